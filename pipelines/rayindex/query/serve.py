"""RAG serving: a Ray Serve application with a FastAPI ingress over the published index.

Each replica opens the version that <index>/CURRENT names (memory-mapped), encodes queries with
the model from that version's manifest (batched across concurrent requests: query/batching.py),
and watches CURRENT: a new version is loaded in the background and swapped in with one reference
assignment, and every request reads that reference once, so no response mixes two versions.

Deployed the Ray way: `app_builder` takes one argument (AppConfig), so `serve run
rayindex.query.serve:app_builder index=/data/rayindex`, a Serve config file (jobs/serve_config.yaml)
with `serve deploy`, and a KubeRay RayService all start the same application; `rayindex serve` calls
it too (launch.py). Request bodies are requests.py's models; metrics are metrics.py's (Ray Serve's
metrics API, summed over the application's replicas by /metrics). /mcp answers MCP (streamable HTTP, the
tools of mcp_tools.py) behind the same gate as /search, its tools' work within the same admission.

(No `from __future__ import annotations` here: Serve's ingress wrapper makes FastAPI miss string
annotations, and Serve's builder check wants the argument's class, not its name.)
"""

import asyncio
import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import Application
from starlette.types import ASGIApp, Receive, Scope, Send

from rayindex.config import AppConfig, SearchParams
from rayindex.errors import DamagedIndex, RayIndexError, Unavailable, user_message
from rayindex.infra.storage import Store, cache_root, is_remote, use_s3_endpoint
from rayindex.layout import CURRENT
from rayindex.query.batching import QueueBatcher
from rayindex.query.gate import (
    COUNTED_HEADER,
    MCP_PATH,
    RETRY_AFTER_S,
    api_key_from_environment,
    endpoint,
    max_body_from_environment,
    refusal,
)
from rayindex.query.generate import GeneratorError, make_generator
from rayindex.query.metrics import ReplicaMetrics, cluster_metrics
from rayindex.query.requests import AskRequest, SearchRequest, field_problems
from rayindex.query.search import PublishedIndex, open_index
from rayindex.query.sharded import BATCHES_IN_FLIGHT, ShardServer, open_router
from rayindex.text.vectors import ModelUnavailable
from rayindex.versions import current_run_id

log = logging.getLogger("rayindex.serve")

