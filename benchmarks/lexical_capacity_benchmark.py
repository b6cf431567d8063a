"""The lexical (BM25) index's per-passage figures that `rayindex plan` scales (lexical/capacity.py), measured
on published builds, and the cost of reading a posting from the synthetic postings measure.

For each build (an output folder; its CURRENT version is read, nothing is written):
- postings (distinct terms) per passage, bytes of lexical/ per passage, postings per KiB of passage text, and
  the bytes of the shards' term counts (lexical_counts.npz) per posting;
- vocabulary growth: distinct terms among the first m passages (in id order, i.e. corpus order) for m = all,
  1/2, 1/4, ... of the passages, and Heaps' law V = K m^beta fitted to the largest four (least squares in
  log-log);
- postings read per query: queries shaped like users' (text/queries.py user_query: sentence, title, phrase,
  question; one per passage drawn at random) analyzed as search analyzes them, the document frequencies of
  their terms summed (search_postings reads every posting of every query term), over the passages.

The synthetic measure (lexical_serving_benchmark.py, docs/benchmark-lexical-serving.json) timed 1,000
searches over 1M and 10M synthetic passages, summing every posting (exhaustive_search) and with MaxScore; its
searches' terms are replayed here (same seeds) to count the postings an exhaustive search reads (before the
generator's duplicate passages are removed: an overcount under 1%), so ms per search becomes ns per posting
read, and the MaxScore speed-up is kept beside it. And a search's working memory:
the peak bytes it allocates (tracemalloc) per posting read, for 3 terms of 2M postings each.

    python benchmarks/lexical_capacity_benchmark.py /tmp/x /tmp/rayindex-passages/out-passages-400 \\
        /tmp/rayindex-hybrid/jargon/out [--queries 400] [--json docs/benchmark-lexical-capacity.json]

(/tmp/x: `rayindex build -o /tmp/x`, the embedded default; the man pages: `python
benchmarks/passages_benchmark.py --docs 400`; the Jargon File: `python benchmarks/hybrid_benchmark.py --sets
other_words`.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
import pyarrow.parquet as pq
from lexical_serving_benchmark import MEMORY_K, SEED, query_terms, synthetic_statistics
from rich.console import Console
from rich.table import Table

from rayindex.layout import DOCS_FILE, LEXICAL_COUNTS_FILE, LEXICAL_DIR, shard_rel
from rayindex.lexical.analyzer import Analyzer, AnalyzerSettings
from rayindex.lexical.counts import term_hashes
from rayindex.lexical.postings import open_postings
from rayindex.text.queries import QUERY_SHAPES, user_query
from rayindex.versions import open_current


def passage_texts(version_dir: Path, manifest) -> tuple[np.ndarray, list[str]]:
    ids, texts = [], []
    for shard in manifest.shards:
        table = pq.read_table(version_dir / shard_rel(shard.shard_id, DOCS_FILE), columns=["vector_id", "text"])
        ids.extend(table.column("vector_id").to_pylist())
        texts.extend(table.column("text").to_pylist())
    return np.asarray(ids), texts


def vocabulary_growth(postings) -> list[tuple[int, int]]:
    """(m, distinct terms among the first m passages in id order), m = all, 1/2, 1/4, ... down to 64."""
    ids = np.unique(np.asarray(postings.ids))
    first_id = np.asarray(postings.ids)[np.asarray(postings.starts)[:-1]]  # ids ascend within a term
    first_passage = np.searchsorted(ids, first_id)  # where in corpus order each term first appears
    points, m = [], len(ids)
    while m >= 64:
        points.append((m, int((first_passage < m).sum())))
        m //= 2
    return points[::-1]


def heaps_fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """K and beta of V = K m^beta, least squares on log V = log K + beta log m over the prefixes of at least an
    eighth of the passages: the smallest prefixes, where most terms of each passage are new, steepen the
    slope (man pages: 0.69 over all prefixes, 0.61 over the largest four)."""
    largest = [(m, v) for m, v in points if m >= points[-1][0] // 8]
    beta, log_k = np.polyfit(np.log([m for m, _ in largest]), np.log([v for _, v in largest]), 1)
    return float(np.exp(log_k)), float(beta)


def postings_read(version_dir: Path, manifest, postings, texts: list[str], n: int) -> dict:
    """Mean postings read per query of each shape (one query per passage, n passages drawn), and their share of
    the passages."""
    lexical = manifest.lexical
    analyzer = Analyzer(AnalyzerSettings(lexical.language, lexical.stopwords))
    rng = np.random.default_rng(21)
    drawn = rng.choice(len(texts), min(n, len(texts)), replace=False)
    terms, starts = np.asarray(postings.terms), np.asarray(postings.starts)
    doc_freqs = np.diff(starts)
    read = {}
    for shape in QUERY_SHAPES:
        counts = []
        for i in drawn:
            hashes = term_hashes(analyzer.analyze(user_query(texts[i], shape, rng)))
            where = np.minimum(np.searchsorted(terms, hashes), len(terms) - 1)
            counts.append(int(doc_freqs[where][terms[where] == hashes].sum()))
        read[shape] = {"postings_per_query": float(np.mean(counts)), "share": float(np.mean(counts)) / len(texts)}
    read["all shapes"] = {key: float(np.mean([read[s][key] for s in QUERY_SHAPES])) for key in read[QUERY_SHAPES[0]]}
    return read


def measure_build(output: str, n_queries: int) -> dict:
    version_dir, manifest = open_current(output)
    postings = open_postings(version_dir / LEXICAL_DIR)
    ids, texts = passage_texts(version_dir, manifest)
    passages = manifest.lexical.passages
    files = {p.name: p.stat().st_size for p in (version_dir / LEXICAL_DIR).glob("*.npy")}
    text_bytes = sum(len(t.encode()) for t in texts)
    counts_bytes = sum(
        (version_dir / shard_rel(shard.shard_id, LEXICAL_COUNTS_FILE)).stat().st_size for shard in manifest.shards
    )
    growth = vocabulary_growth(postings)
    k, beta = heaps_fit(growth)
    return {
        "output": output,
        "corpus": manifest.config.inputs,
        "passages": passages,
        "terms": manifest.lexical.terms,
        "postings": manifest.lexical.postings,
        "avg_length": manifest.lexical.avg_length,
        "lexical_bytes": sum(files.values()),
        "files": files,
        "counts_bytes": counts_bytes,  # the shards' term counts, kept beside the postings (reindex reuses them)
        "counts_bytes_per_posting": counts_bytes / manifest.lexical.postings,
        "postings_per_passage": manifest.lexical.postings / passages,
        "bytes_per_passage": sum(files.values()) / passages,
        "text_bytes_per_passage": text_bytes / passages,
        "postings_per_kib_text": manifest.lexical.postings / (text_bytes / 1024),
        "vocabulary_growth": growth,
        "heaps_k": k,
        "heaps_beta": beta,
        "postings_read": postings_read(version_dir, manifest, postings, texts, n_queries),
    }


def synthetic_cost(serving: dict) -> list[dict]:
    """ns per posting read in the synthetic measure: its exhaustive ms per search (k = MEMORY_K) over the
    postings its searches read, and MaxScore's speed-up on the same searches."""
    runs = []
    for run in serving["runs"]:
        doc_freqs, probability = synthetic_statistics(run["passages"], np.random.default_rng(SEED))
        read = [int(doc_freqs[picked].sum()) for picked in query_terms(probability, serving["searches"])]
        per_search = float(np.mean(read))
        timed = run["time"][str(MEMORY_K)]
        runs.append(
            {
                "passages": run["passages"],
                "ms_per_search": timed["exhaustive"]["mean_ms"],
                "postings_per_search": per_search,
                "share": per_search / run["passages"],
                "ns_per_posting": timed["exhaustive"]["mean_ms"] * 1e6 / per_search,
                "maxscore_speedup": timed["mean_ratio"],
            }
        )
    return runs


