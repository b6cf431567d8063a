"""IVF-sharded serving: the split (ivf/serving_split.py) gives the merged index's results exactly, for
flat, PQ, OPQ and PCA indexes, with and without an id selector; `rayindex partition` records it; the
router + shard deployments over real HTTP answer what the merged index answers (dense, lexical and hybrid:
each shard scores the BM25 postings of its own passages), survive a frozen, then killed shard (partial: true),
and swap versions on every shard at once."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import httpx
import numpy as np
import pytest
from ray import serve

from rayindex.builder import build
from rayindex.config import AppConfig, ServeConfig
from rayindex.errors import RayIndexError, Unavailable, UsageError
from rayindex.infra.progress import StageProgress
from rayindex.infra.storage import Store
from rayindex.ivf.index import read_index, read_merged
from rayindex.ivf.serving_split import (
    coarse_assign,
    larger_is_better,
    list_ids,
    list_sizes,
    merge_part_results,
    parts_needed,
    plan_parts,
    search_part,
    write_part,
)
from rayindex.layout import LEXICAL_DIR, version_rel
from rayindex.lexical.analyzer import Analyzer, AnalyzerSettings
from rayindex.lexical.counts import term_hashes
from rayindex.lexical.postings import merge_top, open_postings, search_postings, term_doc_freqs
from rayindex.query.launch import check_fits, fit_local_ray, start_serving
from rayindex.query.search import open_index
from rayindex.query.sharded import open_router
from rayindex.stages import partition as partition_stage
from rayindex.versions import current_run_id, read_manifest, save_manifest, version_store

from helpers import build_config, client_env, free_port, searches_meanwhile, wait_for_version, write_parquet

RAYINDEX = str(Path(sys.executable).with_name("rayindex"))


def test_plan_parts_balances_lists_by_size_and_is_deterministic():
    sizes = np.random.default_rng(3).integers(0, 5_000, size=1_000)
    for parts in (1, 2, 4, 7):
        owner = plan_parts(sizes, parts)
        loads = np.bincount(owner, weights=sizes, minlength=parts)
        assert set(owner.tolist()) == set(range(parts))  # every list owned, every part used
        assert loads.max() - loads.min() <= sizes.max()  # within one list of each other (LPT)
        assert np.array_equal(owner, plan_parts(sizes, parts))
    with pytest.raises(RayIndexError, match="3 non-empty inverted lists: choose 1..3"):
        plan_parts(np.array([5, 0, 2, 0, 1]), 4)


@pytest.fixture
def one_thread():
    """FAISS on one thread: OpenMP teams spin against the other processes on 2 shared cores (OPQ training
    measured 250 s instead of a few)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.mark.parametrize(
    "index_string,metric",
    [
        ("IVF32,Flat", faiss.METRIC_L2),
        ("IVF32,PQ8x4", faiss.METRIC_INNER_PRODUCT),
        ("OPQ4,IVF32,PQ4x4", faiss.METRIC_L2),
        ("PCA16,IVF16,SQ8", faiss.METRIC_INNER_PRODUCT),
    ],
)
def test_parts_give_the_merged_index_results_exactly(tmp_path, one_thread, index_string, metric):
    rng = np.random.default_rng(0)
    xb, xq = rng.standard_normal((6_000, 32), dtype=np.float32), rng.standard_normal((100, 32), dtype=np.float32)
    merged = faiss.index_factory(32, index_string, metric)
    merged.train(xb[:2_000])
    trained = faiss.clone_index(merged)
    ids = np.arange(len(xb), dtype=np.int64) * 5 + 1
    merged.add_with_ids(xb, ids)
    nprobe, k = 6, 10
    faiss.extract_index_ivf(merged).nprobe = nprobe
    sizes = list_sizes(merged)
    for n_parts in (1, 3, 4):
        owner = plan_parts(sizes, n_parts)
        parts = []
        for part in range(n_parts):
            lists = np.flatnonzero(owner == part)
            vectors = write_part(
                trained,
                merged,
                lists,
                nprobe,
                tmp_path / f"{n_parts}-{part}.faiss",
                tmp_path / f"{n_parts}-{part}.ivfdata",
            )
            assert vectors == sizes[lists].sum()
            parts.append(read_index(tmp_path / f"{n_parts}-{part}.faiss", faiss.IO_FLAG_ONDISK_SAME_DIR))
        held = [list_ids(merged, np.flatnonzero(owner == part)) for part in range(n_parts)]
        assert np.array_equal(np.sort(np.concatenate(held)), ids)  # each vector in exactly one part's lists
        x, coarse_distances, coarse_lists = coarse_assign(merged, xq, nprobe)
        for allowed in (None, ids[::3]):
            selector = (
                (lambda allowed=allowed: faiss.IDSelectorBatch(allowed)) if allowed is not None else (lambda: None)
            )
            params = faiss.SearchParametersIVF(nprobe=nprobe, sel=selector())
            want_d, want_i = merged.search(xq, k, params=params)
            results = [
                search_part(parts[p], owner == p, x, coarse_distances, coarse_lists, k, selector())
                for p in parts_needed(owner, coarse_lists)
            ]
            got_d, got_i = merge_part_results(results, k, larger_is_better(merged))
            np.testing.assert_array_equal(got_i, want_i)
            np.testing.assert_allclose(got_d, want_d, rtol=1e-6, atol=1e-6)


