"""Lexical (BM25) serving at 1M and 10M passages (issue #21): a search's time with MaxScore pruning against
summing every posting of the query's terms, and the memory of a process serving memory-mapped postings.

Synthetic postings (no model, no build): POSTINGS_PER_PASSAGE distinct terms per passage on average, a
vocabulary of passages / 10 terms with Zipf (s = 1) document frequencies capped at MAX_DF_SHARE of the
passages (stopwords never reach the postings), impacts idf x uniform(0.3, 1), written with write_postings
(terms, starts, ids, impacts, maxima). Searches: 2 to 6 terms drawn by their Zipf probability (a term may
come twice, and common terms come often: harder on pruning than users' queries, whose rare words bound the
rest), k = 10, 100 and 1,000 (a hybrid search asks the lexical side for a few hundred passages).

Per size, each measure in a fresh process that opens the postings memory-mapped:
- time: the same searches by search_postings (MaxScore) and exhaustive_search, alternating per search, mean
  and p50/p99, and their ratio; the answers compared (they must be equal: the run fails otherwise);
- memory: RSS after 1,000 MaxScore searches at k = 100, anonymous (the process' own) and file-backed (pages of
  the mapped postings, page cache the kernel can take back);
- the same searches in a memory cgroup limited to --limit-mb (far below the postings' size), the postings'
  pages dropped from the page cache first, so that every page read is charged to it: the answers' digest and
  the time per search, showing that serving needs the anonymous memory only. Needs root and cgroup v1 or v2
  memory control; skipped, and said so, otherwise.

    python benchmarks/lexical_serving_benchmark.py [--passages 1000000,10000000] [--searches 1000] \
        [--work /tmp/rayindex-lexical-serving] [--json docs/benchmark-lexical-serving.json] \
        [--png docs/benchmark-lexical-serving.png]

The postings are written to --work and removed after each size (1.6 GB at 10M), or kept and reused with --keep.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from rayindex.lexical.postings import (
    exhaustive_search,
    from_rows,
    open_postings,
    search_postings,
    stepped,
    term_rows,
    write_postings,
)

POSTINGS_PER_PASSAGE = 16  # distinct terms per synthetic passage: 10M passages in 1.6 GB of postings
MAX_DF_SHARE = 0.05  # no term in more than 5% of the passages
KS = (10, 100, 1000)
MEMORY_K = 100
SEED = 21


def synthetic_statistics(passages: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each term's document frequency before duplicates are removed, and the Zipf probability queries draw it
    with (the first draws of its generator: lexical_capacity_benchmark.py replays them)."""
    vocabulary = passages // 10
    zipf = 1.0 / np.arange(1, vocabulary + 1)
    zipf /= zipf.sum()
    doc_freqs = np.minimum(rng.multinomial(passages * POSTINGS_PER_PASSAGE, zipf), int(MAX_DF_SHARE * passages))
    doc_freqs = np.maximum(doc_freqs, 1)
    order = rng.permutation(vocabulary)  # the frequent terms scattered through the sorted dictionary
    return doc_freqs[order], zipf[order]


def synthetic_postings(passages: int, seed: int = SEED):
    """The synthetic Postings (a passage at most once per term), and each term's query probability."""
    rng = np.random.default_rng(seed)
    doc_freqs, probability = synthetic_statistics(passages, rng)
    vocabulary = len(doc_freqs)
    terms = np.unique(rng.integers(1, 2**63, int(vocabulary * 1.01), dtype=np.uint64))[:vocabulary]
    keys = np.repeat(np.arange(vocabulary, dtype=np.int64), doc_freqs) * passages
    keys += rng.integers(0, passages, len(keys), dtype=np.int64)
    keys = np.unique(keys)  # by term, ids ascending within it, each once
    term_of = keys // passages
    idf = np.log1p((passages - doc_freqs + 0.5) / (doc_freqs + 0.5))
    impacts = stepped(idf[term_of] * rng.uniform(0.3, 1.0, len(keys)))
    return from_rows(terms[term_of], keys % passages, impacts), probability


def query_terms(probability: np.ndarray, searches: int, seed: int = 7):
    """The terms of each synthetic search: 2 to 6 drawn by their Zipf probability (a term may come twice)."""
    rng = np.random.default_rng(seed)
    for _ in range(searches):
        yield rng.choice(len(probability), rng.integers(2, 7), p=probability)


def rss_kb() -> dict:
    status = Path("/proc/self/status").read_text()
    keys = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
    return {key: int(re.search(rf"{key}:\s+(\d+)", status).group(1)) for key in keys}


