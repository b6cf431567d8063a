"""Sharded serving at 100M vectors on this machine: a streaming build of a synthetic 100M-vector IVF-PQ
index (generated chunk by chunk, one build shard at a time, on-disk merge: no step holds more than one
shard's codes in RAM), split into parts for 1 and for 4 serving shards, then served through Ray Serve
with the router and shard deployments of `rayindex serve --shards N` (query/sharded.py):

- identity: the sharded results against the merged (monolithic) index's at the same nprobe, in process;
- QPS, p50/p99 through the router's batched handle (concurrent clients), 1 shard vs 4;
- RAM per shard replica: anonymous and file-backed (the memory-mapped part) resident memory;
- replica startup with a cold page cache (the part files evicted first); searches are then measured with
  the parts' lists read into the page cache (warm, as a server is after its first minutes).

Vectors are synthetic (no text): the router here is the sharded vector path of the serving app (coarse
assignment, fan-out to the shard deployments, merge) behind @serve.batch as in RagService, without
query encoding and the doc store, which a 100M-vector synthetic collection does not have. The build is
reused when <dir>/CURRENT names a complete one.

    python benchmarks/sharded_benchmark.py [--vectors 100000000] [--dir /work/bench-sharded] [--json
    docs/benchmark-sharded.json]
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
INDEX_STRING = "IVF2048,PQ16"
NPROBE = 16
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


def build(root: Path, total: int) -> Path:
    """A published rayindex version of `total` synthetic vectors (no doc store): trained.faiss, one index
    per build shard, the on-disk merge, parts for 1 and 4 serving shards, the manifest, CURRENT."""
    from rayindex.config import BuildConfig
    from rayindex.infra.storage import Store, file_sha256
    from rayindex.ivf.index import make_index, read_index, trained_fingerprint, write_index
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
    index = make_index(INDEX_STRING, DIM, "l2")
    index.train(clustered_chunk(10**12, TRAIN_ROWS))  # a sample of the same distribution, not rows of the index
    write_index(index, vdir / TRAINED_FILE)
    log(f"trained {INDEX_STRING} on {TRAIN_ROWS:,} vectors in {time.perf_counter() - started:.0f} s")
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
    merged = merge_shards(str(vdir / TRAINED_FILE), shard_paths, str(vdir), on_disk=True, nprobe=NPROBE)
    for path in shard_paths:
        os.unlink(path)  # the merged lists hold them now: keep the disk for the parts
    log(f"merged on disk: {merged.ntotal:,} vectors, {os.path.getsize(vdir / IVFDATA_FILE) / 2**30:.2f} GiB of lists")
    trained = read_index(vdir / TRAINED_FILE)
    manifest = Manifest(
        run_id=run_id,
        created_at=now_iso(),
        config=BuildConfig(inputs=[f"synthetic:{total}"], index=INDEX_STRING),
        config_fingerprint="synthetic",
        versions=library_versions(),
        metric="l2",
        dimension=DIM,
        model=ModelInfo(name="synthetic (no model: vectors only)", path="", normalized=False, dimension=DIM),
        counts=Counts(rows_read=total, docs_encoded=total, passages=total),
        nprobe=NPROBE,
        merge=merged,
        training=TrainedIndex(
            index_string=INDEX_STRING,
            chosen_automatically=False,
            nlist=2048,
            nprobe=NPROBE,
            sample_size=TRAIN_ROWS,
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


def serve_shards(root: Path, shards: int, queries: np.ndarray, clients: int, seconds: float) -> dict:
    """Deploy the router and `shards` shard deployments over the published version, cold; measure startup,
    QPS and latency under `clients` concurrent single-query requests, the shards' memory, and the results."""
    import asyncio

    from ray import serve

    from rayindex.config import AppConfig
    from rayindex.manifest import Manifest
    from rayindex.query.sharded import BATCHES_IN_FLIGHT, ShardServer, open_router

    @serve.deployment(max_ongoing_requests=1024)
    class VectorRouter:
        """RagService's sharded vector path (open_router, prepare, batched search) without the model and doc store."""

        def __init__(self, config: dict, handles: list):
            self.published = open_router(AppConfig(**config), handles)
            self.published.shards.prepare()

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=BATCHES_IN_FLIGHT)
        async def search(self, vectors: list[np.ndarray]) -> list[np.ndarray]:
            _, ids = await asyncio.to_thread(self.published.search_vectors, np.stack(vectors), 10, NPROBE)
            return list(ids)

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
    router = serve.run(
        VectorRouter.options(ray_actor_options={"num_cpus": 0}).bind(config, handles),
        name=f"sharded-{shards}",
        route_prefix=None,
    )
    startup_s = time.perf_counter() - start
    log(f"{shards} shard(s): deployed in {startup_s:.1f} s (cold page cache)")
    for part in manifest.serving[shards]:  # then searches are measured warm, as a server is after its first minutes
        warm(version_dir / part.files[1])

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

    asyncio.run(load_warm(router, queries[:64]))
    latencies, done, results = asyncio.run(load())
    stats = [
        serve.get_deployment_handle(f"shard-{p}", app_name=f"sharded-{shards}").stats.remote().result()
        for p in range(shards)
    ]
    serve.delete(f"sharded-{shards}")
    row = {
        "shards": shards,
        "startup_s": round(startup_s, 2),
        "part_load_s": [max(s["versions"].values()) for s in stats],
        "qps": round(done / seconds, 1),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "anon_mb_per_shard": [round(s["anon_mb"]) for s in stats],
        "file_mb_per_shard": [round(s["file_mb"]) for s in stats],
        "lists_mb_per_shard": [round(s["lists_mb"]) for s in stats],
        "vectors_per_shard": [p.vectors for p in manifest.serving[shards]],
    }
    log(json.dumps(row))
    return row, results


