"""Sharded serving on this machine (100M vectors, or 10M): a streaming build of a synthetic IVF-PQ index
(generated chunk by chunk, one build shard at a time, on-disk merge: no step holds more than one shard's
codes in RAM), split into parts for 1 and for 4 serving shards, then served through Ray Serve with the
router and shard deployments of `rayindex serve --shards N` (query/sharded.py):

- identity: the sharded results against the merged (monolithic) index's at the same nprobe, in process;
- QPS, p50/p99 through the router's batched handle (concurrent clients), 1 shard vs 4; with --via http, through
  Serve's HAProxy ingress straight to the router replica (POST /search with a vector, `rayindex serve --ingress
  haproxy`'s path) from a light asyncio client;
- the in-process scan capacity of the same parts (searched as the router and shards search them, no Serve),
  measured in the same run, and the plan's figure (`rayindex plan --serving-shards`): Serve's QPS / capacity;
- where the time goes: batch sizes, the router's seconds per batch, shard calls per batch and their seconds
  in FAISS, CPU per query of the router, the shards and the load generator (psutil); py-spy with --profile;
- RAM per shard replica: anonymous and file-backed (the memory-mapped part) resident memory;
- replica startup with a cold page cache (the part files evicted first); searches are then measured with
  the parts' lists read into the page cache (warm, as a server is after its first minutes).

Vectors are synthetic (no text): the router here is the sharded vector path of the serving app (coarse
assignment, fan-out to the shard deployments, merge) batched as in RagService (query/batching.py, or
Serve's @serve.batch with --batching serve: the code before), without query encoding and the doc store,
which a synthetic collection does not have. The index is the build's choice for --vectors at d 64 unless
--index says otherwise. The build is reused when <dir>/CURRENT names a complete one.

    python benchmarks/sharded_benchmark.py [--vectors 100000000] [--dir /work/bench-sharded] [--index
    IVF2048,PQ16 --nprobe 16] [--rounds 3] [--via handle http] [--profile DIR] [--json docs/benchmark-sharded.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

DIM = 64
BUILD_SHARD_ROWS = 10_000_000
CHUNK_ROWS = 500_000
TRAIN_ROWS = 200_000


def clustered_chunk(start: int, n: int, dim: int = DIM) -> np.ndarray:
    """Rows [start, start + n) of the synthetic collection: points around 4,000 centres spread along a
    24-dimensional subspace (clustered, low intrinsic dimension, like embeddings), the same rows for the
    same start whatever the chunking."""
    rng = np.random.default_rng([7, start])
    basis = np.random.default_rng(99).standard_normal((24, dim)).astype(np.float32) / np.sqrt(24)
    centres = np.random.default_rng(98).standard_normal((4000, dim)).astype(np.float32)
    spread = rng.standard_normal((n, 24), dtype=np.float32) @ basis
    return (
        centres[rng.integers(0, len(centres), n)]
        + 0.5 * spread
        + 0.05 * rng.standard_normal((n, dim), dtype=np.float32)
    )


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build(root: Path, total: int, index_string: str, nprobe: int) -> Path:
    """A published rayindex version of `total` synthetic vectors (no doc store): trained.faiss, one index
    per build shard, the on-disk merge, parts for 1 and 4 serving shards, the manifest, CURRENT."""
    from rayindex.config import BuildConfig
    from rayindex.infra.storage import Store, file_sha256
    from rayindex.ivf.index import make_index, read_index, trained_fingerprint, write_index
    from rayindex.ivf.index_params import parse_index_string
    from rayindex.layout import IVFDATA_FILE, MERGED_FILE, PASSAGE_BITS, SHARD_INDEX_FILE, TRAINED_FILE, shard_dir
    from rayindex.manifest import Counts, Manifest, ModelInfo, TrainedIndex, library_versions, now_iso
    from rayindex.stages.merge import merge_shards
    from rayindex.stages.partition import partition, record
    from rayindex.versions import current_run_id, new_run_id, publish, version_store

    store = Store(str(root))
    if current_run_id(store):
        return root
    run_id = new_run_id()
    version = version_store(store, run_id)
    vdir = version.local_root
    vdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    index = make_index(index_string, DIM, "l2")
    # a sample of the same distribution, not rows of the index; at least the 39 per list FAISS's k-means asks for
    train_rows = max(TRAIN_ROWS, 39 * parse_index_string(index_string, DIM).nlist)
    index.train(clustered_chunk(10**12, train_rows))
    write_index(index, vdir / TRAINED_FILE)
    log(f"trained {index_string} on {train_rows:,} vectors in {time.perf_counter() - started:.0f} s")
    shard_paths, done = [], 0
    for shard_id, start in enumerate(range(0, total, BUILD_SHARD_ROWS)):
        shard = read_index(vdir / TRAINED_FILE)
        for chunk in range(start, min(total, start + BUILD_SHARD_ROWS), CHUNK_ROWS):
            n = min(CHUNK_ROWS, total - chunk, start + BUILD_SHARD_ROWS - chunk)
            shard.add_with_ids(clustered_chunk(chunk, n), (np.arange(chunk, chunk + n, dtype=np.int64) << PASSAGE_BITS))
            done += n
            rate = done / (time.perf_counter() - started)
            log(f"added {done:,}/{total:,} vectors ({rate:,.0f}/s, ETA {(total - done) / rate / 60:.1f} min)")
        path = shard_dir(vdir, shard_id) / SHARD_INDEX_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_index(shard, path)
        shard_paths.append(str(path))
        del shard
    merged = merge_shards(str(vdir / TRAINED_FILE), shard_paths, str(vdir), on_disk=True, nprobe=nprobe)
    for path in shard_paths:
        os.unlink(path)  # the merged lists hold them now: keep the disk for the parts
    log(f"merged on disk: {merged.ntotal:,} vectors, {os.path.getsize(vdir / IVFDATA_FILE) / 2**30:.2f} GiB of lists")
    trained = read_index(vdir / TRAINED_FILE)
    manifest = Manifest(
        run_id=run_id,
        created_at=now_iso(),
        config=BuildConfig(inputs=[f"synthetic:{total}"], index=index_string),
        config_fingerprint="synthetic",
        versions=library_versions(),
        metric="l2",
        dimension=DIM,
        model=ModelInfo(name="synthetic (no model: vectors only)", path="", normalized=False, dimension=DIM),
        counts=Counts(rows_read=total, docs_encoded=total, passages=total),
        nprobe=nprobe,
        merge=merged,
        training=TrainedIndex(
            index_string=index_string,
            chosen_automatically=False,
            nlist=parse_index_string(index_string, DIM).nlist,
            nprobe=nprobe,
            sample_size=train_rows,
            trained_sha256=file_sha256(vdir / TRAINED_FILE),
            trained_fingerprint=trained_fingerprint(trained),
        ),
    )
    for name in (MERGED_FILE, IVFDATA_FILE):
        manifest.files_sha256[name] = file_sha256(vdir / name)
    manifest.files_sha256[TRAINED_FILE] = manifest.training.trained_sha256
    for shards in (1, 4):
        start = time.perf_counter()
        parts, _ = partition(vdir, manifest, shards)
        record(manifest, vdir, shards, parts)
        log(f"split for {shards} serving shards in {time.perf_counter() - start:.0f} s: {[p.vectors for p in parts]}")
    publish(store, version, manifest)
    log(f"published {run_id} in {(time.perf_counter() - started) / 60:.1f} min")
    return root


def version_of(root: Path) -> Path:
    """The folder of the version CURRENT names."""
    from rayindex.infra.storage import Store
    from rayindex.versions import current_run_id

    return root / "versions" / current_run_id(Store(str(root)))


def evict(path: Path) -> None:
    """Drop a file's clean pages from the page cache: a cold start without root."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    """Read a file through, into the page cache."""
    with open(path, "rb") as fh:
        while fh.read(16 << 20):
            pass


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def serve_shards(
    root: Path,
    shards: int,
    queries: np.ndarray,
    nprobe: int,
    batch: int,
    batching: str,
    clients: int,
    seconds: float,
    profile: Path | None,
    via: str = "handle",
    http_port: int | None = None,
) -> tuple[dict, list]:
    """Deploy the router and `shards` shard deployments over the published version, cold; measure startup,
    QPS and latency under `clients` concurrent single-query requests, where the time goes (the router's batches
    and the shards' searches, timed in process; py-spy on the router, shard 0 and the clients when `profile`
    names a folder), the shards' memory, and the results. via: the clients call the router's handle, or (http) POST
    /search through HAProxy on http_port (the Ray must run Serve's HAProxy ingress: main)."""
    import asyncio

    import orjson
    import psutil
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from ray import serve

    from rayindex.config import AppConfig
    from rayindex.manifest import Manifest
    from rayindex.query.batching import QueueBatcher
    from rayindex.query.launch import wait_until_steady
    from rayindex.query.requests import SearchRequest
    from rayindex.query.sharded import BATCHES_IN_FLIGHT, ShardServer, open_router

    class Router:
        """RagService's sharded vector path (open_router, prepare, batched search) without the model and doc store."""

        def __init__(self, config: dict, handles: list):
            self.published = open_router(AppConfig(**config), handles)
            self.published.shards.prepare()
            self.batches, self.batched, self.search_s = 0, 0, 0.0
            self.batcher = QueueBatcher(self.search_batch, batch, BATCHES_IN_FLIGHT)

        async def search(self, vector: np.ndarray) -> np.ndarray:
            if batching == "serve":
                return await self.serve_batch(vector)
            return await self.batcher.submit(vector)

        @serve.batch(max_batch_size=batch, batch_wait_timeout_s=0.005, max_concurrent_batches=BATCHES_IN_FLIGHT)
        async def serve_batch(self, vectors: list[np.ndarray]) -> list[np.ndarray]:
            return await self.search_batch(vectors)

        async def search_batch(self, vectors: list[np.ndarray]) -> list[np.ndarray]:
            start = time.perf_counter()
            _, ids = await asyncio.to_thread(self.published.search_vectors, np.stack(vectors), 10, nprobe)
            self.batches, self.batched = self.batches + 1, self.batched + len(vectors)
            self.search_s += time.perf_counter() - start
            return list(ids)

        def stats(self) -> dict:
            """pid, and the batches searched: how many, their queries, seconds in search_vectors (coarse assignment,
            fan-out, the shards' answers, merge)."""
            return {"pid": os.getpid(), "batches": self.batches, "queries": self.batched, "search_s": self.search_s}

    api = FastAPI()

    class HttpRouter(Router):
        """Router as the HTTP ingress (reached through HAProxy, straight to the replica): /search takes the body
        RagService takes for a vector ({"vector": [...], "k": 10}, validated by the same SearchRequest) and
        answers the ids, serialized once by orjson as RagService's bodies are."""

        @api.post("/search")
        async def search_http(self, request: Request) -> Response:
            body = SearchRequest.model_validate_json(await request.body())
            ids = await self.search(np.asarray(body.vector, dtype=np.float32))
            return Response(
                orjson.dumps({"ids": ids}, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
            )

        @api.get("/healthz")
        async def healthz(self) -> Response:
            return Response(b"ok")

    # the annotations as objects: this module's are strings (__future__), which FastAPI resolves in the function's
    # globals, and the class travels to its replica by value (cloudpickle), without the imports they name
    HttpRouter.search_http.__annotations__ = {"request": Request, "return": Response}
    HttpRouter.healthz.__annotations__ = {"return": Response}
    deployment = serve.deployment(max_ongoing_requests=1024)
    router_class = deployment(serve.ingress(api)(HttpRouter)) if via == "http" else deployment(Router)

    version_dir = version_of(root)
    manifest = Manifest.load(version_dir)
    for part in manifest.serving[shards]:
        for rel in part.files:
            evict(version_dir / rel)
    config = AppConfig(index=str(root), shards=shards, shard_timeout=60).model_dump()
    cpus = 2 / shards  # the same 2 cores in all: one shard searches with 2 threads, four with one each
    handles = [
        ShardServer.options(name=f"shard-{p}", ray_actor_options={"num_cpus": cpus}).bind(config, shards, p)
        for p in range(shards)
    ]
    start = time.perf_counter()
    app = f"sharded-{shards}"
    router = serve.run(
        router_class.options(ray_actor_options={"num_cpus": 0}).bind(config, handles),
        name=app,
        route_prefix="/" if via == "http" else None,
    )
    if via == "http":
        wait_until_steady(f"http://127.0.0.1:{http_port}/healthz")
    startup_s = time.perf_counter() - start
    log(f"{shards} shard(s): deployed in {startup_s:.1f} s (cold page cache)")
    for part in manifest.serving[shards]:  # then searches are measured warm, as a server is after its first minutes
        warm(version_dir / part.files[1])

    def shard_stats() -> list[dict]:
        return [serve.get_deployment_handle(f"shard-{p}", app_name=app).stats.remote().result() for p in range(shards)]

    def load(some: np.ndarray, n_clients: int, for_s: float):
        """The load generator of this run's path (handle_load or http_load)."""
        if via == "http":
            return http_load(http_port, some, n_clients, for_s)
        return handle_load(router, some, n_clients, for_s)

    asyncio.run(load(queries[:64], 16, 0.5)())  # the router's and shards' first calls set up their connections
    router_before, shards_before = router.stats.remote().result(), shard_stats()
    processes = {
        "router": [psutil.Process(router_before["pid"])],
        "shards": [psutil.Process(s["pid"]) for s in shards_before],
        "clients": [psutil.Process()],
    }
    if via == "http":  # HAProxy: the ingress in front of the router replica
        processes["proxy"] = [p for p in psutil.Process().children(recursive=True) if p.name() == "haproxy"]
    cpu_before = {name: sum(cpu_seconds(p) for p in group) for name, group in processes.items()}
    spies = []
    if profile:
        profile.mkdir(parents=True, exist_ok=True)
        targets = {"router": router_before["pid"], "shard0": shards_before[0]["pid"], "clients": os.getpid()}
        spies = [py_spy(pid, profile / f"{shards}-shards-{name}.txt", seconds) for name, pid in targets.items()]
    latencies, done, results = asyncio.run(load(queries, clients, seconds)())
    for spy in spies:
        spy.wait()
    cpu_ms = {
        name: round(1000 * (sum(cpu_seconds(p) for p in group) - cpu_before[name]) / max(done, 1), 3)
        for name, group in processes.items()
    }
    router_after, stats = router.stats.remote().result(), shard_stats()
    serve.delete(app)
    batches = router_after["batches"] - router_before["batches"]
    shard_calls = sum(a["searches"] - b["searches"] for a, b in zip(stats, shards_before, strict=True))
    row = {
        "shards": shards,
        "startup_s": round(startup_s, 2),
        "part_load_s": [max(s["versions"].values()) for s in stats],
        "qps": round(done / seconds, 1),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "cpu_ms_per_query": cpu_ms,
        "mean_batch": round((router_after["queries"] - router_before["queries"]) / max(batches, 1), 1),
        "router_search_ms_per_batch": round(
            1000 * (router_after["search_s"] - router_before["search_s"]) / max(batches, 1), 2
        ),
        "shard_calls_per_batch": round(shard_calls / max(batches, 1), 2),
        "shard_search_ms_per_call": [
            round(1000 * (a["search_s"] - b["search_s"]) / max(a["searches"] - b["searches"], 1), 2)
            for a, b in zip(stats, shards_before, strict=True)
        ],
        "anon_mb_per_shard": [round(s["anon_mb"]) for s in stats],
        "file_mb_per_shard": [round(s["file_mb"]) for s in stats],
        "lists_mb_per_shard": [round(s["lists_mb"]) for s in stats],
        "vectors_per_shard": [p.vectors for p in manifest.serving[shards]],
    }
    log(json.dumps(row))
    return row, results


def cpu_seconds(process) -> float:
    """A process's CPU seconds so far, user + system."""
    times = process.cpu_times()
    return times.user + times.system


def py_spy(pid: int, path: Path, seconds: float):
    """py-spy sampling a process for `seconds` without pausing it (--nonblocking), its stacks collapsed into
    `path` (one line per stack with its sample count)."""
    import subprocess

    spy = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen(
        [
            str(spy),
            "record",
            "--nonblocking",
            "--format",
            "raw",
            "-d",
            str(int(seconds)),
            "-r",
            "50",
            "-p",
            str(pid),
            "-o",
            str(path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def http_load(port: int, queries: np.ndarray, clients: int, seconds: float):
    """The load generator over HTTP: `clients` keep-alive connections, each sending a prepared POST /search (the
    JSON a user sends for a vector) as soon as its previous answer is read, for `seconds`; raw asyncio streams and
    orjson, so that the clients, which share the cores, spend little (their CPU per query is reported). Returns the
    coroutine function load() of serve_shards: (latencies, answered, ids per query)."""
    import asyncio
    import re

    import orjson

    requests = []
    for q in queries:
        body = orjson.dumps({"vector": q.tolist(), "k": 10})
        head = (
            f"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        )
        requests.append(head.encode() + b"\r\n\r\n" + body)
    length_header = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")

    async def load() -> tuple[list[float], int, list]:
        latencies, stop_at = [], time.perf_counter() + seconds
        results = [None] * len(queries)

        async def client(c: int) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            i = c
            try:
                while time.perf_counter() < stop_at:
                    t = time.perf_counter()
                    writer.write(requests[i % len(queries)])
                    head = await reader.readuntil(b"\r\n\r\n")
                    body = await reader.readexactly(int(length_header.search(head).group(1)))
                    if head[9:12] != b"200":
                        raise RuntimeError(f"HTTP {head[9:12].decode()}: {body[:200]!r}")
                    latencies.append(time.perf_counter() - t)
                    results[i % len(queries)] = np.array(orjson.loads(body)["ids"])
                    i += clients
            finally:
                writer.close()

        await asyncio.gather(*(client(c) for c in range(clients)))
        return latencies, len(latencies), results

    return load


def handle_load(router, queries: np.ndarray, clients: int, seconds: float):
    """The load generator through the router's Serve handle: `clients` concurrent callers, each calling
    router.search.remote as soon as its previous answer came, for `seconds`. Returns the coroutine function load()
    of serve_shards: (latencies, answered, ids per query)."""
    import asyncio

    async def load() -> tuple[list[float], int, list]:
        latencies, stop_at = [], time.perf_counter() + seconds
        results = [None] * len(queries)

        async def client(c: int) -> None:
            i = c
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                ids = await router.search.remote(queries[i % len(queries)])
                latencies.append(time.perf_counter() - t)
                results[i % len(queries)] = ids
                i += clients

        await asyncio.gather(*(client(c) for c in range(clients)))
        return latencies, len(latencies), results

    return load


def monolithic(root: Path, queries: np.ndarray, nprobe: int) -> np.ndarray:
    """The merged index's ids for the queries at nprobe, in this process (on-disk lists memory-mapped)."""
    from rayindex.ivf.index import read_merged

    index = read_merged(version_of(root))
    return index.search(queries, 10, params=faiss.SearchParametersIVF(nprobe=nprobe))[1]


def in_process_capacity(root: Path, shards: int, queries: np.ndarray, nprobe: int, batch: int, threads: int) -> dict:
    """The scan capacity of the same parts without Serve: the parts opened as the shards open them (open_part),
    the queries in batches of `batch` as the router sends them (coarse_assign, search_part on each part that
    owns a probed list, merge_part_results), FAISS on `threads` threads in all: the median of three passes after
    a warm one (the cores are shared). Its searches per second, and its ids (the same as the merged index's)."""
    from rayindex.infra.storage import Store
    from rayindex.ivf.index import read_index
    from rayindex.ivf.serving_split import coarse_assign, merge_part_results, parts_needed, search_part
    from rayindex.layout import TRAINED_FILE
    from rayindex.manifest import Manifest
    from rayindex.query.sharded import list_owner, open_part
    from rayindex.versions import current_run_id

    run_id = current_run_id(Store(str(root)))
    manifest = Manifest.load(version_of(root))
    parts = [open_part(str(root), run_id, shards, p) for p in range(shards)]
    trained = read_index(version_of(root) / TRAINED_FILE)
    owner = list_owner(manifest.serving[shards], manifest.nlist)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    passes = []
    try:
        for _ in range(4):
            start, ids = time.perf_counter(), []
            for first in range(0, len(queries), batch):
                x, coarse_distances, coarse_lists = coarse_assign(trained, queries[first : first + batch], nprobe)
                results = [
                    search_part(parts[p].index, parts[p].owned, x, coarse_distances, coarse_lists, 10)
                    for p in parts_needed(owner, coarse_lists)
                ]
                ids.append(merge_part_results(results, 10, False)[1])
            passes.append(time.perf_counter() - start)
    finally:
        faiss.omp_set_num_threads(before)
    seconds = float(np.median(passes[1:]))
    return {"qps": round(len(queries) / seconds, 1), "seconds": round(seconds, 3), "ids": np.concatenate(ids)}


def plan_qps(vectors: int, index_string: str, nprobe: int, shards: int) -> dict:
    """`rayindex plan --serving-shards`'s searches per second for the same index on 2 cores (ivf/capacity.py)."""
    from rayindex.ivf.capacity import plan_capacity

    plan = plan_capacity(vectors, DIM, index_string, serving_shards=shards, nprobe=nprobe, cores=2, lexical=False)
    qps = plan["serving"]["queries_per_s"]
    return {"qps": round(qps["value"], 1), "how": qps["how"]}


def plot(summary: dict, path: Path) -> None:
    """QPS through Serve (each batching; dots: runs) beside the in-process capacity of the same parts, with the
    0.5x target; and CPU per query in each process against the in-process search's (2 threads / its QPS)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"in process": "#999", "queue": "#1f77b4", "serve": "#ff7f0e", "http": "#2ca02c"}
    fig, (qps, cpu) = plt.subplots(1, 2, figsize=(10, 4))
    labels, heights, colour, runs = [], [], [], []
    for shards in (1, 4):
        rows = [r for r in summary["rows"] if r["shards"] == shards]
        labels.append(f"{shards} sh.\nin process")
        heights.append(rows[0]["in_process_qps"])
        colour.append(colours["in process"])
        runs.append(rows[0]["in_process_qps_runs"])
        for row in rows:
            labels.append(f"{shards} sh.\n{'queue' if row['batching'] == 'queue' else 'serve.batch'}\n{row['via']}")
            heights.append(row["qps"])
            colour.append(colours["http" if row["via"] == "http" else row["batching"]])
            runs.append(row["qps_runs"])
    bars = qps.bar(range(len(labels)), heights, color=colour)
    qps.bar_label(bars, fmt="%.0f")
    for x, values in enumerate(runs):
        qps.scatter([x] * len(values), values, color="black", s=8, zorder=3)
    four = next(r for r in summary["rows"] if r["shards"] == 4)  # the rows' first path: the target's
    target = 0.5 * four["in_process_qps"]
    qps.axhline(target, color="red", linestyle="--", linewidth=1, label="target: 0.5x in process (4 shards)")
    qps.set_xticks(range(len(labels)), labels, fontsize=7)
    qps.set(ylabel=f"searches/s, {summary['clients']} clients (median of runs)", title="QPS")
    qps.set_ylim(top=1.3 * max(max(values) for values in runs))  # room for the legend above the bars
    qps.legend(fontsize=7)
    names = ("proxy", "router", "shards", "clients")
    x_labels = []
    for x, row in enumerate(summary["rows"]):
        bottom = 0.0
        for name, shade in zip(names, ("#9467bd", "#1f77b4", "#2ca02c", "#bbbbbb"), strict=True):
            value = row["cpu_ms_per_query"].get(name, 0.0)
            cpu.bar(x, value, bottom=bottom, color=shade, label=name if x == 0 else None)
            bottom += value
        cpu.scatter([x], [2000 / row["in_process_qps"]], color="red", marker="_", s=400, zorder=3)
        x_labels.append(f"{row['shards']} sh.\n{row['batching']}/{row['via']}\nbatch {row['mean_batch']}")
    cpu.scatter([], [], color="red", marker="_", s=100, label="in-process search (2 threads)")
    cpu.set_xticks(range(len(x_labels)), x_labels, fontsize=7)
    cpu.set(ylabel="CPU ms per query", title="CPU per query by process")
    cpu.set_ylim(top=1.5 * cpu.get_ylim()[1])
    cpu.legend(fontsize=7)
    fig.suptitle(
        f"{summary['vectors'] / 1e6:g}M vectors, {summary['index']}, nprobe {summary['nprobe']}, 2 cores: "
        f"4 shards x{four['qps_vs_in_process']} of in process"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=100_000_000)
    parser.add_argument("--dir", default="/work/bench-sharded")
    parser.add_argument("--index", help="index_factory string (default: the build's choice for --vectors at d 64)")
    parser.add_argument("--nprobe", type=int, help="default: the build's for the index's nlist (default_nprobe)")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="the router's largest batch (RagService's SEARCH_BATCH)")
    parser.add_argument("--profile", help="a folder: py-spy's stacks of the router, shard 0 and the clients, round 1")
    parser.add_argument(
        "--batching",
        nargs="+",
        choices=("queue", "serve"),
        default=["queue"],
        help="the router's batches, each measured in every round: what queued while the previous batch ran "
        "(query/batching.py QueueBatcher, as RagService), or Serve's @serve.batch (one every 5 ms, queued behind the "
        "batch in flight: the code before)",
    )
    parser.add_argument(
        "--via",
        nargs="+",
        choices=("handle", "http"),
        default=["handle"],
        help="how the clients reach the router, each measured in every round: its Serve handle (one Ray call per "
        "query), or POST /search through Serve's HAProxy ingress straight to the router replica (`rayindex serve "
        "--ingress haproxy`'s path), from a light asyncio client",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    from rayindex.ivf.index_params import choose_index_string, default_nprobe, parse_index_string

    index_string = args.index or choose_index_string(args.vectors, DIM)
    nprobe = args.nprobe or default_nprobe(parse_index_string(index_string, DIM).nlist)
    root = build(Path(args.dir), args.vectors, index_string, nprobe)
    if args.build_only:
        return
    import ray

    queries = clustered_chunk(10**13, args.queries)
    want = monolithic(root, queries, nprobe)
    http_port = None
    if "http" in args.via:  # Serve's HAProxy ingress, for the Ray started next (its controller and proxy read it)
        from rayindex.query.launch import free_port, haproxy_environment, haproxy_folder

        os.environ.update(haproxy_environment(haproxy_folder()))
        http_port = free_port()
    # logical CPUs: 2 for the shards (see serve_shards), the rest for Serve's own actors
    ray.init(num_cpus=4, log_to_driver=False)
    if http_port:
        from ray import serve

        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    paths = [(batching, via) for batching in args.batching for via in args.via]
    runs = {(shards, path): [] for shards in (1, 4) for path in paths}
    capacity = {1: [], 4: []}
    for round_no in range(args.rounds):  # alternating, so that a noisy neighbour on the shared cores hits all alike
        for shards in (1, 4):
            # the same parts' scan capacity in this process, 2 FAISS threads, right before Serve searches them
            scan = in_process_capacity(root, shards, queries, nprobe, args.batch, threads=2)
            if not np.array_equal(scan["ids"], want):
                raise SystemExit(f"the {shards} parts searched in process differ from the merged index")
            capacity[shards].append(scan["qps"])
            log(f"{shards} part(s) in process: {scan['qps']} QPS")
            for batching, via in paths:
                profile = Path(args.profile) / f"{batching}-{via}" if args.profile and round_no == 0 else None
                row, results = serve_shards(
                    root,
                    shards,
                    queries,
                    nprobe,
                    args.batch,
                    batching,
                    args.clients,
                    args.seconds,
                    profile,
                    via,
                    http_port,
                )
                answered = [i for i, r in enumerate(results) if r is not None]
                row["batching"], row["via"] = batching, via
                row["queries_checked"] = len(answered)
                row["identical_to_merged"] = float(np.mean([np.array_equal(results[i], want[i]) for i in answered]))
                row["recall_at_10_vs_merged"] = float(
                    np.mean([len(set(results[i]) & set(want[i])) / 10 for i in answered])
                )
                runs[shards, (batching, via)].append(row)
    ray.shutdown()
    rows = []
    # the first run's startup (cold: files evicted and checksummed), the median QPS run
    for (shards, _), measured in runs.items():
        median = sorted(measured, key=lambda r: r["qps"])[len(measured) // 2]
        in_process = float(np.median(capacity[shards]))
        rows.append(
            dict(
                median,
                startup_s=measured[0]["startup_s"],
                part_load_s=measured[0]["part_load_s"],
                qps_runs=[r["qps"] for r in measured],
                in_process_qps=in_process,
                in_process_qps_runs=capacity[shards],
                qps_vs_in_process=round(median["qps"] / in_process, 3),
                plan=plan_qps(args.vectors, index_string, nprobe, shards),
            )
        )
    from rayindex.manifest import Manifest

    first = paths[0]  # the path the ratios and the target are stated for
    one, four = (next(r for r in rows if r["shards"] == n and (r["batching"], r["via"]) == first) for n in (1, 4))
    summary = {
        "vectors": args.vectors,
        "index": index_string,
        "nprobe": nprobe,
        "router_batch": args.batch,
        "clients": args.clients,
        "seconds": args.seconds,
        "rows": rows,
        "qps_ratio_4_vs_1": round(four["qps"] / one["qps"], 3),
        "part_lists_file_mb": {
            shards: [
                round(os.path.getsize(version_of(root) / p.files[1]) / 2**20)
                for p in Manifest.load(version_of(root)).serving[shards]
            ]
            for shards in (1, 4)
        },
        "lists_mb_ratio_4_vs_1": round(max(four["lists_mb_per_shard"]) / max(one["lists_mb_per_shard"]), 3),
        # issue 26: sharded, 4 shards on one node, QPS >= 0.5x the in-process scan capacity of the same parts
        "target_4_shards_vs_in_process": 0.5,
        "target_met": four["qps_vs_in_process"] >= 0.5,
        "note": "synthetic vectors: router = the sharded vector path of the serving app without query encoding or doc "
        f"store; ratios, target and the 4 vs 1 figures for --batching {first[0]} --via {first[1]}",
    }
    print(
        f"{'batch/via':>12} {'shards':>6} {'startup s':>9} {'QPS':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'anon MB/shard':>13} {'lists MB/shard':>14} {'file MB/shard':>13} {'same ids':>8}"
    )
    for row in rows:
        print(
            f"{row['batching'] + '/' + row['via']:>12} {row['shards']:>6} {row['startup_s']:>9} {row['qps']:>8} "
            f"{row['p50_ms']:>7} "
            f"{row['p99_ms']:>7} "
            f"{max(row['anon_mb_per_shard']):>13} {max(row['lists_mb_per_shard']):>14} "
            f"{max(row['file_mb_per_shard']):>13} "
            f"{row['identical_to_merged']:>8.3f}"
        )
    print(
        f"4 shards vs 1: QPS x{summary['qps_ratio_4_vs_1']}, inverted lists resident per shard "
        f"x{summary['lists_mb_ratio_4_vs_1']}"
    )
    for row in rows:
        print(
            f"{row['batching']}/{row['via']}, {row['shards']} shard(s): Serve {row['qps']} QPS / in process "
            f"{row['in_process_qps']} QPS = "
            f"x{row['qps_vs_in_process']} (plan: {row['plan']['qps']} QPS); batch {row['mean_batch']}, router "
            f"{row['router_search_ms_per_batch']} ms per batch, {row['shard_calls_per_batch']} shard calls per batch "
            f"of {row['shard_search_ms_per_call']} ms; CPU ms per query {row['cpu_ms_per_query']}"
        )
    print(f"target (4 shards >= 0.5x in process): {'met' if summary['target_met'] else 'missed'}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        plot(summary, Path(args.json).with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
