"""Short questions, as RAG users send them, against the nprobe a default build tunes itself to (issue #24).

Corpus: every 10th entry of the GNU Collaborative International Dictionary of English (Debian's dict-gcide;
`apt-get install dict-gcide`), headword and definition, built with default options ("{word}: {definition}"):
the index, its nprobe and its tuning are what a newcomer gets. Questions: "What is TERM?" for headwords drawn
at random among those naming exactly one entry of the corpus; the answer is that entry. The question is not a
sentence of the corpus.

For each nprobe of the sweep and for the tuned default, through the published index (encode, search, a hit per
document): recall@10 of the documents found against exhaustive search over the same stored vectors (the
documents of the exact nearest passages, ranked as search ranks them), document hit@10 (the answer among the
10), and the median time of one question searched alone (search only; encoding one question alone is
reported on its own line).

    apt-get install dict-gcide
    python benchmarks/short_questions_benchmark.py [--questions 300] [--work /tmp/rayindex-short] \
        [--json docs/benchmark-short-questions.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from encode_benchmark import GCIDE, gcide_entries
from rich.console import Console
from rich.table import Table

from rayindex.builder import build
from rayindex.config import BuildConfig
from rayindex.ivf.recall import document_truth, nprobe_sweep, recall_at, select_nprobe
from rayindex.layout import PASSAGE_BITS, document_rows
from rayindex.query.search import open_index

K = 10
EVERY = 10  # every 10th GCIDE entry: the corpus of short glossary entries


def questions(rows: list[dict], n: int, seed: int = 24) -> list[dict]:
    """'What is TERM?' for n headwords (letters only, 3+) naming exactly one entry of rows; answer: that entry."""
    entries_of: dict[str, list[str]] = {}
    for row in rows:
        entries_of.setdefault(row["word"].lower(), []).append(row["id"])
    single = sorted(w for w, ids in entries_of.items() if len(ids) == 1 and re.fullmatch(r"[a-z][a-z -]{2,}", w))
    picked = random.Random(seed).sample(single, n)
    return [{"query": f"What is {word}?", "id": entries_of[word][0]} for word in picked]


def measure(published, vectors: np.ndarray, truth: np.ndarray, answers: np.ndarray, nprobe: int) -> dict:
    """recall@K vs exhaustive and hit@K of the documents search returns at nprobe, and the median ms of one
    question searched alone."""
    found = published.search_documents(vectors, K, nprobe)
    rows = np.full((len(found), K), -1, np.int64)
    for i, hits in enumerate(found):
        got = document_rows(np.array([vector_id for _, vector_id in hits], np.int64))
        rows[i, : len(got)] = got
    times = []
    for row in range(len(vectors)):
        start = time.perf_counter()
        published.search_documents(vectors[row : row + 1], K, nprobe)
        times.append(time.perf_counter() - start)
    return {
        "nprobe": nprobe,
        "recall_at_10": recall_at(rows, truth, K),
        "hit_at_10": float(np.mean([a in r for a, r in zip(answers, rows)])),
        "p50_ms": 1000 * float(np.median(times)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--work", type=Path, default=Path("/tmp/rayindex-short"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (GCIDE / "gcide.index").exists():
        raise SystemExit("dict-gcide is not installed: apt-get install dict-gcide")
    rows = gcide_entries()[::EVERY]
    corpus, output = args.work / "gcide.parquet", args.work / "out"
    if not (output / "CURRENT").exists():  # built once; rerun the measurement on the same build
        args.work.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), corpus)
        started = time.monotonic()
        build(BuildConfig(inputs=[str(corpus)], output=str(output), id_column="id", template="{word}: {definition}"))
        print(f"built {len(rows):,} entries in {time.monotonic() - started:.0f} s", file=sys.stderr)
    published = open_index(output)
    manifest = published.manifest
    asked = questions(rows, args.questions)
    vectors = published.encode([q["query"] for q in asked])  # loads the model
    alone = []
    for q in asked[:50]:
        started = time.perf_counter()
        published.encode([q["query"]])
        alone.append(time.perf_counter() - started)
    encode_ms = 1000 * float(np.median(alone))
    row_of = {row["id"]: n for n, row in enumerate(rows)}  # the corpus' row: the document's row number
    answers = np.array([row_of[q["id"]] for q in asked])
    assert all(published.docs.get(int(row) << PASSAGE_BITS)["id"] == q["id"] for row, q in zip(answers, asked))
    truth = document_truth(published.version_dir, manifest, vectors, K, manifest.first_fetch(K))
    exhaustive_hit = float(np.mean([a in t for a, t in zip(answers, truth)]))
    sweep = [measure(published, vectors, truth, answers, nprobe) for nprobe in nprobe_sweep(manifest.nlist)]
    default = next(p for p in sweep if p["nprobe"] == manifest.nprobe)
    tuning = manifest.tuning
    # without the budget (--max-search-ms 0): the smallest nprobe reaching the target on the tuning's own queries
    smallest = select_nprobe(tuning.sweep, tuning.target, tuning.k) if tuning else None
    result = {
        "corpus": f"every {EVERY}th entry of GCIDE (Debian dict-gcide): {len(rows):,} entries",
        "vectors": manifest.merge.ntotal,
        "index": manifest.index_string,
        "questions": len(asked),
        "question_form": "What is TERM? (TERM: a headword naming one entry; answer: that entry)",
        "default_nprobe": manifest.nprobe,
        "tuning": tuning.model_dump(exclude={"sweep"}) if tuning else None,
        "default": default,
        "smallest_reaching_target_without_budget": smallest.nprobe if smallest else None,
        "exhaustive_hit_at_10": exhaustive_hit,
        "encode_p50_ms_alone": encode_ms,
        "sweep": sweep,
        "cpus": os.cpu_count(),
    }
    table = Table(
        title=f"{result['corpus']}, {manifest.index_string}, {len(asked)} 'What is TERM?' questions "
        f"(exhaustive hit@10 {exhaustive_hit:.3f})"
    )
    for col in ("nprobe", "recall@10 vs exhaustive", "hit@10", "p50 ms alone"):
        table.add_column(col, justify="right")
    for p in sweep:
        mark = " (default)" if p["nprobe"] == manifest.nprobe else ""
        table.add_row(f"{p['nprobe']}{mark}", f"{p['recall_at_10']:.3f}", f"{p['hit_at_10']:.3f}", f"{p['p50_ms']:.2f}")
    Console(width=140).print(table)
    if tuning:
        print(
            f"tuned: nprobe {tuning.nprobe}, recall@10 {tuning.recall:.3f} on {tuning.queries} queries from "
            f"{tuning.queries_from}, p50 {tuning.p50_ms:.2f} ms within {tuning.max_search_ms} ms "
            f"on {tuning.measured_on}"
        )
    if smallest:
        print(f"without the budget, tuning's queries would choose nprobe {smallest.nprobe}")
    print(f"encoding one question alone: {encode_ms:.1f} ms (p50 of 50)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
