"""Build benchmark: our pipeline vs a single process, on the same machine, in one run.

(a) encode throughput: the encode stage (Ray actor pool, incl. actor start and model load)
    vs one process calling SentenceTransformer.encode (incl. model load) on the same texts.
(b) train + per-shard add + merge (the build's own stage functions, through Ray) vs one
    process doing index_factory + train + add on the same vectors; recall@10 of both against
    exact search.

    python benchmarks/build_benchmark.py [--docs 1600] [--vectors 200000] [--index IVF1024,PQ48np]

Prints a table and the ratios; targets on 2 cores: (a) >= 0.9, (b) <= 1.15 with equal recall.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from rich.console import Console
from rich.table import Table

from rayindex.builder import build, timed
from rayindex.config import BuildConfig
from rayindex.infra.progress import StageProgress
from rayindex.infra.storage import Store
from rayindex.ivf.index import read_merged
from rayindex.layout import EMBEDDINGS_FILE, VECTOR_IDS_FILE, shard_dir
from rayindex.manifest import Counts, Manifest, ModelInfo, ShardState, now_iso
from rayindex.stages import add, merge, train
from rayindex.text.model import load_model
from rayindex.text.shard_plan import FileCost, plan_shards
from rayindex.text.stdlib_corpus import stdlib_docstrings
from rayindex.versions import new_run_id


def encode_benchmark(n_docs: int, work: Path) -> dict:
    docs = stdlib_docstrings()[:n_docs]
    texts = [f"{d['title']}: {d['body']}" for d in docs]
    start = time.perf_counter()
    model = load_model("all-MiniLM-L6-v2")
    model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
    single = time.perf_counter() - start

    pq.write_table(pa.Table.from_pylist(docs), work / "docs.parquet")
    n_cpus = int(ray.cluster_resources()["CPU"])
    config = BuildConfig(
        inputs=[str(work / "docs.parquet")],
        output=str(work / "out"),
        id_column="id",
        template="{title}: {body}",
        shards=n_cpus,
        index="IVF1,Flat",
    )
    manifest = build(config)
    return {"docs": len(texts), "single_s": single, "pipeline_s": manifest.timings_s["encode"]}


def clustered_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Normalized points around 2,000 random centres, spread along a 32-dimensional subspace: clustered
    and of low intrinsic dimension like real embeddings, not uniform noise that no index can search."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).standard_normal((32, dim)).astype(np.float32) / np.sqrt(32)
    centres = np.random.default_rng(98).standard_normal((2000, dim)).astype(np.float32)
    spread = rng.standard_normal((n, 32)).astype(np.float32) @ basis
    x = (
        centres[rng.integers(0, len(centres), n)]
        + 0.5 * spread
        + 0.05 * rng.standard_normal((n, dim)).astype(np.float32)
    )
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at_10(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, nprobe: int) -> float:
    _, found = index.search(queries, 10, params=faiss.SearchParametersIVF(nprobe=nprobe))
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))


def index_benchmark(n: int, dim: int, index_string: str, n_shards: int, nprobe: int, work: Path) -> dict:
    x = clustered_vectors(n, dim)
    ids = np.arange(n, dtype=np.int64)
    queries = clustered_vectors(200, dim, seed=1)
    flat = faiss.IndexFlatIP(dim)
    flat.add(x)
    _, truth = flat.search(queries, 10)
    del flat

    # our stages, on shard folders laid out as the encode stage leaves them
    version = work / "index-bench"
    shards = plan_shards([FileCost("synthetic", n)], n_shards)
    for shard in shards:
        d = shard_dir(version, shard.shard_id)
        d.mkdir(parents=True)
        x[shard.global_start : shard.global_end].astype("<f4").tofile(d / EMBEDDINGS_FILE)
        np.save(d / VECTOR_IDS_FILE, ids[shard.global_start : shard.global_end])
    config = BuildConfig(inputs=["synthetic"], output=str(work), index=index_string, on_disk=False)
    manifest = Manifest(
        run_id=new_run_id(),
        created_at=now_iso(),
        config=config,
        config_fingerprint="bench",
        shards=shards,
        shard_states=[ShardState(shard_id=s.shard_id, docs_encoded=s.num_rows, passages=s.num_rows) for s in shards],
        dimension=dim,
        metric="cosine",
        counts=Counts(docs_encoded=n, passages=n),
        model=ModelInfo(name="synthetic", path="", normalized=True, device="cpu"),
    )
    store, progress = Store(str(version)), StageProgress(quiet=True)
    start = time.perf_counter()
    for name, stage in (("train", train), ("add", add), ("merge", merge)):
        with timed(name, manifest, store):
            stage.run(config, manifest, store, progress)
    ours = time.perf_counter() - start
    sample = manifest.training.sample_size
    ours_recall = recall_at_10(read_merged(version), queries, truth, nprobe)

    # the single-process baseline: same index string, same training sample size, same vectors
    start = time.perf_counter()
    index = faiss.index_factory(dim, index_string, faiss.METRIC_INNER_PRODUCT)
    index.train(x[np.sort(np.random.default_rng(config.seed).choice(n, sample, replace=False))])
    index.add_with_ids(x, ids)
    single = time.perf_counter() - start
    return {
        "vectors": n,
        "train_sample": sample,
        "ours_s": ours,
        "single_s": single,
        "ours_recall": ours_recall,
        "single_recall": recall_at_10(index, queries, truth, nprobe),
        "stages": dict(manifest.timings_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1600)
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--index", default="IVF1024,PQ48np")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    ray.init(include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        enc = encode_benchmark(args.docs, Path(tmp))
        idx = index_benchmark(
            args.vectors, args.dim, args.index, int(ray.cluster_resources()["CPU"]), args.nprobe, Path(tmp)
        )
    table = Table(title=f"rayindex build benchmark ({os.cpu_count()} cores)")
    for col in ("measure", "rayindex", "single process", "ratio", "target"):
        table.add_column(col)
    enc_ratio = enc["single_s"] / enc["pipeline_s"]
    table.add_row(
        f"(a) encode {enc['docs']} docs, docs/s",
        f"{enc['docs'] / enc['pipeline_s']:.1f}",
        f"{enc['docs'] / enc['single_s']:.1f}",
        f"{enc_ratio:.2f}",
        ">= 0.9",
    )
    idx_ratio = idx["ours_s"] / idx["single_s"]
    table.add_row(
        f"(b) train+add+merge {idx['vectors']:,} x {args.dim}, s",
        f"{idx['ours_s']:.1f}",
        f"{idx['single_s']:.1f}",
        f"{idx_ratio:.2f}",
        "<= 1.15",
    )
    table.add_row(
        f"(b) recall@10 at nprobe {args.nprobe}",
        f"{idx['ours_recall']:.3f}",
        f"{idx['single_recall']:.3f}",
        f"{idx['ours_recall'] - idx['single_recall']:+.3f}",
        "equal",
    )
    Console().print(table)
    print("our stage times (s):", json.dumps(idx["stages"]))
    if args.json:
        args.json.write_text(
            json.dumps({"encode": enc, "index": idx, "args": vars(args) | {"json": str(args.json)}}, indent=2)
        )


if __name__ == "__main__":
    main()
