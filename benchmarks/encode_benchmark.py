"""Encode throughput: rayindex's encode stage against one process calling SentenceTransformer.encode, on the
same texts and the same cores, in one run.

(a) the real model: the encode stage (plan + encode through Ray: actors, reading Parquet, text assembly,
    hashes, tokenizing, forward pass, writing embeddings and the doc store) vs one process calling
    SentenceTransformer.encode(texts, batch_size=64) on the already assembled texts;
(b) both again with the forward pass made free: a stub stands in for SentenceTransformer.forward (it
    returns random vectors of the right size, in the actors through Ray's worker_process_setup_hook and
    in the baseline process), so what remains is the data path: reading, assembly, hashing, tokenizing,
    writing. This stub exists in this benchmark only;
(c) the tokenizer alone (the model's fast tokenizer, batches of 2,048, truncation on), with its
    parallelism on and off: the floor of any data path that tokenizes once.

Rates are docs/s over the same documents. The stage's rate is given two ways: over the encode stage's wall time
(actor start, model load and the stage's checks included: its fixed costs; starting the local Ray is timed on its
own, as the build's timings record it, and so is the plan) and over the encoders' own time per shard (reading to
writing, ShardState.encode_seconds: the steady data path). The stages run as a build runs them: the default shard
plan, for the encoders this Ray can run at once. The one process's rate leaves out its model load (reported).

    apt-get install dict-gcide          # the default corpus: 114,890 GCIDE dictionary entries
    python benchmarks/encode_benchmark.py [--corpus gcide|stdlib|FILE.parquet] [--docs N] [--json
    docs/benchmark-encode.json]
    python benchmarks/encode_benchmark.py --gpu ...   # on a GPU machine: GPU utilization, forward-only rate
    in fp16, bf16 and fp32 at batch 64 and 256, and the fp16/bf16 vectors' recall@10 against fp32
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from rich.console import Console
from rich.table import Table

GCIDE = Path("/usr/share/dictd")
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 64 + B64.index(ch)
    return value


def gcide_entries() -> list[dict]:
    """Every entry of Debian's dict-gcide (one per distinct offset in gcide.index): headword and definition."""
    data = gzip.open(GCIDE / "gcide.dict.dz").read()
    seen, entries = set(), []
    for line in (GCIDE / "gcide.index").read_text(encoding="utf-8", errors="replace").splitlines():
        word, offset, length = line.split("\t")
        span = (dictd_number(offset), dictd_number(length))
        if word.startswith("00-database") or span in seen:
            continue
        seen.add(span)
        entries.append(
            {
                "id": f"{word}#{len(entries)}",
                "word": word,
                "definition": data[span[0] : span[0] + span[1]].decode("utf-8", "replace").strip(),
            }
        )
    return entries


def corpus(name: str, limit: int | None) -> tuple[list[dict], str]:
    if name == "gcide":
        if not (GCIDE / "gcide.index").exists():
            raise SystemExit("dict-gcide is not installed (apt-get install dict-gcide); or use --corpus stdlib")
        rows, what = gcide_entries(), "GCIDE dictionary entries (Debian dict-gcide)"
    elif name == "stdlib":
        from rayindex.text.stdlib_corpus import stdlib_docstrings

        rows = [{"id": d["id"], "word": d["title"], "definition": d["body"]} for d in stdlib_docstrings()]
        what = "Python standard library docstrings"
    else:
        rows, what = pq.read_table(name).to_pylist(), name
    return rows[:limit] if limit else rows, what


def free_forward() -> None:
    """The stub (this benchmark only): SentenceTransformer.forward returns random vectors of the right
    size, so only the data path around the forward pass costs anything."""
    import torch
    from sentence_transformers import SentenceTransformer

    from rayindex.text.model import embedding_dimension

    def forward(self, features, **kwargs):
        return {**features, "sentence_embedding": torch.rand(features["input_ids"].shape[0], embedding_dimension(self))}

    SentenceTransformer.forward = forward


def one_process(texts: list[str]) -> tuple[float, float]:
    """Seconds of loading the model, then of SentenceTransformer.encode(texts, batch_size=64), in this process."""
    from rayindex.text.model import load_model

    start = time.perf_counter()
    model = load_model("all-MiniLM-L6-v2")
    loaded = time.perf_counter()
    model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
    return loaded - start, time.perf_counter() - loaded


def planned_and_encoded(config):
    """The plan and encode stages of a build as `rayindex build` runs them, on the Ray this process is connected
    to: (manifest, the plan's seconds, the encode stage's seconds)."""
    from rayindex.builder import start_or_resume
    from rayindex.infra.progress import StageProgress
    from rayindex.infra.storage import Store
    from rayindex.stages import encode, plan

    progress = StageProgress(quiet=True)
    manifest, version = start_or_resume(config, Store(config.output), progress)
    start = time.perf_counter()
    plan.run(config, manifest)
    planned = time.perf_counter()
    encode.run(config, manifest, version, progress)
    return manifest, planned - start, time.perf_counter() - planned


