"""Parse throughput of a folder of files (issue #22's target: the pipeline >= 0.9x the parser alone): what an
encoder's reader thread does with a shard of document files (text/corpus.py read_pieces: each file stat'ed and
read through fsspec, parsed, batched into Arrow; then text/documents.py prepare: ids, metadata JSON, hashes)
against the parser alone (text/files.py parse_document on the files' bytes, already in memory), in one process
on the same files, so on one core: files/s, pages/s (PDF) and MB/s, per format and in all.

    python benchmarks/parse_benchmark.py DIR [--repeat 3] [--json docs/benchmark-parse.json]

The shard plan is the build's own (stages/plan.py plan on `rayindex build DIR`'s default config). Each side
runs --repeat times, alternating; the best run of each is kept (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rayindex.config import BuildConfig
from rayindex.stages.plan import plan
from rayindex.text import corpus, files
from rayindex.text.documents import prepare


def parser_alone(blobs: list[tuple[str, bytes]]) -> tuple[float, dict[str, float]]:
    """Seconds for every file, and per format."""
    per_format: dict[str, float] = defaultdict(float)
    started = time.perf_counter()
    for fmt, data in blobs:
        t = time.perf_counter()
        try:
            files.parse_document(data, fmt)
        except files.Unreadable:
            pass
        per_format[fmt] += time.perf_counter() - t
    return time.perf_counter() - started, per_format


def pipeline(config: BuildConfig, shards) -> tuple[float, int]:
    """Seconds to read every shard as the encoders do (no model), and the documents made."""
    started = time.perf_counter()
    documents = 0
    for shard in shards:
        for batch, where in corpus.read_pieces(shard.pieces, config.id_column, config.max_file_bytes):
            documents += len(
                prepare(batch, config.text_fields(), config.template, config.id_column, where, config.max_doc_chars)
            )
    return time.perf_counter() - started, documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    config = BuildConfig(inputs=[args.folder])
    planned = plan(config)
    paths = [p.path for s in planned.shards for p in s.pieces if corpus.is_document_file(p.path)]
    blobs = [(corpus.file_format(p), Path(p).read_bytes()) for p in paths]
    sizes: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    pages = 0
    for fmt, data in blobs:
        sizes[fmt] += len(data) / 1e6
        counts[fmt] += 1
        if fmt == "pdf":
            try:
                pages += len(files.parse_document(data, fmt).page_starts)
            except files.Unreadable:
                pass
    alone, through = [], []
    for _ in range(args.repeat):
        alone.append(parser_alone(blobs))
        through.append(pipeline(config, planned.shards))
    best_alone = min(alone, key=lambda r: r[0])
    best_pipeline = min(t for t, _ in through)
    total_mb = sum(sizes.values())
    result = {
        "folder": args.folder,
        "files": len(blobs),
        "documents": through[0][1],
        "mb": round(total_mb, 2),
        "pdf_pages": pages,
        "per_format": {
            fmt: {
                "files": counts[fmt],
                "mb": round(sizes[fmt], 2),
                "parser_s": round(best_alone[1][fmt], 3),
                "parser_mb_per_s": round(sizes[fmt] / best_alone[1][fmt], 2),
            }
            for fmt in sorted(counts)
        },
        "parser_alone_s": round(best_alone[0], 3),
        "pipeline_s": round(best_pipeline, 3),
        "parser_alone_mb_per_s": round(total_mb / best_alone[0], 2),
        "pipeline_mb_per_s": round(total_mb / best_pipeline, 2),
        "parser_alone_pdf_pages_per_s": round(pages / best_alone[1]["pdf"], 1) if pages else None,
        "pipeline_vs_parser": round(best_alone[0] / best_pipeline, 3),
        "runs_s": {"parser_alone": [round(t, 3) for t, _ in alone], "pipeline": [round(t, 3) for t, _ in through]},
    }
    table = Table(title=f"{len(blobs)} files, {total_mb:.1f} MB, one core")
    for col in ("format", "files", "MB", "parser s", "parser MB/s"):
        table.add_column(col, justify="right")
    for fmt, row in result["per_format"].items():
        table.add_row(fmt, str(row["files"]), f"{row['mb']:.2f}", f"{row['parser_s']:.3f}", f"{row['parser_mb_per_s']}")
    console = Console()
    console.print(table)
    console.print(
        f"parser alone {result['parser_alone_s']} s ({result['parser_alone_mb_per_s']} MB/s), pipeline "
        f"{result['pipeline_s']} s ({result['pipeline_mb_per_s']} MB/s): {result['pipeline_vs_parser']}x; "
        f"PDF pages/s (parser) {result['parser_alone_pdf_pages_per_s']}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
