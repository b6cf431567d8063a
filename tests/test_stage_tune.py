"""The tune stage (stages/tune.py): the smallest nprobe reaching a recall target, re-ranking when PQ
codes cannot reach it, recorded in the manifest and written into index.faiss (and index_infos.json)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

import rayindex.stages.tune as tune_stage
from rayindex.config import TuneOptions
from rayindex.infra.progress import StageProgress
from rayindex.infra.storage import Store
from rayindex.ivf import recall
from rayindex.ivf.refine import Refiner, write_fp16_embeddings
from rayindex.layout import INDEX_INFOS_FILE, MERGED_FILE
from rayindex.manifest import SweepPoint
from rayindex.query.search import open_index


@pytest.fixture
def index_copy(built, tmp_path):
    shutil.copytree(built[0], tmp_path / "out")
    return tmp_path / "out"


def stored_nprobe(version_dir: Path) -> int:
    return faiss.extract_index_ivf(faiss.read_index(str(version_dir / MERGED_FILE))).nprobe


def point(nprobe: int, recall10: float, p50_ms: float | None) -> SweepPoint:
    return SweepPoint(nprobe=nprobe, refine=1, ms_per_query=0.01, recall={10: recall10}, p50_ms=p50_ms)


def test_the_largest_nprobe_reaching_the_target_within_the_budget_is_chosen():
    sweep = [point(1, 0.7, 0.1), point(2, 0.96, 0.2), point(4, 0.99, 0.5), point(8, 1.0, 1.1), point(16, 1.0, 2.3)]
    assert recall.select_nprobe(sweep, 0.95, 10, max_search_ms=2.0).nprobe == 8  # 16 costs 2.3 ms: over
    assert recall.select_nprobe(sweep, 0.95, 10, max_search_ms=0.5).nprobe == 4  # the budget itself fits
    assert recall.select_nprobe(sweep, 0.95, 10, max_search_ms=0).nprobe == 2  # no budget: the smallest reaching
    assert recall.select_nprobe(sweep, 0.999, 10, max_search_ms=0.6).nprobe == 8  # none fits: the smallest reaching
    assert recall.select_nprobe(sweep, 0.95, 10, max_search_ms=0.15).nprobe == 2  # over budget, yet reaching
    assert recall.select_nprobe(sweep, 1.01, 10, max_search_ms=9) is None
    # a point that reaches the target only counts; one within the budget that does not is never chosen
    noisy = [point(1, 0.96, 0.1), point(2, 0.94, 0.2), point(4, 0.97, 3.0)]
    assert recall.select_nprobe(noisy, 0.95, 10, max_search_ms=1.0).nprobe == 1
    unmeasured = [point(1, 0.96, None), point(2, 0.99, None)]
    assert recall.select_nprobe(unmeasured, 0.95, 10, max_search_ms=5).nprobe == 1


def test_tune_picks_the_nprobe_for_the_target_and_the_budget_and_writes_it_into_the_index(index_copy, monkeypatch):
    published = open_index(index_copy)
    tuning, written = tune_stage.tune(
        published.version_dir, published.manifest, TuneOptions(target_recall=0.6, n_queries=80, max_search_ms=0)
    )
    reaching = [p.nprobe for p in tuning.sweep if p.recall[10] >= 0.6]
    assert tuning.reached and tuning.nprobe == min(reaching)
    assert tuning.recall_of == "documents" and tuning.queries == 80 and "key phrases" in tuning.queries_from
    assert all(p.p50_ms > 0 for p in tuning.sweep)
    assert tuning.p50_ms == next(p.p50_ms for p in tuning.sweep if p.nprobe == tuning.nprobe)
    assert tuning.measured_on == recall.this_machine() and tuning.max_search_ms == 0
    assert published.manifest.nprobe == tuning.nprobe and published.manifest.tuning.target == 0.6
    assert (MERGED_FILE in written) == (tuning.nprobe != 1) and stored_nprobe(published.version_dir) == tuning.nprobe
    roomy, _ = tune_stage.tune(
        published.version_dir, published.manifest, TuneOptions(target_recall=0.6, n_queries=80, max_search_ms=1e6)
    )
    assert roomy.nprobe == max(p.nprobe for p in roomy.sweep if p.recall[10] >= 0.6)  # all fit: the largest
    assert published.manifest.nprobe == roomy.nprobe == stored_nprobe(published.version_dir)
    monkeypatch.setattr(tune_stage, "REFINE_FACTORS", ())  # no re-ranking: PQ16 codes alone cannot be exact
    unreachable, _ = tune_stage.tune(
        published.version_dir, published.manifest, TuneOptions(target_recall=1.0, n_queries=80)
    )
    assert not unreachable.reached and "best this index reaches" in unreachable.note


def test_tune_run_at_the_end_of_a_build_records_and_checksums(index_copy):
    published = open_index(index_copy)
    manifest = published.manifest
    config = manifest.config.model_copy(update={"target_recall": 0.5})
    tuning = tune_stage.run(config, manifest, Store(str(published.version_dir)), StageProgress(quiet=True))
    assert manifest.tuning == tuning and manifest.nprobe == tuning.nprobe
    assert Store(str(published.version_dir)).verified({MERGED_FILE: manifest.files_sha256[MERGED_FILE]})


def test_refiner_reads_fp16_vectors_and_reranks_exactly(index_copy):
    published = open_index(index_copy)
    files = write_fp16_embeddings(published.version_dir, published.manifest)
    assert len(files) == 3 and all((published.version_dir / f).stat().st_size for f in files)
    stamps = [(published.version_dir / f).stat().st_mtime_ns for f in files]
    assert write_fp16_embeddings(published.version_dir, published.manifest) == files  # already there: not rewritten
    assert [(published.version_dir / f).stat().st_mtime_ns for f in files] == stamps
    x = np.concatenate(list(recall.corpus_blocks(published.version_dir, published.manifest)))
    ids = recall.positions_to_ids(published.version_dir, published.manifest, np.arange(len(x)))
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
    published = open_index(index_copy)
    plain, _ = tune_stage.tune(published.version_dir, published.manifest, TuneOptions(target_recall=0.2, n_queries=80))
    target = min(0.95, max(p.recall[10] for p in plain.sweep) + 0.1)  # out of reach for the PQ16 codes alone
    tuning, written = tune_stage.tune(
        published.version_dir, published.manifest, TuneOptions(target_recall=target, n_queries=80)
    )
    assert tuning.reached and tuning.refine_factor > 1 and tuning.recall >= target
    assert sum(f.endswith("embeddings.f16") for f in written) == 3
    queries, _ = recall.sample_queries(published.version_dir, published.manifest, 5, 3)
    default = published.search_vectors(queries, 10)
    explicit = published.search_vectors(queries, 10, tuning.nprobe, tuning.refine_factor)
    assert np.array_equal(default[1], explicit[1])  # search and serve use the tuned re-ranking by default


def test_tune_cli_stores_the_choice_in_the_manifest_index_and_infos(index_copy, docs, tmp_path):
    rayindex = str(Path(sys.executable).with_name("rayindex"))
    log = tmp_path / "log.jsonl"
    log.write_text(
        "".join(json.dumps({"query": f"What is {d['title']}?", "user": n}) + "\n" for n, d in enumerate(docs))
    )
    result = subprocess.run(
        [rayindex, "tune", "--index", str(index_copy), "--target-recall", "0.8", "--n-queries", "60"]
        + ["--queries", str(log), "--max-search-ms", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "p50 ms alone" in result.stdout and "Latencies measured on" in result.stdout
    reopened = open_index(index_copy)
    tuning = reopened.manifest.tuning
    assert tuning.target == 0.8 and stored_nprobe(reopened.version_dir) == reopened.manifest.nprobe
    assert tuning.queries == 60 and tuning.queries_from == f"{log} (60 of its {len(docs)} queries)"
    assert tuning.recall_of == "documents" and tuning.max_search_ms == 0
    assert tuning.nprobe == min(p.nprobe for p in tuning.sweep if p.recall[10] >= 0.8)
    infos = json.loads((reopened.version_dir / INDEX_INFOS_FILE).read_text())
    assert infos["nprobe"] == reopened.manifest.nprobe and infos["refine_factor"] == reopened.manifest.refine_factor
    assert Store(str(reopened.version_dir)).verified(
        {name: reopened.manifest.files_sha256[name] for name in (MERGED_FILE, INDEX_INFOS_FILE)}
    )


def test_tune_cli_refuses_a_bad_query_file_naming_its_line(index_copy, tmp_path):
    rayindex = str(Path(sys.executable).with_name("rayindex"))
    log = tmp_path / "log.jsonl"
    log.write_text('{"query": "what is a socket"}\n{"q": "typo"}\n')
    before = open_index(index_copy).manifest
    result = subprocess.run(
        [rayindex, "tune", "--index", str(index_copy), "--queries", str(log)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f'{log} line 2: no "query" field' in " ".join(result.stderr.split())
    assert open_index(index_copy).manifest == before  # nothing tuned, nothing written