def test_replicas_that_do_not_fit_a_local_ray_are_refused():
    with pytest.raises(
        UsageError, match=r"reserve 5 CPUs \(1 x --replica-cpus 1 \+ 4 shards x 1 x --shard-cpus 1\), this Ray has 2"
    ):
        check_fits(AppConfig(index="out", shards=4), 2)
    check_fits(AppConfig(index="out", shards=4, shard_cpus=0.25), 2)


def test_a_local_ray_sizes_the_cpus_not_given_and_keeps_those_given():
    """`rayindex serve --shards 2` on a local Ray of 2 CPUs: router and shards share them (0.66 each) instead of
    reserving 3 and being refused; CPUs given by hand stay as given, and what cannot fit is still refused."""
    sharded = ServeConfig(index="out", shards=2)
    sized = sharded.model_copy(update=fit_local_ray(sharded, 2))
    assert (sized.replica_cpus, sized.shard_cpus) == (0.66, 0.66)
    check_fits(sized, 2)
    assert fit_local_ray(ServeConfig(index="out", shards=2, replica_cpus=0.5), 2) == {"shard_cpus": 0.75}
    assert fit_local_ray(ServeConfig(index="out"), 8) == {"replica_cpus": 1.0}  # the defaults fit: unchanged
    given = ServeConfig(index="out", shards=2, shard_cpus=1)  # leaves nothing for the router
    with pytest.raises(UsageError, match=r"reserve 3 CPUs .* 2 shards x 1 x --shard-cpus 1\), this Ray has 2"):
        check_fits(given.model_copy(update=fit_local_ray(given, 2)), 2)


def test_parts_needed_are_only_the_owners_of_probed_lists():
    owner = np.array([0, 0, 1, 2, 2, 3])
    assert parts_needed(owner, np.array([[0, 1], [4, -1]])) == [0, 2]


@pytest.fixture(scope="module")
def split_index(built, tmp_path_factory):
    """The session build, copied (a swap publishes into it), split for 3 serving shards by the CLI."""
    output = tmp_path_factory.mktemp("sharded") / "index"
    shutil.copytree(built[0], output)
    done = subprocess.run(
        [RAYINDEX, "partition", "--index", str(output), "--shards", "3"],
        capture_output=True,
        text=True,
        env=client_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "split for 3 serving shards" in done.stdout and "--shards 3" in done.stdout
    return output


@pytest.mark.slow  # sharded serving over real HTTP, or on S3
def test_partition_is_recorded_and_checksummed(split_index, built):
    """Each part: its lists, their vectors, and the postings of exactly those vectors' passages, every file
    checksummed."""
    manifest = read_manifest(Store(str(split_index)), built[1].run_id)
    split = manifest.serving[3]
    assert sorted(sum((p.lists for p in split), [])) == list(range(manifest.nlist))
    assert sum(p.vectors for p in split) == manifest.merge.ntotal
    assert all(rel in manifest.files_sha256 for p in split for rel in p.files + p.lexical)
    version_dir = split_index / version_rel(manifest.run_id)
    whole, merged = open_postings(version_dir / LEXICAL_DIR), read_merged(version_dir)
    for part in split:
        postings = open_postings(version_dir / Path(part.lexical[0]).parent)
        assert len(postings.ids) == part.postings > 0
        assert set(postings.ids.tolist()) <= set(list_ids(merged, np.array(part.lists)).tolist())
    assert sum(p.postings for p in split) == len(whole.ids)


@pytest.fixture(scope="module")
def sharded(split_index):
    settings = ServeConfig(
        index=str(split_index),
        shards=3,
        poll_interval=0.3,
        port=free_port(),
        replica_cpus=0,
        shard_cpus=0,
        shard_timeout=3,
        on_shard_failure="partial",
    )
    start_serving(settings)
    with httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=60) as client:
        yield split_index, client
    serve.shutdown()


