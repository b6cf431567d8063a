"""Requests batched as they queue: whatever arrived while the previous batch ran is the next batch, and a
request that finds nothing running runs at once, alone.

Ray Serve's @serve.batch forms a batch every batch_wait_timeout_s and only then waits for a free slot of
max_concurrent_batches (ray/serve/batching.py _process_batches): when a batch takes longer than the wait,
batches of the requests that arrived in one wait queue up behind it. Measured on the sharded router (4 shards)
at 10M vectors with 32 clients (benchmarks/sharded_benchmark.py, docs/benchmarks.md): batches of 1.3 queries,
each a call to every shard, 24.1 ms of CPU per query in the router and shards, 50.5 QPS; formed here, 14.8
queries a batch, 5.0 ms, 206.6 QPS. A batch is formed when a slot frees, so its size follows the load (up to
max_batch_size) and an idle replica never waits for company.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any


class QueueBatcher:
    """Calls `handler` on batches of submitted items, at most `in_flight` batches at once, each of the items
    queued when it starts (at most max_batch_size). handler returns one result per item, in order; a result that
    is an exception is raised to its caller, and an exception the handler raises to every caller of its batch.
    Used from one event loop."""

    def __init__(self, handler: Callable[[list], Awaitable[list]], max_batch_size: int, in_flight: int = 1):
        if max_batch_size < 1 or in_flight < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}) and in_flight ({in_flight}) must be at least 1")
        self.handler, self.max_batch_size, self.in_flight = handler, max_batch_size, in_flight
        self.queue: deque[tuple[Any, asyncio.Future]] = deque()
        self.running = 0  # batches being run (workers)
        self.workers: set[asyncio.Task] = set()  # the loop holds tasks weakly: a worker must not be collected mid-batch

    async def submit(self, item: Any) -> Any:
        """item's result, once a batch holding it has run."""
        future = asyncio.get_running_loop().create_future()
        self.queue.append((item, future))
        if self.running < self.in_flight:
            self.running += 1
            worker = asyncio.ensure_future(self._work())
            self.workers.add(worker)
            worker.add_done_callback(self.workers.discard)
        result = await future
        if isinstance(result, Exception):
            raise result
        return result

    async def _work(self) -> None:
        """Run batches while items are queued: each takes what queued while the one before ran."""
        try:
            while self.queue:
                batch = [self.queue.popleft() for _ in range(min(self.max_batch_size, len(self.queue)))]
                batch = [(item, future) for item, future in batch if not future.done()]  # callers gone: skipped
                if not batch:
                    continue
                try:
                    results = await self.handler([item for item, _ in batch])
                except Exception as exc:  # the whole batch fails alike
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self.running -= 1
