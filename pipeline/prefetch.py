"""Batches prepared on a background thread while the accelerator runs the current step.

Why: the train loop synchronises once per micro-step (the logged loss), so whatever it does
between steps (decoding shard rows, packing, collating, the host-to-device copy) leaves the
GPU idle. A producer thread keeps ``depth`` batches ready, in pinned memory on CUDA so that
the copy to the device is asynchronous. Order is unchanged and errors reach the consumer.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


class Prefetcher(Generic[T]):
    """Iterate ``source`` on a daemon thread, ``depth`` items ahead (``prepare`` applied there)."""

    def __init__(self, source: Iterator[T], depth: int = 2, prepare: Callable[[T], T] | None = None) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._source, self._prepare = source, prepare
        self._thread = threading.Thread(target=self._run, name="ndocr-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._source:
                if self._prepare is not None:
                    item = self._prepare(item)
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def __iter__(self) -> "Prefetcher[T]":
        return self

    def __next__(self) -> T:
        if self._stop.is_set():
            raise StopIteration
        item = self._queue.get()
        if item is _DONE:
            self._stop.set()
            raise StopIteration
        if isinstance(item, BaseException):
            self._stop.set()
            raise item
        return item

    def close(self) -> None:
        """Stop the producer (it exits at its next hand-over) and drop what it prepared."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=2)