QUERIES = [
    "read a file line by line",
    "base64 decoding",
    "parse command line arguments",
    "compress data with zlib",
    "an abstract base class",
    "format a date and time",
    "run a subprocess",
    "regular expression matching",
]


@pytest.mark.slow  # sharded serving over real HTTP, or on S3
def test_sharded_search_equals_the_merged_index(sharded):
    output, client = sharded
    merged = open_index(output)
    for query in QUERIES:
        for nprobe in (None, 2, 8):
            payload = {"query": query, "k": 5} | ({"nprobe": nprobe} if nprobe else {})
            body = client.post("/search", json=payload).json()
            want = merged.search(query, k=5, nprobe=nprobe)
            assert body["partial"] is False and body["missing_shards"] == []
            assert [(h["id"], h["passage"]) for h in body["hits"]] == [(h["id"], h["passage"]) for h in want]
            np.testing.assert_allclose(
                [h["score"] for h in body["hits"]], [h["score"] for h in want], rtol=1e-5, atol=1e-6
            )
    health = client.get("/healthz").json()
    assert health["shards"] == 3 and health["vectors"] == merged.ntotal
    filtered = client.post("/search", json={"query": "open a file", "k": 5, "filter": {"kind": "class"}}).json()["hits"]
    assert [h["id"] for h in filtered] == [h["id"] for h in merged.search("open a file", k=5, filter={"kind": "class"})]
    answer = client.post("/ask", json={"question": "How do I decode base64 data?", "k": 3}).json()
    assert answer["answer"] and len(answer["sources"]) == 3 and answer["partial"] is False
    for vector in merged.encode(QUERIES[:3]):  # search by vector: the router sends it to the shards as is
        body = client.post("/search", json={"vector": vector.tolist(), "k": 5, "filter": {"kind": "function"}}).json()
        want = merged.search_vector(vector, k=5, filter={"kind": "function"})
        assert body["partial"] is False and [h["id"] for h in body["hits"]] == [h["id"] for h in want]
        np.testing.assert_allclose([h["score"] for h in body["hits"]], [h["score"] for h in want], atol=1e-6)
    # every list probed: every shard searches, and counts it in its stats (searches, seconds in FAISS)
    before = [shard_stats(part) for part in range(3)]
    body = client.post("/search", json={"query": QUERIES[0], "k": 5, "nprobe": merged.manifest.nlist}).json()
    assert body["partial"] is False and len(body["hits"]) == 5
    for old, new in zip(before, (shard_stats(part) for part in range(3)), strict=True):
        assert new["searches"] > old["searches"] and new["search_s"] > old["search_s"]


def shard_stats(part: int) -> dict:
    return serve.get_deployment_handle(f"shard-{part}", app_name="rayindex").stats.remote().result(timeout_s=60)


def shard_pid(part: int) -> int:
    return shard_stats(part)["pid"]


# words, identifiers, a phrase, stopwords only (lexically nothing: hybrid is the dense side)
LEXICAL_QUERIES = QUERIES + [
    "json.loads",
    "os.path.join",
    "EINVAL errno",
    "socket timeout",
    "__init__",
    "acquire a thread lock",
    "csv dialect",
    "decimal rounding",
    "http cookie",
    "extract a tar archive",
    "heapq",
    "the of and",
]


@pytest.mark.slow  # sharded serving over real HTTP, or on S3
def test_sharded_lexical_and_hybrid_equal_the_unsharded_index(sharded):
    """Each shard scores its own postings, the router merges them: lexical and hybrid hits over HTTP are the
    unsharded index's (lexical scores exactly), with and without a filter; the router maps no postings."""
    output, client = sharded
    merged = open_index(output)
    for query in LEXICAL_QUERIES:
        for mode in ("lexical", "hybrid"):
            for filter in (None, {"kind": "class"}):
                per_document = 2 if query == QUERIES[0] else 1
                payload = {"query": query, "k": 5, "mode": mode, "per_document": per_document}
                body = client.post("/search", json=payload | ({"filter": filter} if filter else {})).json()
                want = merged.search(query, k=5, mode=mode, filter=filter, per_document=per_document)
                assert body["partial"] is False
                assert [(h["id"], h["passage"]) for h in body["hits"]] == [(h["id"], h["passage"]) for h in want]
                # BM25 scores exactly; hybrid fuses by score, with the dense side's similarities the merged
                # index's within float rounding (as for dense searches, above)
                scores, wanted = [h["score"] for h in body["hits"]], [h["score"] for h in want]
                assert scores == (wanted if mode == "lexical" else pytest.approx(wanted, abs=1e-6)), (query, mode)
    assert client.post("/search", json={"query": "the of and", "k": 5, "mode": "lexical"}).json()["hits"] == []
    router = open_router(AppConfig(index=str(output), shards=3), handles=[])
    assert router.lexical is None and router.shards.lexical and router.check_mode(None) == "hybrid"


