"""Work units sized by cost (issue #22 item 5): a corpus of long documents encoded by the one-shard plan of before
and by the default plan, in one run, on the same cores and the same local Ray; and what a shard costs.

(a) this machine's English man pages (sections 1, 5 and 8, rendered as benchmarks/passages_benchmark.py renders
    them), one JSONL file, a page a line: the encode stage (plan + encode, the real model) with --shards 1 (what
    the default plan gave any corpus under 50,000 documents: one unit, so one encoder actor holding every core)
    against the default plan (units cut by cost, one per encoder that can run at once). Reported: the encode
    stage's wall time (actor start and model load included) and their ratio, the units and encoders, and how
    many units ran at once on average: the encoders' own seconds on their units (reading to writing,
    ShardState.encode_seconds) summed, over the stage's wall time; with --gcide N, the first N GCIDE entries
    instead (short texts of unequal lengths), in one Parquet file of one row group ("{word}: {definition}"), the
    corpus where the plan's cuts fall inside a row group (its finer cost marks: docs/build.md "Shard plan");
(b) --shard-cost: what one more shard costs a whole build (the forward pass made free, as encode_benchmark.py's
    (b) makes it, so that only the per-shard work is left: an encoder's start and end of a unit, its files and
    checksums, its add and BM25 count tasks, its merge entry): the same 2,000 GCIDE entries built with --shards 1
    and --shards 8, one encoder, every stage but tune; the difference over 7.

    python benchmarks/units_benchmark.py [--docs 2000] [--json docs/benchmark-units.json]
    python benchmarks/units_benchmark.py --gcide 3000 [--json docs/benchmark-units-gcide.json]
(c) --ceiling: what cutting the work into units can gain at most on this machine, without Ray or rayindex: the
    man pages cut into windows of 254 tokens (30 shared) encoded by SentenceTransformer.encode in one process on
    every core (torch's threads), against one process per core, each one thread and its share of the windows, all
    at once (the wall time of the slowest); the better of two rounds each. One encoder on every core is what the
    one-shard plan runs; one per core, what the default plan runs.

    python benchmarks/units_benchmark.py --shard-cost
    python benchmarks/units_benchmark.py --ceiling --docs 50 [--json docs/benchmark-units-ceiling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmarks' corpora

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from encode_benchmark import free_forward, gcide_entries, planned_and_encoded
from passages_benchmark import man_pages

from rayindex.builder import build
from rayindex.config import BuildConfig


def encode_stage(corpus: Path, work: Path, shards: int | None, text: dict) -> dict:
    """Plan + encode of the corpus (as `rayindex build` runs them, on the Ray already started), timed; text: the
    options that make its text (text_columns or template)."""
    config = BuildConfig(
        inputs=[str(corpus)], output=str(work), id_column="id", shards=shards, index="IVF1,Flat", **text
    )
    manifest, plan_s, wall = planned_and_encoded(config)
    unit_seconds = [s.encode_seconds for s in manifest.shard_states]
    return {
        "units": len(manifest.shards),
        "encoder_slots": manifest.encoder_slots,
        "unit_costs": [s.cost for s in manifest.shards],
        "unit_seconds": unit_seconds,
        "unit_rows": [s.global_end - s.global_start for s in manifest.shards],
        "unit_tokens": [s.tokens_encoded for s in manifest.shard_states],  # what the units cost, whatever the load
        "plan_s": plan_s,
        "encode_s": wall,
        "units_at_once_mean": sum(unit_seconds) / wall,
        "passages": manifest.counts.passages,
        "tokens": manifest.counts.tokens_encoded,
    }


def man_page_corpus(work: Path, docs: int) -> tuple[Path, dict, dict]:
    """The first `docs` man pages as one JSONL file (made once), the options that make its text, what it is."""
    corpus = work / f"man-{docs}.jsonl"
    if not corpus.exists():
        rows = man_pages(docs)
        corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return corpus, {"text_columns": ["text"]}, {"what": "English man pages (sections 1, 5, 8), man -l at 100 columns"}


def gcide_corpus(work: Path, docs: int) -> tuple[Path, dict, dict]:
    """The first `docs` GCIDE entries as one Parquet file of one row group (made once), their template, what."""
    corpus = work / f"gcide-{docs}.parquet"
    if not corpus.exists():
        rows = gcide_entries()[:docs]
        pq.write_table(pa.Table.from_pylist(rows), corpus, row_group_size=len(rows))
    what = "the first GCIDE entries (Debian dict-gcide), one Parquet row group, '{word}: {definition}'"
    return corpus, {"template": "{word}: {definition}"}, {"what": what}


def units(args) -> dict:
    work = Path(args.work)
    if args.gcide:
        corpus, text, described = gcide_corpus(work, args.gcide)
    else:
        corpus, text, described = man_page_corpus(work, args.docs)
    size = corpus.stat().st_size
    started = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    ray_s = time.perf_counter() - started
    try:
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            before = encode_stage(corpus, Path(tmp) / "one", 1, text)
            after = encode_stage(corpus, Path(tmp) / "units", None, text)
    finally:
        ray.shutdown()
    return {
        "corpus": {**described, "docs": args.gcide or args.docs},
        "file_bytes": size,
        "cores": os.cpu_count(),
        "ray_start_s": ray_s,
        "one_shard": before,
        "default_plan": after,
        "speedup": before["encode_s"] / after["encode_s"],
    }


def shard_cost(args) -> dict:
    """Whole builds of 2,000 GCIDE entries, forward pass free, with 1 and 8 shards and one encoder."""
    rows = [{"id": r["id"], "text": f"{r['word']}: {r['definition']}"} for r in gcide_entries()[:2_000]]
    ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"worker_process_setup_hook": free_forward})
    out = {}
    try:
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            corpus = Path(tmp) / "gcide.jsonl"
            corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
            for run, shards in enumerate((1, 8, 1, 8)):  # twice each, interleaved: the machine is shared
                manifest = build(
                    BuildConfig(
                        inputs=[str(corpus)],
                        output=str(Path(tmp) / f"out-{run}"),
                        id_column="id",
                        text_columns=["text"],
                        shards=shards,
                        encoders=1,
                        index="IVF1,Flat",
                        tune=False,
                    )
                )
                stages = {k: v for k, v in manifest.timings_s.items() if k != "ray"}
                out.setdefault(shards, []).append({"total_s": sum(stages.values()), "stages": stages})
    finally:
        ray.shutdown()
    one = min(r["total_s"] for r in out[1])
    eight = min(r["total_s"] for r in out[8])
    return {"builds": out, "per_extra_shard_s": (eight - one) / 7}


def windows_of(docs: int, size: int = 254, overlap: int = 30) -> list[str]:
    """The first `docs` man pages cut into windows of `size` tokens (`overlap` shared), decoded back to text."""
    from rayindex.text.model import load_model

    tokenizer = load_model("all-MiniLM-L6-v2").tokenizer
    texts = []
    for page in man_pages(docs):
        ids = tokenizer(page["text"], add_special_tokens=False, verbose=False)["input_ids"]
        texts += [tokenizer.decode(ids[i : i + size]) for i in range(0, len(ids), size - overlap)]
    return texts


def encode_seconds(texts: list[str], threads: int, answer=None) -> float:
    """Seconds of SentenceTransformer.encode(texts) on `threads` torch threads in this process, model loaded and
    warmed first; put on `answer` (a queue) when given."""
    import torch

    from rayindex.text.model import load_model

    torch.set_num_threads(threads)
    model = load_model("all-MiniLM-L6-v2")
    model.encode(texts[:64], batch_size=64)
    start = time.perf_counter()
    model.encode(texts, batch_size=64, show_progress_bar=False)
    seconds = time.perf_counter() - start
    if answer is not None:
        answer.put(seconds)
    return seconds


def ceiling(args) -> dict:
    """(c): one process on every core against one one-thread process per core at once, on the same windows."""
    import multiprocessing

    texts = windows_of(args.docs)
    cores = os.cpu_count()
    spawn = multiprocessing.get_context("spawn")
    one, per_core = [], []
    for _ in range(2):
        one.append(encode_seconds(texts, cores))
        answers = spawn.Queue()
        workers = [spawn.Process(target=encode_seconds, args=(texts[k::cores], 1, answers)) for k in range(cores)]
        for worker in workers:
            worker.start()
        per_core.append(max(answers.get() for _ in workers))
        for worker in workers:
            worker.join()
    return {
        "docs": args.docs,
        "windows": len(texts),
        "cores": cores,
        "one_process_every_core_s": one,
        "one_process_per_core_s": per_core,
        "ceiling": min(one) / min(per_core),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2000, help="man pages (the first N in the fixed order)")
    parser.add_argument("--gcide", type=int, help="the first N GCIDE entries in one row group instead of man pages")
    parser.add_argument("--work", default="/tmp/rayindex-units")
    parser.add_argument("--shard-cost", action="store_true", help="measure what one more shard costs a build")
    parser.add_argument(
        "--ceiling", action="store_true", help="what units can gain at most here: one process per core vs one on all"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    results = shard_cost(args) if args.shard_cost else ceiling(args) if args.ceiling else units(args)
    print(json.dumps(results, indent=2))
    if args.ceiling:
        print(
            f"{results['windows']:,} windows of {args.docs} man pages, {results['cores']} cores: one process on every "
            f"core {min(results['one_process_every_core_s']):.1f} s, one one-thread process per core at once "
            f"{min(results['one_process_per_core_s']):.1f} s: units can gain {results['ceiling']:.2f}x at most"
        )
    elif not args.shard_cost:
        one, new = results["one_shard"], results["default_plan"]
        what = f"{args.gcide} GCIDE entries" if args.gcide else f"{args.docs} man pages"
        print(
            f"{what} ({results['file_bytes'] / 1e6:.1f} MB, {new['passages']:,} passages) on "
            f"{results['cores']} cores: one shard {one['encode_s']:.1f} s, default plan ({new['units']} units for "
            f"{new['encoder_slots']} encoders, {new['units_at_once_mean']:.2f} at once on average) "
            f"{new['encode_s']:.1f} s: {results['speedup']:.2f}x; units' own seconds: one shard {one['unit_seconds']}, "
            f"default plan {new['unit_seconds']}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
