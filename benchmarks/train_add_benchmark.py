"""Train and add on CPU against GPU, in one run, through the build's own functions (stages/train.py
train_index, ivf/index.py coarse_mse and add_assigned), on the same vectors and threads:

  1. train: index_factory + train on a sample (k-means of the coarse quantizer on the CPU threads, or on
     the GPUs FAISS sees, as the train stage does on a GPU build), then coarse_mse on the sample;
  2. add: the add stage's chunks (ADD_CHUNK vectors) into the trained index, the coarse assignment by the
     index's own quantizer on the CPU, or by the exact assigner on the GPU (gpu_assigner); how many lists
     the two assignments agree on.

Where FAISS sees no GPU (faiss-cpu, no CUDA device) only the CPU side runs, and the output says the GPU
side was skipped. Data: the build benchmark's clustered vectors (normalized, inner product).

    python benchmarks/train_add_benchmark.py [--vectors 200000] [--dim 384] [--index IVF4096,PQ48np]
        [--train-sample 131072] [--threads N] [--json docs/benchmark-train-add.json]
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
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from build_benchmark import clustered_vectors  # noqa: E402

from rayindex.ivf.index import add_assigned, coarse_mse, gpu_assigner, gpus_usable  # noqa: E402
from rayindex.stages.add import ADD_CHUNK  # noqa: E402
from rayindex.stages.train import train_index  # noqa: E402


def side(index_string: str, x: np.ndarray, sample: np.ndarray, on_gpu: bool) -> tuple[dict, faiss.Index]:
    """Seconds to train (and measure coarse_mse) and to add every vector, on one side."""
    start = time.perf_counter()
    index = train_index(index_string, x.shape[1], "cosine", sample, seed=1234, use_gpu=on_gpu)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    mse = coarse_mse(index, sample)
    mse_s = time.perf_counter() - start
    assigner = gpu_assigner(index) if on_gpu else None
    ids = np.arange(len(x), dtype=np.int64)
    start = time.perf_counter()
    for first in range(0, len(x), ADD_CHUNK):
        add_assigned(index, x[first : first + ADD_CHUNK], ids[first : first + ADD_CHUNK], assigner)
    add_s = time.perf_counter() - start
    figures = {"train_s": train_s, "coarse_mse_s": mse_s, "coarse_mse": mse, "add_s": add_s}
    return figures, index


def lists_of(index: faiss.Index, n: int) -> np.ndarray:
    """Which list holds each vector id 0..n-1."""
    ivf = faiss.extract_index_ivf(index)
    where = np.full(n, -1, np.int64)
    for list_no in range(ivf.nlist):
        size = ivf.invlists.list_size(list_no)
        if size:
            where[faiss.rev_swig_ptr(ivf.invlists.get_ids(list_no), size)] = list_no
    return where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--index", default="IVF4096,PQ48np")
    parser.add_argument("--train-sample", type=int, default=131_072)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="FAISS's CPU threads (both sides)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    console = Console(width=150)
    x = clustered_vectors(args.vectors, args.dim)
    sample = np.ascontiguousarray(x[np.random.default_rng(7).permutation(len(x))[: args.train_sample]])
    results: dict = {
        "index": args.index,
        "vectors": len(x),
        "dim": args.dim,
        "train_sample": len(sample),
        "threads": args.threads,
        "faiss": faiss.__version__,
        "gpus": faiss.get_num_gpus() if gpus_usable() else 0,
    }
    console.print(f"{args.index}: {len(x):,} x {args.dim} vectors, sample {len(sample):,}, {args.threads} CPU threads")
    results["cpu"], cpu_index = side(args.index, x, sample, on_gpu=False)
    if gpus_usable():
        results["gpu"], gpu_index = side(args.index, x, sample, on_gpu=True)
        results["lists_agree"] = float(np.mean(lists_of(cpu_index, len(x)) == lists_of(gpu_index, len(x))))
        results["ratios_cpu_over_gpu"] = {
            k: results["cpu"][k] / results["gpu"][k] for k in ("train_s", "coarse_mse_s", "add_s")
        }
    table = Table(title="train and add: seconds (CPU / GPU: how many times faster the GPU side is)")
    for col in ("", "CPU", "GPU", "CPU / GPU"):
        table.add_column(col, justify="right")
    for key, label in (("train_s", "train"), ("coarse_mse_s", "coarse_mse"), ("add_s", "add")):
        gpu = results.get("gpu", {}).get(key)
        ratio = results.get("ratios_cpu_over_gpu", {}).get(key)
        table.add_row(
            label,
            f"{results['cpu'][key]:.2f}",
            "skipped" if gpu is None else f"{gpu:.2f}",
            "" if ratio is None else f"{ratio:.1f}",
        )
    console.print(table)
    if "gpu" in results:
        console.print(
            f"lists agree for {results['lists_agree']:.2%} of vectors; "
            f"coarse_mse CPU {results['cpu']['coarse_mse']:.4f}, GPU {results['gpu']['coarse_mse']:.4f}"
        )
    else:
        console.print("GPU side skipped: FAISS sees no GPU here (faiss-cpu, or no CUDA device)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
