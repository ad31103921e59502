"""The background batch producer: same order, errors reach the consumer, close stops the thread."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from pipeline.prefetch import Prefetcher


def test_items_arrive_in_order_prepared_and_the_end_is_an_end():
    got = list(Prefetcher(iter(range(50)), depth=3, prepare=lambda x: x * 10))
    assert got == [x * 10 for x in range(50)]


def test_a_producer_error_is_raised_in_the_consumer_after_the_items_before_it():
    def source():
        yield 1
        yield 2
        raise RuntimeError("corrupt shard row")

    it = Prefetcher(source(), depth=2)
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(RuntimeError, match="corrupt shard row"):
        next(it)
    with pytest.raises(StopIteration):  # nothing more after the error
        next(it)


def test_the_producer_runs_ahead_while_the_consumer_works():
    def slow():
        for i in itertools.count():
            time.sleep(0.05)
            yield i

    it = Prefetcher(slow(), depth=4)
    try:
        time.sleep(0.3)  # the "GPU step": the producer fills the queue meanwhile
        t0 = time.perf_counter()
        first = [next(it) for _ in range(4)]
        assert first == [0, 1, 2, 3] and time.perf_counter() - t0 < 0.2  # already prepared
        t0 = time.perf_counter()
        rest = [next(it) for _ in range(10)]  # these are produced while we wait (50 ms each)
        assert rest == list(range(4, 14)) and time.perf_counter() - t0 > 0.4
    finally:
        it.close()


def test_close_stops_an_endless_producer():
    it = Prefetcher(itertools.count(), depth=2)
    assert next(it) == 0
    it.close()
    assert not any(t.name == "ndocr-prefetch" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(StopIteration):
        next(it)


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(iter([]), depth=0)
