"""The driver's memory and disk traffic for the BM25 postings' merge and split (issue #21, "holds a billion
passages"): the build's out-of-core way (lexical/postings.py write_merged_postings: each shard's postings
appended to buckets of terms, then each bucket sorted and appended to the .npy files; write_split_postings:
each serving part's postings written in chunks of terms) against the in-memory way it replaced (every shard's
postings concatenated and sorted by (term, id); every part's postings picked out of the whole postings held in
memory), in the same run.

Synthetic term counts (no model, no build): --shards shards of consecutive passages (ids row << 20, as the
layout numbers a document's first passage), POSTINGS_PER_PASSAGE distinct terms a passage drawn from a
vocabulary of passages / 10 terms by Zipf (s = 1) probability, counts 1 to 3, written as each shard's
lexical_counts.npz. Each measure runs in a fresh process (the driver of a build would): its peak RSS
(/proc/self/status VmHWM, anonymous and file-backed pages together), the peak of its anonymous memory alone
(sampled every 5 ms), the RSS before the work (imports), the wall time, and its disk traffic from
/proc/self/io: written, the bytes of the pages it dirtied (write_bytes: through write calls or a memory map; a
page dirtied again after the kernel wrote it back counts again), and read, the bytes its read calls returned
(rchar: from the page cache or the disk; a memory map's reads are not counted; the JSON also keeps read_bytes,
the reads the cache did not serve, and cancelled_write_bytes, dirty pages of files deleted before their
writeback). The split is into --parts serving parts, each passage's part drawn at random (as by inverted
list). Both ways' files are compared byte for byte (the run fails when they differ).

    python benchmarks/lexical_merge_benchmark.py [--passages 1000000,4000000] [--shards 8] [--parts 4] \
        [--work /tmp/rayindex-lexical-merge] [--json docs/benchmark-lexical-merge.json]

Everything is written under --work and removed after each size (about 3.5 GB at 4M passages).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from rayindex.layout import LEXICAL_ARRAYS, PASSAGE_BITS
from rayindex.lexical.counts import TermCounts, corpus_terms, load_counts, save_counts, shard_terms
from rayindex.lexical.postings import (
    from_rows,
    open_postings,
    shard_postings,
    write_merged_postings,
    write_postings,
    write_split_postings,
)

POSTINGS_PER_PASSAGE = 16  # distinct terms per synthetic passage, as benchmarks/lexical_serving_benchmark.py
SEED = 21


def synthetic_counts(passages: int, shards: int, folder: Path, seed: int = SEED) -> list[Path]:
    """Each shard's term counts file, shards of consecutive passages."""
    rng = np.random.default_rng(seed)
    vocabulary = passages // 10
    zipf = 1.0 / np.arange(1, vocabulary + 1)
    cumulative = np.cumsum(zipf / zipf.sum())
    hashes = np.unique(rng.integers(1, 2**63, int(vocabulary * 1.01), dtype=np.uint64))[:vocabulary]
    hashes = rng.permutation(hashes)  # frequent terms scattered through the sorted dictionary
    bounds = np.linspace(0, passages, shards + 1).astype(np.int64)
    paths = []
    for shard, (a, b) in enumerate(zip(bounds, bounds[1:])):
        rows = b - a
        drawn = np.minimum(np.searchsorted(cumulative, rng.random(rows * POSTINGS_PER_PASSAGE)), vocabulary - 1)
        keys = np.unique(np.repeat(np.arange(rows, dtype=np.int64), POSTINGS_PER_PASSAGE) * vocabulary + drawn)
        passage, term = keys // vocabulary, keys % vocabulary
        counts = rng.integers(1, 4, len(keys)).astype(np.int32)
        starts = np.searchsorted(passage, np.arange(rows + 1)).astype(np.int64)
        lengths = np.add.reduceat(counts, starts[:-1]) if len(keys) else np.zeros(rows, np.int32)
        lengths[starts[:-1] == starts[1:]] = 0  # a passage without terms (reduceat repeats the next value)
        ids = np.arange(a, b, dtype=np.int64) << PASSAGE_BITS
        path = folder / f"shard{shard:03d}.npz"
        save_counts(TermCounts(ids, lengths.astype(np.int32), starts, hashes[term], counts), path)
        paths.append(path)
    return paths


