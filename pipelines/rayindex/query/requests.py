"""The HTTP API's request bodies: /search and /ask as pydantic models (SearchParams/AskParams from
config.py plus the query text), with the limits that bound one request's work. A bad field is a 422
naming it (serve.py's validation handler), never a 5xx."""

from pydantic import Field, field_validator

from rayindex.config import AskParams, SearchParams

MAX_QUERY_CHARS = 2_000
MAX_K = 100  # hits per /search: bounds the doc-store reads and the response size
MAX_ASK_K = 20  # passages per /ask: with the sentence budget (generate.MAX_SENTENCES_SCORED) bounds an answer's work


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


def _k_at_most_max(value: int) -> int:
    if value > MAX_K:
        raise ValueError(f"must be at most {MAX_K}")
    return value


def validation_detail(errors: list[dict]) -> str:
    """One line per bad field, 'k: Value error, must be at most 100': the detail of a 422 from /search and /ask
    (serve.py), and what query/client.py refuses before sending, so that both read alike."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}" for err in errors)


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
