"""Broker bookkeeping (broker.state.PoolState) driven by hand: fake clock, no sockets, no processes.

Every test feeds client and worker frames exactly as the broker's ROUTER sockets would hand them over
(identity stripped) and reads back what the broker queued for clients and workers, parsed with the
wire codec in client.protocol, so that assertions are on what a client or a worker would receive.
"""
from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest

from modelpool.client import protocol
from modelpool.client.errors import (
    InvalidInput,
    ModelError,
    ModelNotFound,
    NotSupported,
    Overloaded,
    ProtocolError,
    RequestTimeout,
    Unavailable,
    WorkerCrashed,
)
from modelpool.client.protocol import Command
from modelpool.broker.state import IllegalTransition, PoolState, Worker, WorkerState

ALICE = b"\x00alice"
BOB = b"\x00bob"
W1, W2, W3 = b"w1", b"w2", b"w3"
OUT_HEADER = {"model_name": "m", "model_version": "1", "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}]}


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_state(clock: Clock, *models: str, expected: int = 0, **kwargs) -> PoolState:
    kwargs.setdefault("heartbeat_interval", 1.0)
    kwargs.setdefault("heartbeat_liveness", 3)
    kwargs.setdefault("hang_timeout", 60.0)
    state = PoolState(now=clock, **kwargs)
    for name in models:
        state.add_model(name, expected=expected, version="1")
    return state


def request(state: PoolState, client: bytes, model: str | bytes, rid: bytes, header: dict | None = None,
            tensors=(), *, dispatch: bool = True) -> None:
    """A client message, then dispatch as the socket loop does after each read (``dispatch=False``:
    more of the same burst follows)."""
    state.client_message(client, protocol.encode_request(model, rid, header if header is not None else {}, tensors))
    if dispatch:
        state.dispatch()


def infer(state: PoolState, client: bytes, model: str, rid: bytes, value: float = 1.0, *, rows: int = 1,
          dispatch: bool = True, **header) -> None:
    metas, frames = protocol.encode_tensors({"x": np.full((rows, 1), value, dtype=np.float32)})
    request(state, client, model, rid, {"inputs": metas, **header}, frames, dispatch=dispatch)


def ready(state: PoolState, identity: bytes, model: str, capacity: int = 1, **info) -> None:
    """A worker registers; ``capacity`` N: it takes N one-row requests at a time (batches of one row,
    N - 1 prefetched), unless ``max_batch_size``/``prefetch`` are given."""
    info = {"version": "1", "max_batch_size": 1, "prefetch": capacity - 1, "pid": 4242, **info}
    state.worker_message(identity, protocol.encode_ready(model, info))
    state.dispatch()


def reply(state: PoolState, identity: bytes, client: bytes, rid: bytes, status: bytes = protocol.OK,
          header: dict | None = None, tensors=()) -> None:
    body = [protocol.packb(header if header is not None else OUT_HEADER), *tensors]
    state.worker_message(identity, protocol.encode_replies([protocol.ReplyItem(client, rid, status, body)]))
    state.dispatch()


def client_out(state: PoolState) -> list[tuple[bytes, protocol.Reply]]:
    """(client identity, parsed reply) for everything queued to clients; the outbox is cleared."""
    out = []
    for frames in state.outbox_clients:
        assert frames[1] == b"" and frames[2] == protocol.CLIENT, frames
        out.append((frames[0], protocol.parse_reply(frames[1:])))
    state.outbox_clients.clear()
    return out


def worker_out(state: PoolState) -> list[tuple[bytes, protocol.WorkerMessage]]:
    """(worker identity, parsed message) for everything queued to workers, after the dispatch the
    socket loop runs before it sends; the outbox is cleared."""
    state.dispatch()
    out = []
    for frames in state.outbox_workers:
        assert frames[1] == b"" and frames[2] == protocol.WORKER, frames
        out.append((frames[0], protocol.parse_worker_message(frames[1:])))
    state.outbox_workers.clear()
    return out


def dispatched(state: PoolState) -> list[tuple[bytes, bytes, bytes]]:
    """(worker, client, rid) of every request in the BATCHes queued to workers; the outbox is cleared."""
    return [(identity, item.client, item.rid) for identity, batch in batches(state) for item in batch]


def batches(state: PoolState) -> list[tuple[bytes, list[protocol.BatchItem]]]:
    """(worker, items) of every BATCH queued to workers; the outbox is cleared."""
    out = []
    for identity, message in worker_out(state):
        assert message.command is Command.BATCH, message
        out.append((identity, message.fields))
    return out


def only_error(state: PoolState, client: bytes, rid: bytes, status: bytes, error_type: type) -> str:
    """The single reply queued must be an error of that status and type for that client; returns the message."""
    out = client_out(state)
    assert len(out) == 1, out
    who, rep = out[0]
    assert who == client and rep.rid == rid
    assert rep.status == status, (rep.status, rep.header)
    assert rep.tensors == []
    err = protocol.reply_error(rep)
    assert type(err) is error_type, (type(err), err)
    return err.message


def only_ok(state: PoolState, client: bytes, rid: bytes) -> protocol.Reply:
    out = client_out(state)
    assert len(out) == 1, out
    who, rep = out[0]
    assert who == client and rep.rid == rid and rep.status == protocol.OK, (who, rep)
    return rep


# --- unknown models and management ----------------------------------------------------------------


def test_unknown_model_is_404_listing_served_models(clock):
    state = make_state(clock, "resnet", "bert")
    request(state, ALICE, "gpt", b"r1")
    out = client_out(state)
    assert len(out) == 1
    who, rep = out[0]
    assert who == ALICE and rep.model == b"gpt" and rep.rid == b"r1" and rep.status == b"404"
    err = protocol.reply_error(rep)
    assert isinstance(err, ModelNotFound)
    assert '"gpt"' in err.message and "bert, resnet" in err.message
    assert state.outbox_workers == []


def test_unknown_model_with_no_models_says_none(clock):
    state = make_state(clock)
    request(state, ALICE, "gpt", b"r1")
    assert "models served: none" in only_error(state, ALICE, b"r1", b"404", ModelNotFound)


def test_mmi_models_lists_models_workers_and_queue_depths(clock):
    state = make_state(clock, "a", "b", expected=1, mmi_detail=True)
    ready(state, W1, "a", capacity=1)
    infer(state, ALICE, "a", b"1")
    infer(state, ALICE, "a", b"2")  # queued: W1 is full
    request(state, BOB, "mmi.models", b"q", {"detail": True})
    rep = only_ok(state, BOB, b"q")
    assert rep.model == b"mmi.models"
    models = {m["name"]: m for m in rep.header["models"]}
    assert set(models) == {"a", "b"}
    a = models["a"]
    assert a["replicas_ready"] == 1 and a["replicas_expected"] == 1
    assert a["queue_depth"] == 1 and a["in_flight"] == 1
    assert a["queue_rows"] == 1 and a["batches"] == 1 and a["batch_rows"] == 1
    assert a["workers"] == [{"id": "w1", "pid": 4242, "state": "ready", "max_batch_size": 1, "prefetch": 0,
                             "in_flight": 1, "batches": 1, "rows": 1, "load_seconds": None, "rss_bytes": None}]
    assert models["b"]["replicas_ready"] == 0 and models["b"]["workers"] == []


def test_mmi_health_ready_only_when_every_model_has_a_replica(clock):
    state = make_state(clock, "a", "b", expected=1)
    request(state, ALICE, "mmi.health", b"h1")
    rep = only_ok(state, ALICE, b"h1")
    assert rep.model == b"mmi.health"
    assert rep.header["live"] is True and rep.header["ready"] is False
    assert rep.header["models"] == {"a": False, "b": False}
    ready(state, W1, "a")
    ready(state, W2, "b")
    request(state, ALICE, "mmi.health", b"h2")
    rep = only_ok(state, ALICE, b"h2")
    assert rep.header["ready"] is True and rep.header["models"] == {"a": True, "b": True}
    state.stop_admitting()
    request(state, ALICE, "mmi.health", b"h3")
    rep = only_ok(state, ALICE, b"h3")
    assert rep.header["live"] is True and rep.header["ready"] is False and rep.header["admitting"] is False


def test_mmi_service_200_for_served_model_and_404_otherwise(clock):
    state = make_state(clock, "resnet")
    request(state, ALICE, "mmi.service", b"s1", {"name": "resnet"})
    rep = only_ok(state, ALICE, b"s1")
    assert rep.model == b"mmi.service" and rep.header == {"name": "resnet"}
    request(state, ALICE, "mmi.service", b"s2", {"name": "nope"})
    assert '"nope"' in only_error(state, ALICE, b"s2", b"404", ModelNotFound)
    request(state, ALICE, "mmi.service", b"s3")
    only_error(state, ALICE, b"s3", b"404", ModelNotFound)


def test_unknown_mmi_service_is_501(clock):
    state = make_state(clock, "resnet")
    request(state, ALICE, "mmi.reload", b"x")
    message = only_error(state, ALICE, b"x", b"501", NotSupported)
    assert "mmi.reload" in message


# --- registration and dispatch ----------------------------------------------------------------------


def test_ready_registers_worker_and_dispatches_queued_requests(clock):
    state = make_state(clock, "m", expected=1)
    infer(state, ALICE, "m", b"1", 1.0)
    infer(state, BOB, "m", b"2", 2.0)
    assert state.outbox_clients == [] and state.outbox_workers == []
    assert state.models[b"m"].queued == 2
    ready(state, W1, "m", max_batch_size=4)
    assert W1 in state.workers and state.workers[W1].state is WorkerState.READY
    [(who, items)] = batches(state)  # both in one BATCH
    assert who == W1 and [(i.client, i.rid, i.budget_ms) for i in items] == [(ALICE, b"1", None), (BOB, b"2", None)]
    # Each item carries the client's header and tensor frames untouched.
    header, tensor = items[0].body
    x = protocol.decode_tensors(protocol.unpack_header(header)["inputs"], [tensor])["x"]
    assert x.tolist() == [[1.0]]
    assert state.models[b"m"].queued == 0 and state.models[b"m"].in_flight == 2


def test_ready_from_unknown_model_is_refused(clock):
    state = make_state(clock, "m")
    ready(state, W1, "remote", capacity=2, version="7")
    assert W1 not in state.workers and b"remote" not in state.models
    [(who, message)] = worker_out(state)
    assert who == W1 and message.command is Command.DISCONNECT and "not served" in message.fields[0]["error"]
    request(state, ALICE, "mmi.service", b"s", {"name": "remote"})
    only_error(state, ALICE, b"s", b"404", ModelNotFound)


def test_idle_workers_take_turns_and_busy_ones_get_one_batch_ahead(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m", max_batch_size=4, prefetch=1)
    ready(state, W2, "m", max_batch_size=4, prefetch=1)
    infer(state, ALICE, "m", b"a")
    infer(state, ALICE, "m", b"b")
    assert [w for w, *_ in dispatched(state)] == [W1, W2]  # each idle worker in turn
    for i in range(3):  # both busy: what waits goes ahead to one, then the other
        infer(state, BOB, "m", b"q%d" % i, dispatch=False)
    state.dispatch()
    [(who, items)] = batches(state)
    assert [i.rid for i in items] == [b"q0", b"q1", b"q2"] and state.workers[who].batches == 2
    infer(state, BOB, "m", b"r0")
    [(other, items)] = batches(state)
    assert other != who and [i.rid for i in items] == [b"r0"]
    infer(state, BOB, "m", b"s0")  # both hold a batch running and one ahead: s0 waits in the broker
    assert dispatched(state) == [] and state.models[b"m"].queued == 1
    reply(state, W1, ALICE, b"a")  # W1's credit for batch [a] returns
    client_out(state)
    assert dispatched(state) == [(W1, BOB, b"s0")]


def test_a_burst_becomes_one_batch_split_over_idle_workers(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m", max_batch_size=8)
    ready(state, W2, "m", max_batch_size=8)
    for i in range(10):  # read in one go, then dispatched
        infer(state, ALICE, "m", b"%d" % i, dispatch=False)
    state.dispatch()
    sent = batches(state)
    assert [(w, len(items)) for w, items in sent] == [(W1, 5), (W2, 5)]
    entry = state.models[b"m"]
    assert (entry.batches, entry.batch_rows) == (2, 10)


def test_batches_hold_max_batch_size_rows_and_a_larger_request_goes_alone(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m", max_batch_size=4, prefetch=8)
    for rid, rows in ((b"a", 3), (b"b", 2), (b"big", 9), (b"c", 1)):
        infer(state, ALICE, "m", rid, rows=rows, dispatch=False)
    state.dispatch()
    assert [[i.rid for i in items] for _, items in batches(state)] == [[b"a"], [b"b"], [b"big"], [b"c"]]


def test_only_compatible_requests_share_a_batch_oldest_lane_first(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m", max_batch_size=8, prefetch=0)
    infer(state, ALICE, "m", b"busy")
    wide = protocol.encode_tensors({"x": np.zeros((1, 3), np.float32)})
    request(state, ALICE, "m", b"w1", {"inputs": wide[0]}, wide[1], dispatch=False)
    infer(state, ALICE, "m", b"n1", dispatch=False)
    request(state, ALICE, "m", b"w2", {"inputs": wide[0]}, wide[1], dispatch=False)
    infer(state, ALICE, "m", b"n2", dispatch=False)
    infer(state, ALICE, "m", b"o1", outputs=[{"name": "hidden"}], dispatch=False)
    state.dispatch()
    dispatched(state)
    reply(state, W1, ALICE, b"busy")
    order = []
    for _ in range(3):
        [(_, items)] = batches(state)
        order.append([i.rid for i in items])
        for item in items:
            reply(state, W1, ALICE, item.rid)
    assert order == [[b"w1", b"w2"], [b"n1", b"n2"], [b"o1"]]


def test_max_delay_waits_for_a_fuller_batch_then_sends_what_there_is(clock):
    state = make_state(clock)
    state.add_model("m", max_delay_ms=20)
    ready(state, W1, "m", max_batch_size=4)
    infer(state, ALICE, "m", b"1")
    assert dispatched(state) == [] and state.next_deadline() == pytest.approx(clock.t + 0.02)
    clock.advance(0.01)
    infer(state, ALICE, "m", b"2")
    state.tick()
    assert dispatched(state) == []
    clock.advance(0.011)
    state.tick()
    assert [rid for _, _, rid in dispatched(state)] == [b"1", b"2"]
    for i in range(4):  # a full batch does not wait
        infer(state, BOB, "m", b"f%d" % i, dispatch=False)
    reply(state, W1, ALICE, b"1")
    reply(state, W1, ALICE, b"2")
    assert len(dispatched(state)) == 4


def test_budget_left_travels_with_each_request(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m", max_batch_size=1, prefetch=0)
    infer(state, ALICE, "m", b"busy")
    infer(state, ALICE, "m", b"t", timeout_ms=1000)
    dispatched(state)
    clock.advance(0.25)
    reply(state, W1, ALICE, b"busy")
    [(_, [item])] = batches(state)
    assert item.rid == b"t" and item.budget_ms == 750
    assert state.models[b"m"].queue_seconds == pytest.approx(0.25)


def test_second_copy_of_a_pending_request_is_dropped_not_run_twice(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m", max_batch_size=1, prefetch=0)
    infer(state, ALICE, "m", b"1")
    infer(state, ALICE, "m", b"1")  # in flight: a resend after a reconnect
    infer(state, ALICE, "m", b"2")
    infer(state, ALICE, "m", b"2")  # queued
    assert state.outbox_clients == [] and state.duplicates == 2
    assert dispatched(state) == [(W1, ALICE, b"1")] and state.models[b"m"].queued == 1
    infer(state, BOB, "m", b"1")  # the same id from another client is another request
    assert state.models[b"m"].queued == 2


def test_requests_only_go_to_workers_of_their_model(clock):
    state = make_state(clock, "a", "b", expected=1)
    ready(state, W1, "a", capacity=8)
    infer(state, ALICE, "b", b"for-b")
    assert state.outbox_workers == []  # W1 is free but serves "a"
    assert state.models[b"b"].queued == 1
    ready(state, W2, "b", capacity=1)
    assert dispatched(state) == [(W2, ALICE, b"for-b")]
    infer(state, ALICE, "a", b"for-a")
    assert dispatched(state) == [(W1, ALICE, b"for-a")]


def test_reply_routed_to_client_frees_capacity_and_dispatches_next(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m", capacity=1)
    infer(state, ALICE, "m", b"a-1")
    infer(state, BOB, "m", b"b-1")
    assert dispatched(state) == [(W1, ALICE, b"a-1")]
    metas, frames = protocol.encode_tensors({"y": np.array([3.5], dtype=np.float32)})
    reply(state, W1, ALICE, b"a-1", header={**OUT_HEADER, "outputs": metas}, tensors=frames)
    out = client_out(state)
    assert len(out) == 1
    who, rep = out[0]
    assert who == ALICE and rep.model == b"m" and rep.rid == b"a-1" and rep.status == b"200"
    assert protocol.decode_tensors(rep.header["outputs"], rep.tensors)["y"].tolist() == [3.5]
    assert dispatched(state) == [(W1, BOB, b"b-1")]
    assert state.models[b"m"].served == 1


def test_error_reply_from_worker_reaches_client_typed(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m")
    infer(state, ALICE, "m", b"1")
    dispatched(state)
    reply(state, W1, ALICE, b"1", b"500", {"error": {"type": "ModelError", "message": "boom in layer dense"}})
    assert only_error(state, ALICE, b"1", b"500", ModelError) == "boom in layer dense"
    assert state.models[b"m"].errors == 1 and state.models[b"m"].in_flight == 0


def test_bad_requests_are_counted_apart_from_model_failures(clock):
    """`modelpool status` must not show a client's bad requests as the model failing."""
    state = make_state(clock)
    state.add_model("m", max_queue=1, version="1")
    ready(state, W1, "m")
    infer(state, ALICE, "m", b"1")
    infer(state, ALICE, "m", b"2")  # waits: the only worker is busy
    infer(state, ALICE, "m", b"3")  # 429: the queue of one is full
    request(state, ALICE, "m", b"4", {"timeout_ms": "soon"})  # 400
    request(state, ALICE, "m", b"5", {"parameters": [1, 2]})  # 400: parameters must be a map
    refused = {rep.rid: rep for _, rep in client_out(state)}
    assert refused[b"5"].header["error"]["message"] == "parameters must be a map, got an array"
    reply(state, W1, ALICE, b"1", b"400", {"error": {"type": "InvalidInput", "message": "wrong shape"}})
    reply(state, W1, ALICE, b"2", b"500", {"error": {"type": "ModelError", "message": "boom"}})
    summary = state.models[b"m"].summary()
    assert (summary["client_errors"], summary["errors"], summary["served"]) == (4, 1, 0)


def test_reply_for_unknown_request_is_dropped(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m", capacity=1)
    infer(state, ALICE, "m", b"1")
    dispatched(state)
    reply(state, W1, ALICE, b"never-sent")
    reply(state, W1, BOB, b"1")  # right rid, wrong client
    reply(state, W3, ALICE, b"1")  # worker that never registered
    assert state.outbox_clients == []
    assert len(state.workers[W1].inflight) == 1
    reply(state, W1, ALICE, b"1")
    only_ok(state, ALICE, b"1")
    reply(state, W1, ALICE, b"1")  # a duplicate reply is dropped too
    assert state.outbox_clients == []


def test_metadata_answered_from_ready_cache_without_worker(clock):
    state = make_state(clock, "m")
    metadata = {"name": "m", "versions": ["1"], "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}]}
    ready(state, W1, "m", capacity=1, metadata=metadata)
    infer(state, BOB, "m", b"busy")  # W1 is now full
    dispatched(state)
    request(state, ALICE, "m", b"meta", {"op": "metadata"})
    rep = only_ok(state, ALICE, b"meta")
    assert rep.model == b"m" and rep.header == metadata
    assert state.outbox_workers == [] and state.models[b"m"].queued == 0


def test_metadata_without_cache_goes_to_worker(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m")
    request(state, ALICE, "m", b"meta", {"op": "metadata"})
    assert dispatched(state) == [(W1, ALICE, b"meta")]


# --- admission: starting, unavailable, overloaded, invalid ---------------------------------------------


def test_requests_queue_while_replicas_are_starting(clock):
    state = make_state(clock, "m")  # expected=0: e.g. remote-only, but the supervisor reports starting ones
    state.set_starting("m", 2)
    infer(state, ALICE, "m", b"1")
    assert state.outbox_clients == [] and state.models[b"m"].queued == 1
    state.set_starting("m", 1)
    ready(state, W1, "m")
    assert dispatched(state) == [(W1, ALICE, b"1")]


def test_requests_queue_while_expected_replicas_are_not_up(clock):
    state = make_state(clock, "m", expected=2)
    infer(state, ALICE, "m", b"1")
    assert state.outbox_clients == [] and state.models[b"m"].queued == 1


def test_503_when_no_worker_and_none_expected(clock):
    state = make_state(clock, "m")
    infer(state, ALICE, "m", b"1")
    message = only_error(state, ALICE, b"1", b"503", Unavailable)
    assert '"m"' in message and "no live worker" in message
    assert state.models[b"m"].queued == 0


def test_load_failed_answers_queued_and_new_requests_503_with_reason(clock):
    state = make_state(clock, "m", expected=1)
    infer(state, ALICE, "m", b"queued")
    state.load_failed("m", "OSError: no file model.keras")
    message = only_error(state, ALICE, b"queued", b"503", Unavailable)
    assert "failed to load" in message and "OSError: no file model.keras" in message
    infer(state, BOB, "m", b"later")
    assert "OSError: no file model.keras" in only_error(state, BOB, b"later", b"503", Unavailable)
    assert state.drained()
    request(state, ALICE, "mmi.models", b"q")
    summary = only_ok(state, ALICE, b"q").header["models"][0]
    assert summary["load_error"] == "OSError: no file model.keras" and summary["replicas_failed"] == 1
    # A replica that does come up clears the error.
    ready(state, W1, "m")
    infer(state, BOB, "m", b"now")
    assert dispatched(state) == [(W1, BOB, b"now")]


def test_load_failed_reported_by_worker_disconnect(clock):
    state = make_state(clock, "m", expected=1)
    infer(state, ALICE, "m", b"1")
    state.worker_message(W1, protocol.encode_disconnect({"model": "m", "error": "ValueError: bad layer"}))
    assert "ValueError: bad layer" in only_error(state, ALICE, b"1", b"503", Unavailable)


def test_load_failed_keeps_queue_when_a_replica_is_ready(clock):
    state = make_state(clock, "m", expected=2)
    ready(state, W1, "m", capacity=1)
    infer(state, ALICE, "m", b"1")
    infer(state, ALICE, "m", b"2")
    dispatched(state)
    state.load_failed("m", "second replica OOM")
    assert state.outbox_clients == [] and state.models[b"m"].queued == 1


def test_429_when_queue_is_full(clock):
    state = make_state(clock)
    state.add_model("m", max_queue=2, expected=1)
    ready(state, W1, "m", capacity=1)
    for rid in (b"1", b"2", b"3"):  # one in flight, two queued
        infer(state, ALICE, "m", rid)
    assert state.outbox_clients == []
    infer(state, BOB, "m", b"4")
    message = only_error(state, BOB, b"4", b"429", Overloaded)
    assert '"m"' in message and "queue is full" in message and "2" in message
    dispatched(state)
    reply(state, W1, ALICE, b"1")
    client_out(state)
    infer(state, BOB, "m", b"5")  # a slot is free again
    assert state.outbox_clients == []


@pytest.mark.parametrize("timeout_ms", [-1, "100", True, [5], {"ms": 1}])
def test_invalid_timeout_ms_is_400(clock, timeout_ms):
    state = make_state(clock, "m")
    ready(state, W1, "m")
    infer(state, ALICE, "m", b"1", timeout_ms=timeout_ms)
    message = only_error(state, ALICE, b"1", b"400", InvalidInput)
    assert "timeout_ms" in message
    assert state.outbox_workers == []


@pytest.mark.parametrize("timeout_ms", [math.nan, math.inf, -math.inf])
def test_non_finite_timeout_ms_is_400(clock, timeout_ms):
    state = make_state(clock, "m")
    ready(state, W1, "m")
    infer(state, ALICE, "m", b"1", timeout_ms=timeout_ms)
    assert "timeout_ms" in only_error(state, ALICE, b"1", b"400", InvalidInput)


def test_nan_timeout_does_not_block_other_deadlines(clock):
    state = make_state(clock, "m", expected=1)
    infer(state, ALICE, "m", b"nan", timeout_ms=math.nan)
    client_out(state)
    infer(state, BOB, "m", b"short", timeout_ms=10)
    clock.advance(1.0)
    state.tick()
    assert "deadline" in only_error(state, BOB, b"short", b"504", RequestTimeout)


def test_valid_timeout_ms_accepted(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m", capacity=2)
    infer(state, ALICE, "m", b"1", timeout_ms=250)
    infer(state, ALICE, "m", b"2", timeout_ms=0.5)
    assert [rid for _, _, rid in dispatched(state)] == [b"1", b"2"]
    assert state.outbox_clients == []


# --- deadlines ----------------------------------------------------------------------------------------


def test_queued_request_past_deadline_is_504_and_never_dispatched(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m", capacity=1)
    infer(state, ALICE, "m", b"busy")
    infer(state, BOB, "m", b"late", timeout_ms=100)
    infer(state, BOB, "m", b"patient")
    assert dispatched(state) == [(W1, ALICE, b"busy")]
    assert state.next_deadline() == pytest.approx(clock.t + 0.1)
    clock.advance(0.05)
    state.tick()
    assert state.outbox_clients == []
    clock.advance(0.06)
    state.tick()
    message = only_error(state, BOB, b"late", b"504", RequestTimeout)
    assert "deadline" in message and "never reached the model" in message
    assert state.models[b"m"].queued == 1
    # When W1 frees up, the expired request is skipped and the next one goes out.
    reply(state, W1, ALICE, b"busy")
    only_ok(state, ALICE, b"busy")
    assert dispatched(state) == [(W1, BOB, b"patient")]
    assert state.models[b"m"].queued == 0


def test_expired_request_skipped_by_dispatch_without_tick(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m", capacity=1)
    infer(state, ALICE, "m", b"busy")
    infer(state, BOB, "m", b"late", timeout_ms=100)
    dispatched(state)
    clock.advance(0.2)  # no tick: dispatch itself must notice
    reply(state, W1, ALICE, b"busy")
    out = client_out(state)
    assert [(w, r.rid, r.status) for w, r in out] == [(ALICE, b"busy", b"200"), (BOB, b"late", b"504")]
    assert state.outbox_workers == []
    assert state.drained()
    state.tick()  # the heap entry is stale now and answers nothing twice
    assert state.outbox_clients == []


def test_request_dispatched_before_deadline_is_not_answered_by_tick(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m")
    infer(state, ALICE, "m", b"1", timeout_ms=100)
    dispatched(state)
    clock.advance(0.5)
    state.tick()
    assert state.outbox_clients == []  # in flight: the worker answers it


def test_answered_request_does_not_keep_its_tensors_until_its_deadline(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m")
    tensor = np.ones((256, 256), dtype=np.float32)  # stands in for a zmq.Frame: forwarded untouched
    probe = weakref.ref(tensor)
    metas, frames = protocol.encode_tensors({"x": tensor})
    request(state, ALICE, "m", b"1", {"inputs": metas, "timeout_ms": 3_600_000}, frames)
    del tensor, frames
    dispatched(state)
    reply(state, W1, ALICE, b"1")
    only_ok(state, ALICE, b"1")
    gc.collect()
    assert probe() is None


def test_retried_request_past_its_deadline_is_504_not_rerun(clock):
    state = make_state(clock, "m", expected=1)
    ready(state, W1, "m")
    infer(state, ALICE, "m", b"1", timeout_ms=100)
    dispatched(state)
    clock.advance(0.5)
    state.worker_lost(W1, "exited")
    ready(state, W2, "m")
    assert "deadline" in only_error(state, ALICE, b"1", b"504", RequestTimeout)
    assert state.outbox_workers == []


# --- worker loss, retries, liveness ------------------------------------------------------------------


def test_worker_lost_retries_inflight_once_on_another_replica_with_solo_flag(clock):
    state = make_state(clock, "m", expected=2)
    ready(state, W1, "m", capacity=2)
    infer(state, ALICE, "m", b"1")
    infer(state, BOB, "m", b"2")
    assert [w for w, *_ in dispatched(state)] == [W1, W1]
    ready(state, W2, "m", capacity=2)
    state.worker_lost(W1, "worker process exited with code -9")
    assert state.outbox_clients == []
    # each runs alone: a poison input among them must not take the other with it
    assert dispatched(state) == [(W2, ALICE, b"1")]
    assert W1 not in state.workers and W1 not in state.models[b"m"].workers
    assert state.models[b"m"].retried == 2
    reply(state, W2, ALICE, b"1")
    rep = only_ok(state, ALICE, b"1")
    assert rep.model == b"m"
    assert dispatched(state) == [(W2, BOB, b"2")]


def test_request_that_crashed_two_workers_gets_500_worker_crashed(clock):
    state = make_state(clock, "m", expected=2)
    ready(state, W1, "m")
    ready(state, W2, "m")
    infer(state, ALICE, "m", b"poison")
    (first, *_), = dispatched(state)
    state.worker_lost(first, "exited with code -11")
    (second, _, _), = dispatched(state)
    assert second != first
    ready(state, W3, "m")  # a replacement is up
    state.worker_lost(second, "exited with code -11")
    message = only_error(state, ALICE, b"poison", b"500", WorkerCrashed)
    assert "request crashed a worker" in message and '"m"' in message and "not retried" in message
    assert state.outbox_workers == []  # never sent to W3
    assert state.models[b"m"].crashed == 1
    assert state.drained()


def test_worker_lost_with_no_replica_left_and_none_expected_fails_queue_503(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m", capacity=1)
    infer(state, ALICE, "m", b"1")
    infer(state, BOB, "m", b"2")
    state.worker_lost(W1, "disconnected")
    out = sorted((w, r.rid, r.status) for w, r in client_out(state))
    assert out == [(ALICE, b"1", b"503"), (BOB, b"2", b"503")]
    assert state.drained()


def test_worker_lost_with_replica_expected_keeps_retry_queued(clock):
    state = make_state(clock, "m", expected=1)
    ready(state, W1, "m", capacity=1)
    infer(state, ALICE, "m", b"1")
    dispatched(state)
    state.worker_lost(W1, "exited")
    assert state.outbox_clients == [] and state.models[b"m"].queued == 1
    ready(state, W2, "m")  # the restarted replica
    assert dispatched(state) == [(W2, ALICE, b"1")]


def test_worker_lost_unknown_identity_is_noop(clock):
    state = make_state(clock, "m")
    assert state.worker_lost(b"ghost", "exited") is None
    assert state.outbox_clients == [] and state.outbox_workers == []


def test_worker_disconnect_retries_its_requests(clock):
    state = make_state(clock, "m", expected=2)
    ready(state, W1, "m")
    ready(state, W2, "m")
    infer(state, ALICE, "m", b"1")
    (target, *_), = dispatched(state)
    state.worker_message(target, protocol.encode_disconnect())
    other = W2 if target == W1 else W1
    assert dispatched(state) == [(other, ALICE, b"1")]


def test_heartbeat_expiry_of_idle_worker(clock):
    state = make_state(clock, "m", expected=1)
    ready(state, W1, "m")
    ready(state, W2, "m")
    clock.advance(2.0)
    state.worker_message(W2, protocol.encode_heartbeat())
    clock.advance(1.5)  # W1 silent 3.5s > 3 x 1s; W2 silent 1.5s
    state.tick()
    assert [i for i, _ in state.lost_workers] == [W1]
    assert "missed heartbeats" in state.lost_workers[0][1]
    assert set(state.workers) == {W2}


def test_busy_worker_is_not_expired_by_heartbeat_but_by_hang_timeout(clock):
    state = make_state(clock, "m", expected=2, hang_timeout=10.0)
    ready(state, W1, "m", capacity=2)
    infer(state, ALICE, "m", b"1")
    infer(state, BOB, "m", b"2")
    dispatched(state)
    clock.advance(5.0)  # past heartbeat liveness, but inference may hold the serve loop
    ready(state, W2, "m", capacity=2)
    state.tick()
    assert state.lost_workers == [] and W1 in state.workers
    clock.advance(5.5)
    state.worker_message(W2, protocol.encode_heartbeat())
    state.tick()
    assert [i for i, _ in state.lost_workers] == [W1]
    assert "hung" in state.lost_workers[0][1]
    assert W1 not in state.workers
    assert dispatched(state) == [(W2, ALICE, b"1")]  # one at a time, alone
    assert state.outbox_clients == []


def test_any_message_keeps_worker_alive(clock):
    state = make_state(clock, "m", hang_timeout=10.0)
    ready(state, W1, "m")
    for _ in range(10):
        clock.advance(2.0)
        state.worker_message(W1, protocol.encode_heartbeat())
        state.tick()
    assert state.lost_workers == [] and W1 in state.workers


def test_heartbeat_from_unknown_worker_asks_it_to_reregister(clock):
    state = make_state(clock, "m")
    state.worker_message(b"stranger", protocol.encode_heartbeat())
    (identity, message), = worker_out(state)
    assert identity == b"stranger" and message.command is Command.DISCONNECT


def test_heartbeat_all_and_disconnect_all(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m")
    ready(state, W2, "m")
    state.heartbeat_all()
    assert sorted((i, m.command) for i, m in worker_out(state)) == [(W1, Command.HEARTBEAT), (W2, Command.HEARTBEAT)]
    state.disconnect_all()
    assert sorted((i, m.command) for i, m in worker_out(state)) == [(W1, Command.DISCONNECT), (W2, Command.DISCONNECT)]


def test_ready_twice_reregisters_and_retries_inflight(clock):
    state = make_state(clock, "m", expected=1)
    ready(state, W1, "m")
    infer(state, ALICE, "m", b"1")
    dispatched(state)
    ready(state, W1, "m", pid=5151)  # another process behind the same identity: the first one is gone
    assert dispatched(state) == [(W1, ALICE, b"1")]
    assert state.outbox_clients == [] and state.models[b"m"].retried == 1


# --- graceful stop ---------------------------------------------------------------------------------------


def test_stop_admitting_refuses_new_but_finishes_queued_and_inflight(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m", capacity=1)
    infer(state, ALICE, "m", b"inflight")
    infer(state, ALICE, "m", b"queued")
    dispatched(state)
    assert not state.drained()
    state.stop_admitting()
    infer(state, BOB, "m", b"new")
    assert "shutting down" in only_error(state, BOB, b"new", b"503", Unavailable)
    reply(state, W1, ALICE, b"inflight")
    only_ok(state, ALICE, b"inflight")
    assert dispatched(state) == [(W1, ALICE, b"queued")]
    assert not state.drained()
    reply(state, W1, ALICE, b"queued")
    only_ok(state, ALICE, b"queued")
    assert state.drained()


def test_drained_counts_queue_and_inflight(clock):
    state = make_state(clock, "m", expected=1)
    assert state.drained()
    infer(state, ALICE, "m", b"1")
    assert not state.drained()
    ready(state, W1, "m")
    dispatched(state)
    assert not state.drained()
    reply(state, W1, ALICE, b"1")
    assert state.drained()


# --- malformed input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames, fragment",
    [
        ([b"", protocol.CLIENT, b"m", b"r1", b"\xc1garbage"], "msgpack"),
        ([b"", protocol.CLIENT, b"m", b"r1", protocol.packb([1, 2])], "map"),
        ([b"", b"MDPC99", b"m", b"r1", protocol.packb({})], "protocol"),
        ([b"", protocol.CLIENT, b"m", b"r1"], "5 frames"),
        ([b"", protocol.CLIENT, b"", b"r1", protocol.packb({})], "model name"),
        ([b"", protocol.CLIENT, b"m" * 256, b"r1", protocol.packb({})], "model name"),  # one rule for names
    ],
)
def test_malformed_client_message_with_envelope_is_400(clock, frames, fragment):
    state = make_state(clock, "m")
    ready(state, W1, "m")
    state.client_message(ALICE, frames)
    out = client_out(state)
    assert len(out) == 1
    who, rep = out[0]
    assert who == ALICE and rep.model == frames[2] and rep.rid == b"r1" and rep.status == b"400"
    err = protocol.reply_error(rep)
    assert isinstance(err, ProtocolError) and fragment in err.message
    assert state.outbox_workers == []


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b""],
        [b"", protocol.CLIENT, b"m"],
        [b"not-empty", protocol.CLIENT, b"m", b"r1", protocol.packb({})],
        [b"", protocol.CLIENT, b"m", b"", protocol.packb({})],  # empty request-id
        [b"", protocol.CLIENT, b"m", b"r" * 256, protocol.packb({})],
    ],
)
def test_malformed_client_message_without_envelope_is_dropped(clock, frames):
    state = make_state(clock, "m")
    ready(state, W1, "m")
    state.client_message(ALICE, frames)
    assert state.outbox_clients == [] and state.outbox_workers == []
    infer(state, ALICE, "m", b"ok")  # the broker carries on
    assert dispatched(state) == [(W1, ALICE, b"ok")]


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"", protocol.WORKER],
        [b"x", protocol.WORKER, Command.HEARTBEAT.value],
        [b"", b"MDPW99", Command.HEARTBEAT.value],
        [b"", protocol.WORKER, b"\x09"],
        [b"", protocol.WORKER, Command.READY.value, b"m"],  # no info
        [b"", protocol.WORKER, Command.READY.value, b"m", b"\xc1"],  # info not msgpack
        [b"", protocol.WORKER, Command.READY.value, b"", protocol.packb({})],  # empty model
        [b"", protocol.WORKER, Command.REPLIES.value, b"\x05\x00\x00\x00", b"\x00alice", b"1"],  # too short
        [b"", protocol.WORKER, Command.REPLIES.value, b"\x04\x00", b"\x00alice", b"1", b"200", b"\x80"],
        [b"", protocol.WORKER, Command.REPLIES.value, b"\x04\x00\x00\x00", b"\x00alice", b"1", b"OK!", b"\x80"],
        [b"", protocol.WORKER, Command.REPLIES.value, b"\x03\x00\x00\x00", b"\x00alice", b"1", b"200"],
        [b"", protocol.WORKER, b"\x03", b"\x00alice", b"", b"1", b"200", protocol.packb({})],  # MDP's REPLY
        [b"", protocol.WORKER, Command.DISCONNECT.value, b"\xc1"],
    ],
)
def test_malformed_worker_message_is_dropped(clock, frames):
    state = make_state(clock, "m", expected=1)
    ready(state, W1, "m")
    infer(state, ALICE, "m", b"1")
    dispatched(state)
    state.worker_message(W1, frames)
    state.worker_message(W2, frames)
    assert state.outbox_clients == [] and state.outbox_workers == []
    assert set(state.workers) == {W1} and len(state.workers[W1].inflight) == 1
    reply(state, W1, ALICE, b"1")  # still served normally
    only_ok(state, ALICE, b"1")


def test_batch_command_from_worker_is_dropped(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m")
    batch = protocol.encode_batch([protocol.BatchItem(ALICE, b"1", None, [protocol.packb({})])])
    state.worker_message(W1, batch)
    assert state.outbox_clients == [] and state.outbox_workers == []
    assert W1 in state.workers


# --- worker states ----------------------------------------------------------------------------------------


def _worker() -> Worker:
    return Worker(identity=W1, model=b"m", version="1", max_rows=2, slots=2, pid=1, expiry=0.0)


def test_worker_state_legal_moves():
    worker = _worker()
    assert worker.state is WorkerState.READY and worker.usable
    worker.move(WorkerState.GONE)
    assert worker.state is WorkerState.GONE and not worker.usable


@pytest.mark.parametrize(
    "path",
    [
        [WorkerState.GONE, WorkerState.READY],
        [WorkerState.GONE, WorkerState.GONE],
        [WorkerState.READY],
    ],
)
def test_worker_state_illegal_moves_raise(path):
    worker = _worker()
    for state in path[:-1]:
        worker.move(state)
    before = worker.state
    with pytest.raises(IllegalTransition, match=f"{before.value} -> {path[-1].value}"):
        worker.move(path[-1])
    assert worker.state is before


def test_deadline_watch_memory_is_bounded_by_the_queue_not_by_rate_times_timeout(clock):
    """Entries of requests answered since are dropped from the deadline heap when tick() compacts it."""
    state = make_state(clock, "m", default_max_queue=10_000)
    ready(state, b"w", "m", capacity=4)
    for i in range(6000):  # dispatched immediately, answered, with a long timeout
        infer(state, b"c", "m", f"r{i}".encode(), timeout_ms=60_000)
        reply(state, b"w", b"c", f"r{i}".encode())
    state.tick()
    assert len(state._deadlines) == 0
    for i in range(6000):  # these wait in the queue first (capacity 4), then are served
        infer(state, b"c", "m", f"q{i}".encode(), timeout_ms=60_000)
    for i in range(6000):
        reply(state, b"w", b"c", f"q{i}".encode())
    assert state.models[b"m"].queued == 0
    state.tick()
    assert len(state._deadlines) == 0
    statuses = {r.status for _, r in client_out(state)}
    assert statuses == {protocol.OK}


# --- replies ---------------------------------------------------------------------------------


def test_replies_answer_every_item_and_the_last_returns_the_credit(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m", max_batch_size=3, prefetch=0)
    for i in range(4):
        infer(state, ALICE if i % 2 else BOB, "m", f"r{i}".encode(), float(i), dispatch=False)
    state.dispatch()
    assert [d[2] for d in dispatched(state)] == [b"r0", b"r1", b"r2"]  # r3 waits for the credit
    metas, frames = protocol.encode_tensors({"y": np.array([[7.0]], dtype=np.float32)})
    header = protocol.packb({**OUT_HEADER, "outputs": metas})
    items = [protocol.ReplyItem(BOB, b"r0", protocol.OK, [header, *frames]),
             protocol.ReplyItem(ALICE, b"r1", b"500", [protocol.error_header(ModelError("boom"))]),
             protocol.ReplyItem(BOB, b"unknown", protocol.OK, [header, *frames])]  # dropped, others delivered
    state.worker_message(W1, protocol.encode_replies(items))
    state.dispatch()
    out = client_out(state)
    assert [(who, rep.rid, rep.status) for who, rep in out] == [(BOB, b"r0", b"200"), (ALICE, b"r1", b"500")]
    assert protocol.decode_tensors(out[0][1].header["outputs"], out[0][1].tensors)["y"].tolist() == [[7.0]]
    assert type(protocol.reply_error(out[1][1])) is ModelError
    assert dispatched(state) == []  # r2 is still running: the batch holds the credit
    reply(state, W1, BOB, b"r2")
    assert [d[2] for d in dispatched(state)] == [b"r3"]
    entry = state.models[b"m"]
    assert (entry.served, entry.errors, len(state.workers[W1].inflight)) == (2, 1, 1)


def test_a_known_header_is_taken_from_the_cache_and_still_checked_per_request(clock):
    state = make_state(clock, "m", "n")
    ready(state, W1, "m", max_batch_size=8, prefetch=0)
    infer(state, ALICE, "m", b"r1", dispatch=False)
    assert len(state._headers) == 1
    infer(state, ALICE, "m", b"r2", dispatch=False)  # same header bytes: the cached decoding
    infer(state, ALICE, "m", b"r2", dispatch=False)  # a second copy of a pending id is still dropped
    infer(state, ALICE, "n", b"r3", dispatch=False)  # no replica of "n": still queued (none expected: 503)
    assert only_error(state, ALICE, b"r3", b"503", Unavailable)
    state.client_message(ALICE, protocol.encode_request("m", b"", {}, [b"x"])[:4] + [
        next(iter(state._headers)), b"\0\0\x80?"])  # cached header, empty request-id: not taken as known
    [(_, items)] = batches(state)
    assert [i.rid for i in items] == [b"r1", b"r2"] and state.duplicates == 1
    big = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1]}], "parameters": {"pad": "x" * 5000}}
    request(state, ALICE, "m", b"r4", big, [b"\0\0\x80?"])
    assert len(state._headers) == 1, "a large header is not cached"
