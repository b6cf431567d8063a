"""The output lock: a second run on the same output refuses, an expired lock is taken over, a live one is renewed."""

import json
import time

import pytest

from pipelines.build import build_index
from pipelines.errors import RayIndexError
from pipelines.lock import LOCK_FILE, OutputLock

from conftest import build_config


def test_second_holder_refuses_and_release_frees(tmp_path):
    with OutputLock(tmp_path, "run-a"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["run_id"] == "run-a"
        with pytest.raises(RayIndexError, match=r"is locked by run run-a .* delete .*LOCK if that run is gone"):
            OutputLock(tmp_path, "run-b").acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    with OutputLock(tmp_path, "run-b"):
        pass


def test_expired_lock_of_a_dead_run_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"run_id": "killed", "host": "h", "pid": 1, "expires_at": time.time() - 1}))
    with OutputLock(tmp_path, "run-c"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["run_id"] == "run-c"


def test_live_holder_renews_its_lock(tmp_path):
    with OutputLock(tmp_path, "long-run", ttl_s=0.6):
        first = json.loads((tmp_path / LOCK_FILE).read_text())["expires_at"]
        time.sleep(1.0)  # past the first expiry: renewed every ttl/3
        assert json.loads((tmp_path / LOCK_FILE).read_text())["expires_at"] > first
        with pytest.raises(RayIndexError, match="locked by run long-run"):
            OutputLock(tmp_path, "other").acquire()


def test_build_refuses_a_locked_output(tmp_path, corpus_dir):
    (tmp_path / "out").mkdir()
    with OutputLock(tmp_path / "out", "someone-else"):
        with pytest.raises(RayIndexError, match="is locked by run someone-else"):
            build_index(build_config([corpus_dir], tmp_path / "out"))
    assert not list((tmp_path / "out" / "versions").glob("*"))  # refused before creating a version
