"""S3 end to end against a real S3-compatible server (SeaweedFS on 127.0.0.1): the corpus, the
intermediates, the version and CURRENT on s3://, search through a checksummed local cache, an
outage waited out, an outage for good that fails clearly and resumes, and two runs on one output."""

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import httpx
import pytest

from rayindex.api import reindex
from rayindex.builder import build
from rayindex.errors import RayIndexError, user_message
from rayindex.infra.lock import OutputLock
from rayindex.infra.storage import Store
from rayindex.manifest import Manifest
from rayindex.query.search import open_index

from helpers import build_config, client_env, free_port, s3_output

pytestmark = pytest.mark.slow  # S3 end to end against SeaweedFS: builds, outages, serving (about 150 s)

RAYINDEX = str(Path(sys.executable).with_name("rayindex"))


def test_build_from_s3_folder_and_search(s3_corpus, ray_address, tmp_path, s3_docs):
    manifest = build(build_config([s3_corpus], tmp_path, shards=2, index="IVF2,Flat"))
    assert [f.path for f in manifest.files] == [f"{s3_corpus}/part-0.parquet", f"{s3_corpus}/part-1.jsonl"]
    assert manifest.counts.docs_encoded == 100
    target = s3_docs[77]  # from the JSONL part, read by a worker straight from S3
    hits = open_index(tmp_path).search(f"{target['title']}: {target['body']}", k=3, nprobe=2)
    assert hits[0]["id"] == target["id"]


def test_s3_glob_and_missing_key(s3_corpus, ray_address, tmp_path):
    from rayindex.text.corpus import list_input_files

    assert list_input_files([f"{s3_corpus}/*.jsonl"]) == [f"{s3_corpus}/part-1.jsonl"]
    with pytest.raises(RayIndexError, match=r"input path s3://.*/nope\.parquet does not exist"):
        build(build_config([f"{s3_corpus}/nope.parquet"], tmp_path))


