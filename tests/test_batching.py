"""QueueBatcher (query/batching.py): a request alone runs at once; those that queue while a batch runs are the next
batch, up to its size; results and failures reach their own callers."""

import asyncio

import pytest

from rayindex.query.batching import QueueBatcher


class Recorder:
    """A handler that records its batches and holds each until released (a batch that takes a while)."""

    def __init__(self):
        self.batches: list[list] = []
        self.release = asyncio.Event()
        self.running = 0
        self.most_running = 0

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        await self.release.wait()
        self.running -= 1
        if "boom" in items:
            raise RuntimeError("the batch failed")
        return [ValueError(f"bad {item}") if item == "bad" else item * 10 for item in items]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_lone_request_runs_at_once_and_what_queues_meanwhile_is_the_next_batch():
    async def scenario():
        handler = Recorder()
        batcher = QueueBatcher(handler, max_batch_size=3)
        first = asyncio.ensure_future(batcher.submit(1))
        await settle()
        assert handler.batches == [[1]]  # alone: no wait for company
        later = [asyncio.ensure_future(batcher.submit(n)) for n in range(2, 7)]
        await settle()
        assert handler.batches == [[1]]  # the first batch still runs: the others queue
        handler.release.set()
        results = await asyncio.gather(first, *later)
        return handler, results

    handler, results = asyncio.run(scenario())
    assert handler.batches == [[1], [2, 3, 4], [5, 6]]  # what queued, in order, at most max_batch_size each
    assert results == [10, 20, 30, 40, 50, 60]
    assert handler.most_running == 1


def test_failures_reach_their_callers_only_and_later_batches_still_run():
    async def scenario():
        handler = Recorder()
        handler.release.set()
        batcher = QueueBatcher(handler, max_batch_size=4)
        mixed = await asyncio.gather(*(batcher.submit(item) for item in (1, "bad", 3)), return_exceptions=True)
        failed = await asyncio.gather(*(batcher.submit(item) for item in (4, "boom")), return_exceptions=True)
        after = await batcher.submit(5)
        return mixed, failed, after

    mixed, failed, after = asyncio.run(scenario())
    assert mixed[0] == 10 and mixed[2] == 30
    assert isinstance(mixed[1], ValueError) and str(mixed[1]) == "bad bad"
    assert all(isinstance(f, RuntimeError) and str(f) == "the batch failed" for f in failed)
    assert after == 50


def test_in_flight_batches_run_at_once_and_a_cancelled_caller_is_skipped():
    async def scenario():
        handler = Recorder()
        batcher = QueueBatcher(handler, max_batch_size=2, in_flight=2)
        calls = [asyncio.ensure_future(batcher.submit(n)) for n in (1, 2)]
        await settle()
        queued = [asyncio.ensure_future(batcher.submit(n)) for n in (3, 4, 5)]
        await settle()
        queued[2].cancel()  # still queued: both slots are busy
        await settle()
        handler.release.set()
        results = await asyncio.gather(*calls, *queued[:2])
        await settle()
        return handler, results

    handler, results = asyncio.run(scenario())
    # 1 and 2 queued together: one batch; 3 found a slot free: a second batch at once, of what had queued by then
    # (3, 4); 5, cancelled while it waited, is never searched
    assert handler.most_running == 2
    assert handler.batches == [[1, 2], [3, 4]]
    assert results == [10, 20, 30, 40]


def test_sizes_below_one_are_refused():
    with pytest.raises(ValueError, match="must be at least 1"):
        QueueBatcher(Recorder(), max_batch_size=0)
