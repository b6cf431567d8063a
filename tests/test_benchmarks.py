"""The GPU benchmarks, ready for the day a GPU is lent: what of them can run on this CPU-only machine runs.
benchmarks/train_add_benchmark.py's CPU side (the GPU side skipped, and said so); benchmarks/encode_benchmark.py
--gpu refused at once where torch cannot use a GPU (not deep inside a Ray build), and its forward-only figures
measured on the CPU (bf16 against fp32) through the same function the GPU run uses."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def benchmark(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.slow  # a subprocess importing faiss, torch and Ray, then training and adding
def test_train_add_benchmark_runs_its_cpu_side_and_says_the_gpu_side_was_skipped(tmp_path):
    from rayindex.ivf.index import gpus_usable

    figures_file = tmp_path / "train-add.json"
    run = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "train_add_benchmark.py"),
            *("--vectors", "4000", "--dim", "32", "--index", "IVF16,PQ8x4np", "--train-sample", "2000"),
            *("--threads", "1", "--json", str(figures_file)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    figures = json.loads(figures_file.read_text())
    assert set(figures["cpu"]) == {"train_s", "coarse_mse_s", "coarse_mse", "add_s"}
    assert figures["vectors"] == 4000 and figures["cpu"]["add_s"] > 0
    if not gpus_usable():
        assert figures["gpus"] == 0 and "gpu" not in figures and "GPU side skipped" in run.stdout


def test_encode_benchmark_gpu_is_refused_at_once_without_a_usable_gpu():
    encode_benchmark = benchmark("encode_benchmark")
    problems = encode_benchmark.gpu_problems()
    if not problems:
        pytest.skip("torch can use a GPU here: the GPU side runs")
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "encode_benchmark.py"), "--gpu", "--corpus", "stdlib", "--docs", "10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip() == f"--gpu: no usable GPU here: {'; '.join(problems)}. Run without --gpu for the CPU side"


@pytest.mark.slow  # the model loaded twice (bf16, fp32), 48 texts at two batch sizes each
def test_the_forward_only_figures_run_on_the_cpu(docs):
    encode_benchmark = benchmark("encode_benchmark")
    texts = [f"{d['title']}: {d['body'][:300]}" for d in docs[:48]]
    figures = encode_benchmark.gpu_figures(texts, device="cpu", dtypes=("bf16", "fp32"))
    rates = {f"forward_only_{dtype}_batch{batch}_docs_per_s" for dtype in ("bf16", "fp32") for batch in (64, 256)}
    assert set(figures) == rates | {"bf16_recall_at_10_vs_fp32"}
    assert all(figures[name] > 0 for name in rates)
    assert figures["bf16_recall_at_10_vs_fp32"] >= 0.8  # bf16 keeps the neighbours (docs/benchmark figures: GPU)
