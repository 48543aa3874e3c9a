"""The clients' request tracker (client.tracker.Tracker) driven by hand: a fake clock, no sockets.

Requests are real request frames from the client's RequestBuilder, so that what would be re-sent is
checked by parsing it as the broker would.
"""
from __future__ import annotations

import pytest

from modelpool.client import protocol
from modelpool.client.base import RequestBuilder
from modelpool.client.errors import RequestTimeout, Unavailable
from modelpool.client.tracker import DEADLINE_GRACE, Tracker, lost_error, timeout_error

ENDPOINT = "tcp://127.0.0.1:5555"
T0 = 1000.0


def _request(builder: RequestBuilder, timeout: float | None = 2.5) -> tuple[bytes, list]:
    return builder.request("m", {"inputs": []}, timeout=timeout)


def _up(retries: int) -> Tracker:
    """A tracker whose connection is up (its socket's first handshake done)."""
    tracker = Tracker(retries)
    assert tracker.reconnected(T0 - 1) == []
    return tracker


@pytest.fixture()
def builder() -> RequestBuilder:
    return RequestBuilder()


def test_whole_timeout_goes_in_the_header_once(builder):
    rid, frames = _request(builder, 2.5)
    assert protocol.parse_request(frames).header["timeout_ms"] == 2500
    tracker = _up(retries=1)
    entry = tracker.sent(rid, frames, 2.5, T0)
    assert entry.deadline == T0 + 2.5 and entry.give_up == T0 + 2.5 + DEADLINE_GRACE
    assert entry.sends == 1 and entry.frames is frames


def test_deadline_plus_grace_then_expired(builder):
    tracker = _up(retries=1)
    rid, frames = _request(builder)
    entry = tracker.sent(rid, frames, 2.5, T0)
    assert tracker.next_timeout(T0) == pytest.approx(2.5 + DEADLINE_GRACE)
    assert tracker.expired(T0 + 2.5) == []  # the broker's 504 may still be on its way
    assert tracker.next_timeout(T0 + 2.5) == pytest.approx(DEADLINE_GRACE)
    assert tracker.expired(T0 + 2.5 + DEADLINE_GRACE) == [entry]
    assert not tracker and tracker.next_timeout(T0 + 10) is None
    error = timeout_error(entry, ENDPOINT)
    assert isinstance(error, RequestTimeout)
    assert str(error) == f"no reply within 2.500s from {ENDPOINT}; is the pool running there?"


def test_a_mere_timeout_resends_nothing(builder):
    tracker = _up(retries=3)
    rid, frames = _request(builder)
    entry = tracker.sent(rid, frames, 1.0, T0)
    assert tracker.expired(T0 + 5) == [entry]
    assert tracker.reconnected(T0 + 5) == []  # not held: a slow answer is not a lost connection
    assert entry.sends == 1


def test_reply_matched_by_rid_and_late_reply_dropped(builder):
    tracker = _up(retries=1)
    (r1, f1), (r2, f2) = _request(builder), _request(builder)
    e1 = tracker.sent(r1, f1, 1.0, T0)
    e2 = tracker.sent(r2, f2, 5.0, T0)
    assert tracker.reply(r2) is e2
    assert tracker.reply(r2) is None  # a duplicate answer
    assert tracker.reply(b"nobody asked") is None
    assert tracker.expired(T0 + 1.0 + DEADLINE_GRACE) == [e1]
    assert tracker.reply(r1) is None  # late: given up on already
    assert len(tracker) == 0


def test_next_timeout_is_the_earliest_of_mixed_timeouts(builder):
    tracker = _up(retries=0)
    entries = {}
    for timeout in (5.0, 1.0, 3.0):
        rid, frames = _request(builder, timeout)
        entries[timeout] = tracker.sent(rid, frames, timeout, T0)
    assert tracker.next_timeout(T0) == pytest.approx(1.0 + DEADLINE_GRACE)
    tracker.reply(entries[1.0].rid)
    assert tracker.next_timeout(T0) == pytest.approx(3.0 + DEADLINE_GRACE)
    assert tracker.expired(T0 + 10) == [entries[3.0], entries[5.0]]


