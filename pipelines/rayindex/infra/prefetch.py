"""Work ahead in a thread: the items of an iterable computed by a producer thread into a bounded queue
while the caller consumes them, so the CPU work of the next items (reading, text assembly, hashing,
tokenizing: pyarrow and the Rust tokenizer release the GIL) overlaps the caller's (the forward pass,
which torch runs without the GIL). The bound is the backpressure: at most `depth` items wait in memory."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
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
