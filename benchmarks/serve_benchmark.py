"""Serving benchmark: /search over HTTP at concurrency 1, 8 and 32 vs in-process encode + index.search
on the same queries, in the same run; recall@10 against exact search at the nprobe used.

    rayindex build                       # or any build; then
    python benchmarks/serve_benchmark.py --index rayindex-data [--queries 200] [--png docs/serve-benchmark.png]

Prints QPS and p50/p99 latency per concurrency, the HTTP+Serve overhead as ratios, and recall@10.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers: one free_port

import httpx
import numpy as np
from ray import serve
from rich.console import Console
from rich.table import Table

from rayindex.config import ServeConfig
from rayindex.ivf.recall import drop_self, exact_truth, recall_at
from rayindex.layout import VECTOR_IDS_FILE, shard_dir
from rayindex.query.launch import start_serving
from rayindex.query.search import open_index

from helpers import free_port


def query_texts(published, n: int) -> list[str]:
    """First sentences of documents spread over the corpus: realistic, short queries."""
    step = max(1, int(published.index.ntotal) // n)
    texts = []
    for shard in published.manifest.shards:
        row_ids = np.load(shard_dir(published.version_dir, shard.shard_id) / VECTOR_IDS_FILE)
        texts += [published.docs.get(int(r))["text"].split(". ")[0][:200] for r in row_ids[::step]]
    return texts[:n]


def percentiles(latencies: list[float]) -> tuple[float, float]:
    return float(np.percentile(latencies, 50) * 1000), float(np.percentile(latencies, 99) * 1000)


def in_process(published, queries: list[str], k: int, nprobe: int) -> dict:
    latencies = []
    start = time.perf_counter()
    for q in queries:
        t = time.perf_counter()
        published.search_vectors(published.encode([q]), k, nprobe)
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    p50, p99 = percentiles(latencies)
    return {"qps": len(queries) / wall, "p50_ms": p50, "p99_ms": p99}


def over_http(url: str, queries: list[str], concurrency: int, k: int, nprobe: int) -> dict:
    latencies, errors, lock = [], [], threading.Lock()
    work = list(queries)

    def client():
        with httpx.Client(base_url=url, timeout=120) as c:
            while True:
                with lock:
                    if not work:
                        return
                    q = work.pop()
                t = time.perf_counter()
                r = c.post("/search", json={"query": q, "k": k, "nprobe": nprobe})
                with lock:
                    (latencies if r.status_code == 200 else errors).append(time.perf_counter() - t)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    p50, p99 = percentiles(latencies)
    return {"qps": len(latencies) / wall, "p50_ms": p50, "p99_ms": p99, "errors": len(errors)}


def recall_at_10(published, queries: list[str], nprobe: int) -> float:
    """recall@10 of the text queries against exact search (ivf/recall.py's ground truth; the queries are
    not corpus rows, so no id is held out: -1 matches nothing)."""
    q = published.encode(queries)
    no_self = np.full(len(q), -1)
    truth = exact_truth(published.version_dir, published.manifest, q, no_self, 10)
    _, found = published.search_vectors(q, 10, nprobe)
    return recall_at(drop_self(found, no_self, 10), truth, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="rayindex-data")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nprobe", type=int, default=None, help="default: the build's")
    parser.add_argument("--png", type=Path, default=None, help="write a QPS / latency plot here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    published = open_index(args.index, with_vectors=True)
    nprobe = args.nprobe or published.manifest.nprobe
    queries = query_texts(published, args.queries)
    published.encode(queries[:8])  # warm up the model
    baseline = in_process(published, queries, args.k, nprobe)
    recall = recall_at_10(published, queries, nprobe)

    port = free_port()
    start_serving(ServeConfig(index=args.index, port=port, replica_cpus=0))
    url = f"http://127.0.0.1:{port}"
    over_http(url, queries[:16], 4, args.k, nprobe)  # warm up
    results = {c: over_http(url, queries, c, args.k, nprobe) for c in (1, 8, 32)}
    serve.shutdown()

    table = Table(
        title=f"/search on {published.manifest.run_id}: {int(published.index.ntotal):,} docs, "
        f"{published.manifest.index_string}, nprobe {nprobe}, recall@10 {recall:.3f} ({os.cpu_count()} cores)"
    )
    for col in ("client", "QPS", "p50 ms", "p99 ms", "QPS vs in-process", "p50 vs in-process", "errors"):
        table.add_column(col, justify="right")
    table.add_row(
        "in-process, sequential",
        f"{baseline['qps']:.1f}",
        f"{baseline['p50_ms']:.1f}",
        f"{baseline['p99_ms']:.1f}",
        "1.00",
        "1.00",
        "0",
    )
    for c, r in results.items():
        table.add_row(
            f"HTTP, concurrency {c}",
            f"{r['qps']:.1f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            f"{r['qps'] / baseline['qps']:.2f}",
            f"{r['p50_ms'] / baseline['p50_ms']:.2f}",
            str(r["errors"]),
        )
    Console().print(table)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "in_process": baseline,
                    "http": results,
                    "recall_at_10": recall,
                    "nprobe": nprobe,
                    "index_string": published.manifest.index_string,
                    "docs": int(published.index.ntotal),
                },
                indent=2,
            )
        )
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
        cs = list(results)
        a.plot(cs, [results[c]["qps"] for c in cs], "o-", label="HTTP /search")
        a.axhline(baseline["qps"], color="grey", linestyle="--", label="in-process, sequential")
        a.set(xlabel="concurrent clients", ylabel="queries / s", xscale="log", title="Throughput")
        a.legend()
        b.plot(cs, [results[c]["p50_ms"] for c in cs], "o-", label="p50")
        b.plot(cs, [results[c]["p99_ms"] for c in cs], "s-", label="p99")
        b.axhline(baseline["p50_ms"], color="grey", linestyle="--", label="in-process p50")
        b.set(xlabel="concurrent clients", ylabel="ms", xscale="log", title="Latency")
        b.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
