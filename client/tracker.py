"""The requests a client has in flight on one connection: deadlines, reply matching, resends after a lost connection.

Plain data with the clock passed in (``now``), no sockets: the blocking client (its per-thread sockets,
``predict_many`` and the ``submit()`` I/O thread) and the asyncio client all keep their requests here, so
that the deadline and retry rules exist once.

Deadlines. A request's whole ``timeout`` travels once, as the header's ``timeout_ms``; the broker counts
it from the moment it receives the request and answers ``504`` when it passes. The client waits that
long plus ``DEADLINE_GRACE``, so that the broker's 504 (or a reply that left just in time) arrives before
the client gives up and raises ``RequestTimeout`` itself. A slow answer is never a reason to send a
request again: a request that runs out of time is dropped, and a reply that comes later is dropped by
its request-id.

Connections. Requests go out on one DEALER socket that keeps its connection across broker restarts
(ZeroMQ reconnects by itself). The tracker knows whether that connection is up, as the socket's
monitor last reported. While it is not (before the first handshake, and from a disconnect until the
next one), new requests are held here rather than queued in ZeroMQ's pipe: a request that runs out of
time while no broker listens is dropped instead of reaching the next broker late, and the pipe never
fills up (a DEALER send blocks at the high-water mark). When the connection drops, the requests that
were sent and not answered may be lost with the broker: ``connection_lost`` holds each that has a
retry left and fails the others at once. When it is up, ``reconnected`` hands back every held request
to send now, under its own request-id (the broker drops a second copy of a request-id it still holds
from the same client, so a copy that also survived in ZeroMQ's pipe cannot run twice) and with
``timeout_ms`` cut to what is left of its budget. A held request whose deadline passes first times out
at its deadline, without the grace: no broker holds it that could answer 504.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import math
from typing import Any, Callable

from modelpool.client import protocol
from modelpool.client.errors import RequestTimeout, Unavailable

log = logging.getLogger(__name__)

# Seconds the client waits past a request's deadline for the broker's 504 (or a reply that left just in
# time) before giving up on its own. A constant, not a share of the timeout: what it covers is the
# broker's reaction time and the trip back, which do not grow with the timeout.
DEADLINE_GRACE = 0.5


class Entry:
    """One request in flight: its frames, its deadline, its retries, and where its outcome goes."""

    __slots__ = ("rid", "frames", "timeout", "deadline", "give_up", "retries_left", "sends", "held", "tag",
                 "decode")

    def __init__(self, rid: bytes, frames: list, timeout: float, deadline: float, give_up: float, retries: int,
                 tag: Any, decode: Callable[[protocol.Reply], Any] | None) -> None:
        self.rid = rid
        self.frames = frames
        self.timeout = timeout  # the whole budget, seconds
        self.deadline = deadline  # when the budget (and the broker's timeout_ms) runs out
        self.give_up = give_up  # deadline + grace: when the client stops waiting for a reply
        self.retries_left = retries
        self.sends = 0
        self.held = False  # waiting for the connection: not sent yet, or lost with it
        self.tag = tag  # what the caller wants back with the outcome: a Future, an index
        self.decode = decode

    @property
    def due(self) -> float:
        """When the client stops waiting for it: its deadline while held (no broker has it), else give_up."""
        return self.deadline if self.held else self.give_up

    def __repr__(self) -> str:
        return f"Entry(rid={self.rid.hex()}, sends={self.sends}, held={self.held})"


class Tracker:
    """Requests in flight on one connection, by request-id (see the module docstring)."""

    def __init__(self, retries: int, grace: float = DEADLINE_GRACE) -> None:
        self.retries = retries
        self.grace = grace
        self.connected = False  # as the socket monitor last reported; False until the first handshake
        self.pending: dict[bytes, Entry] = {}
        self._held: list[Entry] = []
        self._heap: list[tuple[float, int, Entry]] = []  # by give_up; answered entries are skipped lazily
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self.pending)

    def __bool__(self) -> bool:
        return bool(self.pending)

    def sent(self, rid: bytes, frames: list, timeout: float, now: float, tag: Any = None,
             decode: Callable[[protocol.Reply], Any] | None = None) -> Entry:
        """Track a new request with ``timeout`` seconds for its answer.

        The caller has put it on the wire when ``connected``; otherwise it is held, for ``reconnected``.
        """
        deadline = now + timeout
        entry = Entry(rid, frames, timeout, deadline, deadline + self.grace, self.retries, tag, decode)
        self.pending[rid] = entry
        if self.connected:
            entry.sends = 1
        else:
            entry.held = True
            self._held.append(entry)
        heap = self._heap
        if len(heap) > 2 * len(self.pending) + 64:  # mostly answered entries: rebuild instead of growing
            heap[:] = [item for item in heap if self.pending.get(item[2].rid) is item[2]]
            heapq.heapify(heap)
        heapq.heappush(heap, (entry.give_up, next(self._seq), entry))
        return entry

    def reply(self, rid: bytes) -> Entry | None:
        """The request a reply answers, no longer tracked; None for a reply nobody waits for (a late one)."""
        entry = self.pending.pop(rid, None)
        if entry is not None and entry.held:
            self._held.remove(entry)
        return entry

    def discard(self, rid: bytes) -> None:
        """Stop tracking a request its caller gave up on (cancelled, abandoned); its reply will be dropped."""
        self.reply(rid)

    def clear(self) -> list[Entry]:
        """Stop tracking every request; the ones that were in flight."""
        entries = list(self.pending.values())
        self.pending.clear()
        self._held.clear()
        self._heap.clear()
        return entries

    def expired(self, now: float) -> list[Entry]:
        """Requests that ran out of time, no longer tracked (see ``timeout_error`` for what to raise)."""
        out: list[Entry] = []
        heap, pending = self._heap, self.pending
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)[2]
            if pending.get(entry.rid) is entry and not entry.held:
                del pending[entry.rid]
                out.append(entry)
        if self._held:
            for entry in [e for e in self._held if e.deadline <= now]:
                self._held.remove(entry)
                del pending[entry.rid]
                out.append(entry)
        return out

    def next_timeout(self, now: float) -> float | None:
        """Seconds until the next request runs out of time; None when nothing is in flight."""
        heap, pending = self._heap, self.pending
        while heap and pending.get(heap[0][2].rid) is not heap[0][2]:
            heapq.heappop(heap)
        when = math.inf
        if heap:
            when = heap[0][0]  # a held entry's give_up is past its deadline, which is counted below
        for entry in self._held:
            when = min(when, entry.deadline)
        return None if when == math.inf else max(0.0, when - now)

    def connection_lost(self, now: float) -> tuple[list[Entry], list[Entry]]:
        """The connection dropped: (requests held to be sent again on reconnect, requests with no retry left).

        Every request sent and not answered may have been lost with it. The failed ones are no longer
        tracked (see ``lost_error``); requests already held stay held.
        """
        self.connected = False
        held: list[Entry] = []
        failed: list[Entry] = []
        for entry in list(self.pending.values()):
            if entry.held:
                continue
            if entry.retries_left > 0:
                entry.retries_left -= 1
                entry.held = True
                held.append(entry)
            else:
                del self.pending[entry.rid]
                failed.append(entry)
        self._held.extend(held)
        return held, failed

    def reconnected(self, now: float) -> list[Entry]:
        """The connection is up (the first time or again): the held requests to send now.

        Their ``timeout_ms`` is cut to what is left of their budget; one whose deadline has passed stays
        held, for ``expired`` to report.
        """
        self.connected = True
        out: list[Entry] = []
        for entry in self._held:
            left = entry.deadline - now
            if left <= 0:
                continue
            if entry.timeout - left >= 0.001:  # timeout_ms counts from when the broker receives it
                entry.frames = _retimed(entry.frames, left)
            entry.held = False
            entry.sends += 1
            out.append(entry)
        self._held = [e for e in self._held if e.held]
        return out


def dropped(tracker: Tracker, now: float, endpoint: str) -> list[Entry]:
    """The connection dropped (``Tracker.connection_lost``, logged): the requests that fail now."""
    held, failed = tracker.connection_lost(now)
    if held or failed:
        log.warning("lost the connection to %s with %d requests in flight: %d to resend, %d failed",
                     endpoint, len(held) + len(failed), len(held), len(failed))
    return failed


def resends(tracker: Tracker, now: float, abandoned: Callable[[Entry], bool] | None) -> list[Entry]:
    """The connection is up (``Tracker.reconnected``): the requests to send, without those nobody waits
    for any more (``abandoned``), which are no longer tracked."""
    out = []
    for entry in tracker.reconnected(now):
        if abandoned is not None and abandoned(entry):
            tracker.discard(entry.rid)
        else:
            out.append(entry)
    return out


def _retimed(frames: list, left: float) -> list:
    """A request's frames with its header's ``timeout_ms`` (if it has one) cut to ``left`` seconds."""
    header = protocol.unpack_header(frames[4])
    if "timeout_ms" not in header:
        return frames
    header["timeout_ms"] = max(1, math.ceil(left * 1000))
    return [*frames[:4], protocol.packb(header), *frames[5:]]


def timeout_error(entry: Entry, endpoint: str) -> RequestTimeout:
    """What a request that ran out of time raises."""
    if entry.held and entry.sends == 0:
        return RequestTimeout(f"no connection to {endpoint} within {entry.timeout:.3f}s; is the pool running there?")
    if entry.held:
        return RequestTimeout(f"the connection to {endpoint} was lost with the request in flight and did not come "
                              f"back within its {entry.timeout:.3f}s timeout")
    resent = f" (sent {entry.sends} times: resent after the connection was lost)" if entry.sends > 1 else ""
    return RequestTimeout(f"no reply within {entry.timeout:.3f}s from {endpoint}{resent}; is the pool running there?")


def lost_error(entry: Entry, endpoint: str) -> Unavailable:
    """What a request lost with its connection and not sent again raises."""
    times = "once" if entry.sends == 1 else f"{entry.sends} times"
    return Unavailable(f"the connection to the broker at {endpoint} was lost while the request was in flight "
                       f"(sent {times}, no retries left); it may or may not have run (a broker also drops the "
                       "connection of a client that sends a message over its max_message_bytes)")
