"""rayindex eval / tune: recall against exact search (checked against numpy), blocks, tuning, labelled queries."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pipelines.evaluate as evaluation
from pipelines.build import tune_stage
from pipelines.manifest import Manifest
from pipelines.search import open_published


def test_pure_helpers():
    assert evaluation.nprobe_sweep(64) == [1, 2, 4, 8, 16, 32, 64]
    assert evaluation.nprobe_sweep(12) == [1, 2, 4, 8, 12]
    assert evaluation.nprobe_sweep(1) == [1]
    rows = [{"nprobe": 1, "recall@10": 0.5}, {"nprobe": 2, "recall@10": 0.96}, {"nprobe": 4, "recall@10": 0.99}]
    assert evaluation.select_nprobe(rows, 0.95)["nprobe"] == 2
    assert evaluation.select_nprobe(rows, 0.999) is None
    found = np.array([[7, 1, 2, 3], [9, 9, -1, -1]])
    assert evaluation.drop_self(found, np.array([7, 9]), 2).tolist() == [[1, 2], [-1, -1]]
    assert evaluation.recall_at(np.array([[1, 2], [3, 4]]), np.array([[2, 5], [3, 4]]), 2) == 0.75


@pytest.fixture
def index_copy(built, tmp_path):
    shutil.copytree(built[0], tmp_path / "out")
    return tmp_path / "out"


def numpy_recall(published, queries, self_ids, nprobe, k):
    """Independent ground truth: all vectors in RAM, brute force with numpy."""
    x = np.concatenate(list(evaluation.corpus_blocks(published)))
    ids = evaluation.positions_to_ids(published, np.arange(len(x)))
    truth = evaluation.drop_self(ids[np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, : k + 1]], self_ids, k)
    _, found = published.search_vectors(queries, k + 1, nprobe)
    return evaluation.recall_at(evaluation.drop_self(found, self_ids, k), truth, k)


def test_eval_matches_numpy_ground_truth_and_writes_outputs(index_copy, monkeypatch):
    monkeypatch.setattr(evaluation, "BLOCK", 50)  # ground truth really goes block by block
    published = open_published(index_copy)
    result = evaluation.evaluate(published, n_queries=60, ks=(1, 10))
    assert [r["nprobe"] for r in result["sweep"]] == [1, 2, 4, 8]
    queries, self_ids = evaluation.sample_queries(published, 60, 7)
    for row in result["sweep"]:
        assert row["recall@10"] == pytest.approx(numpy_recall(published, queries, self_ids, row["nprobe"], 10), abs=0.02)
    assert result["sweep"][-1]["recall@10"] >= result["sweep"][0]["recall@10"]
    saved = json.loads((published.version_dir / "eval.json").read_text())
    assert saved["sweep"] == result["sweep"] and saved["queries"] == 60
    for png in ("recall_vs_nprobe.png", "latency_vs_recall.png"):
        assert (published.version_dir / png).read_bytes()[:4] == b"\x89PNG"


def test_labelled_queries_hit_and_mrr(index_copy, docs, tmp_path):
    labelled = tmp_path / "q.jsonl"
    labelled.write_text("\n".join(json.dumps({"query": f"{d['title']}: {d['body']}", "id": d["id"]}) for d in docs[::36]))
    result = evaluation.evaluate(open_published(index_copy), n_queries=20, ks=(1, 10), labelled_path=str(labelled))
    assert result["labelled"]["queries"] == 10
    assert result["labelled"]["hit@10"] == 1.0 and result["labelled"]["mrr"] > 0.8


def test_tune_stores_the_smallest_nprobe_reaching_the_target(index_copy, built, monkeypatch):
    published = open_published(index_copy)
    tuning = evaluation.tune_nprobe(published, 0.6, n_queries=80)
    reaching = [r["nprobe"] for r in tuning["sweep"] if r["recall@10"] >= 0.6]
    assert tuning["reached"] and tuning["nprobe"] == min(reaching)
    reopened = open_published(index_copy)
    assert reopened.manifest.nprobe == tuning["nprobe"] and reopened.manifest.tuning["target"] == 0.6
    monkeypatch.setattr(evaluation, "REFINE_FACTORS", ())  # no re-ranking: PQ16 codes alone cannot be exact
    unreachable = evaluation.tune_nprobe(reopened, 1.0, n_queries=80)
    assert not unreachable["reached"] and "best this index reaches" in unreachable["note"]
    with pytest.raises(evaluation.RayIndexError, match="target-recall"):
        evaluation.tune_nprobe(reopened, 1.5)


def test_build_tune_stage_records_tuning(index_copy, built):
    version = open_published(index_copy).version_dir
    manifest = Manifest.load(version)
    config = manifest.config.model_copy(update={"target_recall": 0.5})
    tune_stage(config, manifest, version)
    saved = Manifest.load(version)
    assert "tune" in saved.timings_s and saved.tuning["target"] == 0.5 and saved.nprobe == saved.tuning["nprobe"]


def test_eval_cli(index_copy):
    rayindex = str(Path(sys.executable).with_name("rayindex"))
    result = subprocess.run([rayindex, "eval", "--index", str(index_copy), "--k", "1,10", "--n-queries", "40"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "recall@10" in result.stdout and "eval.json" in result.stdout
    bad = subprocess.run([rayindex, "eval", "--index", str(index_copy), "--k", "ten"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--k" in bad.stderr


def test_refiner_reads_fp16_vectors_and_reranks_exactly(index_copy):
    from pipelines.refine import Refiner, write_fp16_embeddings

    published = open_published(index_copy)
    assert write_fp16_embeddings(published.version_dir, published.manifest) > 0
    assert write_fp16_embeddings(published.version_dir, published.manifest) == 0  # already there
    x = np.concatenate(list(evaluation.corpus_blocks(published)))
    ids = evaluation.positions_to_ids(published, np.arange(len(x)))
    refiner = Refiner(published.version_dir, published.manifest)
    pick = np.array([ids[-1], -1, ids[0], ids[150]])
    got = refiner.vectors(pick)
    assert np.allclose(got[[0, 2, 3]], x[[-1, 0, 150]], atol=1e-3) and not got[1].any()
    queries = x[::45]
    # every vector as a candidate: the re-ranked order is the exact order over the fp16 vectors
    _, found = published.search_vectors(queries, 10, nprobe=published.manifest.nlist, refine=len(x))
    x16 = x.astype(np.float16).astype(np.float32)
    exact = ids[np.argsort(-(queries @ x16.T), axis=1, kind="stable")[:, :10]]
    assert np.mean(found == exact) >= 0.99  # ties aside


def test_tune_turns_on_reranking_when_pq_cannot_reach_the_target(index_copy):
    published = open_published(index_copy)
    plain_best = max(evaluation.tune_nprobe(published, 0.2, n_queries=80)["sweep"], key=lambda r: r["recall@10"])["recall@10"]
    target = min(0.95, plain_best + 0.1)  # out of reach for the PQ16 codes alone
    tuning = evaluation.tune_nprobe(open_published(index_copy), target, n_queries=80)
    assert tuning["reached"] and tuning["refine_factor"] > 1 and tuning["recall"] >= target
    reopened = open_published(index_copy)
    assert reopened.manifest.refine_factor == tuning["refine_factor"]
    queries, _ = evaluation.sample_queries(reopened, 5, 3)
    default = reopened.search_vectors(queries, 10)
    explicit = reopened.search_vectors(queries, 10, tuning["nprobe"], tuning["refine_factor"])
    assert np.array_equal(default[1], explicit[1])  # search and serve use the tuned re-ranking by default