@pytest.mark.slow  # copies the split index
def test_a_version_split_before_parts_held_postings_is_scored_by_the_router(split_index, tmp_path):
    """Parts recorded without postings (split by an earlier rayindex): the router maps the whole postings and
    scores them itself, as before; the partition stage of a build writes the parts again, with postings."""
    output = tmp_path / "index"
    shutil.copytree(split_index, output)
    store = Store(str(output))
    manifest = read_manifest(store, current_run_id(store))
    for part in manifest.serving[3]:
        part.lexical, part.postings = [], 0
    save_manifest(version_store(store, manifest.run_id), manifest)
    router = open_router(AppConfig(index=str(output), shards=3), handles=[])
    assert router.lexical is not None and not router.shards.lexical
    merged = open_index(output)
    for query in LEXICAL_QUERIES[:5]:
        assert router.rank([query], 5, mode="lexical") == merged.rank([query], 5, mode="lexical")
    config = manifest.config.model_copy(update={"serving_shards": 3})
    parts = partition_stage.run(config, manifest, version_store(store, manifest.run_id), StageProgress(quiet=True))
    assert all(part.lexical for part in parts)  # a build's partition stage redoes such a split


@pytest.mark.slow  # sharded serving over real HTTP, or on S3
def test_a_stopped_then_killed_shard_gives_partial_answers_then_recovers(sharded):
    """Shard 0's only replica is frozen (SIGSTOP): Serve cannot undo that within the 3 s shard timeout (its
    health check gives a replica 30 s), so the next search is partial, every time. A SIGKILL'ed replica,
    by contrast, may be replaced (or the call routed to its replacement) within the timeout, and the answer
    is then complete: the test raced that restart. Meanwhile routers in this process, on the same shards,
    see a hybrid search's lexical calls (sent before its dense ones, gathered after) fail as a dense call
    does: Unavailable naming the shard, or (partial) the shard missing and no hit of its passages, also when
    only the lexical side asks it. Then the frozen process is killed and Serve's replacement makes answers
    complete again."""
    output, client = sharded
    pid = shard_pid(0)
    handles = [serve.get_deployment_handle(f"shard-{part}", app_name="rayindex") for part in range(3)]
    routers = {
        failure: open_router(AppConfig(index=str(output), shards=3, shard_timeout=1, on_shard_failure=failure), handles)
        for failure in ("fail", "partial")
    }
    router = routers["partial"]
    part_zero = open_postings(router.version_dir / Path(router.manifest.serving[3][0].lexical[0]).parent).ids
    # a query whose one probed list another shard owns: its hybrid search asks shard 0 on the lexical side only
    lexical_only = next(
        query
        for query in QUERIES
        if router.shards.owner[coarse_assign(router.shards.trained, router.encode([query]), 1)[2][0, 0]] != 0
    )
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        body = client.post("/search", json={"query": "read a file", "k": 5, "nprobe": 8}).json()
        assert time.monotonic() - start < 10  # never hangs: the shard timeout is 3 s
        assert body["partial"] is True and body["missing_shards"] == [0] and body["hits"]
        assert list(client.get("/healthz").json()["failing_shards"]) == ["0"]
        for query, nprobe in ((lexical_only, 1), ("read a file", 8)):
            for mode in ("lexical", "hybrid"):
                with pytest.raises(Unavailable, match=r"serving shard 0 of 3 did not answer within 1 s"):
                    routers["fail"].rank([query], 5, nprobe, mode=mode)
                missing: set = set()
                found = routers["partial"].rank([query], 5, nprobe, mode=mode, missing=missing)[0]
                assert missing == {0} and found, (query, mode)
                assert not np.isin([vector_id for _, vector_id in found], part_zero).any(), (query, mode)
    finally:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while client.post("/search", json={"query": "read a file", "k": 5, "nprobe": 8}).json()["partial"]:
        assert time.monotonic() < deadline, "shard 0 was not replaced within 120 s"
        time.sleep(1)
    assert client.get("/healthz").json()["failing_shards"] == {}


