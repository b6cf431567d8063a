"""Streaming at scale: synthetic clustered vectors (encoding skipped) through train -> per-shard add
-> on-disk merge, with wall time and peak anonymous memory (heap, not page cache) per stage.

Each stage runs in a fresh process (the library's own stage functions: train_quantizer, add_shard,
merge_shards) so its peak memory is its own. Time should grow linearly with the corpus and peak
memory stay flat: only the index's in-RAM parts (centroids, codebooks) and one shard's codes may
be resident.

    python benchmarks/scale_benchmark.py [--sizes 1e6,4e6,16e6] [--dim 96] [--index IVF4096,PQ24np] [--workdir
    /tmp/scale]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SHARD_ROWS = 1_000_000


def peak_anon_mb(stop: threading.Event, out: list) -> None:
    """Sample RssAnon of this process every 20 ms (VmHWM would count memory-mapped file pages)."""
    peak = 0
    while True:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                peak = max(peak, int(line.split()[1]))
        if stop.is_set():
            break
        stop.wait(0.02)
    out.append(peak / 1024)


def run_stage(stage: str, work: Path, n: int, dim: int, index_string: str) -> dict:
    """One stage in this process: returns seconds and peak anonymous MB."""
    from rayindex.infra.storage import Store, file_sha256
    from rayindex.ivf.index import make_index
    from rayindex.ivf.index_params import training_sample_size
    from rayindex.layout import SHARD_INDEX_FILE, TRAINED_FILE, shard_dir, shard_rel
    from rayindex.stages.add import add_shard
    from rayindex.stages.merge import merge_shards
    from rayindex.stages.train import train_quantizer

    version = Store(str(work))  # a version folder laid out as the encode stage leaves it
    n_shards = (n + SHARD_ROWS - 1) // SHARD_ROWS
    counts = [min(SHARD_ROWS, n - k * SHARD_ROWS) for k in range(n_shards)]
    stop, peak = threading.Event(), []
    sampler = threading.Thread(target=peak_anon_mb, args=(stop, peak))
    sampler.start()
    start = time.perf_counter()
    if stage == "train":
        import faiss

        probe = make_index(index_string, dim, "cosine")
        ivf = faiss.downcast_index(faiss.extract_index_ivf(probe))
        train_quantizer(
            index_string,
            "cosine",
            version,
            {},
            [shard_rel(k) for k in range(n_shards)],
            counts,
            dim,
            training_sample_size(n, ivf.nlist, hasattr(ivf, "pq")),
            1234,
            False,
        )
    elif stage == "add":
        sha = file_sha256(work / TRAINED_FILE)
        for k, count in enumerate(counts):
            add_shard(version, sha, k, count, {}, dim)
    else:
        (work / "merged").mkdir(exist_ok=True)
        merge_shards(
            str(work / TRAINED_FILE),
            [str(shard_dir(work, k) / SHARD_INDEX_FILE) for k in range(n_shards)],
            str(work / "merged"),
            on_disk=True,
            nprobe=1,
        )
    seconds = time.perf_counter() - start
    stop.set()  # the sampler reads once more before it stops
    sampler.join()
    return {"seconds": seconds, "peak_anon_mb": peak[0]}


def write_vectors(work: Path, n: int, dim: int) -> None:
    """Clustered, low-intrinsic-dimension vectors, written shard by shard as the encode stage would."""
    sys.path.insert(0, str(Path(__file__).parent))
    from build_benchmark import clustered_vectors

    from rayindex.layout import EMBEDDINGS_FILE, VECTOR_IDS_FILE, shard_dir

    for k in range((n + SHARD_ROWS - 1) // SHARD_ROWS):
        count = min(SHARD_ROWS, n - k * SHARD_ROWS)
        d = shard_dir(work, k)
        d.mkdir(parents=True, exist_ok=True)
        clustered_vectors(count, dim, seed=k).astype("<f4").tofile(d / EMBEDDINGS_FILE)
        np.save(d / VECTOR_IDS_FILE, np.arange(k * SHARD_ROWS, k * SHARD_ROWS + count, dtype=np.int64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e6,4e6,16e6")
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--index", default="IVF4096,PQ24np")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rayindex-scale"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(run_stage(args.stage, args.workdir, args.n, args.dim, args.index)))
        return
    from rich.console import Console
    from rich.table import Table

    results = {}
    for n in (int(float(v)) for v in args.sizes.split(",")):
        work = args.workdir / f"n{n}"
        shutil.rmtree(work, ignore_errors=True)
        write_vectors(work, n, args.dim)
        for stage in ("train", "add", "merge"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--stage",
                    stage,
                    "--n",
                    str(n),
                    "--dim",
                    str(args.dim),
                    "--index",
                    args.index,
                    "--workdir",
                    str(work),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[f"{n}/{stage}"] = json.loads(out.stdout.strip().splitlines()[-1])
            print(n, stage, results[f"{n}/{stage}"], flush=True)
        shutil.rmtree(work, ignore_errors=True)
    table = Table(title=f"{args.index}, d={args.dim}, shards of {SHARD_ROWS:,}: seconds / peak anonymous MB per stage")
    table.add_column("vectors", justify="right")
    for stage in ("train", "add", "merge (on disk)"):
        table.add_column(stage, justify="right")
    table.add_column("add s per 1M", justify="right")
    for n in (int(float(v)) for v in args.sizes.split(",")):
        cells = [
            f"{results[f'{n}/{s}']['seconds']:.1f} s / {results[f'{n}/{s}']['peak_anon_mb']:.0f} MB"
            for s in ("train", "add", "merge")
        ]
        table.add_row(f"{n:,}", *cells, f"{results[f'{n}/add']['seconds'] / (n / 1e6):.1f}")
    Console(width=140).print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
