"""The batching policy (broker.batcher) as plain data: lanes, batch sizes, prefetch, delay, expiry."""
from __future__ import annotations

import itertools

import pytest

from modelpool.broker.batcher import DONE, QUEUED, Batcher, Pending, RequestQueue

_seq = itertools.count()


def pending(rid: str, rows: int = 1, key: object = "k", arrived: float = 0.0, deadline: float | None = None) -> Pending:
    return Pending(b"c", rid.encode(), b"m", [], rows=rows, key=key, arrived=arrived, deadline=deadline,
                   seq=next(_seq))


def rids(requests: list[Pending]) -> list[str]:
    return [p.rid.decode() for p in requests]


def test_queue_counts_live_requests_and_rows_per_lane():
    queue = RequestQueue()
    a, b, c = pending("a", 2), pending("b", 3, key="other"), pending("c", 4)
    for p in (a, b, c):
        queue.push(p)
    assert (len(queue), queue.rows, queue.lane_rows("k"), queue.lane_rows("other")) == (3, 9, 6, 3)
    c.where = DONE
    queue.discard(c)
    assert (len(queue), queue.rows, queue.lane_rows("k")) == (2, 5, 2)
    batch, expired = queue.take("k", 10, now=0.0)
    assert rids(batch) == ["a"] and expired == [] and queue.lane_rows("k") == 0


def test_oldest_looks_across_lanes_and_skips_answered_requests():
    queue = RequestQueue()
    first, second, third = pending("first", key="x"), pending("second", key="y"), pending("third", key="x")
    for p in (first, second, third):
        queue.push(p)
    assert queue.oldest() is first
    first.where = DONE
    queue.discard(first)
    assert queue.oldest() is second


def test_a_request_put_back_goes_first_in_its_lane():
    queue = RequestQueue()
    old, new = pending("old"), pending("new")
    queue.push(new)
    queue.push(old, front=True)
    assert queue.oldest() is old and old.where is QUEUED
    assert rids(queue.take("k", 5, now=0.0)[0]) == ["old", "new"]


def test_take_stops_at_the_row_limit_but_always_takes_the_first():
    queue = RequestQueue()
    for rid, rows in (("big", 9), ("a", 2), ("b", 2), ("c", 1)):
        queue.push(pending(rid, rows))
    assert rids(queue.take("k", 4, now=0.0)[0]) == ["big"]
    assert rids(queue.take("k", 4, now=0.0)[0]) == ["a", "b"]
    assert rids(queue.take("k", 4, now=0.0)[0]) == ["c"]
    assert len(queue) == 0 and queue.oldest() is None


def test_take_sets_expired_requests_apart_without_counting_their_rows():
    queue = RequestQueue()
    queue.push(pending("late", 3, deadline=5.0))
    queue.push(pending("ok", 3, deadline=50.0))
    queue.push(pending("free", 1))
    batch, expired = queue.take("k", 4, now=10.0)
    assert rids(expired) == ["late"] and rids(batch) == ["ok", "free"]


def test_drain_gives_every_live_request_once():
    queue = RequestQueue()
    items = [pending(str(i), key=i % 2) for i in range(5)]
    for p in items:
        queue.push(p)
    items[2].where = DONE
    queue.discard(items[2])
    assert sorted(rids(list(queue.drain()))) == ["0", "1", "3", "4"]
    assert len(queue) == 0 and queue.rows == 0


def test_an_idle_worker_gets_what_waits_at_once_without_delay():
    batcher = Batcher()
    batcher.queue.push(pending("a"))
    decision = batcher.next_batch(limit=8, idle=True, now=0.0)
    assert rids(decision.batch) == ["a"] and decision.wait_until is None


def test_a_busy_worker_gets_what_waits_up_to_its_limit_without_delay():
    batcher = Batcher(max_delay=1.0)
    for i in range(3):
        batcher.queue.push(pending(str(i)))
    decision = batcher.next_batch(limit=2, idle=False, now=0.0)  # prefetched: it would wait anyway
    assert rids(decision.batch) == ["0", "1"] and decision.wait_until is None


def test_idle_workers_share_what_waits():
    batcher = Batcher()
    for i in range(10):
        batcher.queue.push(pending(str(i)))
    assert len(batcher.next_batch(limit=8, idle=True, share=3, now=0.0).batch) == 4  # ceil(10 / 3)
    assert len(batcher.next_batch(limit=8, idle=True, share=2, now=0.0).batch) == 3
    assert len(batcher.next_batch(limit=8, idle=True, share=1, now=0.0).batch) == 3


def test_max_delay_holds_a_partial_batch_until_the_oldest_has_waited_it():
    batcher = Batcher(max_delay=0.010)
    batcher.queue.push(pending("a", arrived=1.000))
    decision = batcher.next_batch(limit=4, idle=True, now=1.004)
    assert decision.batch == [] and decision.wait_until == pytest.approx(1.010)
    batcher.queue.push(pending("b", arrived=1.005))
    assert rids(batcher.next_batch(limit=4, idle=True, now=1.010).batch) == ["a", "b"]
    for i in range(4):  # a full lane never waits
        batcher.queue.push(pending(f"f{i}", arrived=2.0))
    assert len(batcher.next_batch(limit=4, idle=True, now=2.0).batch) == 4


def test_the_lane_of_the_oldest_request_goes_first():
    batcher = Batcher()
    batcher.queue.push(pending("x1", key="x"))
    batcher.queue.push(pending("y1", key="y"))
    batcher.queue.push(pending("x2", key="x"))
    assert rids(batcher.next_batch(limit=8, idle=True, now=0.0).batch) == ["x1", "x2"]
    assert rids(batcher.next_batch(limit=8, idle=True, now=0.0).batch) == ["y1"]
