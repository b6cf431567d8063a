"""Inside an encoder (text/model.py embed, stages/encode.py, infra/prefetch.py written_behind): the batch size
and dtype each device gets, length-sorted batches returning the unsorted vectors in order, writes off the
forward thread (in order, bounded, their errors reaching the build), the NaN refusal, and a resume that
never mixes two precisions. The GPU side of the same code runs in benchmarks/encode_benchmark.py --gpu."""

import threading
import time

import numpy as np
import pyarrow as pa
import pytest
from rich.console import Console

from rayindex.builder import start_or_resume
from rayindex.config import CPU_BATCH_SIZE, GPU_BATCH_SIZE
from rayindex.errors import RayIndexError
from rayindex.infra.files import atomic_file
from rayindex.infra.prefetch import written_behind
from rayindex.infra.progress import StageProgress
from rayindex.infra.storage import Store
from rayindex.stages import encode, plan
from rayindex.text.corpus import RowBatch
from rayindex.text.documents import prepare
from rayindex.text.model import embed, encode_batch_size, encode_precision, load_model, nonfinite_rows, tokenize

from helpers import build_config, write_parquet


def test_batch_size_and_dtype_follow_the_device():
    assert encode_batch_size(None, "cuda") == GPU_BATCH_SIZE == 256
    assert encode_batch_size(None, "cpu") == CPU_BATCH_SIZE == 64
    assert encode_batch_size(32, "cuda") == 32  # --batch-size wins
    assert encode_precision("auto", "cuda") == "fp16" and encode_precision("auto", "cpu") == "fp32"
    assert encode_precision("bf16", "cpu") == "bf16" and encode_precision("fp32", "cuda") == "fp32"
    with pytest.raises(RayIndexError, match="--encode-dtype fp16 needs a GPU; on CPU use fp32"):
        encode_precision("fp16", "cpu")


@pytest.fixture(scope="module")
def model():
    return load_model("all-MiniLM-L6-v2")


