"""Sharded hybrid search, its two fan-outs overlapped or one after the other (issue #21): a router opened in this
process (query/sharded.py open_router) on the shard deployments of `rayindex serve --shards N` over the man page
build of hybrid_benchmark.py (split for N first when it is not), each query timed five ways, interleaved, so that
the comparison is paired (the machine's load drifts alike for all five):

- overlapped: `rank(mode="hybrid")`, what serving does (every lexical call sent before the dense search, gathered
  after it);
- one after the other: the dense search (`search_documents`), then the lexical one (`lexical_passages`), as
  serving did before;
- each side alone, and the query's encoding alone.

--router-threads sets this process's torch and FAISS threads: on a 2-core machine 2 leave the shards no core
while the query is encoded, 1 leaves them one.

    python benchmarks/sharded_overlap_benchmark.py [--serving-shards 3] [--queries 100] [--router-threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import faiss
import numpy as np
import torch
from hybrid_benchmark import man_pages, quote_queries
from ray import serve

from rayindex import api
from rayindex.config import AppConfig, ServeConfig
from rayindex.query.launch import free_port, start_serving
from rayindex.query.search import FUSION_DEPTH, open_index
from rayindex.query.sharded import open_router

K = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serving-shards", type=int, default=3)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--router-threads", type=int, default=1)
    parser.add_argument("--man-pages", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/rayindex-hybrid"))
    args = parser.parse_args()
    output = args.work / "man" / "out"
    if not (output / "CURRENT").exists():
        raise SystemExit(f"{output}: no build; run benchmarks/hybrid_benchmark.py --sets quotes first")
    shards = args.serving_shards
    if shards not in open_index(output).manifest.serving:
        api.partition(str(output), shards)
    texts = [q["query"] for q in quote_queries(man_pages(args.man_pages), args.queries)]
    config = ServeConfig(
        index=str(output), port=free_port(), replica_cpus=0, shards=shards, shard_cpus=0, ingress="python"
    )
    start_serving(config)  # the ingress of the figures in docs/benchmarks.md
    try:
        handles = [serve.get_deployment_handle(f"shard-{part}", app_name="rayindex") for part in range(shards)]
        torch.set_num_threads(args.router_threads)
        faiss.omp_set_num_threads(args.router_threads)
        router = open_router(AppConfig(index=str(output), shards=shards), handles)
        depth = max(K, FUSION_DEPTH)
        fetch = router.lexical_fetch(depth, 1)

        def one_after_the_other(query: str) -> None:
            router.search_documents(router.encode([query]), depth)
            router.lexical_passages(router.query_terms(query), fetch, None)

        ways = {
            "overlapped": lambda query: router.rank([query], K, mode="hybrid"),
            "one_after_the_other": one_after_the_other,
            "dense": lambda query: router.search_documents(router.encode([query]), depth),
            "lexical": lambda query: router.lexical_passages(router.query_terms(query), fetch, None),
            "encode": lambda query: router.encode([query]),
        }
        for query in texts[:10]:  # warm up
            for way in ways.values():
                way(query)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for query in texts:
            for name, way in ways.items():
                started = time.perf_counter()
                way(query)
                times[name].append(1000 * (time.perf_counter() - started))
    finally:
        serve.shutdown()
    saved = np.subtract(times["one_after_the_other"], times["overlapped"])
    print(
        json.dumps(
            {
                "serving_shards": shards,
                "router_threads": args.router_threads,
                "queries": len(texts),
                "p50_ms": {name: round(float(np.median(t)), 2) for name, t in times.items()},
                "saved_p50_ms": round(float(np.median(saved)), 2),  # paired, per query
            }
        )
    )


if __name__ == "__main__":
    main()