def parts_of(paths: list[Path], parts: int, seed: int = SEED) -> list[np.ndarray]:
    """Every passage's serving part, drawn at random: the ids each part owns (a split's input, as
    stages/partition.py reads them from the inverted lists)."""
    ids = np.concatenate([np.load(path)["ids"] for path in paths])
    owner = np.random.default_rng(seed).integers(0, parts, len(ids))
    return [ids[owner == part] for part in range(parts)]


def in_memory_merge(paths: list[Path], folder: Path) -> int:
    """The way the build merged before: every shard's counts and postings held, concatenated, sorted."""
    counts = [load_counts(path) for path in paths]
    corpus = corpus_terms(shard_terms(c) for c in counts)
    shards = [shard_postings(c, corpus) for c in counts]
    terms = np.concatenate([np.repeat(p.terms, np.diff(p.starts)) for p in shards])
    ids = np.concatenate([p.ids for p in shards])
    impacts = np.concatenate([p.impacts for p in shards])
    order = np.lexsort((ids, terms))
    postings = from_rows(terms[order], ids[order], impacts[order])
    write_postings(postings, folder)
    return len(postings.ids)


def out_of_core_merge(paths: list[Path], folder: Path) -> int:
    """The build's way (stages/lexical.py run): one shard's counts at a time, twice."""
    corpus = corpus_terms(shard_terms(load_counts(path)) for path in paths)
    return write_merged_postings((load_counts(path) for path in paths), corpus, folder)


def in_memory_split(source: Path, parts: list[np.ndarray], folders: list[Path]) -> int:
    """The way partition split before: the whole postings read into memory, each part's picked out."""
    postings = open_postings(source)
    ids, impacts = np.array(postings.ids), np.array(postings.impacts)
    owned = np.concatenate(parts)
    part_of = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    order = np.argsort(owned, kind="stable")
    owner = part_of[order][np.searchsorted(owned[order], ids)]
    terms = np.repeat(np.array(postings.terms), np.diff(postings.starts))
    for part, folder in enumerate(folders):
        mine = owner == part
        write_postings(from_rows(terms[mine], ids[mine], impacts[mine]), folder)
    return len(ids)


def out_of_core_split(source: Path, parts: list[np.ndarray], folders: list[Path]) -> int:
    """The build's way (stages/partition.py): write_split_postings over the memory-mapped postings."""
    return sum(write_split_postings(open_postings(source), parts, folders))


def kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def io_bytes() -> dict[str, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {key: int(value) for key, value in fields.items()}


def child(task: str, work: Path, parts: int) -> dict:
    """(In a fresh process.) One way of the merge or the split; its peak memory and wall time."""
    paths = sorted((work / "counts").glob("shard*.npz"))
    owned = parts_of(paths, parts) if task.endswith("split") else None
    before = kb("VmRSS")
    peak_anon = [kb("RssAnon")]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak_anon[0] = max(peak_anon[0], kb("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    io_before = io_bytes()
    started = time.perf_counter()
    if task.endswith("merge"):
        way = in_memory_merge if task.startswith("in-memory") else out_of_core_merge
        postings = way(paths, work / f"merged-{task.removesuffix('-merge')}")
    else:
        way = in_memory_split if task.startswith("in-memory") else out_of_core_split
        folders = [work / f"split-{task.removesuffix('-split')}" / f"part{p}" for p in range(parts)]
        postings = way(work / "merged-out-of-core", owned, folders)
    wall = time.perf_counter() - started
    io_after = io_bytes()
    io = {key: io_after[key] - io_before[key] for key in io_after}
    done.set()
    sampler.join()
    return {
        "task": task,
        "postings": int(postings),
        "rss_before_mb": before / 1024,
        "peak_rss_mb": kb("VmHWM") / 1024,
        "peak_anon_mb": max(peak_anon[0], kb("RssAnon")) / 1024,
        "wall_s": wall,
        "written_mb": io["write_bytes"] / 2**20,
        "read_mb": io["rchar"] / 2**20,
        "storage_read_mb": io["read_bytes"] / 2**20,
        "cancelled_write_mb": io["cancelled_write_bytes"] / 2**20,
    }


def run_child(task: str, work: Path, parts: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", task, "--work", str(work), "--parts", str(parts)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for name in LEXICAL_ARRAYS:
        with open(folder / f"{name}.npy", "rb") as fh:
            while block := fh.read(1 << 24):
                sha.update(block)
    return sha.hexdigest()


def same_files(a: Path, b: Path, parts: int | None = None) -> bool:
    if parts is None:
        return digest(a) == digest(b)
    return all(digest(a / f"part{p}") == digest(b / f"part{p}") for p in range(parts))


def measure(passages: int, shards: int, parts: int, work: Path) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    (work / "counts").mkdir(parents=True)
    try:
        synthetic_counts(passages, shards, work / "counts")
        counts_bytes = sum(p.stat().st_size for p in (work / "counts").iterdir())
        runs = [run_child(task, work, parts) for task in ("out-of-core-merge", "in-memory-merge")]
        if not same_files(work / "merged-out-of-core", work / "merged-in-memory"):
            raise SystemExit(f"{passages} passages: the merges' files differ")
        shutil.rmtree(work / "merged-in-memory")
        runs += [run_child(task, work, parts) for task in ("out-of-core-split", "in-memory-split")]
        if not same_files(work / "split-out-of-core", work / "split-in-memory", parts):
            raise SystemExit(f"{passages} passages: the splits' files differ")
        postings_bytes = sum(f.stat().st_size for f in (work / "merged-out-of-core").iterdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by_task = {r["task"]: r for r in runs}
    ratios = {
        step: {
            "peak_rss": by_task[f"in-memory-{step}"]["peak_rss_mb"] / by_task[f"out-of-core-{step}"]["peak_rss_mb"],
            "peak_anon": by_task[f"in-memory-{step}"]["peak_anon_mb"] / by_task[f"out-of-core-{step}"]["peak_anon_mb"],
            "wall": by_task[f"out-of-core-{step}"]["wall_s"] / by_task[f"in-memory-{step}"]["wall_s"],
        }
        for step in ("merge", "split")
    }
    return {
        "passages": passages,
        "shards": shards,
        "parts": parts,
        "postings": runs[0]["postings"],
        "counts_mb": counts_bytes / 2**20,
        "postings_mb": postings_bytes / 2**20,
        "runs": runs,
        "in_memory_over_out_of_core": ratios,
        "files_equal": True,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", default="1000000,4000000")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path("/tmp/rayindex-lexical-merge"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work, args.parts)))
        return
    sizes = [measure(int(float(n)), args.shards, args.parts, args.work) for n in args.passages.split(",")]
    table = Table(title="BM25 postings merge and split: the driver's memory and disk traffic")
    columns = ("passages", "postings", "way", "peak RSS MB", "peak anon MB", "RSS before MB", "wall s")
    for column in (*columns, "written MB", "read MB"):
        table.add_column(column, justify="right")
    for size in sizes:
        for r in size["runs"]:
            table.add_row(
                f"{size['passages']:,}",
                f"{size['postings']:,}",
                r["task"],
                f"{r['peak_rss_mb']:,.0f}",
                f"{r['peak_anon_mb']:,.0f}",
                f"{r['rss_before_mb']:,.0f}",
                f"{r['wall_s']:.1f}",
                f"{r['written_mb']:,.0f}",
                f"{r['read_mb']:,.0f}",
            )
    Console().print(table)
    for size in sizes:
        for step, ratio in size["in_memory_over_out_of_core"].items():
            print(
                f"{size['passages']:,} passages, {step}: in-memory peak RSS {ratio['peak_rss']:.1f}x the out-of-core "
                f"one (anonymous {ratio['peak_anon']:.1f}x); out-of-core wall time {ratio['wall']:.2f}x"
            )
    if args.json:
        meta = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "cores": len(os.sched_getaffinity(0))}
        args.json.write_text(json.dumps({**meta, "sizes": sizes}, indent=1) + "\n")


if __name__ == "__main__":
    main()