def test_build_to_s3_and_search_through_a_fresh_local_cache(s3_build, s3_server, tmp_path, s3_docs):
    """Intermediates, the version and CURRENT on S3; `rayindex search` in a new process with an empty
    cache pulls the serving files (checked against the manifest's sha256), memory-maps them and reads
    the hits' passages from the doc store on S3."""
    output, manifest = s3_build
    fs = s3_server.fs
    assert fs.cat(f"{output}/CURRENT").decode().strip() == manifest.run_id
    stored = {p.split(f"/versions/{manifest.run_id}/", 1)[1] for p in fs.find(f"{output}/versions/{manifest.run_id}")}
    assert set(manifest.files_sha256) | {"manifest.json"} <= stored
    assert {"trained.faiss", "index.faiss", "shards/00001/embeddings.f32", "shards/00001/index.faiss"} <= stored
    assert OutputLock(Store(output), "reader").current()[1]["released"] is True  # released

    target = s3_docs[42]
    cache = tmp_path / "cache"
    env = dict(client_env(), RAYINDEX_CACHE=str(cache))
    search = subprocess.run(
        [
            RAYINDEX,
            "search",
            "--index",
            output,
            "--json",
            "-k",
            "3",
            "--s3-endpoint",
            os.environ["AWS_ENDPOINT_URL"],
            f"{target['title']}: {target['body']}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert search.returncode == 0, search.stderr
    assert json.loads(search.stdout)[0]["id"] == target["id"]
    cached = {p.name for p in cache.rglob("*") if p.is_file()}
    assert {"index.faiss", "index_infos.json", "manifest.json"} <= cached
    assert not cached & {
        "docs.parquet",
        "vector_ids.npy",
        "embeddings.f32",
    }  # only what serving holds whole: no doc store

    # a damaged object in the store is refused on download, naming it
    good = fs.cat(f"{output}/versions/{manifest.run_id}/index.faiss")
    fs.pipe(f"{output}/versions/{manifest.run_id}/index.faiss", b"garbage")
    try:
        with pytest.raises(RayIndexError, match=r"index\.faiss does not match its checksum in the manifest"):
            open_index_with_cache(output, tmp_path / "cache2")
    finally:
        fs.pipe(f"{output}/versions/{manifest.run_id}/index.faiss", good)


def test_tune_on_s3_writes_the_manifest_and_the_index_to_the_store(s3_build, s3_server, tmp_path):
    """`rayindex tune --index s3://...`: the tuned nprobe reaches the store, not only this node's cache."""
    output, manifest = s3_build
    env = dict(client_env(), RAYINDEX_CACHE=str(tmp_path / "cache"))
    tuned = subprocess.run(
        [RAYINDEX, "tune", "--index", output, "--target-recall", "0.99", "--n-queries", "50"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert tuned.returncode == 0, tuned.stderr
    stored = Manifest.from_json(s3_server.fs.cat(f"{output}/versions/{manifest.run_id}/manifest.json"), "stored")
    assert stored.tuning is not None and stored.tuning.target == 0.99 and stored.status == "published"
    index_bytes = s3_server.fs.cat(f"{output}/versions/{manifest.run_id}/index.faiss")
    assert hashlib.sha256(index_bytes).hexdigest() == stored.files_sha256["index.faiss"]
    infos = json.loads(s3_server.fs.cat(f"{output}/versions/{manifest.run_id}/index_infos.json"))
    assert infos["nprobe"] == stored.nprobe
    fresh = open_index_with_cache(output, tmp_path / "cache2")  # another node: pulls the tuned files, checked
    assert fresh.manifest.nprobe == stored.nprobe and faiss.extract_index_ivf(fresh.index).nprobe == stored.nprobe


def test_serve_an_index_published_on_s3_and_swap_to_a_new_version(s3_build, s3_docs):
    from ray import serve

    from rayindex.config import ServeConfig
    from rayindex.query.launch import start_serving

    output, manifest = s3_build
    port = free_port()
    start_serving(ServeConfig(index=output, poll_interval=0.5, port=port, replica_cpus=0))
    try:
        target = s3_docs[7]
        r = httpx.post(
            f"http://127.0.0.1:{port}/search",
            json={"query": f"{target['title']}: {target['body']}", "k": 2},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["version"] == manifest.run_id and r.json()["hits"][0]["id"] == target["id"]

        newer = reindex(output)  # a new version on S3: the replica's watcher pulls it into its cache and swaps
        deadline = time.monotonic() + 60
        while httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json()["version"] != newer.run_id:
            assert time.monotonic() < deadline, "the replica did not swap to the new S3 version"
            time.sleep(0.5)
    finally:
        serve.shutdown()


def open_index_with_cache(output: str, cache):
    os.environ["RAYINDEX_CACHE"] = str(cache)
    try:
        return open_index(output)
    finally:
        del os.environ["RAYINDEX_CACHE"]


def run_in_thread(fn) -> tuple[threading.Thread, list]:
    result: list = []

    def target():
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the test
            result.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def wait_for_encoded_shard(s3_server, output: str, timeout: float = 180) -> str:
    """The run id once the run's manifest on S3 records a finished shard."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in s3_server.fs.glob(f"{output}/versions/*/manifest.json"):
            manifest = Manifest.from_json(s3_server.fs.cat(path), path)
            if any(s.embeddings_sha256 for s in manifest.shard_states):
                return manifest.run_id
        time.sleep(0.3)
    raise AssertionError("no shard finished encoding")


# An outage as conftest's stop() and start() make one, without their waits. stop() sends SIGTERM, under
# which SeaweedFS shuts down gracefully and its S3 API answers 5xx, and kills it once 20 s have passed (its
# filer's gRPC stop alone times out after 15 s); start() on the same data folder then waits for the
# restarted master, which as a single raft node leads again only after an election timeout (10 s by
# default). Here what is left of the server is killed once the test is done with the outage, and it
# restarts with a 1 s election timeout.
FAST_RESTART = "-master.electionTimeout=1s"


def store_goes_down(s3_server) -> None:
    """SIGTERM: from now on the store answers 5xx while it shuts down, then nothing (returns once it fails:
    asked by a client that does not retry, unlike the build's, which waits each error out for seconds)."""
    import s3fs

    s3_server.proc.terminate()
    probe = s3fs.S3FileSystem(
        use_listings_cache=False,
        skip_instance_cache=True,
        config_kwargs={"retries": {"total_max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5},
    )
    probe.retries = 1
    deadline = time.monotonic() + 30
    while True:
        try:
            probe.ls(s3_server.bucket, refresh=True)
        except Exception:
            return
        assert time.monotonic() < deadline, "the store still answers 30 s after SIGTERM"
        time.sleep(0.05)


def store_comes_back(s3_server) -> None:
    """What is left of the stopping store killed, and the store started again on its data."""
    s3_server.proc.kill()
    s3_server.proc.wait()
    if FAST_RESTART not in s3_server.command:
        s3_server.command.append(FAST_RESTART)
    s3_server.start()


def store_goes_down_after_the_first_shard(monkeypatch, s3_server, output: str) -> tuple[threading.Event, list]:
    """The store goes down (store_goes_down) once the build's driver has recorded its first encoded shard in
    the manifest on S3, before it hands the next shard to the encoder: at the driver's fault-injection point
    (infra/faults.py, after each shard's manifest save), so the next shard's input read meets the outage, or
    that shard's upload when the encoder had already read it. Returns an event set once the store is down, and
    the run id (read from S3 then)."""
    from rayindex.stages import encode

    down, run_id = threading.Event(), []
    checkpoint = encode.checkpoint

    def outage_then_checkpoint(stage: str, done: int) -> None:
        if not down.is_set():
            run_id.append(wait_for_encoded_shard(s3_server, output))  # the manifest just saved: at once
            store_goes_down(s3_server)
            down.set()
        checkpoint(stage, done)

    monkeypatch.setattr(encode, "checkpoint", outage_then_checkpoint)
    return down, run_id


def test_storage_outage_is_waited_out(s3_corpus, s3_server, ray_address, monkeypatch):
    output = s3_output(s3_server, "outage")
    down, _ = store_goes_down_after_the_first_shard(monkeypatch, s3_server, output)
    thread, result = run_in_thread(
        lambda: build(build_config([s3_corpus], output, shards=3, encoders=1, index="IVF2,Flat", storage_retry=120))
    )
    try:
        assert down.wait(timeout=180), "no shard finished encoding"
        time.sleep(
            3
        )  # the store is down (3 s, then the restart's ~5 s) while the next shard is read, written and recorded
    finally:
        store_comes_back(s3_server)
    thread.join(timeout=300)
    assert isinstance(result[0], Manifest), result
    assert s3_server.fs.cat(f"{output}/CURRENT").decode().strip() == result[0].run_id
    assert result[0].counts.docs_encoded == 100 and not result[0].resumed


def test_storage_gone_for_good_fails_clearly_then_the_same_command_resumes(
    s3_corpus, s3_server, ray_address, monkeypatch
):
    output = s3_output(s3_server, "gone")
    config = build_config([s3_corpus], output, shards=3, encoders=1, index="IVF2,Flat", storage_retry=4)
    down, recorded = store_goes_down_after_the_first_shard(monkeypatch, s3_server, output)
    thread, result = run_in_thread(lambda: build(config))
    try:
        assert down.wait(timeout=180), "no shard finished encoding"
        thread.join(timeout=300)
    finally:
        store_comes_back(s3_server)
    run_id = recorded[0]
    error = result[0]
    assert isinstance(error, RayIndexError), error
    message = user_message(error)  # what the CLI prints: it names the object (input or output) it could not reach
    assert re.match(r"storage unavailable: could not .* within 4 s \(", message), message
    # The outage meets the next shard's input read (the path is in the error: "read the input of shard 1 (...)")
    # or, when the encoder was already past it, that shard's upload ("write s3://.../embeddings.f32"): CI met both.
    assert re.search(rf"s3://{s3_server.bucket}/(corpus|gone-)\S+", message), message
    assert "re-run the same command" in message
    assert not s3_server.fs.exists(f"{output}/CURRENT")

    manifest = build(config)  # the store is back: the same command resumes the same run
    assert manifest.run_id == run_id and len(manifest.resumed) == 1
    assert manifest.reused.encode  # the shards pushed before the outage were kept
    assert s3_server.fs.cat(f"{output}/CURRENT").decode().strip() == run_id


def test_concurrent_runs_on_one_s3_output(s3_corpus, s3_server, ray_address):
    output = s3_output(s3_server, "concurrent")
    config = build_config([s3_corpus], output, shards=2, index="IVF2,Flat")
    thread, result = run_in_thread(lambda: build(config))
    deadline = time.monotonic() + 60
    while not s3_server.fs.exists(f"{output}/LOCK"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with pytest.raises(
        RayIndexError, match=rf"s3://{s3_server.bucket}/concurrent-\w+/LOCK: the output is locked by run"
    ):
        build(config)
    thread.join(timeout=300)
    assert isinstance(result[0], Manifest), result
    versions = s3_server.fs.ls(f"{output}/versions")
    assert len(versions) == 1 and s3_server.fs.cat(f"{output}/CURRENT").decode().strip() == result[0].run_id
