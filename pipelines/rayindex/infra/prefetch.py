"""Work ahead and behind in a thread: the items of an iterable computed by a producer thread into a bounded
queue while the caller consumes them (prefetched), so the CPU work of the next items (reading, text assembly,
hashing, tokenizing: pyarrow and the Rust tokenizer release the GIL) overlaps the caller's (the forward pass,
which torch runs without the GIL); and the caller's writes done by a writer thread in order (written_behind),
so writing a batch's results overlaps the next forward pass. The bounds are the backpressure: at most
`depth` items wait in memory either way."""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield items as the producer thread makes them; its exception is raised here, in order; stopping early
    (the consumer failed) stops the producer at its next item."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(_Failed(exc))

    producer = threading.Thread(target=produce, daemon=True, name="rayindex-prefetch")
    producer.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        producer.join(timeout=30)


@contextlib.contextmanager
def written_behind(depth: int = 2) -> Iterator[Callable[..., None]]:
    """Yields submit(fn, *args): fn(*args) runs on one writer thread, in submission order. submit returns at
    once unless `depth` writes are waiting (then it waits for the oldest: memory stays bounded); a failed
    write's exception is raised by a later submit, or when the block ends, which waits for every write.
    When the block fails, writes not started are cancelled and the running one is waited for, so the
    caller's cleanup (atomic_file removing a partial file) never races a write."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayindex-write")
    pending: collections.deque[Future] = collections.deque()

    def submit(fn: Callable[..., None], *args) -> None:
        while pending and (len(pending) >= depth or pending[0].done()):
            pending.popleft().result()
        pending.append(pool.submit(fn, *args))

    try:
        yield submit
        while pending:
            pending.popleft().result()
    finally:
        for write in pending:
            write.cancel()
        pool.shutdown(wait=True)