app = FastAPI(title="rayindex", description="Search and retrieval-augmented answers over a rayindex build.")


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with one readable line per bad field ('k: Value error, must be at most 100')."""
    return JSONResponse(status_code=422, content={"detail": field_problems(exc.errors())})


class ReplicaGate:
    """The proxy's checks again (gate.py `refusal`: the proxy may run without them, and through HAProxy requests
    come straight to the replica), then the request, counted and timed in the replica's metrics, its response
    marked counted. A plain ASGI middleware: Starlette's @app.middleware("http") spent 0.35 ms of CPU more per
    request (a task and two memory streams each; 826 against 458 us for a /search through FastAPI, measured with
    httpx's ASGI transport)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state, path, start = scope["app"].state, scope["path"], time.perf_counter()  # Starlette sets "app"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refused = refusal(scope["method"], path, headers, getattr(state, "api_key", None), MAX_BODY_BYTES)
        metrics = getattr(state, "metrics", None)
        status = 500  # what an app that fails before answering answers (Starlette's ServerErrorMiddleware)

        async def counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if metrics is not None:  # the proxy's gate counts the responses without it
                    message = {**message, "headers": [*message.get("headers", []), (COUNTED_HEADER, b"1")]}
            await send(message)

        try:
            if refused:
                code, detail, extra = refused
                await JSONBody({"detail": detail}, code, extra)(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            if metrics is not None:
                metrics.requests.inc(tags={"endpoint": endpoint(path), "status": str(status)})
                metrics.latency.observe(time.perf_counter() - start, tags={"endpoint": endpoint(path)})


class JSONBody(Response):
    """A JSON response serialized once, by orjson: a body FastAPI is handed as a dict goes through
    jsonable_encoder first, 199 us for a /search body of 10 hits (5.5 kB) against orjson's 2.5 us (measured).
    What orjson cannot write (bytes, sets, pydantic models) is handed to jsonable_encoder."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content, default=jsonable_encoder, option=orjson.OPT_SERIALIZE_NUMPY)


app.add_middleware(ReplicaGate)


def without_paths(text: str, folders: dict[str, str]) -> str:
    """text with each server folder (path -> what a client reads instead) replaced, the longest first: a client
    learns which file of which version, never where the server keeps it."""
    for folder, name in sorted(folders.items(), key=lambda item: -len(item[0])):
        text = text.replace(folder, name)
    return text


def shed(status: int, detail: str) -> JSONResponse:
    """A fast refusal the client should retry: 503 (busy) or 504 (too slow), with Retry-After."""
    return JSONResponse(status_code=status, content={"detail": detail}, headers={"Retry-After": str(RETRY_AFTER_S)})


def sharded_response(loaded: PublishedIndex, missing: set) -> dict:
    """What a sharded search's response adds: {partial, missing_shards} ({} when not sharded)."""
    return {"partial": bool(missing), "missing_shards": sorted(missing)} if loaded.shards is not None else {}


def ranked_hits(
    loaded: PublishedIndex, queries: list[str] | list[np.ndarray], params: SearchParams, missing: set
) -> list[list[dict]]:
    """The hits of queries sharing params (texts, in one model call, or query vectors) in one search, read from the
    doc store in the same worker thread; missing: the shards that did not answer. Each request's hits read in a
    thread of their own, one more round trip from the event loop, made the search in the replica 1.34 and 1.62 ms
    slower than in process at one client (two runs of benchmarks/serve_benchmark.py, interleaved); read here,
    -0.02 to 0.65 ms (three runs)."""
    if isinstance(queries[0], np.ndarray):
        found = loaded.search_documents(
            np.vstack(queries), params.k, params.nprobe, params.per_document, params.filter, missing
        )
    else:
        found = loaded.rank(queries, params.k, params.nprobe, params.per_document, params.filter, params.mode, missing)
    return [loaded.hits(row) for row in found]


class Refused(RayIndexError):
    """A request the replica does not answer: its HTTP status and message, and whether to retry it (Retry-After).
    An MCP tool reports it as its error (mcp_tools.py)."""

    def __init__(self, status: int, detail: str, retry: bool = False):
        super().__init__(detail)
        self.status, self.retry = status, retry

    def response(self) -> JSONResponse:
        if self.retry:
            return shed(self.status, str(self))
        return JSONResponse(status_code=self.status, content={"detail": str(self)})


class Handoff(Response):
    """Another ASGI app's answer to the same request (the MCP transport's): FastAPI sends the Response an endpoint
    returns by calling it with the request's scope, receive and send."""

    def __init__(self, app: ASGIApp):
        self.app, self.background = app, None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def mcp_over_http(search, fetch) -> tuple[ASGIApp | None, str | None]:
    """(the MCP tools over streamable HTTP (mcp_tools.StatelessHttp), None) or, without the mcp extra, (None, what to
    install)."""
    try:
        from rayindex.query.mcp_tools import StatelessHttp, mcp_server
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "mcp":
            raise
        return None, user_message(exc)
    return StatelessHttp(mcp_server(search, fetch), MAX_BODY_BYTES), None


# Load is shed in the replica, not queued: Serve hands it up to MAX_ONGOING_REQUESTS requests at once, so
# /healthz is never stuck in the proxy's queue behind searches; the replica works on max_inflight
# searches (two full batches: with Serve's default of 5 ongoing requests the batches
# starve, measured 9.6 QPS and 2.9 s p50 at 32 clients) and answers the rest 503 at once. Past
# MAX_QUEUED_REQUESTS waiting in the proxy, Serve itself answers 503 with Retry-After.
MAX_ONGOING_REQUESTS = 1024
MAX_QUEUED_REQUESTS = 1024
SEARCH_BATCH = 32  # queries encoded and searched together at most: FAISS parallelizes over a batch
MAX_BODY_BYTES = max_body_from_environment()
# Serve replaces a replica after 3 failed health checks (check_health: its version's files are damaged): one
# every 2 s makes that ~6 s, instead of ~30 s at Serve's default period of 10 s
HEALTH_CHECK_PERIOD_S = 2


@serve.deployment(
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    max_queued_requests=MAX_QUEUED_REQUESTS,
    health_check_period_s=HEALTH_CHECK_PERIOD_S,
)
@serve.ingress(app)
class RagService:
    def __init__(self, config: dict, shards: list | None = None):
        self.config = AppConfig(**config)
        self.shard_handles = shards or []  # sharded serving: the shard deployments (query/sharded.py), one per part
        use_s3_endpoint(self.config.s3_endpoint)
        self.current: PublishedIndex = self._load(None)
        self.degraded: dict | None = None  # the newest version CURRENT named that this replica refused, and why
        self.damaged: str | None = None  # why the version served cannot answer (its files are damaged): unhealthy
        self.inflight = 0
        # the requests that queue while a batch runs are the next one; alone, a search runs at once
        self.batcher = QueueBatcher(self._search_batch, SEARCH_BATCH, BATCHES_IN_FLIGHT)
        self.generator = make_generator(self.config, self._encode_now)
        self.mcp_http, self.mcp_missing = mcp_over_http(self._mcp_search, self._mcp_fetch)
        app.state.api_key = self.config.api_key or api_key_from_environment()
        app.state.metrics = ReplicaMetrics()
        app.state.metrics.serving.set(1, tags={"version": self.current.run_id})
        self._stop = threading.Event()
        threading.Thread(target=self._watch_current, daemon=True, name="rayindex-watch-current").start()

    def _load(self, previous: PublishedIndex | None) -> PublishedIndex:
        """Open the version CURRENT names (every serving file checked against its sha256), reusing the loaded
        model when the new version uses the same one. Sharded: the router's side of the version, once every
        shard has it loaded (or has been asked to)."""
        if self.config.shards:
            loaded = open_router(self.config, self.shard_handles)
            loaded.shards.prepare()
        else:
            loaded = open_index(self.config.index)
        loaded.docs.open_all()  # every doc store file's footer checked now: a damaged one is refused, not served
        if previous is not None and previous.manifest.model.name == loaded.manifest.model.name:
            loaded.model = previous.model
        try:
            loaded.encode(["warm-up"])  # load the model and touch the index before taking traffic
        except ModelUnavailable as exc:  # vectors made elsewhere, their model not here: searched by vector only
            log.warning("version %s: %s", loaded.run_id, self._message(exc))
        return loaded

    def _watch_current(self) -> None:
        output = Store(self.config.index)
        while not self._stop.wait(self.config.poll_interval):
            # Ray exports a gauge only in the export rounds (10 s by default) in which it was recorded: set
            # once, this replica's version vanished from /metrics two rounds after it started (measured).
            app.state.metrics.serving.set(1, tags={"version": self.current.run_id})
            named = None
            try:
                named = current_run_id(output)
                if named == self.current.run_id:
                    self.degraded = None  # CURRENT is back on the version served
                    continue
                if self.degraded and self.degraded["version"] == named:
                    continue  # refused it already: look again when CURRENT names another
                new = self._load(self.current)
            except Exception as exc:  # keep serving the old version
                self._refuse(named, output, exc)
                continue
            old = self.current
            self.current, self.degraded, self.damaged = new, None, None  # one assignment: the old or the new version
            metrics = app.state.metrics
            metrics.serving.set(0, tags={"version": old.run_id})
            metrics.serving.set(1, tags={"version": new.run_id})
            metrics.swaps.inc()
            log.info("now serving %s (was %s)", new.run_id, old.run_id)

    def _refuse(self, run_id: str | None, output: Store, exc: Exception) -> None:
        """Report a version this replica will not serve: in /healthz, and in the log once (not every poll)."""
        reason = self._message(exc)
        if self.degraded != {"version": run_id, "reason": reason}:
            log.warning(
                "not serving the version %s names (%s): %s; still serving %s",
                output.url(CURRENT),
                run_id,
                reason,
                self.current.run_id,
            )
        self.degraded = {"version": run_id, "reason": reason}

    def _message(self, exc: BaseException) -> str:
        """What a client may read of an error: user_message without the server's folders."""
        return self._public(user_message(exc))

    def _public(self, text: str) -> str:
        index = self.config.index
        local = {} if is_remote(index) else {index.rstrip("/"): "<index>", str(Path(index).resolve()): "<index>"}
        return without_paths(text, {**local, str(cache_root()): "<cache>"})

    def _damaged(self, loaded: PublishedIndex, exc: DamagedIndex) -> str:
        """The message naming the damaged file (a 503's); when it belongs to the version served, this replica cannot
        answer searches: it fails its health checks from now on (/healthz 503, check_health), and Serve replaces it."""
        message = self._message(exc)
        if loaded is self.current and self.damaged is None:
            self.damaged = message
            log.error("the version served (%s) is damaged: %s; failing health checks", loaded.run_id, message)
        return message

    def check_health(self) -> None:
        """Serve's health check: fails while the version served is damaged."""
        if self.damaged:
            raise RuntimeError(f"cannot answer searches: {self.damaged}")

    def _encode_now(self, texts: list[str]) -> np.ndarray:
        return self.current.encode(texts)

    async def _search_batch(
        self, items: list[tuple[PublishedIndex, str | np.ndarray, SearchParams]]
    ) -> list[tuple[list, set]]:
        """Concurrent requests' queries encoded in one model call and searched in one FAISS call (sharded: one
        call per shard) per (version, texts or vectors, nprobe, passages per document, filter) group: FAISS
        parallelizes over a batch, while many single-query searches from threads each start OpenMP teams and
        oversubscribe the cores (measured: 6 QPS at 32 clients). Each request gets its hits and the shards that did
        not answer."""
        out: list = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, (loaded, query, params) in enumerate(items):
            key = (
                id(loaded),
                isinstance(query, np.ndarray),
                params.k,
                params.nprobe,
                params.per_document,
                json.dumps(params.filter, sort_keys=True),
                params.mode,
            )
            groups.setdefault(key, []).append(i)
        for positions in groups.values():
            loaded, _, params = items[positions[0]]
            missing: set = set()
            try:
                hits = await asyncio.to_thread(ranked_hits, loaded, [items[i][1] for i in positions], params, missing)
            except Exception as exc:  # this group's requests fail alike; the batch's other groups still answer
                for i in positions:
                    out[i] = exc
                continue
            for row, i in enumerate(positions):
                out[i] = (hits[row], missing)
        return out

    async def _retrieve(
        self, loaded: PublishedIndex, query: str | np.ndarray, params: SearchParams
    ) -> tuple[list[dict], dict]:
        """The hits for a query text or vector (query_vectors': searched dense, in a batch of vectors like texts
        are), and what a sharded response adds: {partial, missing_shards} ({} when not sharded)."""
        vector = isinstance(query, np.ndarray)
        params = params.model_copy(
            update={
                "nprobe": loaded.check_nprobe(params.nprobe),
                "mode": "dense" if vector else loaded.check_mode(params.mode),
            }
        )
        if params.filter:  # a bad filter is this request's 422 here, not an error for the whole batch
            await asyncio.to_thread(loaded.matching_ids, params.filter)
        hits, missing = await self.batcher.submit((loaded, query, params))
        return hits, sharded_response(loaded, missing)

    async def _limited(self, work, loaded: PublishedIndex):
        """Run a search (or an answer, or a document's fetch) within max_inflight and request_timeout; Refused when
        it is refused, too slow, asks for the impossible or meets damaged files."""
        if self.inflight >= self.config.max_inflight:
            work.close()  # never started
            raise Refused(
                503, f"busy: {self.inflight} searches in progress on this replica; retry after {RETRY_AFTER_S} s", True
            )
        self.inflight += 1
        try:
            return await asyncio.wait_for(work, self.config.request_timeout)
        except asyncio.TimeoutError:
            raise Refused(
                504, f"no answer within {self.config.request_timeout:g} s; retry after {RETRY_AFTER_S} s", True
            ) from None
        except Unavailable as exc:
            raise Refused(503, f"{self._message(exc)}; retry after {RETRY_AFTER_S} s", True) from None
        except DamagedIndex as exc:
            raise Refused(503, self._damaged(loaded, exc)) from None
        except RayIndexError as exc:
            raise Refused(422, self._message(exc)) from None
        finally:
            self.inflight -= 1

    async def _admitted(self, work, loaded: PublishedIndex):
        """_limited's result (a body: serialized once, JSONBody), or the JSON error response of its refusal."""
        try:
            result = await self._limited(work, loaded)
        except Refused as refused:
            return refused.response()
        return result if isinstance(result, Response) else JSONBody(result)

    async def _search_body(self, loaded: PublishedIndex, request: SearchRequest, start: float) -> dict:
        """A /search response's body: the version, the hits (sharded: partial, missing_shards) and the time taken."""
        # a vector is checked here (a wrong dimension is this request's 422), not in its batch
        query = request.query if request.vector is None else loaded.query_vectors(request.vector)
        hits, sharding = await self._retrieve(loaded, query, request)
        return {
            "version": loaded.run_id,
            "hits": hits,
            **sharding,
            "timings_ms": {"total": round(1000 * (time.perf_counter() - start), 2)},
        }

    @app.post("/search")
    async def search(self, request: SearchRequest):
        loaded = self.current  # one version for the whole request
        return await self._admitted(self._search_body(loaded, request, time.perf_counter()), loaded)

    async def _mcp_search(self, request: SearchRequest) -> dict:
        """The MCP tool `search`: /search's work, admitted like a /search (its Refused is the tool's error)."""
        loaded = self.current
        return await self._limited(self._search_body(loaded, request, time.perf_counter()), loaded)

    async def _mcp_fetch(self, doc_id: str | int) -> dict:
        """The MCP tool `fetch_document`: the document's passages from the doc store, admitted like a /search."""
        loaded = self.current

        async def work():
            passages = await asyncio.to_thread(loaded.document, doc_id)
            return {"version": loaded.run_id, "id": doc_id, "passages": passages}

        return await self._limited(work(), loaded)

    @app.api_route(MCP_PATH, methods=["GET", "POST", "DELETE"], include_in_schema=False)
    async def mcp(self, request: Request):
        """MCP over streamable HTTP (mcp_tools.py: the tools search and fetch_document), behind the gate's token and
        body checks like /search; 501 naming the extra to install when the mcp package is missing."""
        if self.mcp_http is None:
            return JSONResponse(status_code=501, content={"detail": self.mcp_missing})
        return Handoff(self.mcp_http)

    @app.post("/ask")
    async def ask(self, request: AskRequest):
        loaded = self.current
        start = time.perf_counter()

        async def work():
            hits, sharding = await self._retrieve(loaded, request.question, request)
            retrieved = time.perf_counter()
            sources = [{"n": n, **hit} for n, hit in enumerate(hits, 1)]
            body = {"version": loaded.run_id, "generator": self.config.generator, "sources": sources, **sharding}
            try:
                answer = await asyncio.to_thread(self.generator.generate, request.question, hits)
            except GeneratorError as exc:  # the sources are still useful when the generator is down
                body.update(detail=str(exc), answer=None)
                return JSONResponse(status_code=exc.status_code, content=body)
            done = time.perf_counter()
            body.update(
                answer=answer,
                timings_ms={
                    "retrieve": round(1000 * (retrieved - start), 2),
                    "generate": round(1000 * (done - retrieved), 2),
                    "total": round(1000 * (done - start), 2),
                },
            )
            return body

        return await self._admitted(work(), loaded)

    @app.get("/healthz")
    async def healthz(self):
        """Answered by the event loop at once, never queued behind searches; "degraded" (still 200: the
        replica serves the version it has) when CURRENT names a version it refused; "damaged" (503: a load
        balancer must stop sending searches here) when the version served cannot answer. Sharded:
        failing_shards, the shards whose last call failed, and why."""
        loaded = self.current
        body = {
            "status": "damaged" if self.damaged else "degraded" if self.degraded else "ok",
            "version": loaded.run_id,
            "documents": loaded.manifest.counts.docs_encoded,
            "vectors": loaded.ntotal,
            "shards": self.config.shards,
            **(
                {"failing_shards": {str(k): self._public(why) for k, why in sorted(loaded.shards.failing.items())}}
                if loaded.shards
                else {}
            ),
            "index_string": loaded.manifest.index_string,
            "in_flight": self.inflight,
            "degraded": self.degraded,
            "damaged": self.damaged,
        }
        return JSONResponse(status_code=503, content=body) if self.damaged else body

    @app.get("/metrics")
    async def metrics(self):
        """This application's request metrics summed over its replicas (Prometheus text)."""
        text = await asyncio.to_thread(cluster_metrics, serve.get_replica_context().app_name)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def app_builder(config: AppConfig) -> Application:
    """The application, for `serve run rayindex.query.serve:app_builder index=...`, a Serve config's
    import_path (with `args:`), and `rayindex serve`. Replicas get the S3 endpoint of the config (or of
    this process) in the config they are bound with, not in ray_actor_options: a Serve config's
    ray_actor_options replace the application's whole (tests/test_manifests.py), and would drop it. An
    s3:// index's serving files are pulled into each replica's node-local cache.
    shards=N: N ShardServer deployments (shard-0..N-1: replicas, autoscaling) behind the RagService router."""
    config = config.model_copy(update={"s3_endpoint": config.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")})
    replicas = (
        {"num_replicas": config.replicas} if config.replicas else {}
    )  # else Serve's default or the config's autoscaling
    shards = None
    if config.shards:
        scaling = (
            {"autoscaling_config": {"min_replicas": config.shard_replicas, "max_replicas": config.shard_max_replicas}}
            if config.shard_max_replicas
            else {"num_replicas": config.shard_replicas}
        )
        shards = [
            ShardServer.options(
                name=f"shard-{part}", ray_actor_options={"num_cpus": config.shard_cpus}, **scaling
            ).bind(config.model_dump(), config.shards, part)
            for part in range(config.shards)
        ]
    return RagService.options(ray_actor_options={"num_cpus": config.replica_cpus}, **replicas).bind(
        config.model_dump(), shards
    )
