"""Recall and latency of several index settings on the same real embeddings, in one run.

Re-runs only the train, add and merge stages of an existing build for each index string (the
encoded shards are hard-linked, not re-encoded), then evaluates each against exact search.

    rayindex build -o /tmp/rd                        # the embedded default: stdlib docstrings
    python benchmarks/quality_benchmark.py --index /tmp/rd --png docs/quality-recall.png --json
    docs/benchmark-quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray
from rich.console import Console
from rich.table import Table

from rayindex.builder import timed
from rayindex.config import EvalOptions, TuneOptions
from rayindex.infra.progress import StageProgress
from rayindex.infra.storage import Store
from rayindex.layout import DOC_HASHES_FILE, DOCS_FILE, EMBEDDINGS_FILE, MERGED_FILE, VECTOR_IDS_FILE, shard_dir
from rayindex.manifest import Manifest
from rayindex.query.evaluate import evaluate
from rayindex.query.search import open_version
from rayindex.stages import add, merge, train
from rayindex.stages.tune import tune
from rayindex.versions import open_current, save_manifest

DEFAULT_SETTINGS = ["IVF64,Flat", "IVF64,SQ8", "IVF64,PQ48np", "IVF64,PQ16np"]


def rebuild(source: Path, index_string: str, root: Path) -> Path:
    """A version folder sharing the source's encoded shards, trained and merged for index_string."""
    manifest = Manifest.load(source)
    target = root / re.sub(r"[^A-Za-z0-9]+", "_", index_string)
    for shard in manifest.shards:
        src, dst = shard_dir(source, shard.shard_id), shard_dir(target, shard.shard_id)
        dst.mkdir(parents=True)
        for name in (EMBEDDINGS_FILE, VECTOR_IDS_FILE, DOCS_FILE, DOC_HASHES_FILE):
            os.link(src / name, dst / name)
    config = manifest.config.model_copy(update={"index": index_string, "on_disk": False})
    manifest = manifest.model_copy(
        update={"config": config, "timings_s": {}, "warnings": [], "tuning": None, "training": None, "merge": None}
    )
    store, progress = Store(str(target)), StageProgress(quiet=True)
    for name, stage in (("train", train), ("add", add), ("merge", merge)):
        with timed(name, manifest, store):
            stage.run(config, manifest, store, progress)
    manifest.status = "published"
    save_manifest(store, manifest)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="rayindex-data", help="output folder of an existing build")
    parser.add_argument("--settings", default=";".join(DEFAULT_SETTINGS), help="index strings separated by ';'")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--target-recall", type=float, default=0.95, help="tune each setting to this recall@10")
    parser.add_argument("--png", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    source = open_current(args.index)[0]
    ray.init(include_dashboard=False, log_to_driver=False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index_string in args.settings.split(";"):
            version = rebuild(source, index_string, Path(tmp))
            published = open_version(version, Manifest.load(version))
            result = evaluate(published, EvalOptions(n_queries=args.queries, ks="1,10,100"))
            result["bytes_per_vector"] = (version / MERGED_FILE).stat().st_size / published.index.ntotal
            tuning, _ = tune(
                version, published.manifest, TuneOptions(target_recall=args.target_recall, n_queries=args.queries)
            )
            result["tuned"] = tuning.model_dump(include={"reached", "nprobe", "refine_factor", "recall"})
            results[index_string] = result
    first = next(iter(results.values()))
    dim = Manifest.load(source).dimension
    table = Table(
        title=f"{first['documents']:,} docs ({first['queries']} held-out queries), dim {dim}; "
        f"recall@10 vs exact search, ms/query batched ({os.cpu_count()} cores)"
    )
    for col in (
        "index",
        "bytes/vector",
        "RAM vs Flat",
        "nprobe 1",
        "nprobe 4",
        "nprobe 16",
        "all lists",
        "ms/query (all)",
        f"tuned to {args.target_recall}: nprobe, re-rank, recall@10",
    ):
        table.add_column(col, justify="right")
    for name, r in results.items():
        by = {row["nprobe"]: row for row in r["sweep"]}
        table.add_row(
            name,
            f"{r['bytes_per_vector']:.0f}",
            f"{r['bytes_per_vector'] / (4 * dim):.2f}",
            *[f"{by[n]['recall'][10]:.3f}" if n in by else "-" for n in (1, 4, 16)],
            f"{r['sweep'][-1]['recall'][10]:.3f}",
            f"{r['sweep'][-1]['ms_per_query']:.3f}",
            f"{r['tuned']['nprobe']}, x{r['tuned']['refine_factor']}, {r['tuned']['recall']:.3f}"
            + ("" if r["tuned"]["reached"] else " (not reached)"),
        )
    Console(width=160).print(table)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    k: {key: v[key] for key in ("sweep", "bytes_per_vector", "documents", "queries", "tuned")}
                    for k, v in results.items()
                },
                indent=2,
            )
        )
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 3.6))
        for name, r in results.items():
            a.plot([row["nprobe"] for row in r["sweep"]], [row["recall"][10] for row in r["sweep"]], "o-", label=name)
            b.plot(
                [row["recall"][10] for row in r["sweep"]], [row["ms_per_query"] for row in r["sweep"]], "o-", label=name
            )
        a.set(xscale="log", xlabel="nprobe", ylabel="recall@10 vs exact", title="Recall vs nprobe", ylim=(0, 1.02))
        b.set(xlabel="recall@10", ylabel="ms / query (batched)", title="Latency vs recall")
        a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