def test_many_answered_requests_do_not_pile_up(builder):
    tracker = _up(retries=1)
    for _ in range(10_000):
        rid, frames = _request(builder)
        tracker.sent(rid, frames, 30.0, T0)
        assert tracker.reply(rid) is not None
    assert len(tracker._heap) < 200


def test_connection_lost_then_resent_with_same_rid_and_remaining_budget(builder):
    tracker = _up(retries=1)
    (r1, f1), (r2, f2) = _request(builder, 10.0), _request(builder, 10.0)
    e1 = tracker.sent(r1, f1, 10.0, T0)
    e2 = tracker.sent(r2, f2, 10.0, T0 + 1)
    held, failed = tracker.connection_lost(T0 + 2)
    assert held == [e1, e2] and failed == []
    assert tracker.connection_lost(T0 + 2.5) == ([], [])  # held ones are not lost twice
    # while the connection is down, held requests wait for their deadline (no grace: no broker has them)
    assert tracker.next_timeout(T0 + 3) == pytest.approx(7.0)
    again = tracker.reconnected(T0 + 4)
    assert again == [e1, e2]
    for entry, sent_at in ((e1, T0), (e2, T0 + 1)):
        request = protocol.parse_request(entry.frames)
        assert request.rid == entry.rid  # the same request-id: the broker can drop a second copy
        assert request.header["timeout_ms"] == round((sent_at + 10.0 - (T0 + 4)) * 1000)
        assert request.header["inputs"] == [] and request.model == b"m"
        assert entry.sends == 2 and entry.retries_left == 0
        assert entry.give_up == sent_at + 10.0 + DEADLINE_GRACE  # the budget is not renewed
    assert tracker.reconnected(T0 + 5) == []  # nothing held any more
    assert tracker.reply(r1) is e1


def test_lost_again_with_no_retries_left_fails_at_once(builder):
    tracker = _up(retries=1)
    rid, frames = _request(builder, 10.0)
    entry = tracker.sent(rid, frames, 10.0, T0)
    tracker.connection_lost(T0 + 1)
    assert tracker.reconnected(T0 + 2) == [entry]
    held, failed = tracker.connection_lost(T0 + 3)
    assert held == [] and failed == [entry]
    assert not tracker
    error = lost_error(entry, ENDPOINT)
    assert isinstance(error, Unavailable)
    assert str(error) == (f"the connection to the broker at {ENDPOINT} was lost while the request was in flight "
                          "(sent 2 times, no retries left); it may or may not have run (a broker also drops the "
                          "connection of a client that sends a message over its max_message_bytes)")


def test_retries_zero_fails_lost_requests_but_not_later_ones(builder):
    tracker = _up(retries=0)
    (r1, f1), (r2, f2) = _request(builder), _request(builder)
    e1 = tracker.sent(r1, f1, 2.5, T0)
    held, failed = tracker.connection_lost(T0 + 0.1)
    assert held == [] and failed == [e1]
    assert "sent once" in str(lost_error(e1, ENDPOINT))
    e2 = tracker.sent(r2, f2, 2.5, T0 + 0.2)  # made while down: it waits for the connection, no retry spent
    assert tracker.reconnected(T0 + 0.3) == [e2]
    assert tracker.reply(r2) is e2


def test_held_request_times_out_at_its_deadline_if_the_connection_stays_down(builder):
    tracker = _up(retries=1)
    rid, frames = _request(builder, 2.0)
    entry = tracker.sent(rid, frames, 2.0, T0)
    tracker.connection_lost(T0 + 0.5)
    assert tracker.expired(T0 + 1.9) == []
    assert tracker.next_timeout(T0 + 1.9) == pytest.approx(0.1)
    assert tracker.expired(T0 + 2.0) == [entry]
    error = timeout_error(entry, ENDPOINT)
    assert isinstance(error, RequestTimeout)
    assert "was lost with the request in flight and did not come back within its 2.000s timeout" in str(error)
    assert tracker.reconnected(T0 + 2.1) == [] and not tracker


