"""rayindex eval (query/evaluate.py) and the recall measurement under it (ivf/recall.py): recall
against exact search (checked against numpy), block by block, and labelled queries in each search mode."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rayindex.ivf.recall as recall
from rayindex.config import EvalOptions
from rayindex.manifest import SweepPoint
from rayindex.query.evaluate import EVAL_SEED, evaluate, labelled_by_mode
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


def quotes(docs: list[dict], n: int) -> list[dict]:
    """{query, id}: n documents' longest sentence of 12 to 40 words that no other document holds nor nearly
    holds (no other body has 60% of its words: _pyio.open words TextIOWrapper's newline rule alike)."""
    bodies = [" ".join(d["body"].split()) for d in docs]
    words = [set(re.findall(r"\w+", body.lower())) for body in bodies]
    asked = []
    for i, (doc, body) in enumerate(zip(docs, bodies)):
        sentences = []
        for sentence in re.split(r"(?<=[.!?])\s+", body):
            said = set(re.findall(r"\w+", sentence.lower()))
            others = (len(said & other) / len(said) for j, other in enumerate(words) if j != i)
            if 12 <= len(sentence.split()) <= 40 and max(others) < 0.6:
                sentences.append(sentence)
        if sentences:
            asked.append({"query": max(sentences, key=len), "id": doc["id"]})
    return asked[:: len(asked) // n][:n]


def found_by_search(published, asked: list[dict], k: int, mode: str, nprobe: int | None = None) -> dict:
    """hit@1, hit@k and MRR computed here from index.search, what users get."""
    ranks = []
    for item in asked:
        ids = [hit["id"] for hit in published.search(item["query"], k=k, nprobe=nprobe, mode=mode)]
        ranks.append(ids.index(item["id"]) + 1 if item["id"] in ids else None)
    return {
        "hit@1": float(np.mean([r == 1 for r in ranks])),
        f"hit@{k}": float(np.mean([r is not None for r in ranks])),
        "mrr": float(np.mean([1 / r if r else 0.0 for r in ranks])),
    }


@pytest.mark.slow  # eval, then 60 searches one by one to check it: 25 s on 2 shared cores, 42 s under load
def test_labelled_queries_in_every_mode(index_copy, docs, tmp_path):
    """Sentences quoted from documents: BM25 finds every one first; each mode's figures are what index.search
    gives in that mode; the PNG holds a bar per mode."""
    asked = quotes(docs, 12)
    labelled = tmp_path / "quotes.jsonl"
    labelled.write_text("".join(json.dumps(item) + "\n" for item in asked))
    published = open_index(index_copy)
    result = evaluate(published, EvalOptions(n_queries=20, ks="1,10", queries=str(labelled)))["labelled"]
    assert result["queries"] == 12 and result["default_mode"] == "hybrid" and "note" not in result
    assert list(result["modes"]) == ["dense", "lexical", "hybrid"]
    assert result["modes"]["lexical"]["hit@1"] == 1.0 and result["modes"]["lexical"]["mrr"] == 1.0
    nprobe, nlist = published.manifest.nprobe, published.manifest.nlist
    for mode, figures in result["modes"].items():
        assert {key: figures[key] for key in ("hit@1", "hit@10", "mrr")} == found_by_search(published, asked, 10, mode)
        if mode != "lexical":
            assert figures["nprobe"] == nprobe and figures["all_lists"]["nprobe"] == nlist
            every = {key: figures["all_lists"][key] for key in ("hit@1", "hit@10", "mrr")}
            assert every == found_by_search(published, asked, 10, mode, nlist)
    dense = result["modes"]["dense"]  # the keys from before modes: dense's
    assert {key: result[key] for key in ("hit@1", "hit@10", "mrr", "nprobe", "all_lists")} == {
        key: dense[key] for key in ("hit@1", "hit@10", "mrr", "nprobe", "all_lists")
    }
    saved = json.loads((published.version_dir / "eval.json").read_text())["labelled"]
    assert saved["modes"] == result["modes"]
    assert (published.version_dir / "labelled_by_mode.png").read_bytes()[:4] == b"\x89PNG"
    # a version built with --no-lexical opens with no postings: dense only, and the figures say so
    dense_only = labelled_by_mode(dataclasses.replace(published, lexical=None), asked, [1, 10])
    assert list(dense_only["modes"]) == ["dense"] and dense_only["default_mode"] == "dense"
    assert dense_only["modes"]["dense"] == dense and "built with --no-lexical" in dense_only["note"]


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
    assert f"Search's default mode: {saved['default_mode']}" in lines
    modes = saved["modes"]
    rows = {  # a row per mode: hit@1, hit@10, MRR; dense and hybrid at the default nprobe, then every list probed
        f"dense, nprobe {modes['dense']['nprobe']}": modes["dense"],
        f"dense, all {modes['dense']['all_lists']['nprobe']} lists": modes["dense"]["all_lists"],
        "lexical": modes["lexical"],
        f"hybrid, nprobe {modes['hybrid']['nprobe']}": modes["hybrid"],
        f"hybrid, all {modes['hybrid']['all_lists']['nprobe']} lists": modes["hybrid"]["all_lists"],
    }
    table = [[cell.strip() for cell in line.split("│") if cell.strip()] for line in lines if "│" in line]
    for label, figures in rows.items():
        assert [label, *(f"{figures[key]:.3f}" for key in ("hit@1", "hit@10", "mrr"))] in table
    bad = subprocess.run(
        [rayindex, "eval", "--index", str(index_copy), "--k", "ten"], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "--k" in bad.stderr
