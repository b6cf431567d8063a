"""The checks every request passes before its body is read: a declared body size (413 past the limit,
411 for a POST that declares none), when RAYINDEX_API_KEY is set the bearer token (401), and in the proxy
the number of searches in flight (503 + Retry-After past RAYINDEX_PROXY_MAX_INFLIGHT). A pure
ASGI middleware, light to import: it runs in Ray Serve's HTTP proxy, installed with
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=rayindex.query.gate:middlewares (`rayindex serve` sets it for
the Ray it starts; on a cluster, set it in the nodes' environment), where a refused body is never read,
and in each replica (query/serve.py), where the same checks guard a proxy that lacks them.

Measured without it: an unauthenticated 400 MB body took 9 s to be refused, the proxy having read it all.
"""

from __future__ import annotations

import hmac
import json
import os

API_KEY_ENV = "RAYINDEX_API_KEY"
MAX_BODY_ENV = "RAYINDEX_MAX_BODY_BYTES"
MAX_INFLIGHT_ENV = "RAYINDEX_PROXY_MAX_INFLIGHT"
DEFAULT_MAX_BODY_BYTES = 1 << 20  # a query is at most 2,000 characters: 1 MiB is generous
# Searches one proxy lets through at once; the rest get 503 + Retry-After from the proxy itself. Shedding
# in the replica alone was not enough: each request that reaches a replica costs Serve two actor calls,
# and 1,000 concurrent ones on 2 cores made even the refusals take 34 s (benchmarks/load_benchmark.py).
DEFAULT_PROXY_MAX_INFLIGHT = 128
SHED_PATHS = frozenset({"/search", "/ask"})
RETRY_AFTER_S = 1
OPEN_PATHS = frozenset({"/healthz", "/-/healthz", "/-/routes"})  # load balancer probes (Serve's own too)
CALLBACK = "rayindex.query.gate:middlewares"


def api_key_from_environment() -> str | None:
    """RAYINDEX_API_KEY, None when unset; set but empty is refused (it would silently turn auth off)."""
    value = os.environ.get(API_KEY_ENV)
    if value is None:
        return None
    if not value.strip():
        raise ValueError(f"{API_KEY_ENV} is set but empty: set a secret, or unset it to serve without authentication")
    return value


def authorized(header: str | bytes | None, api_key: str | None) -> bool:
    """Whether an Authorization header carries the API key, compared in constant time."""
    if not api_key:
        return True
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    presented = header[len("Bearer ") :] if header and header.startswith("Bearer ") else ""
    return hmac.compare_digest(presented.encode(), api_key.encode())


def refusal(
    method: str, path: str, headers: dict[str, str], api_key: str | None, max_body: int
) -> tuple[int, str, dict] | None:
    """(status, detail, extra headers) for a request to refuse before reading its body, or None."""
    if path not in OPEN_PATHS and not authorized(headers.get("authorization"), api_key):
        return (
            401,
            "missing or wrong bearer token (Authorization: Bearer <RAYINDEX_API_KEY>)",
            {"www-authenticate": "Bearer"},
        )
    length = headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            return 400, "Content-Length is not a number", {}
        if declared > max_body:
            return 413, f"request body of {declared} bytes is over the limit of {max_body} bytes ({MAX_BODY_ENV})", {}
    elif method == "POST" and "chunked" in headers.get("transfer-encoding", ""):
        return 411, "send a Content-Length: bodies without one are refused", {}
    return None


class Gate:
    """ASGI middleware applying `refusal` to HTTP requests, and shedding searches past max_inflight."""

    def __init__(
        self, app, api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY_BYTES, max_inflight: int | None = None
    ):
        self.app, self.api_key, self.max_body, self.max_inflight = app, api_key, max_body, max_inflight
        self.inflight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        refused = refusal(scope.get("method", ""), path, headers, self.api_key, self.max_body)
        if refused is None and self.max_inflight and path in SHED_PATHS and self.inflight >= self.max_inflight:
            refused = (
                503,
                f"busy: {self.inflight} searches in flight; retry after {RETRY_AFTER_S} s",
                {"retry-after": str(RETRY_AFTER_S)},
            )
        if refused is not None:
            return await respond(send, *refused)
        counted = path in SHED_PATHS
        self.inflight += counted
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= counted


async def respond(send, status: int, detail: str, extra: dict) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *[(k.encode(), v.encode()) for k, v in extra.items()],
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def max_body_from_environment() -> int:
    return int(os.environ.get(MAX_BODY_ENV) or DEFAULT_MAX_BODY_BYTES)


def middlewares() -> list:
    """Serve's HTTP proxy callback: the Gate with this process's RAYINDEX_API_KEY and body limit."""
    from starlette.middleware import Middleware

    max_inflight = int(os.environ.get(MAX_INFLIGHT_ENV) or DEFAULT_PROXY_MAX_INFLIGHT)
    return [
        Middleware(
            Gate, api_key=api_key_from_environment(), max_body=max_body_from_environment(), max_inflight=max_inflight
        )
    ]