async def load_warm(router, queries: np.ndarray) -> None:
    """A few requests before measuring: the router's and shards' first calls set up their connections."""
    import asyncio

    await asyncio.gather(*(router.search.remote(q) for q in queries))


def monolithic(root: Path, queries: np.ndarray) -> np.ndarray:
    """The merged index's ids for the queries at NPROBE, in this process (on-disk lists memory-mapped)."""
    from rayindex.ivf.index import read_merged

    index = read_merged(version_of(root))
    return index.search(queries, 10, params=faiss.SearchParametersIVF(nprobe=NPROBE))[1]


def plot(summary: dict, path: Path) -> None:
    """QPS (each run and the median) and the inverted lists resident per shard, 1 shard vs 4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{row['shards']} shard{'s' if row['shards'] > 1 else ''}" for row in summary["rows"]]
    fig, (qps, ram) = plt.subplots(1, 2, figsize=(8, 3.5))
    bars = qps.bar(labels, [row["qps"] for row in summary["rows"]], color=["#999", "#1f77b4"])
    qps.bar_label(bars, fmt="%.1f")
    for x, row in enumerate(summary["rows"]):
        qps.scatter([x] * len(row["qps_runs"]), row["qps_runs"], color="black", s=10, zorder=3)
    qps.set(ylabel="searches/s (median of runs, dots: runs)", title=f"QPS, 4 vs 1: x{summary['qps_ratio_4_vs_1']}")
    bars = ram.bar(labels, [max(row["lists_mb_per_shard"]) for row in summary["rows"]], color=["#999", "#1f77b4"])
    ram.bar_label(bars, fmt="%.0f")
    ram.set(
        ylabel="MB resident per shard replica", title=f"inverted lists per shard, x{summary['lists_mb_ratio_4_vs_1']}"
    )
    fig.suptitle(f"{summary['vectors'] / 1e6:.0f}M vectors, {summary['index']}, nprobe {summary['nprobe']}, 2 cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=100_000_000)
    parser.add_argument("--dir", default="/work/bench-sharded")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    root = build(Path(args.dir), args.vectors)
    if args.build_only:
        return
    import ray

    queries = clustered_chunk(10**13, args.queries)
    want = monolithic(root, queries)
    ray.init(
        num_cpus=4, log_to_driver=False
    )  # logical CPUs: 2 for the shards (see serve_shards), the rest for Serve's own actors
    runs = {1: [], 4: []}
    for _ in range(args.rounds):  # alternating, so that a noisy neighbour on the shared cores hits both alike
        for shards in (1, 4):
            row, results = serve_shards(root, shards, queries, args.clients, args.seconds)
            answered = [i for i, r in enumerate(results) if r is not None]
            row["queries_checked"] = len(answered)
            row["identical_to_merged"] = float(np.mean([np.array_equal(results[i], want[i]) for i in answered]))
            row["recall_at_10_vs_merged"] = float(np.mean([len(set(results[i]) & set(want[i])) / 10 for i in answered]))
            runs[shards].append(row)
    ray.shutdown()
    rows = []
    # the first run's startup (cold: files evicted and checksummed), the median QPS run
    for measured in runs.values():
        median = sorted(measured, key=lambda r: r["qps"])[len(measured) // 2]
        rows.append(
            dict(
                median,
                startup_s=measured[0]["startup_s"],
                part_load_s=measured[0]["part_load_s"],
                qps_runs=[r["qps"] for r in measured],
            )
        )
    from rayindex.manifest import Manifest

    one, four = rows
    summary = {
        "vectors": args.vectors,
        "index": INDEX_STRING,
        "nprobe": NPROBE,
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
        "note": "synthetic vectors: router = the sharded vector path of the serving app without query encoding or doc "
        "store",
    }
    print(
        f"{'shards':>6} {'startup s':>9} {'QPS':>8} {'p50 ms':>7} {'p99 ms':>7} {'anon MB/shard':>13} "
        f"{'lists MB/shard':>14} {'file MB/shard':>13} {'same ids':>8}"
    )
    for row in rows:
        print(
            f"{row['shards']:>6} {row['startup_s']:>9} {row['qps']:>8} {row['p50_ms']:>7} {row['p99_ms']:>7} "
            f"{max(row['anon_mb_per_shard']):>13} {max(row['lists_mb_per_shard']):>14} "
            f"{max(row['file_mb_per_shard']):>13} "
            f"{row['identical_to_merged']:>8.3f}"
        )
    print(
        f"4 shards vs 1: QPS x{summary['qps_ratio_4_vs_1']}, inverted lists resident per shard "
        f"x{summary['lists_mb_ratio_4_vs_1']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        plot(summary, Path(args.json).with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