def child(folder: Path, task: str, searches: int) -> dict:
    """(In a fresh process.) task: 'time' (MaxScore vs exhaustive per k) or 'memory' (MaxScore at MEMORY_K:
    RSS, ms per search and the answers' digest)."""
    before = rss_kb()
    postings = open_postings(folder)
    probability = np.load(folder / "probability.npy")
    asked = [np.sort(postings.terms[picked]) for picked in query_terms(probability, searches)]
    opened = rss_kb()
    if task == "memory":
        digest = hashlib.sha256()
        started = time.perf_counter()
        for terms in asked:
            ids, scores = search_postings(postings, terms, MEMORY_K)
            digest.update(ids.tobytes() + scores.tobytes())
        took = time.perf_counter() - started
        after = rss_kb()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # what glibc keeps of freed arrays back to the system
        trimmed = rss_kb()
        tracemalloc.start()  # numpy reports its arrays: a search's peak of them, over the first 200 searches
        peaks = []
        for terms in asked[:200]:
            tracemalloc.reset_peak()
            search_postings(postings, terms, MEMORY_K)
            peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        return {
            "rss_before_open_mb": before["VmRSS"] / 1024,
            "rss_opened_mb": opened["VmRSS"] / 1024,
            "rss_anon_opened_mb": opened["RssAnon"] / 1024,  # the benchmark's own arrays (its queries) included
            "rss_after_mb": after["VmRSS"] / 1024,
            "rss_anon_after_mb": after["RssAnon"] / 1024,
            "rss_anon_trimmed_mb": trimmed["RssAnon"] / 1024,  # live: the freed memory glibc kept released
            "search_peak_mb": max(peaks) / 2**20,
            "search_peak_p50_mb": float(np.median(peaks)) / 2**20,
            "rss_file_after_mb": after["RssFile"] / 1024,
            "peak_rss_mb": after["VmHWM"] / 1024,
            "ms_per_search": 1000 * took / searches,
            "digest": digest.hexdigest(),
        }
    result = {}
    for k in KS:
        times = {"maxscore": [], "exhaustive": []}
        for terms in asked:
            started = time.perf_counter()
            pruned = search_postings(postings, terms, k)
            times["maxscore"].append(time.perf_counter() - started)
            where, found = term_rows(postings, terms)
            started = time.perf_counter()
            summed = exhaustive_search(postings, where[found], k)
            times["exhaustive"].append(time.perf_counter() - started)
            if not (np.array_equal(pruned[0], summed[0]) and np.array_equal(pruned[1], summed[1])):
                raise SystemExit(f"k={k}: MaxScore and the exhaustive search disagree on {terms.tolist()}")
        result[k] = {
            way: {
                "mean_ms": 1000 * float(np.mean(t)),
                "p50_ms": 1000 * float(np.median(t)),
                "p99_ms": 1000 * float(np.percentile(t, 99)),
            }
            for way, t in times.items()
        }
        result[k]["mean_ratio"] = result[k]["exhaustive"]["mean_ms"] / result[k]["maxscore"]["mean_ms"]
    return result


