"""A model's waiting requests and how batches are formed from them: plain data, no sockets, no clock.

Requests wait in lanes, one per batch key (input names, datatypes and non-batch dimensions, and the
requested outputs): only requests of one lane can run as one call. Batches are taken from the lane
of the oldest waiting request, so no lane starves, and each batch is as full as the queue allows
(Triton's dynamic batcher, TF Serving's batching session):

- a worker with nothing in hand (idle) gets a batch at once, or after ``max_delay`` when the lane
  has fewer rows than the worker takes and its oldest request is younger than that;
- a worker still running a batch gets a second one (prefetch) only when the lane holds a full batch:
  a partial batch sealed early would wait behind the running one while the queue could still fill it;
- several idle workers share what waits (each takes its part of the rows), so a burst is spread.

A request larger than ``max_batch_size`` rows travels alone; the worker runs it in slices.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Hashable, Iterator, NamedTuple

QUEUED, INFLIGHT, DONE = 0, 1, 2


class Pending:
    """One client request held by the broker, from admission until it is answered."""

    __slots__ = ("client", "rid", "model", "body", "deadline", "size", "rows", "key", "arrived", "admitted", "seq",
                 "crashes", "where", "batch", "grouped", "owner")

    def __init__(self, client: bytes, rid: bytes, model: bytes, body: list, *, deadline: float | None = None,
                 size: int = 0, rows: int = 1, key: Hashable = (), arrived: float = 0.0, seq: int = 0,
                 grouped: bool = False) -> None:
        self.client = client
        self.rid = rid
        self.model = model
        self.body = body  # header frame + tensor frames, forwarded untouched
        self.deadline = deadline
        self.size = size  # payload bytes held for it until it is answered
        self.rows = rows
        self.key = key  # requests with equal keys can run in one call
        self.arrived = arrived  # when it last joined a queue: admission, or re-queueing after a worker died
        self.admitted = arrived  # when the broker admitted it: request duration counts from here
        self.seq = seq  # admission order: the oldest request decides which lane goes next
        self.crashes = 0  # workers that died with it in flight
        self.where = QUEUED
        self.batch: Batch | None = None
        self.grouped = grouped  # came in a group: its client takes grouped replies
        self.owner: Any = None  # the model version whose queue holds it (broker.state.ModelEntry)


class Batch:
    """Requests sent to one worker in one BATCH; its credit returns when every one is answered."""

    __slots__ = ("worker", "left", "rows")

    def __init__(self, worker: Any, left: int, rows: int) -> None:
        self.worker = worker
        self.left = left
        self.rows = rows


class Decision(NamedTuple):
    """What the queue gives one worker now: a batch, requests found expired, or when to ask again."""

    batch: list
    expired: list
    wait_until: float | None = None


_NOTHING = Decision([], [])


class RequestQueue:
    """Waiting requests in lanes by batch key; counts are of live requests (answered ones are skipped)."""

    def __init__(self) -> None:
        self._lanes: dict[Hashable, deque[Pending]] = {}
        self._lane_rows: dict[Hashable, int] = {}
        self.requests = 0
        self.rows = 0

    def __len__(self) -> int:
        return self.requests

    def push(self, pending: Pending, *, front: bool = False) -> None:
        """Add a request at the back of its lane (``front``: a request put back, it goes first)."""
        lane = self._lanes.get(pending.key)
        if lane is None:
            lane = self._lanes[pending.key] = deque()
            self._lane_rows[pending.key] = 0
        if front:
            lane.appendleft(pending)
        else:
            lane.append(pending)
        pending.where = QUEUED
        self._count(pending, 1)

    def discard(self, pending: Pending) -> None:
        """A queued request was answered where it waits (expired, failed): stop counting it.

        The caller marks it DONE; the lane drops it when it reaches the head.
        """
        self._count(pending, -1)

    def _count(self, pending: Pending, sign: int) -> None:
        self.requests += sign
        self.rows += sign * pending.rows
        self._lane_rows[pending.key] += sign * pending.rows

    def oldest(self) -> Pending | None:
        """The live request admitted first, over every lane."""
        best = None
        for key in list(self._lanes):
            lane = self._lanes[key]
            while lane and lane[0].where is not QUEUED:
                lane.popleft()
            if not lane:
                del self._lanes[key], self._lane_rows[key]
            elif best is None or lane[0].seq < best.seq:
                best = lane[0]
        return best

    def lane_rows(self, key: Hashable) -> int:
        """Rows of the live requests waiting in one lane."""
        return self._lane_rows.get(key, 0)

    def take(self, key: Hashable, limit: int, now: float) -> tuple[list[Pending], list[Pending]]:
        """(batch, expired): requests of one lane, oldest first, up to ``limit`` rows (the first one
        whatever its size), and those met on the way whose deadline has passed."""
        lane = self._lanes.get(key)
        batch: list[Pending] = []
        expired: list[Pending] = []
        rows = 0
        while lane and rows < limit:
            pending = lane[0]
            if pending.where is not QUEUED:
                lane.popleft()
                continue
            if batch and rows + pending.rows > limit:
                break
            lane.popleft()
            self._count(pending, -1)
            if pending.deadline is not None and pending.deadline <= now:
                expired.append(pending)
                continue
            batch.append(pending)
            rows += pending.rows
        if lane is not None and not lane:
            del self._lanes[key], self._lane_rows[key]
        return batch, expired

    def drain(self) -> Iterator[Pending]:
        """Take every live request out, oldest lane first (to fail them all)."""
        lanes, self._lanes, self._lane_rows = self._lanes, {}, {}
        self.requests = self.rows = 0
        for lane in lanes.values():
            for pending in lane:
                if pending.where is QUEUED:
                    yield pending


class Batcher:
    """The batching policy over one model's queue (see the module docstring)."""

    def __init__(self, max_delay: float = 0.0) -> None:
        self.queue = RequestQueue()
        self.max_delay = max_delay

    def next_batch(self, *, limit: int, idle: bool, share: int = 1, now: float) -> Decision:
        """The batch for a worker that takes ``limit`` rows; ``idle``: it holds no batch now, one of
        ``share`` idle workers."""
        queue = self.queue
        oldest = queue.oldest()
        if oldest is None:
            return _NOTHING
        rows = queue.lane_rows(oldest.key)
        if idle and rows < limit and self.max_delay and now < oldest.arrived + self.max_delay:
            return Decision([], [], oldest.arrived + self.max_delay)
        target = limit if not idle or share <= 1 else min(limit, max(1, -(-rows // share)))
        batch, expired = queue.take(oldest.key, target, now)
        return Decision(batch, expired)
