"""The checks every request passes before its body is read: a declared body size (413 past the limit,
411 for a body without a Content-Length), when RAYINDEX_API_KEY is set the bearer token (401), and in the proxy
the number of searches in flight (503 + Retry-After past RAYINDEX_PROXY_MAX_INFLIGHT). A pure
ASGI middleware, light to import: it runs in Ray Serve's HTTP proxy, installed with
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=rayindex.query.gate:middlewares (`rayindex serve` sets it for
the Ray it starts; on a cluster, set it in the nodes' environment), where a refused body is never read,
and in each replica (query/serve.py), where the same checks guard a proxy that lacks them.

In the proxy it also caps the bytes it lets the proxy read (413 past the limit, whatever the headers said),
answers searches 503 + Retry-After when no replica answers (instead of letting them wait for a replacement),
and counts the responses no replica counted (its refusals, Serve's own 408/500/503) in rayindex_requests.

Measured without it: an unauthenticated 400 MB body took 9 s to be refused, the proxy having read it all.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections.abc import Callable

from rayindex.config import API_KEY_ENV  # the bearer token's variable: the CLI's --api-key reads it too

MAX_BODY_ENV = "RAYINDEX_MAX_BODY_BYTES"
MAX_INFLIGHT_ENV = "RAYINDEX_PROXY_MAX_INFLIGHT"
DEFAULT_MAX_BODY_BYTES = 1 << 20  # a query is at most 2,000 characters: 1 MiB is generous
# Searches one proxy lets through at once; the rest get 503 + Retry-After from the proxy itself. Shedding
# in the replica alone was not enough: each request that reaches a replica costs Serve two actor calls,
# and 1,000 concurrent ones on 2 cores made even the refusals take 34 s (benchmarks/load_benchmark.py).
DEFAULT_PROXY_MAX_INFLIGHT = 128
MCP_PATH = "/mcp"  # MCP over streamable HTTP (query/mcp_tools.py): its tool calls are searches
SHED_PATHS = frozenset({"/search", "/ask", MCP_PATH})
ENDPOINTS = ("/search", "/ask", MCP_PATH, "/healthz", "/metrics")  # metric labels; every other path is "other"
# the replicas' request counter (query/metrics.py), which the proxy's counts join
REQUESTS_METRIC, REQUESTS_DOC = "rayindex_requests", "HTTP requests"
RETRY_AFTER_S = 1
OPEN_PATHS = frozenset({"/healthz", "/-/healthz", "/-/routes"})  # load balancer probes (Serve's own too)
CALLBACK = "rayindex.query.gate:middlewares"
APPLICATION = (
    "rayindex"  # the Serve application's name (`rayindex serve`, jobs/serve_config.yaml): the proxy's counts go to it
)
# A response a replica counted carries this header (query/serve.py); the proxy's gate counts the others and
# removes it
COUNTED_HEADER = b"x-rayindex-counted"
# Serve's proxy waits for a replica without limit: after a SIGKILL the next search waited 12.7 s for the
# replacement, the one in flight 15 s for a 408. A search without an answer after PROBE_AFTER_S makes the
# gate ask the app for /healthz (a live replica answers it from its event loop at once, never queued
# behind searches); no answer within PROBE_TIMEOUT_S: no replica is up, and searches get 503 + Retry-After
# until a probe is answered again.
PROBE_AFTER_S = 2.0
PROBE_TIMEOUT_S = 2.0


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


def endpoint(path: str) -> str:
    """The endpoint label of a path in the metrics."""
    return path if path in ENDPOINTS else "other"


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
    # Any Transfer-Encoding (coding names are case-insensitive, RFC 9112: "Chunked" is chunked) means a body
    # of undeclared size: refused, so that only a declared Content-Length is ever read
    if headers.get("transfer-encoding", "").strip():
        return 411, "send a Content-Length: bodies without one (Transfer-Encoding) are refused", {}
    length = headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            return 400, "Content-Length is not a number", {}
        if declared > max_body:
            return 413, too_large(f"request body of {declared} bytes", max_body), {}
    return None


def too_large(what: str, max_body: int) -> str:
    return f"{what} is over the limit of {max_body} bytes ({MAX_BODY_ENV})"


class Gate:
    """ASGI middleware applying `refusal` to HTTP requests, capping the body bytes read, shedding searches past
    max_inflight, and, given probe_after_s, answering searches 503 while the app does not answer /healthz.
    count(endpoint, status) is called for every response the app did not mark as counted."""

    def __init__(
        self,
        app,
        api_key: str | None = None,
        max_body: int = DEFAULT_MAX_BODY_BYTES,
        max_inflight: int | None = None,
        probe_after_s: float | None = None,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
        count: Callable[[str, int], None] | None = None,
    ):
        self.app, self.api_key, self.max_body, self.max_inflight = app, api_key, max_body, max_inflight
        self.probe_after_s, self.probe_timeout_s, self.count = probe_after_s, probe_timeout_s, count
        self.inflight = 0
        self.down = False  # the last probe went unanswered: searches get 503 until one is answered
        self._probe: asyncio.Future | None = None
        self._probed_at = -float("inf")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        refused = refusal(scope.get("method", ""), path, headers, self.api_key, self.max_body)
        if refused is None and path in SHED_PATHS:
            refused = self.shedding(scope)
        if refused is not None:
            return await self.respond(send, path, *refused)
        counted = path in SHED_PATHS
        self.inflight += counted
        try:
            await self.forward(scope, receive, send, path)
        finally:
            self.inflight -= counted

    def shedding(self, scope) -> tuple[int, str, dict] | None:
        """503 + Retry-After for a search past max_inflight, or while no replica answers (then a probe is
        started, at most one a RETRY_AFTER_S, so that the first search after a replica is back gets through)."""
        if self.max_inflight and self.inflight >= self.max_inflight:
            return busy(f"busy: {self.inflight} searches in flight")
        if self.down:
            self.probe(scope)
            return busy("no replica of the service is answering (restarting?)")
        return None

    async def forward(self, scope, receive, send, path: str) -> None:
        """The app's answer, unless the body goes past max_body while it is read (413: reading stops) or, for a
        search, no replica answers a probe while it waits (503 + Retry-After): the app's call is then cancelled
        and its messages dropped."""
        read, over, started, answered = 0, asyncio.Event(), asyncio.Event(), False

        async def capped_receive():
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_body:  # whatever the headers said: the proxy reads no more of it
                    over.set()
                    return {"type": "http.disconnect"}
            return message

        async def watched_send(message):
            if answered or over.is_set():  # the gate answers (or answered) this request itself
                return
            if message["type"] == "http.response.start":
                started.set()
                message = self.uncounted(message, path)
            await send(message)

        call = asyncio.ensure_future(self.app(scope, capped_receive, watched_send))
        refused = await self.watch(call, over, started, scope if path in SHED_PATHS else None)
        if refused is None:
            return await call
        answered = True
        cancel(call)
        if not started.is_set():
            await self.respond(send, path, *refused)

    async def watch(self, call: asyncio.Future, over: asyncio.Event, started: asyncio.Event, probing):
        """Wait for the app's call; a refusal instead when the body goes over the limit, or (probing: the scope of
        a search) when the app has not started answering after probe_after_s and does not answer a probe."""
        overflow = asyncio.ensure_future(over.wait())
        try:
            while not call.done() and not over.is_set():
                wait_s = self.probe_after_s if probing and self.probe_after_s and not started.is_set() else None
                await asyncio.wait({call, overflow}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
                waiting = not (call.done() or over.is_set() or started.is_set())
                if waiting and wait_s and not await asyncio.shield(self.probe(probing)):
                    return busy("no replica of the service answered")
        finally:
            overflow.cancel()
        if over.is_set():
            return 413, too_large(f"request body of more than {self.max_body} bytes", self.max_body), {}
        return None

    def probe(self, scope) -> asyncio.Future:
        """Whether the app answers GET /healthz within probe_timeout_s (self.down is set from it): one probe at a
        time, shared by every request waiting, a new one at most every RETRY_AFTER_S."""
        if self._probe is None or (self._probe.done() and time.monotonic() - self._probed_at >= RETRY_AFTER_S):
            self._probed_at = time.monotonic()
            self._probe = asyncio.ensure_future(self.answers_health(scope))
        return self._probe

    async def answers_health(self, scope) -> bool:
        probe_scope = {
            **scope,
            "method": "GET",
            "path": "/healthz",
            "raw_path": b"/healthz",
            "query_string": b"",
            "headers": [(k, v) for k, v in scope.get("headers", []) if k.lower() == b"host"],
        }
        sent_request = asyncio.Event()

        async def receive():
            if not sent_request.is_set():
                sent_request.set()
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Event().wait()  # no disconnect: the probe ends when answered or cancelled

        async def ignore(message):
            pass

        call = asyncio.ensure_future(self.app(probe_scope, receive, ignore))
        done, _ = await asyncio.wait({call}, timeout=self.probe_timeout_s)
        if not done:
            cancel(call)
        self.down = not (done and not call.cancelled() and call.exception() is None)
        return not self.down

    def uncounted(self, start: dict, path: str) -> dict:
        """A response start with the replica's counted mark removed; counted here when it has none."""
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != COUNTED_HEADER]
        if len(headers) == len(start.get("headers", [])) and self.count:
            self.count(endpoint(path), start["status"])
        return {**start, "headers": headers}

    async def respond(self, send, path: str, status: int, detail: str, extra: dict) -> None:
        if self.count:
            self.count(endpoint(path), status)
        body = json.dumps({"detail": detail}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *[(k.encode(), v.encode()) for k, v in extra.items()],
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def cancel(call: asyncio.Future) -> None:
    """Cancel an app call the gate no longer waits for; whatever it ends with is nobody's to report."""
    call.cancel()
    call.add_done_callback(lambda done: done.cancelled() or done.exception())


def busy(why: str) -> tuple[int, str, dict]:
    return 503, f"{why}; retry after {RETRY_AFTER_S} s", {"retry-after": str(RETRY_AFTER_S)}


def max_body_from_environment() -> int:
    return int(os.environ.get(MAX_BODY_ENV) or DEFAULT_MAX_BODY_BYTES)


def proxy_counter() -> Callable[[str, int], None]:
    """count(endpoint, status) into rayindex_requests from the proxy process, under the application APPLICATION:
    the replicas' metric (query/metrics.py), same name, description and tag keys, so /metrics sums both."""
    from ray.util.metrics import Counter

    counter = Counter(
        REQUESTS_METRIC, REQUESTS_DOC, tag_keys=("deployment", "replica", "application", "endpoint", "status")
    )
    counter.set_default_tags({"deployment": "proxy", "replica": f"proxy-{os.getpid()}", "application": APPLICATION})
    return lambda path_endpoint, status: counter.inc(tags={"endpoint": path_endpoint, "status": str(status)})


def middlewares() -> list:
    """Serve's HTTP proxy callback: the Gate with this process's RAYINDEX_API_KEY and body limit, probing the
    app when a search waits, counting what the replicas did not."""
    from starlette.middleware import Middleware

    max_inflight = int(os.environ.get(MAX_INFLIGHT_ENV) or DEFAULT_PROXY_MAX_INFLIGHT)
    return [
        Middleware(
            Gate,
            api_key=api_key_from_environment(),
            max_body=max_body_from_environment(),
            max_inflight=max_inflight,
            probe_after_s=PROBE_AFTER_S,
            count=proxy_counter(),
        )
    ]