def stage(parquet: Path, work: Path, encoders: int | None, gpu: bool, setup_hook=None) -> dict:
    """The plan and encode stages as `rayindex build` runs them (its default shard plan), in a fresh local Ray
    whose start is timed on its own, as the build's timings record it."""
    from rayindex.config import BuildConfig

    runtime_env = {"worker_process_setup_hook": setup_hook} if setup_hook else None
    started = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    ray_s = time.perf_counter() - started
    try:
        config = BuildConfig(
            inputs=[str(parquet)],
            output=str(work),
            id_column="id",
            template="{word}: {definition}",
            encoders=encoders,
            gpu=gpu,
            index="IVF1,Flat",
        )
        manifest, plan_s, wall = planned_and_encoded(config)
    finally:
        ray.shutdown()
    actors = min(len(manifest.shards), manifest.encoder_slots)
    shard_seconds = sum(s.encode_seconds for s in manifest.shard_states)
    return {
        "docs": manifest.counts.docs_encoded,
        "ray_start_s": ray_s,
        "plan_s": plan_s,
        "wall_s": wall,
        "steady_s": shard_seconds / actors,
        "actors": actors,
        "shards": len(manifest.shards),
        "shard_seconds": [s.encode_seconds for s in manifest.shard_states],
        "truncated": manifest.counts.skipped.get("truncated_to_max_seq_length (kept)", 0),
    }


def tokenizer_alone(texts: list[str], parallel: bool) -> float:
    """Seconds for the fast tokenizer alone over the texts (truncation on), in a fresh process (the
    tokenizer's parallelism is fixed when its thread pool starts)."""
    code = (
        "import json, sys, time; from rayindex.text.model import load_model\n"
        "texts = json.load(sys.stdin); tok = load_model('all-MiniLM-L6-v2').tokenizer\n"
        "start = time.perf_counter()\n"
        "for i in range(0, len(texts), 2048): tok(texts[i:i + 2048], truncation=True, max_length=256)\n"
        "print(time.perf_counter() - start)"
    )
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true" if parallel else "false")
    out = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(texts), capture_output=True, text=True, env=env, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def gpu_sampler(samples: list, stop: threading.Event) -> None:
    proc = subprocess.Popen(
        ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
        stdout=subprocess.PIPE,
        text=True,
    )
    while not stop.is_set():
        line = proc.stdout.readline()
        if line.strip().isdigit():
            samples.append(int(line.strip()))
    proc.terminate()


def gpu_problems() -> list[str]:
    """What keeps this machine from the GPU side (infra/gpu.py's checks, as an encoder makes them); empty when
    torch can use a GPU. --gpu is refused with them before anything runs."""
    import torch

    from rayindex.infra.gpu import cuda_problems, nvidia_driver

    return cuda_problems(torch, nvidia_driver())