@pytest.mark.slow  # sharded serving over real HTTP, or on S3
def test_hot_swap_reaches_every_shard_at_once(sharded, docs, tmp_path):
    """A new version published while 3 clients search: no failed request, each response from one version, all
    complete."""
    output, client = sharded
    old = current_run_id(Store(str(output)))
    write_parquet(tmp_path / "v2" / "docs.parquet", [dict(d, id=f"v2-{d['id']}") for d in docs[:60]])
    with searches_meanwhile(str(client.base_url), {"query": "read a file", "k": 5, "nprobe": 4}, clients=3) as (
        results,
        failures,
    ):
        new = build(build_config([tmp_path / "v2"], output, shards=1, index="IVF4,Flat", serving_shards=3))
        wait_for_version(client, new.run_id)
    assert failures == []
    assert {r["version"] for r in results} == {old, new.run_id}
    for r in results:
        assert r["partial"] is False
        assert all(h["id"].startswith("v2-") == (r["version"] == new.run_id) for h in r["hits"]), r
    want = open_index(output).search("read a file", k=5, nprobe=4)
    assert [
        h["id"] for h in client.post("/search", json={"query": "read a file", "k": 5, "nprobe": 4}).json()["hits"]
    ] == [h["id"] for h in want]


@pytest.mark.slow  # sharded serving over real HTTP, or on S3
def test_serving_an_unsplit_count_is_refused_naming_the_command(split_index):
    with pytest.raises(RayIndexError, match=r"not split for 5 serving shards \(splits: 3\); run `rayindex partition"):
        start_serving(ServeConfig(index=str(split_index), shards=5, port=free_port()))


@pytest.mark.slow  # sharded serving over real HTTP, or on S3
def test_partition_on_s3_and_shards_pull_only_their_part(s3_build):
    """An s3:// output: `rayindex partition` writes the parts to the store; each shard pulls its own part
    (not the merged lists), the router no postings, and the parts together answer what the merged index answers,
    by vector and by BM25."""
    from rayindex.query.sharded import open_part

    output = s3_build[0]
    done = subprocess.run(
        [RAYINDEX, "partition", "--index", output, "--shards", "2"],
        capture_output=True,
        text=True,
        env=client_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    run_id = current_run_id(Store(output))  # the version CURRENT names (test_s3 may have published after the fixture's)
    published = read_manifest(Store(output), run_id)
    cache = version_store(Store(output), run_id).local_root
    shutil.rmtree(cache / "parts", ignore_errors=True)  # what a fresh shard node has
    shutil.rmtree(cache / LEXICAL_DIR, ignore_errors=True)  # and a fresh router node
    router = open_router(AppConfig(index=output, shards=2), handles=[])
    assert router.shards.lexical and not (cache / LEXICAL_DIR).exists()  # the shards hold the postings
    parts = [open_part(output, run_id, 2, part) for part in range(2)]
    assert sorted(p.relative_to(cache).as_posix() for p in (cache / "parts").rglob("*.*")) == sorted(
        rel for part in published.serving[2] for rel in part.files + part.lexical
    )
    merged = open_index(output)
    trained = read_index(cache / "trained.faiss")
    queries = merged.encode(QUERIES)
    x, coarse_distances, coarse_lists = coarse_assign(trained, queries, 2)
    got = merge_part_results(
        [search_part(p.index, p.owned, x, coarse_distances, coarse_lists, 5) for p in parts],
        5,
        larger_is_better(trained),
    )
    want = merged.search_vectors(queries, 5, nprobe=2)
    np.testing.assert_array_equal(got[1], want[1])
    analyzer = Analyzer(AnalyzerSettings(published.lexical.language, published.lexical.stopwords))
    for query in LEXICAL_QUERIES:
        terms = term_hashes(analyzer.analyze(query))
        got_ids, got_scores = merge_top([search_postings(p.postings, terms, 10) for p in parts], 10)
        want_ids, want_scores, want_freqs = merged.lexical_passages(terms, 10, None)
        assert np.array_equal(got_ids, want_ids) and np.array_equal(got_scores, want_scores)
        assert np.array_equal(sum(term_doc_freqs(p.postings, terms) for p in parts), want_freqs)
