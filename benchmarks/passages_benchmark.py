"""Long documents: passages against head-only embedding, on real long documents (this machine's English
man pages, sections 1, 5 and 8, rendered to text), with questions answered deep inside a document.

Two builds of the same corpus with default options, in one run on the same cores: --no-passages (one
vector per document from its first 256 tokens, as before passages) and passages (the default). For each,
document hit@10 / MRR of the published index at its default (tuned) nprobe, and of exact search over
the same stored vectors (brute force, grouped by document); encode throughput in tokens/s (tokens the
model read, from the manifests); and filtered search ({"section": "1"}, {"section": {"in": ["5", "8"]}})
against exact filtered search over the passages.

    python benchmarks/passages_benchmark.py [--docs 1000] [--work /tmp/rayindex-passages] [--json
    docs/benchmark-passages.json]

Queries: from each document, one sentence (60-250 characters, 8+ words) from its second half that occurs
in no other document; the answer is that document.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from rayindex.builder import build
from rayindex.config import BuildConfig
from rayindex.infra.files import load_embeddings
from rayindex.layout import VECTOR_IDS_FILE, shard_dir
from rayindex.query.search import open_index

MAN = Path("/usr/share/man")
SECTIONS = ("1", "5", "8")
K = 10
PER_FAMILY = 3  # pages per name prefix (git-*, perl*, systemd.*): variety, not one tool's many pages


def man_pages(limit: int, min_chars: int = 3_000) -> list[dict]:
    """English man pages of SECTIONS rendered to plain text (man -l, 100 columns), the first `limit` of at
    least min_chars characters in a fixed shuffled order, at most PER_FAMILY per name prefix."""
    paths = sorted(p for s in SECTIONS for p in (MAN / f"man{s}").glob("*.gz") if p.stat().st_size >= 1_500)
    paths = [p for p in paths if not p.name.startswith("gcloud")]  # thousands of near-identical generated pages
    random.Random(5).shuffle(paths)

    def render(path: Path) -> dict | None:
        try:
            head = gzip.open(path).read(200).decode("utf-8", "replace")
        except OSError:
            return None
        if head.startswith(".so "):  # a link to another page
            return None
        env = dict(os.environ, MANWIDTH="100", MAN_KEEP_FORMATTING="", MANPAGER="cat", PAGER="cat", LC_ALL="C.UTF-8")
        out = subprocess.run(["man", "-l", str(path)], env=env, capture_output=True, timeout=60)
        text = re.sub(".\b", "", out.stdout.decode("utf-8", "replace")).strip()
        name = path.name.removesuffix(".gz")
        return {"id": name, "section": name.rsplit(".", 1)[-1][:1], "text": text} if len(text) >= min_chars else None

    families: dict[str, int] = {}
    rows, seen = [], set()
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        for start in range(0, len(paths), 64):
            for row in pool.map(render, paths[start : start + 64]):
                family = re.split(r"[-_.]", row["id"])[0] if row else ""
                if (
                    row
                    and row["id"] not in seen
                    and row["section"] in SECTIONS
                    and families.get(family, 0) < PER_FAMILY
                ):
                    seen.add(row["id"])
                    families[family] = families.get(family, 0) + 1
                    rows.append(row)
            if len(rows) >= limit:
                break
    return rows[:limit]


def deep_queries(rows: list[dict], seed: int = 9) -> list[dict]:
    """One sentence per document from its second half, found in no other document."""
    rng = random.Random(seed)
    everything = "\n\x00".join(r["text"] for r in rows)
    queries = []
    for row in rows:
        tail = row["text"][len(row["text"]) // 2 :]
        sentences = [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", tail)]
        sentences = [s for s in sentences if 60 <= len(s) <= 250 and len(s.split()) >= 8]
        rng.shuffle(sentences)
        for sentence in sentences:
            raw = re.escape(sentence).replace(r"\ ", r"\s+")
            if len(re.findall(raw, everything)) == 1:
                queries.append({"query": sentence, "id": row["id"], "section": row["section"]})
                break
    return queries


def stored(index) -> tuple[np.ndarray, np.ndarray]:
    """Every stored vector of a version and its vector id."""
    vectors, ids = [], []
    m = index.manifest
    for shard, state in zip(m.shards, m.shard_states):
        d = shard_dir(index.version_dir, shard.shard_id)
        vectors.append(np.asarray(load_embeddings(d, state.passages, m.dimension)))
        ids.append(np.load(d / VECTOR_IDS_FILE))
    return np.concatenate(vectors), np.concatenate(ids)


def exact_documents(
    queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> list[list[int]]:
    """Brute force: per query the k best documents (rows) by their best passage, among allowed vector ids."""
    if allowed is not None:
        keep = np.isin(ids, allowed)
        vectors, ids = vectors[keep], ids[keep]
    out = []
    for scores in queries @ vectors.T:
        docs: list[int] = []
        for i in np.argsort(-scores):
            row = int(ids[i] >> 20)
            if row not in docs:
                docs.append(row)
                if len(docs) == k:
                    break
        out.append(docs)
    return out


def hit_metrics(found: list[list[int]], wanted: list[int]) -> dict:
    ranks = [f.index(w) + 1 if w in f else None for f, w in zip(found, wanted)]
    return {
        "hit@1": float(np.mean([r == 1 for r in ranks])),
        f"hit@{K}": float(np.mean([r is not None for r in ranks])),
        "mrr": float(np.mean([1 / r if r else 0 for r in ranks])),
    }


def measure(output: Path, queries: list[dict], row_of: dict) -> dict:
    index = open_index(output, with_vectors=True)
    m = index.manifest
    vectors = index.encode([q["query"] for q in queries])
    wanted = [row_of[q["id"]] for q in queries]
    start = time.perf_counter()
    published = [[v >> 20 for _, v in hits] for hits in index.search_documents(vectors, K)]
    search_ms = 1000 * (time.perf_counter() - start) / len(queries)
    all_vectors, all_ids = stored(index)
    exact = exact_documents(vectors, all_vectors, all_ids, K)
    result = {
        "index": m.index_string,
        "nprobe": m.nprobe,
        "tuned_recall@10": m.tuning.recall if m.tuning else None,
        "documents": m.counts.docs_encoded,
        "vectors": m.counts.passages,
        "tokens_encoded": m.counts.tokens_encoded,
        "encode_s": m.timings_s["encode"],
        "build_s": round(sum(m.timings_s.values()), 1),
        "tokens_per_s": m.counts.tokens_encoded / m.timings_s["encode"],
        "docs_per_s": m.counts.docs_encoded / m.timings_s["encode"],
        "published": hit_metrics(published, wanted),
        "exact": hit_metrics(exact, wanted),
        "search_ms_per_query": search_ms,
    }
    if m.passages:
        result["filters"] = {}
        for name, condition in (("section 1", {"section": "1"}), ("section 5 or 8", {"section": {"in": ["5", "8"]}})):
            allowed = index.matching_ids(condition)
            truth = exact_documents(vectors, all_vectors, all_ids, K, allowed)
            got = [[v >> 20 for _, v in hits] for hits in index.search_documents(vectors, K, filter=condition)]
            matching_docs = len(np.unique(allowed >> 20))
            recall = np.mean([len(set(g) & set(t)) / max(1, len(t)) for g, t in zip(got, truth)])
            full = np.mean([len(g) == min(K, matching_docs) for g in got])
            result["filters"][name] = {
                "matching_docs": int(matching_docs),
                "recall@10_vs_exact_filtered": float(recall),
                "queries_with_k_hits": float(full),
            }
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = [], []
    for name in ("head-only", "passages"):
        for kind in ("published", "exact"):
            labels.append(f"{name}\n{kind}")
            values.append(results[name][kind][f"hit@{K}"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(labels, values, color=["#999", "#ccc", "#1f77b4", "#9ecae1"])
    ax.bar_label(bars, fmt="%.2f")
    ax.set(
        ylim=(0, 1.05),
        ylabel=f"document hit@{K}",
        title=f"{results['corpus']['documents']} man pages, {results['corpus']['queries']} deep-inside questions",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--work", default="/tmp/rayindex-passages")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default="docs/benchmark-passages.png")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="Measure the builds already in --work (encode figures from their manifests) instead of building again",
    )
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"man-{args.docs}.jsonl"
    if not corpus.exists():
        started = time.monotonic()
        rows = man_pages(args.docs)
        corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"rendered {len(rows)} man pages in {time.monotonic() - started:.0f} s -> {corpus}", file=sys.stderr)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    lengths = np.array([len(r["text"]) for r in rows])
    queries = deep_queries(rows)
    row_of = {r["id"]: i for i, r in enumerate(rows)}  # one JSONL file: a document's global row is its line
    results = {
        "corpus": {
            "what": "English man pages (sections 1, 5, 8), man -l at 100 columns",
            "documents": len(rows),
            "median_chars": int(np.median(lengths)),
            "max_chars": int(lengths.max()),
            "queries": len(queries),
        },
        "cores": os.cpu_count(),
    }
    for name, passages in (("head-only", False), ("passages", True)):
        output = work / f"out-{name}-{args.docs}"
        config = BuildConfig(inputs=[str(corpus)], output=str(output), id_column="id", passages=passages)
        if args.reuse and (output / "CURRENT").exists():
            print(f"{name}: measuring the build in {output}", file=sys.stderr)
        else:
            started = time.monotonic()
            build(config, quiet=False)
            print(f"{name}: built in {time.monotonic() - started:.0f} s", file=sys.stderr)
        results[name] = measure(output, queries, row_of)
    head, passages = results["head-only"], results["passages"]
    results["ratios"] = {
        "passages hit@10 / exact passages hit@10 (target >= 0.9)": passages["published"][f"hit@{K}"]
        / passages["exact"][f"hit@{K}"],
        "passages hit@10 / head-only hit@10 (target >= 2)": passages["published"][f"hit@{K}"]
        / head["published"][f"hit@{K}"],
        "passages tokens/s / head-only tokens/s (target >= 0.9)": passages["tokens_per_s"] / head["tokens_per_s"],
    }
    print(json.dumps(results, indent=2))
    print(f"\n{'':24}{'head-only':>12}{'passages':>12}")
    for label, key in (
        (f"hit@{K} published", ("published", f"hit@{K}")),
        (f"hit@{K} exact", ("exact", f"hit@{K}")),
        ("MRR published", ("published", "mrr")),
    ):
        print(f"{label:24}{head[key[0]][key[1]]:>12.3f}{passages[key[0]][key[1]]:>12.3f}")
    for label, key in (
        ("vectors", "vectors"),
        ("tokens/s", "tokens_per_s"),
        ("docs/s", "docs_per_s"),
        ("encode s", "encode_s"),
    ):
        print(f"{label:24}{head[key]:>12,.1f}{passages[key]:>12,.1f}")
    for name, f in passages.get("filters", {}).items():
        print(
            f"filter {name}: recall@10 vs exact filtered {f['recall@10_vs_exact_filtered']:.3f}, "
            f"k hits in {f['queries_with_k_hits']:.0%} of queries ({f['matching_docs']} matching documents)"
        )
    for label, ratio in results["ratios"].items():
        print(f"{label}: {ratio:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
