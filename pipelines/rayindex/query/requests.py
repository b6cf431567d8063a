"""The HTTP API's request bodies: /search and /ask as pydantic models (SearchParams/AskParams from
config.py plus the query text), with the limits that bound one request's work. A bad field is a 422
naming it (serve.py's validation handler), never a 5xx."""

from pydantic import Field, FiniteFloat, field_validator, model_validator

from rayindex.config import AskParams, SearchParams

MAX_QUERY_CHARS = 2_000
MAX_K = 100  # hits per /search: bounds the doc-store reads and the response size
# values of a query vector: past the largest embedding models' (4,096); the body limit (gate.py) bounds it too
MAX_VECTOR_VALUES = 16_384
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


def _not_blank(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


def _k_at_most_max(value: int) -> int:
    if value > MAX_K:
        raise ValueError(f"must be at most {MAX_K}")
    return value


class SearchRequest(SearchParams):
    query: str | None = Field(None, max_length=MAX_QUERY_CHARS, description="Text to search for.")
    vector: list[FiniteFloat] | None = Field(
        None,
        max_length=MAX_VECTOR_VALUES,
        description="A vector to search for instead of a text: the index's dimension, finite values (normalized for "
        "metric cosine); dense search only.",
    )

    _query_not_blank = field_validator("query")(_not_blank)
    _k_limit = field_validator("k")(_k_at_most_max)

    @model_validator(mode="after")
    def _query_or_vector(self):
        if (self.query is None) == (self.vector is None):
            raise ValueError("give exactly one of query (text) and vector (a list of numbers)")
        if self.vector is not None and self.mode not in (None, "dense"):
            raise ValueError(f"mode {self.mode} needs query text; a vector is searched with mode dense")
        return self


class AskRequest(AskParams):
    question: str = Field(..., max_length=MAX_QUERY_CHARS, description="The question to answer.")

    _question_not_blank = field_validator("question")(_not_blank)

    @field_validator("k")
    @classmethod
    def _k_limit(cls, value: int) -> int:
        if value > MAX_ASK_K:
            raise ValueError(f"must be at most {MAX_ASK_K}")
        return value