def working_bytes(postings_per_term: int, terms: int = 3, passages: int = 10_000_000) -> dict:
    """Peak bytes a search summing every posting (exhaustive_search) allocates (tracemalloc: numpy reports its
    arrays), per posting it reads: a query of `terms` terms with postings_per_term passages each, drawn from
    `passages`. Past CHUNK_POSTINGS postings the peak stops growing (the lists are summed in chunks)."""
    import tracemalloc

    from rayindex.lexical.postings import exhaustive_search, from_rows, stepped

    rng = np.random.default_rng(21)
    ids = np.concatenate([np.sort(rng.choice(passages, postings_per_term, replace=False)) for _ in range(terms)])
    postings = from_rows(
        np.repeat(np.arange(1, terms + 1, dtype=np.uint64), postings_per_term),
        ids,
        stepped(rng.uniform(0.3, 1.0, len(ids))),
    )
    tracemalloc.start()
    exhaustive_search(postings, np.arange(terms), 100)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"postings_read": len(ids), "peak_bytes": peak, "bytes_per_posting": peak / len(ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "outputs", nargs="*", help="build output folders (their CURRENT version is read); none: --json's builds kept"
    )
    parser.add_argument("--queries", type=int, default=400, help="passages drawn, a query of each shape from each")
    parser.add_argument("--synthetic", type=Path, default=Path("docs/benchmark-lexical-serving.json"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.outputs and not (args.json and args.json.exists()):
        raise SystemExit("give build output folders, or --json with the builds of an earlier run")
    result = {
        "builds": [measure_build(output, args.queries) for output in args.outputs]
        if args.outputs
        else json.loads(args.json.read_text())["builds"],
        "synthetic": synthetic_cost(json.loads(args.synthetic.read_text())),
        "working_memory": working_bytes(60_000),  # 180,000 postings: one chunk
        "working_memory_large": working_bytes(2_000_000),  # 6M postings: 23 chunks
    }
    table = Table(title="Lexical index per passage (measured)")
    columns = ("corpus", "passages", "terms", "postings/passage", "bytes/passage", "postings/KiB text", "Heaps K, beta")
    for column in (*columns, "read/query (share)"):
        table.add_column(column, justify="right")
    for b in result["builds"]:
        table.add_row(
            Path(b["corpus"][0]).name,
            f"{b['passages']:,}",
            f"{b['terms']:,}",
            f"{b['postings_per_passage']:.1f}",
            f"{b['bytes_per_passage']:.0f}",
            f"{b['postings_per_kib_text']:.1f}",
            f"{b['heaps_k']:.1f}, {b['heaps_beta']:.3f}",
            f"{b['postings_read']['all shapes']['share']:.4f}",
        )
    console = Console(width=160)
    console.print(table)
    for b in result["builds"]:
        console.print(Path(b["corpus"][0]).name, {s: round(r["share"], 4) for s, r in b["postings_read"].items()})
    for run in result["synthetic"]:
        console.print(
            f"synthetic {run['passages']:,} passages: {run['postings_per_search']:,.0f} postings read per search "
            f"(share {run['share']:.4f}), {run['ms_per_search']:.2f} ms: {run['ns_per_posting']:.2f} ns per posting; "
            f"MaxScore {run['maxscore_speedup']:.2f}x faster"
        )
    for memory in (result["working_memory"], result["working_memory_large"]):
        console.print(
            f"a search's working memory: {memory['peak_bytes'] / 1e6:,.1f} MB at peak for {memory['postings_read']:,} "
            f"postings read: {memory['bytes_per_posting']:.1f} bytes per posting"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
