"""rayindex eval (query/evaluate.py) and the recall measurement under it (ivf/recall.py): recall
against exact search (checked against numpy), block by block, and labelled queries."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rayindex.ivf.recall as recall
from rayindex.config import EvalOptions
from rayindex.manifest import SweepPoint
from rayindex.query.evaluate import EVAL_SEED, evaluate
from rayindex.query.search import open_index


def point(nprobe: int, r10: float) -> SweepPoint:
    return SweepPoint(nprobe=nprobe, refine=1, ms_per_query=0.1, recall={10: r10})


def test_pure_helpers():
    assert recall.nprobe_sweep(64) == [1, 2, 4, 8, 16, 32, 64]
    assert recall.nprobe_sweep(12) == [1, 2, 4, 8, 12]
    assert recall.nprobe_sweep(1) == [1]
    points = [point(1, 0.5), point(2, 0.96), point(4, 0.99)]
    assert recall.select_nprobe(points, 0.95).nprobe == 2
    assert recall.select_nprobe(points, 0.999) is None
    found = np.array([[7, 1, 2, 3], [9, 9, -1, -1]])
    assert recall.drop_self(found, np.array([7, 9]), 2).tolist() == [[1, 2], [-1, -1]]
    assert recall.recall_at(np.array([[1, 2], [3, 4]]), np.array([[2, 5], [3, 4]]), 2) == 0.75
    assert recall.recall_at(np.array([[1, 2]]), np.array([[2, -1]]), 2) == 1.0  # one true neighbour, found
    # passages (row << 20 | passage) ranked into documents: first appearance wins, -1 padding
    found = np.array([[(3 << 20) | 1, 3 << 20, 5 << 20, -1], [(7 << 20) | 2, -1, -1, -1]])
    assert recall.ranked_documents(found, 2).tolist() == [[3, 5], [7, -1]]


@pytest.fixture
def index_copy(built, tmp_path):
    shutil.copytree(built[0], tmp_path / "out")
    return tmp_path / "out"


def numpy_recall(published, queries, self_ids, nprobe, k):
    """Independent ground truth: all vectors in RAM, brute force with numpy."""
    x = np.concatenate(list(recall.corpus_blocks(published.version_dir, published.manifest)))
    ids = recall.positions_to_ids(published.version_dir, published.manifest, np.arange(len(x)))
    truth = recall.drop_self(ids[np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, : k + 1]], self_ids, k)
    _, found = published.search_vectors(queries, k + 1, nprobe)
    return recall.recall_at(recall.drop_self(found, self_ids, k), truth, k)


def test_eval_matches_numpy_ground_truth_and_writes_outputs(index_copy, monkeypatch):
    monkeypatch.setattr(recall, "BLOCK", 50)  # ground truth really goes block by block
    published = open_index(index_copy)
    result = evaluate(published, EvalOptions(n_queries=60, ks="1,10"))
    assert [r["nprobe"] for r in result["sweep"]] == [1, 2, 4, 8]
    queries, self_ids = recall.sample_queries(published.version_dir, published.manifest, 60, EVAL_SEED)
    for row in result["sweep"]:
        assert row["recall"][10] == pytest.approx(
            numpy_recall(published, queries, self_ids, row["nprobe"], 10), abs=0.02
        )
    assert result["sweep"][-1]["recall"][10] >= result["sweep"][0]["recall"][10]
    saved = json.loads((published.version_dir / "eval.json").read_text())
    assert [p["recall"]["10"] for p in saved["sweep"]] == [p["recall"][10] for p in result["sweep"]] and saved[
        "queries"
    ] == 60
    for png in ("recall_vs_nprobe.png", "latency_vs_recall.png"):
        assert (published.version_dir / png).read_bytes()[:4] == b"\x89PNG"


def test_labelled_queries_hit_and_mrr(index_copy, docs, tmp_path):
    labelled = tmp_path / "q.jsonl"
    labelled.write_text(
        "\n".join(json.dumps({"query": f"{d['title']}: {d['body']}", "id": d["id"]}) for d in docs[::36])
    )
    published = open_index(index_copy)
    result = evaluate(published, EvalOptions(n_queries=20, ks="1,10", queries=str(labelled)))
    assert result["labelled"]["queries"] == 10 and result["labelled"]["nprobe"] == published.manifest.nprobe
    assert result["labelled"]["hit@10"] == 1.0 and result["labelled"]["mrr"] > 0.8
    every = result["labelled"]["all_lists"]
    assert every["nprobe"] == published.manifest.nlist and every["hit@10"] == 1.0 and every["mrr"] > 0.8
    # the all-lists column is the pipeline searched with nprobe = nlist
    vectors = published.encode([json.loads(line)["query"] for line in labelled.read_text().splitlines()])
    found = published.search_documents(vectors, 1, published.manifest.nlist)
    firsts = [published.docs.get(hits[0][1])["id"] for hits in found]
    assert every["hit@1"] == np.mean([f == d["id"] for f, d in zip(firsts, docs[::36])])


@pytest.mark.slow  # three CLI runs, each loading the model (about 70 s on 2 shared cores)
def test_eval_cli(index_copy, docs, tmp_path):
    rayindex = str(Path(sys.executable).with_name("rayindex"))
    result = subprocess.run(
        [rayindex, "eval", "--index", str(index_copy), "--k", "1,10", "--n-queries", "40"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "recall@10" in result.stdout and "eval.json" in result.stdout
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"query": d["title"], "id": d["id"]}) + "\n" for d in docs[:40:8]))
    with_labels = subprocess.run(
        [rayindex, "eval", "--index", str(index_copy), "--k", "1,10", "--n-queries", "20", "--queries", str(labelled)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert with_labels.returncode == 0, with_labels.stderr
    saved = json.loads((open_index(index_copy).version_dir / "eval.json").read_text())["labelled"]
    lines = with_labels.stdout.splitlines()
    head = next(line for line in lines if "default nprobe" in line and " lists" in line)
    assert f"default nprobe {saved['nprobe']}" in head and f"all {saved['all_lists']['nprobe']} lists" in head
    for key in ("hit@1", "hit@10", "mrr"):  # a row: the measure, at the default nprobe, with all lists
        row = next(line for line in lines if f" {key} " in line)
        cells = [cell.strip() for cell in row.split("│") if cell.strip()]
        assert cells == [key, f"{saved[key]:.3f}", f"{saved['all_lists'][key]:.3f}"]
    bad = subprocess.run(
        [rayindex, "eval", "--index", str(index_copy), "--k", "ten"], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "--k" in bad.stderr
