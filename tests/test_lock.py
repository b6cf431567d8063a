"""The output lock, on a local folder and on S3 (conditional writes): a second run on the same output
refuses, an expired lock or one whose process is gone is taken over, a live one is renewed."""

import json
import os
import socket
import time
import uuid

import pytest

from rayindex.builder import build
from rayindex.errors import RayIndexError
from rayindex.infra.lock import OutputLock
from rayindex.infra.storage import Store
from rayindex.layout import LOCK_FILE

from conftest import build_config


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path))
    bucket = request.getfixturevalue("s3_server").bucket
    return Store(f"s3://{bucket}/lock-{uuid.uuid4().hex[:8]}")


def holder(store: Store) -> dict:
    return json.loads(store.read_text(LOCK_FILE))


def test_second_holder_refuses_and_release_frees(store):
    with OutputLock(store, "run-a"):
        assert holder(store)["run_id"] == "run-a"
        with pytest.raises(RayIndexError, match=r"locked by run run-a .* delete .*LOCK if that run is gone"):
            OutputLock(store, "run-b").acquire()
    assert store.read_text(LOCK_FILE) is None
    with OutputLock(store, "run-b"):
        pass


def test_expired_lock_and_lock_of_a_dead_process_are_taken_over(store):
    store.write_text(LOCK_FILE, json.dumps({"run_id": "expired", "host": "h", "pid": 1, "expires_at": time.time() - 1}))
    with OutputLock(store, "run-c"):
        assert holder(store)["run_id"] == "run-c"
    dead_pid = max(int(p) for p in os.listdir("/proc") if p.isdigit()) + 10_000  # no such process
    store.write_text(LOCK_FILE, json.dumps({"run_id": "killed", "host": socket.gethostname(), "pid": dead_pid,
                                            "expires_at": time.time() + 600}))
    with OutputLock(store, "run-d"):
        assert holder(store)["run_id"] == "run-d"


def test_live_holder_renews_its_lock(store):
    with OutputLock(store, "long-run", ttl_s=3):
        first = holder(store)["expires_at"]
        deadline = time.monotonic() + 2.5  # renewed every ttl/3, before it expires
        while holder(store)["expires_at"] == first:
            assert time.monotonic() < deadline, "not renewed"
            time.sleep(0.1)
        assert holder(store)["expires_at"] > first
        with pytest.raises(RayIndexError, match="locked by run long-run"):
            OutputLock(store, "other").acquire()


def test_a_lock_taken_away_stops_the_publish(store):
    lock = OutputLock(store, "slow", ttl_s=0.9)
    lock.acquire()
    store.write_text(LOCK_FILE, json.dumps({"run_id": "usurper", "host": "h", "pid": 1, "expires_at": time.time() + 60}))
    time.sleep(0.7)
    with pytest.raises(RayIndexError, match="lost the output lock .*taken over by another run"):
        lock.check_held()
    lock.release()
    assert holder(store)["run_id"] == "usurper"  # not ours any more: left alone


def test_build_refuses_a_locked_output(tmp_path, corpus_dir):
    (tmp_path / "out").mkdir()
    with OutputLock(Store(str(tmp_path / "out")), "someone-else"):
        with pytest.raises(RayIndexError, match="locked by run someone-else"):
            build(build_config([corpus_dir], tmp_path / "out"))
    assert not [p for p in (tmp_path / "out" / "versions").glob("*") if not p.name.startswith(".")]  # refused before creating a version