def test_length_sorted_batches_give_the_unsorted_vectors_in_the_rows_order(model, docs):
    """Batches of 16 sorted by length (little padding) against batches of one in the given order (no
    padding, no sorting): the same vector for every row, in the rows' order, within fp32 tolerance."""
    texts = [f"{d['title']}: {d['body']}" for d in docs[:60]]
    tokenized = tokenize(model, texts)
    assert len(set(tokenized.lengths.tolist())) > 20  # lengths vary: sorting reorders them
    rows = np.array([5, 0, 59, 17, 3, 42, 8, 33, 21, 1, 50, 12, 27, 39, 44, 30, 2, 55, 9])
    sorted_batches = embed(model, tokenized, 16, True, rows)
    one_by_one = np.concatenate([embed(model, tokenized, 1, True, rows[i : i + 1]) for i in range(len(rows))])
    np.testing.assert_allclose(sorted_batches, one_by_one, atol=1e-5)
    expected = model.encode([texts[r] for r in rows], normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(sorted_batches, expected, atol=1e-5)
    # order restored exactly: each row's nearest vector among the others is itself
    assert (np.argmax(sorted_batches @ one_by_one.T, axis=1) == np.arange(len(rows))).all()


def test_bf16_on_cpu_gives_float32_vectors_close_to_fp32(model, docs):
    texts = [f"{d['title']}: {d['body']}" for d in docs[:20]]
    tokenized = tokenize(model, texts)
    half = load_model("all-MiniLM-L6-v2", "cpu", "bf16")
    assert next(half.parameters()).dtype.is_floating_point and str(next(half.parameters()).dtype) == "torch.bfloat16"
    low, full = embed(half, tokenized, 8, True), embed(model, tokenized, 8, True)
    assert low.dtype == np.float32 and not len(nonfinite_rows(low))
    assert (np.sum(low * full, axis=1) > 0.98).all()  # cosine of each bf16 vector to its fp32 one


def test_nonfinite_vectors_are_refused_naming_the_shard_and_documents(model):
    """A model whose weights overflow (here made NaN, as fp16 does on some models) gives NaN vectors; the
    encoder refuses the chunk naming its shard, precision and documents."""
    import copy

    import torch

    broken = copy.deepcopy(model)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    table = pa.table({"id": ["a", "b", "c"], "text": ["one text", "another text", "a third"]})
    docs = prepare(RowBatch(np.arange(3), table), ["text"], None, "id", str)
    vectors = embed(broken, tokenize(broken, docs.texts.to_pylist()), 2, True)
    assert nonfinite_rows(vectors).tolist() == [0, 1, 2]
    with pytest.raises(
        RayIndexError, match=r"shard 4: the encoder \(cuda/fp16\) gave 3 vector\(s\) with NaN.*'a', 'b', 'c'"
    ):
        encode.refuse_nonfinite(vectors, 4, "cuda/fp16", docs, np.ones(3, np.int64))
    fine = embed(model, tokenize(model, docs.texts.to_pylist()), 2, True)
    encode.refuse_nonfinite(fine, 4, "cpu/fp32", docs, np.ones(3, np.int64))  # finite: no refusal


def test_writes_behind_run_in_order_bounded_and_their_errors_reach_the_caller(tmp_path):
    written, release = [], threading.Event()

    def slow_write(i):
        release.wait()
        written.append(i)

    with written_behind(depth=2) as write:
        started = time.monotonic()
        write(slow_write, 0)
        write(slow_write, 1)
        assert time.monotonic() - started < 0.5  # queued, the caller goes on
        threading.Timer(0.3, release.set).start()
        write(slow_write, 2)  # two waiting: this waits for the oldest
        assert written[:1] == [0]
    assert written == [0, 1, 2]  # the block's end waited for every write, in order

    def failing(i):
        raise OSError(f"disk full writing chunk {i}")

    with pytest.raises(OSError, match="disk full writing chunk 0"):
        with written_behind(depth=2) as write:
            write(failing, 0)
            time.sleep(0.2)
            write(written.append, 99)  # the earlier failure is raised here, before more is queued
    assert 99 not in written

    target = tmp_path / "embeddings.f32"
    with pytest.raises(OSError, match="disk full"):  # nothing half-written is published
        with atomic_file(target) as tmp, open(tmp, "wb") as fh, written_behind() as write:
            write(fh.write, b"first chunk")
            write(failing, 1)
    assert not target.exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_resume_in_another_dtype_re_encodes_the_shards_it_finds(ray_address, docs, tmp_path):
    """A run encoded in fp32, resumed with --encode-dtype bf16: the same run (same plan), every shard encoded
    again in bf16 and saying so; never a mix of the two."""
    corpus = write_parquet(tmp_path / "docs.parquet", docs[:24])
    config = build_config([corpus], tmp_path / "out", shards=2)
    manifest, version = start_or_resume(config, Store(config.output), StageProgress(quiet=True))
    plan.run(config, manifest)
    encode.run(config, manifest, version, StageProgress(quiet=True))
    assert {s.encoded_with for s in manifest.shard_states} == {"cpu/fp32"} and manifest.model.dtype == "fp32"
    before = [s.embeddings_sha256 for s in manifest.shard_states]

    again = config.model_copy(update={"encode_dtype": "bf16"})
    console = Console(record=True, width=300)
    progress = StageProgress(quiet=True, console=console)
    resumed, version = start_or_resume(again, Store(config.output), progress)
    assert resumed.run_id == manifest.run_id
    encode.run(again, resumed, version, progress)
    assert "re-encoding 2 shard(s) encoded with cpu/fp32: this run encodes with cpu/bf16" in console.export_text()
    assert resumed.reused.encode == [] and {s.encoded_with for s in resumed.shard_states} == {"cpu/bf16"}
    assert resumed.model.dtype == "bf16"
    assert all(a != b for a, b in zip(before, [s.embeddings_sha256 for s in resumed.shard_states]))

    resumed.shard_states[0].encoded_with = "cuda/fp16"  # an encoder that ran elsewhere: refused, not mixed
    with pytest.raises(RayIndexError, match="shards were encoded with cpu/bf16 and cuda/fp16"):
        encode.check_one_precision(resumed)
