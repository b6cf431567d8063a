"""A client of a running `rayindex serve`: `ServerIndex(url).search(...)` answers with the hits
`PublishedIndex.search` returns (the same dicts), from POST /search. Light to import (httpx and the request
models, no torch, FAISS or Ray): `rayindex search --server` and the framework retrievers
(integrations/) search without loading the model.

The arguments are checked with the server's own request model (requests.py) before anything is sent, so a
bad one is refused here with the text the server's 422 would carry. What the server answers is not trusted:
a body that is not a list of hits is refused naming the URL."""

from __future__ import annotations

import os
import ssl

import httpx
from pydantic import ValidationError

from rayindex.config import API_KEY_ENV
from rayindex.errors import RayIndexError, Unavailable, UsageError, quoted
from rayindex.query.requests import SearchRequest, field_problems

# Above a server's default time for a search (request_timeout, 10 s) and its proxy's (5 s more): a slow server
# answers 504 itself before the client gives up.
DEFAULT_TIMEOUT_S = 30.0
# A client of an http:// URL never speaks TLS (it follows no redirects), but httpx makes its TLS context up front:
# the default one loads the CA bundle, 74 ms of every `rayindex search --server` on this 2-core machine (measured);
# this one loads nothing.
NO_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
HIT_FIELDS = ("id", "score", "passage", "start", "end", "text", "metadata")  # of every hit (PublishedIndex.hits)


class ServerIndex:
    """A running `rayindex serve` at url (http(s)://host:port), searched like a PublishedIndex, sending api_key
    (default: RAYINDEX_API_KEY) as a bearer token. One connection pool for the synchronous searches (safe from
    several threads); each asearch uses a client of its own event loop."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S):
        try:
            parsed = httpx.URL(str(url))
        except httpx.InvalidURL as exc:
            raise UsageError(f"server URL {quoted(url)}: {exc}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise UsageError(f"server URL {quoted(url)}: give http(s)://host:port, e.g. http://127.0.0.1:8000")
        self.url = str(url).rstrip("/")
        self.api_key, self.timeout = api_key or os.environ.get(API_KEY_ENV) or None, timeout
        self.headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.verify = True if parsed.scheme == "https" else NO_TLS
        self._client = httpx.Client(timeout=timeout, headers=self.headers, verify=self.verify)

    def __repr__(self) -> str:  # never the key
        return f"ServerIndex({self.url!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ServerIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def search(
        self,
        query: str,
        k: int | None = None,
        nprobe: int | None = None,
        per_document: int | None = None,
        filter: dict | None = None,
        mode: str | None = None,
    ) -> list[dict]:
        """The server's hits for the query: {id, score, passage, start, end, text, metadata} each, best first
        (PublishedIndex.search's arguments; None: the server's default)."""
        return self._post(request_body(query, k=k, nprobe=nprobe, per_document=per_document, filter=filter, mode=mode))

    def search_vector(
        self,
        vector,
        k: int | None = None,
        nprobe: int | None = None,
        per_document: int | None = None,
        filter: dict | None = None,
    ) -> list[dict]:
        """The server's hits for a query vector (PublishedIndex.search_vector's arguments): /search with "vector"."""
        values = [float(v) for v in vector]
        body = request_body(None, vector=values, k=k, nprobe=nprobe, per_document=per_document, filter=filter)
        return self._post(body)

    def _post(self, body: dict) -> list[dict]:
        try:
            response = self._client.post(f"{self.url}/search", json=body)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from None
        return self.hits(response)

    async def asearch(
        self,
        query: str,
        k: int | None = None,
        nprobe: int | None = None,
        per_document: int | None = None,
        filter: dict | None = None,
        mode: str | None = None,
    ) -> list[dict]:
        """search, without blocking the event loop."""
        body = request_body(query, k=k, nprobe=nprobe, per_document=per_document, filter=filter, mode=mode)
        async with httpx.AsyncClient(timeout=self.timeout, headers=self.headers, verify=self.verify) as client:
            try:
                response = await client.post(f"{self.url}/search", json=body)
            except httpx.TransportError as exc:
                raise self.unreachable(exc) from None
        return self.hits(response)

    def unreachable(self, exc: httpx.TransportError) -> Unavailable:
        if isinstance(exc, httpx.TimeoutException):
            return Unavailable(
                f"{self.url} did not answer within {self.timeout:g} s ({type(exc).__name__}); retry, or give the "
                "client a longer timeout"
            )
        return Unavailable(
            f"could not reach {self.url} ({exc or type(exc).__name__}): is `rayindex serve` running there?"
        )

    def hits(self, response: httpx.Response) -> list[dict]:
        """The hits of a 200; any other status raised as the error it stands for, with the server's detail."""
        try:
            body = response.json()
        except ValueError:
            body = None
        status, where = response.status_code, f"{self.url}/search"
        if status == 200:
            hits = body.get("hits") if isinstance(body, dict) else None
            if not isinstance(hits, list) or not all(isinstance(h, dict) and set(HIT_FIELDS) <= h.keys() for h in hits):
                raise RayIndexError(f"{where} answered 200 without a list of hits: is {self.url} a rayindex server?")
            return hits
        detail = body.get("detail") if isinstance(body, dict) else None
        detail = detail if isinstance(detail, str) else quoted(response.text or response.reason_phrase)
        if status == 401:
            raise RayIndexError(
                f"{where} refused the API key given ({detail})"
                if self.api_key
                else f"{where} needs an API key ({detail}): set {API_KEY_ENV} to the server's key (or pass it: "
                "--api-key, the api_key argument)"
            )
        if status == 422:
            raise UsageError(detail)
        if status in (503, 504):
            raise Unavailable(f"{where}: {detail}")
        raise RayIndexError(f"{where} answered {status}: {detail}")


def request_body(query: str | None, **params) -> dict:
    """The /search body of the arguments given (None: the server's default), checked with the server's model:
    a bad one is a UsageError with the text of the server's 422."""
    given = {name: value for name, value in dict(params, query=query).items() if value is not None}
    try:
        return SearchRequest(**given).model_dump(mode="json", exclude_unset=True)
    except ValidationError as exc:
        raise UsageError(field_problems(exc.errors())) from None
