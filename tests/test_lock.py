"""The output lock, on a local folder and on S3: a second run on the same output refuses, an expired lock
or one whose process is gone is taken over by exactly one of any number of racing takers (generations
created only if absent), a live one is renewed, and a run whose lock was taken over does not publish."""

import json
import multiprocessing
import os
import socket
import time
import uuid

import pytest

from rayindex.builder import build
from rayindex.errors import RayIndexError
from rayindex.infra.lock import OutputLock, generation_rel
from rayindex.infra.storage import Store

from helpers import build_config

pytestmark = pytest.mark.slow  # lock races and renewals, local and on S3 (about 30 s)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path))
    bucket = request.getfixturevalue("s3_server").bucket
    return Store(f"s3://{bucket}/lock-{uuid.uuid4().hex[:8]}")


def holder(store: Store) -> dict:
    return OutputLock(store, "reader").current()[1]


def plant(store: Store, generation: int, **holder_fields) -> None:
    """A lock generation as another run (here: none) left it."""
    store.write_text(generation_rel(generation), json.dumps({"generation": generation, **holder_fields}))


def test_second_holder_refuses_and_release_frees(store):
    with OutputLock(store, "run-a") as lock:
        assert holder(store)["run_id"] == "run-a" and lock.generation == 1
        with pytest.raises(RayIndexError, match=r"locked by run run-a .* delete .*LOCK if that run is gone"):
            OutputLock(store, "run-b").acquire()
    assert holder(store)["released"] is True
    with OutputLock(store, "run-b") as lock:
        assert lock.generation == 2  # generations only grow: the fencing token of a later holder is larger
    assert sorted(store.list_files("LOCK")) == [f"{2:012d}"]  # the taker removed the generation it replaced


def test_expired_lock_and_lock_of_a_dead_process_are_taken_over(store):
    plant(store, 1, run_id="expired", host="h", pid=1, expires_at=time.time() - 1)
    with OutputLock(store, "run-c"):
        assert holder(store)["run_id"] == "run-c"
    dead_pid = max(int(p) for p in os.listdir("/proc") if p.isdigit()) + 10_000  # no such process
    plant(store, 3, run_id="killed", host=socket.gethostname(), pid=dead_pid, expires_at=time.time() + 600)
    with OutputLock(store, "run-d") as lock:
        assert holder(store)["run_id"] == "run-d" and lock.generation == 4


class ListingThatRacedATakeover(Store):
    """A local store whose first listing of LOCK shows nothing: what readdir may return while another taker
    links generation g+1 and deletes g (entries added or removed during a readdir need not be returned)."""

    raced = False

    def list_files(self, rel: str) -> list[str]:
        if not self.raced:
            self.raced = True
            return []
        return super().list_files(rel)


def test_a_taker_whose_listing_missed_the_new_generation_loses(tmp_path):
    """The race behind two winners in one round of test_racing_takers...: the generation the late taker
    creates (1, deleted by the winner of 2) is lower than the highest, so it is removed and the run refuses."""
    plant(
        Store(str(tmp_path)),
        2,
        run_id="winner",
        host=socket.gethostname(),
        pid=os.getppid(),  # alive, and not this process (whose own dead runs' locks count as gone)
        expires_at=time.time() + 600,
    )
    late = OutputLock(ListingThatRacedATakeover(str(tmp_path)), "late")
    with pytest.raises(RayIndexError, match="locked by run winner"):
        late.acquire()
    assert Store(str(tmp_path)).list_files("LOCK") == [f"{2:012d}"]


def test_a_damaged_lock_is_refused_naming_it(store):
    store.write_text(generation_rel(1), "not json")
    with pytest.raises(RayIndexError, match=r"LOCK/000000000001 is not a rayindex lock; delete .*LOCK if no run"):
        OutputLock(store, "run-e").acquire()


def test_live_holder_renews_its_lock(store):
    with OutputLock(store, "long-run", ttl_s=9):  # S3 under the test session's load takes a while per request
        first = holder(store)["expires_at"]
        deadline = time.monotonic() + 7  # renewed every ttl/3, before it expires
        while holder(store)["expires_at"] == first:
            assert time.monotonic() < deadline, "not renewed"
            time.sleep(0.1)
        assert holder(store)["expires_at"] > first
        with pytest.raises(RayIndexError, match="locked by run long-run"):
            OutputLock(store, "other").acquire()


def test_a_lock_taken_over_stops_the_publish(store):
    lock = OutputLock(store, "slow", ttl_s=600)
    lock.acquire()
    plant(store, lock.generation + 1, run_id="usurper", host="h", pid=1, expires_at=time.time() + 60)
    with pytest.raises(RayIndexError, match="lost the output lock .*taken over by another run"):
        lock.check_held()  # the fence the build runs before writing CURRENT
    lock.release()
    assert holder(store)["run_id"] == "usurper"  # not ours any more: left alone


def test_build_refuses_a_locked_output(tmp_path, corpus_dir):
    (tmp_path / "out").mkdir()
    with OutputLock(Store(str(tmp_path / "out")), "someone-else"):
        with pytest.raises(RayIndexError, match="locked by run someone-else"):
            build(build_config([corpus_dir], tmp_path / "out"))
    assert not [
        p for p in (tmp_path / "out" / "versions").glob("*") if not p.name.startswith(".")
    ]  # refused before creating a version


TAKERS, ROUNDS = 32, 50


def test_racing_takers_of_an_expired_lock_one_winner_every_round(tmp_path):
    """32 processes take over the same expired local lock at once, 50 times: exactly one wins each round."""
    from lock_racer import race

    context = multiprocessing.get_context("spawn")  # the children import only the lock (fork would copy Ray's threads)
    start, tried, released = (context.Barrier(TAKERS + 1) for _ in range(3))
    results = context.Queue()
    racers = [
        context.Process(target=race, args=(str(tmp_path), i, ROUNDS, start, tried, released, results))
        for i in range(TAKERS)
    ]
    for p in racers:
        p.start()
    store, winners = Store(str(tmp_path)), []
    try:
        for round_no in range(ROUNDS):
            gone = (OutputLock(store, "reader").current() or (0, {}))[0] + 1
            plant(store, gone, run_id=f"crashed-{round_no}", host="h", pid=1, expires_at=time.time() - 1)
            start.wait(timeout=120)
            tried.wait(timeout=120)
            won = [results.get(timeout=60) for _ in range(TAKERS)]
            winners.append(sum(won))
            released.wait(timeout=120)
    finally:
        for p in racers:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert winners == [1] * ROUNDS