def gpu_figures(texts: list[str], device: str = "cuda", dtypes: tuple[str, ...] = ("fp16", "bf16", "fp32")) -> dict:
    """Forward-only docs/s on the GPU (tokenized beforehand, through the encoder's own embed: pinned memory,
    non-blocking copies) in each --encode-dtype at the CPU's and the GPU's default batch sizes, and the
    lower precisions' recall@10 against fp32 exact search on the same texts (fp32 among the dtypes). device
    and dtypes: the same figures on the CPU (bf16, fp32), which is how they are tested on a machine without
    a GPU (tests/test_benchmarks.py)."""
    import faiss

    from rayindex.config import CPU_BATCH_SIZE, GPU_BATCH_SIZE
    from rayindex.text.model import embed, load_model, tokenize

    out = {}
    vectors = {}
    for dtype in dtypes:
        model = load_model("all-MiniLM-L6-v2", device, dtype)
        chunks = [tokenize(model, texts[i : i + 2048]) for i in range(0, len(texts), 2048)]
        for batch in (CPU_BATCH_SIZE, GPU_BATCH_SIZE):
            embed(model, chunks[0], batch, True)  # warm up
            start = time.perf_counter()
            vectors[dtype] = np.concatenate([embed(model, c, batch, True) for c in chunks])
            out[f"forward_only_{dtype}_batch{batch}_docs_per_s"] = len(texts) / (time.perf_counter() - start)
    queries = vectors["fp32"][:: max(1, len(texts) // 1000)]
    exact = faiss.IndexFlatIP(vectors["fp32"].shape[1])
    exact.add(vectors["fp32"])
    _, truth = exact.search(queries, 10)
    for dtype in (d for d in dtypes if d != "fp32"):
        low = faiss.IndexFlatIP(vectors[dtype].shape[1])
        low.add(vectors[dtype])
        _, found = low.search(queries, 10)
        out[f"{dtype}_recall_at_10_vs_fp32"] = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="gcide")
    parser.add_argument("--docs", type=int, help="only the first N documents")
    parser.add_argument(
        "--real-docs",
        type=int,
        default=3000,
        help="documents for (a), the real model (on 2 CPU cores it "
        "encodes ~30 docs/s: the whole corpus would take an hour per side)",
    )
    parser.add_argument("--encoders", type=int, help="encoder actors (default: the build's, one per CPU or GPU)")
    parser.add_argument(
        "--gpu", action="store_true", help="encode on the GPU; also sample utilization and measure forward-only"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.gpu and (problems := gpu_problems()):
        raise SystemExit(f"--gpu: no usable GPU here: {'; '.join(problems)}. Run without --gpu for the CPU side")
    rows, what = corpus(args.corpus, args.docs)
    texts = [f"{r['word']}: {r['definition']}" for r in rows]
    console = Console(width=150)
    console.print(f"{len(texts):,} {what}; {os.cpu_count()} cores")
    results: dict = {"corpus": what, "docs": len(texts), "cores": os.cpu_count(), "gpu": args.gpu}
    with tempfile.TemporaryDirectory() as tmp:
        parquet = Path(tmp) / "corpus.parquet"
        pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=10_000)
        samples, stop = [], threading.Event()
        if args.gpu:
            threading.Thread(target=gpu_sampler, args=(samples, stop), daemon=True).start()
        real = parquet if args.gpu else Path(tmp) / "real.parquet"
        if not args.gpu:
            pq.write_table(pa.Table.from_pylist(rows[: args.real_docs]), real, row_group_size=10_000)
        results["a_stage"] = stage(real, Path(tmp) / "a", args.encoders, args.gpu)
        stop.set()
        if samples:
            results["gpu_utilization_pct"] = {"mean": float(np.mean(samples)), "p50": float(np.median(samples))}
        results["a_model_load_s"], results["a_one_process_s"] = one_process(
            texts if args.gpu else texts[: args.real_docs]
        )
        results["b_stage"] = stage(parquet, Path(tmp) / "b", args.encoders, args.gpu, setup_hook=free_forward)
        free_forward()  # from here on, in this process too: the baseline's data path
        results["b_model_load_s"], results["b_one_process_s"] = one_process(texts)
        results["c_tokenizer_parallel_s"] = tokenizer_alone(texts, True)
        results["c_tokenizer_serial_s"] = tokenizer_alone(texts, False)
    if args.gpu:
        results.update(gpu_figures(texts[:20_000]))
    n, cores = len(texts), os.cpu_count()

    def rate(seconds: float) -> float:
        return n / seconds

    table = Table(title=f"encode, {cores} cores{', GPU' if args.gpu else ''}: docs/s (docs/s per core)")
    for col in (
        "",
        "pipeline, steady",
        "pipeline, stage wall",
        "one process",
        "steady / one process",
        "stage wall / one process",
        "steady / tokenizer floor",
    ):
        table.add_column(col, justify="right")
    floor = rate(results["c_tokenizer_parallel_s"])
    for label, key in (("(a) real model", "a"), ("(b) forward free: data path", "b")):
        st = results[f"{key}_stage"]
        docs = st["docs"]
        one, steady, wall = docs / results[f"{key}_one_process_s"], docs / st["steady_s"], docs / st["wall_s"]
        label = f"{label}, {docs:,} docs"
        results[f"{key}_ratios"] = {
            "steady_vs_one_process": steady / one,
            "wall_vs_one_process": wall / one,
            "steady_vs_floor": steady / floor,
        }
        table.add_row(
            label,
            f"{steady:,.0f} ({steady / cores:,.0f})",
            f"{wall:,.0f}",
            f"{one:,.0f}",
            f"{steady / one:.2f}",
            f"{wall / one:.2f}",
            f"{steady / floor:.2f}",
        )
    table.add_row(
        f"(c) tokenizer alone, parallel / serial, {n:,} docs",
        f"{floor:,.0f} / {rate(results['c_tokenizer_serial_s']):,.0f}",
        "",
        "",
        "",
        "",
        "1.00",
    )
    console.print(table)
    for key in ("a", "b"):
        st = results[f"{key}_stage"]
        console.print(
            f"({key}) Ray started in {st['ray_start_s']:.1f} s, plan {st['plan_s']:.1f} s, encode stage "
            f"{st['wall_s']:.1f} s: {st['shards']} shards on {st['actors']} encoders, each shard "
            f"{', '.join(f'{x:.1f}' for x in st['shard_seconds'])} s; the one process loaded its model in "
            f"{results[f'{key}_model_load_s']:.1f} s"
        )
    console.print(
        "(b) uses a stub for SentenceTransformer.forward (random vectors): it measures the data path, not the model."
    )
    if args.gpu:
        console.print({k: v for k, v in results.items() if k.startswith(("forward_only", "fp16", "bf16", "gpu_util"))})
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