def test_held_request_past_its_deadline_is_not_resent(builder):
    tracker = _up(retries=1)
    rid, frames = _request(builder, 1.0)
    entry = tracker.sent(rid, frames, 1.0, T0)
    tracker.connection_lost(T0 + 0.5)
    assert tracker.reconnected(T0 + 1.2) == []  # reconnected too late: no budget left to send
    assert tracker.expired(T0 + 1.2) == [entry]


def test_held_request_answered_by_a_copy_that_survived_is_not_resent(builder):
    tracker = _up(retries=1)
    rid, frames = _request(builder, 5.0)
    entry = tracker.sent(rid, frames, 5.0, T0)
    tracker.connection_lost(T0 + 0.1)
    assert tracker.reply(rid) is entry
    assert tracker.reconnected(T0 + 0.2) == []
    assert tracker.next_timeout(T0 + 0.2) is None


def test_discard_and_clear(builder):
    tracker = _up(retries=1)
    (r1, f1), (r2, f2) = _request(builder), _request(builder)
    tracker.sent(r1, f1, 2.5, T0)
    e2 = tracker.sent(r2, f2, 2.5, T0)
    tracker.connection_lost(T0 + 0.1)
    tracker.discard(r1)  # its caller gave up (cancelled): neither resent nor reported
    assert tracker.reconnected(T0 + 0.2) == [e2]
    assert tracker.clear() == [e2]
    assert tracker.expired(T0 + 100) == [] and tracker.next_timeout(T0) is None


def test_a_header_without_timeout_is_resent_as_it_was(builder):
    rid, frames = builder.request("mmi.models", {})
    tracker = _up(retries=1)
    entry = tracker.sent(rid, frames, 1.0, T0)
    tracker.connection_lost(T0)
    assert tracker.reconnected(T0 + 0.1) == [entry]
    assert protocol.parse_request(entry.frames).header == {}


def test_requests_wait_in_the_tracker_until_the_first_connection(builder):
    tracker = Tracker(retries=1)
    assert not tracker.connected
    rid, frames = _request(builder, 2.0)
    entry = tracker.sent(rid, frames, 2.0, T0)
    assert entry.held and entry.sends == 0  # the caller did not send it: no connection yet
    assert tracker.next_timeout(T0) == pytest.approx(2.0)  # no grace: no broker has it
    assert tracker.reconnected(T0 + 0.5) == [entry] and tracker.connected
    assert entry.sends == 1 and entry.retries_left == 1  # waiting for a connection costs no retry
    request = protocol.parse_request(entry.frames)
    assert request.rid == rid and request.header["timeout_ms"] == 1500  # the broker counts from receipt
    assert tracker.next_timeout(T0 + 0.5) == pytest.approx(1.5 + DEADLINE_GRACE)


def test_a_request_that_never_found_a_broker_times_out_at_its_deadline(builder):
    tracker = Tracker(retries=1)
    rid, frames = _request(builder, 0.5)
    entry = tracker.sent(rid, frames, 0.5, T0)
    assert tracker.expired(T0 + 0.5) == [entry]
    error = timeout_error(entry, ENDPOINT)
    assert str(error) == f"no connection to {ENDPOINT} within 0.500s; is the pool running there?"
    assert tracker.reconnected(T0 + 1) == []  # never sent late to a broker that comes up afterwards


def test_requests_made_while_the_connection_is_down_wait_for_it(builder):
    tracker = _up(retries=0)
    (r1, f1), (r2, f2) = _request(builder, 5.0), _request(builder, 5.0)
    e1 = tracker.sent(r1, f1, 5.0, T0)
    assert tracker.connection_lost(T0 + 1) == ([], [e1])
    assert not tracker.connected
    e2 = tracker.sent(r2, f2, 5.0, T0 + 2)
    assert e2.held and e2.sends == 0
    assert tracker.reconnected(T0 + 3) == [e2]
    assert e2.sends == 1 and protocol.parse_request(e2.frames).header["timeout_ms"] == 4000


def test_a_request_sent_at_once_is_not_re_encoded(builder):
    tracker = Tracker(retries=1)
    rid, frames = _request(builder, 2.0)
    entry = tracker.sent(rid, frames, 2.0, T0)
    tracker.reconnected(T0 + 0.0001)
    assert entry.frames is frames
