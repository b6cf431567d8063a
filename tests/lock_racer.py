"""One of the processes of tests/test_lock.py's race: in each round, wait for the start, try to take the
output lock, report whether it won, hold it until every racer has tried, release it. Its own module so
that spawned children import only the lock, not the test session's fixtures."""

from rayindex.errors import RayIndexError
from rayindex.infra.lock import OutputLock
from rayindex.infra.storage import Store


def race(output: str, index: int, rounds: int, start, tried, released, results) -> None:
    store = Store(output)
    for round_no in range(rounds):
        start.wait()
        lock = OutputLock(store, f"taker-{index}-{round_no}")
        try:
            lock.acquire()
            won = True
        except RayIndexError:
            won = False
        results.put(int(won))
        tried.wait()
        if won:
            lock.release()
        released.wait()
