"""Reindex benchmark: an incremental reindex vs a full rebuild of the same new corpus, in one run.

The base is a build of the standard library's docstrings (3,301 on CPython 3.11); the new corpus
deletes 1%, edits 5% and adds 2% (docstrings held back from the base). Both runs use the same
settings on the same local Ray; the full rebuild also trains its quantizer, the reindex reuses
the base's (unless drift says otherwise, which the table shows).

    python benchmarks/reindex_benchmark.py [--index IVF64,Flat] [--json docs/benchmark-reindex.json]

Prints a table: wall time, stage times, documents encoded, and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from rayindex.api import reindex
from rayindex.builder import build
from rayindex.config import BuildConfig
from rayindex.text.stdlib_corpus import stdlib_docstrings


def corpora(docs: list[dict], delete: float, edit: float, add: float) -> tuple[list[dict], list[dict]]:
    n_add = int(len(docs) * add)
    base, extra = docs[:-n_add], docs[-n_add:]
    n_del, n_edit = int(len(base) * delete), int(len(base) * edit)
    edited = [dict(d, body=d["body"] + " (Changed in this release.)") for d in base[n_del : n_del + n_edit]]
    return base, edited + base[n_del + n_edit :] + extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="IVF64,Flat")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    base, new = corpora(stdlib_docstrings(), delete=0.01, edit=0.05, add=0.02)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pq.write_table(pa.Table.from_pylist(base), work / "base.parquet")
        settings = dict(id_column="id", template="{title}: {body}", shards=args.shards, index=args.index, seed=3)
        build(BuildConfig(inputs=[str(work / "base.parquet")], output=str(work / "out"), **settings))
        (work / "new").mkdir()
        pq.write_table(pa.Table.from_pylist(new), work / "new" / "docs.parquet")

        start = time.perf_counter()
        incremental = reindex(str(work / "out"), work / "new")
        incremental_s = time.perf_counter() - start
        start = time.perf_counter()
        full = build(BuildConfig(inputs=[str(work / "new")], output=str(work / "full"), **settings))
        full_s = time.perf_counter() - start

    r = incremental.reindex
    rows = {
        "base docs": len(base),
        "new docs": len(new),
        "added / changed / deleted / unchanged": f"{r.added} / {r.changed} / {r.deleted} / {r.unchanged}",
        "quantizer": f"{r.path} (drift {r.drift.ratio})" if r.drift else r.path,
    }
    figures = {
        "reindex": {"wall_s": round(incremental_s, 1), "encoded": r.encoded, **incremental.timings_s},
        "full": {"wall_s": round(full_s, 1), "encoded": full.counts.docs_encoded, **full.timings_s},
    }
    table = Table(title=f"reindex vs full rebuild ({args.index}, {args.shards} shards, 2 cores)")
    for col in ("", "reindex", "full rebuild", "full / reindex"):
        table.add_column(col, justify="right")
    for key in ("wall_s", "encoded", "encode", "train", "add", "merge"):
        a, b = figures["reindex"].get(key, 0), figures["full"].get(key, 0)
        table.add_row(key, f"{a}", f"{b}", f"{b / a:.2f}" if a else "-")
    console = Console()
    for k, v in rows.items():
        console.print(f"{k}: {v}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({**rows, **figures, "index": args.index, "shards": args.shards}, indent=2))


if __name__ == "__main__":
    main()
