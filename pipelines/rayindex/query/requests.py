"""The HTTP API's request bodies: /search and /ask as pydantic models (SearchParams/AskParams from
config.py plus the query text), with the limits that bound one request's work. A bad field is a 422
naming it (serve.py's validation handler), never a 5xx."""

from pydantic import Field, field_validator

from rayindex.config import AskParams, SearchParams

MAX_QUERY_CHARS = 2_000
MAX_K = 100  # hits per /search: bounds the doc-store reads and the response size
MAX_ASK_K = 20  # passages per /ask: with the sentence budget (generate.MAX_SENTENCES_SCORED) bounds an answer's work


def field_problems(errors: list[dict]) -> str:
    """One readable line per bad field of a request's validation errors ('k: Value error, must be at most 100'),
    joined: a 422's detail (serve.py), an MCP tool's error (mcp_tools.py), and what query/client.py refuses before
    sending, so that all read alike."""
    problems = []
    for err in errors:
        loc = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
        problems.append(f"{loc}: {err['msg']}")
    return "; ".join(problems)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


def _k_at_most_max(value: int) -> int:
    if value > MAX_K:
        raise ValueError(f"must be at most {MAX_K}")
    return value


class SearchRequest(SearchParams):
    query: str = Field(..., max_length=MAX_QUERY_CHARS, description="Text to search for.")

    _query_not_blank = field_validator("query")(_not_blank)
    _k_limit = field_validator("k")(_k_at_most_max)


class AskRequest(AskParams):
    question: str = Field(..., max_length=MAX_QUERY_CHARS, description="The question to answer.")

    _question_not_blank = field_validator("question")(_not_blank)

    @field_validator("k")
    @classmethod
    def _k_limit(cls, value: int) -> int:
        if value > MAX_ASK_K:
            raise ValueError(f"must be at most {MAX_ASK_K}")
        return value
