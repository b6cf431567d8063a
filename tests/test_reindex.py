"""Incremental reindexing: only new and changed documents are encoded, deleted ones disappear, the
quantizer is reused unless the corpus drifted, and the result has the hits of a full rebuild with
the same trained quantizer; old versions past --keep are deleted; the --every loop goes on after a
failed run."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rayindex.api import reindex
from rayindex.builder import build
from rayindex.config import parse_interval
from rayindex.docstore.format import footer_sha256
from rayindex.errors import RayIndexError
from rayindex.incremental import run_every
from rayindex.infra.lock import OutputLock
from rayindex.infra.progress import StageProgress
from rayindex.infra.storage import Store
from rayindex.layout import CURRENT, DOCS_FILE, MANIFEST, TRAINED_FILE, VERSIONS, shard_dir
from rayindex.manifest import Manifest
from rayindex.query.search import open_index, open_version
from rayindex.stages import add, merge

from helpers import build_config, client_env, write_parquet

pytestmark = pytest.mark.slow  # incremental reindex builds (about 70 s)

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = dict(shards=2, index="IVF4,Flat", template="{title}: {body}")


def corpus_v2(docs):
    """v1 = docs[:200]; v2 deletes docs[0:10], changes the body of docs[10:20], adds docs[200:220]."""
    changed = [dict(d, body=d["body"] + " This function was revised in the new release.") for d in docs[10:20]]
    return changed + docs[20:220]


@pytest.fixture(scope="module")
def reindexed(ray_address, docs, tmp_path_factory):
    root = tmp_path_factory.mktemp("reindex")
    write_parquet(root / "v1" / "a.parquet", docs[:100])
    write_parquet(root / "v1" / "b.parquet", docs[100:200])
    out = root / "out"
    first = build(build_config([root / "v1"], out, **OPTIONS))
    v2 = corpus_v2(docs)
    write_parquet(root / "v2" / "a.parquet", v2[:110])
    write_parquet(root / "v2" / "b.parquet", v2[110:])
    second = reindex(str(out), root / "v2")
    return root, out, first, second


def test_only_new_and_changed_documents_are_encoded(reindexed, docs):
    _, out, first, second = reindexed
    assert second.reindex.previous == first.run_id
    assert second.reindex.model_dump(include={"added", "changed", "deleted", "unchanged", "encoded"}) == {
        "added": 20,
        "changed": 10,
        "deleted": 10,
        "unchanged": 180,
        "encoded": 30,
    }
    assert second.reindex.path == "incremental" and second.reindex.drift.ratio < 1.2
    assert second.training.reused_from == first.run_id
    assert second.training.trained_fingerprint == first.training.trained_fingerprint
    assert (out / CURRENT).read_text().strip() == second.run_id
    assert [s.docs_footer_sha256 for s in second.shard_states] == [  # the doc store written again, its footer recorded
        footer_sha256(shard_dir(out / VERSIONS / second.run_id, s.shard_id) / DOCS_FILE) for s in second.shards
    ]

    index = open_index(out)
    assert (
        index.search(f"{docs[205]['title']}: {docs[205]['body']}", k=1, nprobe=4)[0]["id"] == docs[205]["id"]
    )  # added
    revised = index.search(
        f"{docs[12]['title']}: {docs[12]['body']} This function was revised in the new release.", k=1, nprobe=4
    )[0]
    assert revised["id"] == docs[12]["id"] and revised["text"].endswith("revised in the new release.")  # changed
    ids = {h["id"] for h in index.search(f"{docs[3]['title']}: {docs[3]['body']}", k=20, nprobe=4)}
    assert not ids & {d["id"] for d in docs[:10]}  # deleted


def test_equals_a_full_rebuild_with_the_same_trained_quantizer(reindexed, tmp_path):
    root, out, first, second = reindexed
    full = build(build_config([root / "v2"], tmp_path / "full", **OPTIONS))
    version = tmp_path / "full" / VERSIONS / full.run_id
    shutil.copyfile(out / VERSIONS / first.run_id / TRAINED_FILE, version / TRAINED_FILE)  # the same quantizer
    full.training, full.merge = first.training, None
    full.files_sha256[TRAINED_FILE] = first.training.trained_sha256
    add.run(full.config, full, Store(str(version)), StageProgress(quiet=True))
    merge.run(full.config, full, Store(str(version)), StageProgress(quiet=True))

    incremental = open_index(out)
    rebuilt = open_version(version, full)
    queries = incremental.encode(
        ["open a file", "sort a list", "http request", "random numbers", "revised in the new release"]
    )
    d1, i1 = incremental.search_vectors(queries, 10, nprobe=4)
    d2, i2 = rebuilt.search_vectors(queries, 10, nprobe=4)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, atol=1e-5)  # unchanged documents' vectors were encoded in other batches

    # BM25: the unchanged documents' term counts reused, the statistics recomputed over the new corpus: the
    # same passages, scores and statistics as the full rebuild's
    assert incremental.manifest.lexical.model_dump(exclude={"files"}) == full.lexical.model_dump(exclude={"files"})
    for query in ["open a file", "sort a list", "http request", "random numbers", "revised in the new release"]:
        ids, scores, freqs = incremental.lexical_passages(incremental.query_terms(query), 20, None)
        want_ids, want_scores, want_freqs = rebuilt.lexical_passages(rebuilt.query_terms(query), 20, None)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
        np.testing.assert_array_equal(freqs, want_freqs)


def test_drift_past_the_threshold_retrains(reindexed, tmp_path):
    """A corpus from another domain (order records, not docstrings) fits the old centroids worse."""
    root, out, _, _ = reindexed
    shifted = [
        {
            "id": f"order-{i}",
            "title": f"Order {i}",
            "body": f"Order {i} of {i % 7 + 1} pallets shipped from Rotterdam to "
            f"warehouse {i % 13} on day {i % 28 + 1}; invoice total {i * 37 % 1000} euros.",
        }
        for i in range(150)
    ]
    write_parquet(root / "v3" / "orders.parquet", shifted)
    third = reindex(str(out), root / "v3")  # the default threshold, 1.2
    assert third.reindex.path == "full retrain", third.reindex
    assert third.reindex.drift.ratio > 1.2 and "drift" in third.reindex.reason  # measured 3.18
    assert third.training.reused_from is None and third.reindex.deleted == 210
    assert open_index(out).search("Order 17 shipped from Rotterdam", k=1, nprobe=4)[0]["id"].startswith("order-")


def test_reindex_job_keeps_versions_up_to_the_retention_count(reindexed, ray_address):
    """jobs/reindex.py as `ray job submit` runs it (same arguments as `rayindex reindex`), twice, --keep 2."""
    _, out, _, _ = reindexed
    before = sorted(p.name for p in (out / VERSIONS).iterdir() if not p.name.startswith("."))
    for _ in range(2):
        job = subprocess.run(
            [sys.executable, "jobs/reindex.py", "-o", str(out), "--keep", "2", "--quiet", "--ray-address", ray_address],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
            env=client_env(),
        )
        assert job.returncode == 0, job.stderr
        assert "0 added, 0 changed, 0 deleted" in job.stdout and "Quantizer: incremental" in job.stdout
    versions = sorted(p.name for p in (out / VERSIONS).iterdir() if not p.name.startswith("."))
    assert len(versions) == 2 and not set(versions) & set(before)
    assert (out / CURRENT).read_text().strip() == versions[-1]
    newest = Manifest.from_json((out / VERSIONS / versions[-1] / MANIFEST).read_text(), versions[-1])
    assert newest.pruned == [before[-1]]  # the first job pruned the older ones


def test_a_reindex_while_another_run_holds_the_output_refuses(reindexed):
    _, out, _, _ = reindexed
    with OutputLock(Store(str(out)), "scheduled-run"):
        with pytest.raises(RayIndexError, match="locked by run scheduled-run"):
            reindex(str(out))


def test_reindex_needs_a_published_version(tmp_path):
    with pytest.raises(RayIndexError, match="has no published version to reindex; run `rayindex build` first"):
        reindex(str(tmp_path / "nothing"))


def test_run_every_goes_on_after_a_failed_run():
    calls, errors, sleeps = [], [], []

    def run():
        calls.append(len(calls))
        if len(calls) == 2:
            raise RayIndexError("the store is down")

    run_every(3600, run, errors.append, runs=3, sleep=sleeps.append)
    assert calls == [0, 1, 2] and [str(e) for e in errors] == ["the store is down"]
    assert len(sleeps) == 2 and all(3599 < s <= 3600 for s in sleeps)  # start to start


def test_parse_interval():
    assert [parse_interval(t) for t in ("90s", "15m", "1h", "1d", "30")] == [90, 900, 3600, 86400, 30]
    with pytest.raises(ValueError, match="not an interval"):
        parse_interval("hourly")
