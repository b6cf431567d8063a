"""The add stage's coarse assignment at nlist 65,536, d=384: a flat quantizer vs an HNSW32 one.

Besides encoding, `index.add` costs one quantizer search of k=1 per vector (which list it goes to). A
flat quantizer computes a distance to every centroid (nlist x d multiply-adds per vector); an HNSW32
quantizer walks a graph over the centroids (efSearch 16, the default `IVF65536_HNSW32` gets from
index_factory). Both quantizers hold the same centroids and run in this process on the same threads:

  1. assignment alone: quantizer.search(x, 1) on one batch, flat and HNSW alternately (best of --repeats),
     with how often HNSW picks the exact (flat) list and how much farther its pick is on average;
  2. a real add: `IVF65536_HNSW32,PQ48np` fed a database of --database vectors in the add stage's
     65,536-vector chunks, and `IVF65536,PQ48np` fed one such chunk (per-vector add cost does not depend
     on how many vectors the index already holds, so one chunk gives the flat rate).

Data: the build benchmark's clustered vectors (2,000 Gaussian centres spread along a 32-d subspace,
normalized; metric inner product, the build's default "cosine"). The centroids are not k-means
centroids: they are 65,536 other random points of the same mixture, so they follow the data's density
as k-means centroids would, without hours of k-means on 2 cores.

    python benchmarks/coarse_assign_benchmark.py [--nlist 65536] [--dim 384] [--batch 50000]
        [--database 1000000] [--threads 2] [--json docs/benchmark-coarse-assign.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from build_benchmark import clustered_vectors  # noqa: E402

ADD_CHUNK = 65_536  # the add stage's add_with_ids chunk (rayindex.stages.add.ADD_CHUNK)
PQ_TRAIN = 16_384  # 64 points per PQ centroid: enough codebooks to encode with; their quality is not measured


def ivf_with_centroids(index_string: str, centroids: np.ndarray, sample: np.ndarray) -> faiss.Index:
    """index_factory's index with the given centroids as its coarse quantizer; train then only trains PQ."""
    index = faiss.index_factory(centroids.shape[1], index_string, faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(index).quantizer.add(centroids)
    index.train(sample)
    return index


def timed(function, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def assignment(flat: faiss.Index, hnsw: faiss.Index, centroids: np.ndarray, batch: np.ndarray, repeats: int) -> dict:
    """Vectors/s of quantizer.search(x, 1), flat and HNSW alternately (best of repeats), and HNSW's agreement."""
    flat_s, hnsw_s = [], []
    for _ in range(repeats):
        seconds, (_, exact) = timed(flat.search, batch, 1)
        flat_s.append(seconds)
        seconds, (_, approx) = timed(hnsw.search, batch, 1)
        hnsw_s.append(seconds)
    exact, approx = exact[:, 0], approx[:, 0]
    exact_d2 = ((batch - centroids[exact]) ** 2).sum(axis=1)
    approx_d2 = ((batch - centroids[approx]) ** 2).sum(axis=1)
    return {
        "batch": len(batch),
        "flat_vectors_per_s": len(batch) / min(flat_s),
        "hnsw_vectors_per_s": len(batch) / min(hnsw_s),
        "flat_seconds": flat_s,
        "hnsw_seconds": hnsw_s,
        "same_list": float(np.mean(exact == approx)),
        "coarse_mse_hnsw_over_exact": float(approx_d2.mean() / exact_d2.mean()),
    }


def add_rate(index: faiss.Index, n: int, dim: int) -> dict:
    """Vectors/s of index.add over n vectors in ADD_CHUNK chunks (generating them is not timed)."""
    seconds = 0.0
    for start in range(0, n, ADD_CHUNK):
        chunk = clustered_vectors(min(ADD_CHUNK, n - start), dim, seed=1000 + start // ADD_CHUNK)
        seconds += timed(index.add, chunk)[0]
    return {"vectors": n, "seconds": seconds, "vectors_per_s": n / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nlist", type=int, default=65_536)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--pq", type=int, default=48)
    parser.add_argument("--batch", type=int, default=50_000, help="vectors per assignment timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--database", type=int, default=1_000_000, help="vectors added to the HNSW index")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    from rich.console import Console
    from rich.table import Table

    centroids = clustered_vectors(args.nlist, args.dim, seed=7)
    sample, batch = clustered_vectors(PQ_TRAIN, args.dim, seed=8), clustered_vectors(args.batch, args.dim, seed=9)
    hnsw_string, flat_string = f"IVF{args.nlist}_HNSW32,PQ{args.pq}np", f"IVF{args.nlist},PQ{args.pq}np"
    graph_s, hnsw_index = timed(ivf_with_centroids, hnsw_string, centroids, sample)
    flat_index = ivf_with_centroids(flat_string, centroids, sample)
    hnsw = faiss.downcast_index(faiss.extract_index_ivf(hnsw_index).quantizer)
    flat = faiss.extract_index_ivf(flat_index).quantizer
    print(f"{hnsw_string}: graph over {args.nlist:,} centroids + PQ training in {graph_s:.1f} s", flush=True)

    results = {
        "nlist": args.nlist,
        "dim": args.dim,
        "threads": args.threads,
        "faiss": faiss.__version__,
        "hnsw_ef_search": hnsw.hnsw.efSearch,
        "hnsw_build_and_pq_train_seconds": graph_s,
        "assign": assignment(flat, hnsw, centroids, batch, args.repeats),
    }
    print("assign", json.dumps(results["assign"]), flush=True)
    results["add_flat"] = add_rate(flat_index, ADD_CHUNK, args.dim)
    print(flat_string, "add", json.dumps(results["add_flat"]), flush=True)
    results["add_hnsw"] = add_rate(hnsw_index, args.database, args.dim)
    print(hnsw_string, "add", json.dumps(results["add_hnsw"]), flush=True)

    a, af, ah = results["assign"], results["add_flat"], results["add_hnsw"]
    table = Table(title=f"nlist {args.nlist:,}, d={args.dim}, {args.threads} threads: vectors/s")
    for column in ("measure", "flat quantizer", "HNSW32 quantizer", "HNSW / flat"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    table.add_row(
        f"assign (search k=1), batch of {a['batch']:,}",
        f"{a['flat_vectors_per_s']:,.0f}",
        f"{a['hnsw_vectors_per_s']:,.0f}",
        f"{a['hnsw_vectors_per_s'] / a['flat_vectors_per_s']:.1f}x",
    )
    table.add_row(
        f"add to ...,PQ{args.pq}np: flat {af['vectors']:,}, HNSW {ah['vectors']:,} vectors",
        f"{af['vectors_per_s']:,.0f}",
        f"{ah['vectors_per_s']:,.0f}",
        f"{ah['vectors_per_s'] / af['vectors_per_s']:.1f}x",
    )
    table.add_row("same list as exact", "1", f"{a['same_list']:.3f}", "")
    table.add_row("coarse MSE vs exact", "1", f"{a['coarse_mse_hnsw_over_exact']:.4f}", "")
    Console(width=140).print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