def run_child(folder: Path, task: str, searches: int, cgroup: Path | None = None) -> dict:
    command = [sys.executable, __file__, "--child", task, "--folder", str(folder), "--searches", str(searches)]
    if cgroup is not None:  # the shell joins the cgroup, then becomes the child: every page it reads is charged
        command = ["sh", "-c", f'echo $$ > {cgroup / "cgroup.procs"} && exec "$@"', "sh", *command]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{task} child failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def drop_cached(folder: Path) -> None:
    """The postings' pages out of the page cache (they are on disk: written and synced)."""
    for path in folder.glob("*.npy"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def memory_cgroup(limit_mb: int) -> tuple[Path, str, str] | None:
    """A new memory cgroup limited to limit_mb: (its folder, the peak file, the limit hit counter file), or
    None where this process cannot make one (not root, no memory controller)."""
    name = f"rayindex-lexical-{os.getpid()}"
    for root, limit_file, peak_file, events in (
        (Path("/sys/fs/cgroup"), "memory.max", "memory.peak", "memory.events"),  # v2
        (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.max_usage_in_bytes", "memory.failcnt"),
    ):
        if not (root / limit_file).exists() and not (root / "cgroup.controllers").exists():
            continue
        try:
            (root / name).mkdir()
            (root / name / limit_file).write_text(str(limit_mb << 20))
            return root / name, peak_file, events
        except OSError:
            if (root / name).exists():
                (root / name).rmdir()
    return None


def measure(passages: int, searches: int, work: Path, limit_mb: int, keep: bool, console: Console) -> dict:
    folder = work / f"postings-{passages}"
    started = time.monotonic()
    if not (folder / "probability.npy").exists():  # written last: a whole earlier --keep run's
        folder.mkdir(parents=True, exist_ok=True)
        postings, probability = synthetic_postings(passages)
        write_postings(postings, folder)
        np.save(folder / "probability.npy", probability)
        del postings
    size = sum(f.stat().st_size for f in folder.glob("*.npy"))
    console.print(f"{passages:,} passages: {size / 1e9:.2f} GB of postings in {time.monotonic() - started:.0f} s")
    try:
        result = {"passages": passages, "postings_bytes": size, "time": run_child(folder, "time", searches)}
        console.print(f"  time: {json.dumps({k: round(v['mean_ratio'], 2) for k, v in result['time'].items()})}")
        result["memory"] = run_child(folder, "memory", searches)
        console.print(f"  memory: {result['memory']}")
        made = memory_cgroup(limit_mb)
        if made is None:
            result["limited"] = {"skipped": "no memory cgroup could be made (needs root and a memory controller)"}
        else:
            cgroup, peak_file, events = made
            try:
                drop_cached(folder)
                limited = run_child(folder, "memory", searches, cgroup)
                peak = int((cgroup / peak_file).read_text())
                limited |= {
                    "limit_mb": limit_mb,
                    "cgroup_peak_mb": peak / 2**20,
                    "limit_events": (cgroup / events).read_text().strip(),
                    "same_answers": limited["digest"] == result["memory"]["digest"],
                }
                result["limited"] = limited
            finally:
                cgroup.rmdir()
            console.print(f"  in {limit_mb} MB: {result['limited']}")
            if not result["limited"]["same_answers"]:
                raise SystemExit("the searches in the memory-limited cgroup gave other answers")
    finally:
        if not keep:
            shutil.rmtree(folder)
    return result


def print_tables(result: dict, console: Console) -> None:
    runs = result["runs"]
    times = Table(title="Lexical search ms: MaxScore vs every posting summed (same searches, same process)")
    for col in ("passages", "k", "MaxScore mean / p50 / p99", "exhaustive mean / p50 / p99", "mean speed-up"):
        times.add_column(col, justify="right")
    for run in runs:
        for k, t in run["time"].items():
            cells = [
                " / ".join(f"{t[way][s]:.2f}" for s in ("mean_ms", "p50_ms", "p99_ms"))
                for way in ("maxscore", "exhaustive")
            ]
            times.add_row(f"{run['passages']:,}", str(k), *cells, f"{t['mean_ratio']:.2f}x")
    console.print(times)
    memory = Table(title=f"Serving memory after {result['searches']} MaxScore searches (k = {MEMORY_K})")
    for col in (
        "passages",
        "postings GB",
        "RSS MB",
        "anonymous MB",
        "file-backed MB",
        "ms/search",
        "in a memory cgroup",
    ):
        memory.add_column(col, justify="right")
    for run in runs:
        m, limited = run["memory"], run["limited"]
        if "skipped" in limited:
            cgroup = limited["skipped"]
        else:
            same = "same answers" if limited["same_answers"] else "OTHER ANSWERS"
            cgroup = (
                f"{limited['limit_mb']} MB: peak {limited['cgroup_peak_mb']:.0f} MB, "
                f"RSS {limited['rss_after_mb']:.0f}, {limited['ms_per_search']:.1f} ms/search, {same}"
            )
        memory.add_row(
            f"{run['passages']:,}",
            f"{run['postings_bytes'] / 1e9:.2f}",
            f"{m['rss_after_mb']:.0f}",
            f"{m['rss_anon_after_mb']:.0f}",
            f"{m['rss_file_after_mb']:.0f}",
            f"{m['ms_per_search']:.2f}",
            cgroup,
        )
    console.print(memory)
    first, last = runs[0]["memory"], runs[-1]["memory"]
    console.print(
        f"{runs[-1]['passages']:,} / {runs[0]['passages']:,} passages: anonymous memory "
        f"{last['rss_anon_after_mb'] / first['rss_anon_after_mb']:.2f}x, "
        f"RSS {last['rss_after_mb'] / first['rss_after_mb']:.2f}x"
    )


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for run, marker in zip(result["runs"], "os^"):
        ks = [int(k) for k in run["time"]]
        for way, style in (("maxscore", "-"), ("exhaustive", "--")):
            left.plot(
                ks,
                [t[way]["mean_ms"] for t in run["time"].values()],
                style,
                marker=marker,
                label=f"{way}, {run['passages']:,.0f}",
            )
    left.set(
        xscale="log",
        yscale="log",
        xlabel="k (passages asked)",
        ylabel="mean ms per search",
        title="Lexical search time",
    )
    left.legend(fontsize=7)
    labels = [f"{run['passages']:,.0f}" for run in result["runs"]]
    anon = [run["memory"]["rss_anon_after_mb"] for run in result["runs"]]
    file_backed = [run["memory"]["rss_file_after_mb"] for run in result["runs"]]
    right.bar(labels, anon, label="anonymous (the process')")
    right.bar(labels, file_backed, bottom=anon, label="file-backed (mapped postings, page cache)")
    limited = [run["limited"].get("cgroup_peak_mb") for run in result["runs"]]
    if all(limited):
        right.plot(labels, limited, "k_", markersize=30, mew=2, label="peak in a memory-limited cgroup")
    right.set(ylabel="MB after the searches", title="Serving memory", xlabel="passages")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", default="1000000,10000000")
    parser.add_argument("--searches", type=int, default=1000)
    parser.add_argument("--limit-mb", type=int, default=256, help="the memory cgroup's limit")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rayindex-lexical-serving"))
    parser.add_argument("--keep", action="store_true", help="keep the postings in --work, and reuse them next run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--child", choices=("time", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.folder, args.child, args.searches)))
        return
    console = Console(width=160)
    runs = [
        measure(int(n), args.searches, args.work, args.limit_mb, args.keep, console) for n in args.passages.split(",")
    ]
    result = {"cpus": os.cpu_count(), "searches": args.searches, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print_tables(result, console)
    if args.png:
        plot(result, args.png)


if __name__ == "__main__":
    main()
