"""The "group" extension: many requests to one model in one message, answered in grouped replies.

Wire round trips and hostile groups (client.protocol), and the broker's handling of them
(broker.state.PoolState with a fake clock, no sockets): each request of a group is admitted, queued,
batched and answered on its own; replies to grouped requests come back grouped per client.
"""
from __future__ import annotations

import numpy as np
import pytest

from modelpool.client import protocol
from modelpool.client.errors import InvalidInput, ModelNotFound, Overloaded, ProtocolError

from test_state import ALICE, BOB, OUT_HEADER, W1, batches, clock, infer, make_state, ready  # noqa: F401 (clock: fixture)

X = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1]}]}


def _group(rids, header=None, per=1, model="m", values=None):
    header = X if header is None else header
    tensors = [[np.float32(values[i] if values else i).tobytes()] * per for i in range(len(rids))]
    return protocol.encode_request_group(model, protocol.packb(header), rids, tensors)


def _client_out(state):
    """(client, [Reply...]) per message queued to clients, plain or grouped; the outbox is cleared."""
    out = []
    for frames in state.outbox_clients:
        message = frames[1:]
        out.append((frames[0], protocol.parse_reply_group(message) if protocol.is_group(message)
                    else [protocol.parse_reply(message)]))
    state.outbox_clients.clear()
    return out


# --- wire -------------------------------------------------------------------------------------


def test_request_group_round_trip_keeps_each_requests_tensors():
    frames = _group([b"r1", b"r2", b"r3"], values=[1.5, 2.5, 3.5])
    assert protocol.is_group(frames)
    group = protocol.parse_request_group(frames)
    assert group.model == b"m" and group.rids == [b"r1", b"r2", b"r3"] and group.header == X
    assert [np.frombuffer(t[0], "<f4")[0] for t in group.tensors] == [1.5, 2.5, 3.5]


def test_reply_group_round_trip_with_statuses_and_tensors():
    ok = [protocol.packb(OUT_HEADER), b"\0\0\x80?"]
    bad = [protocol.error_header(InvalidInput, "wrong shape")]
    frames = [b"", *protocol.encode_reply_group(b"m", [(b"a", b"200", ok), (b"b", b"400", bad)])]
    assert protocol.is_group(frames)
    a, b = protocol.parse_reply_group(frames)
    assert (a.rid, a.status, a.header, a.tensors) == (b"a", b"200", OUT_HEADER, [ok[1]])
    assert (b.rid, b.status) == (b"b", b"400") and str(protocol.reply_error(b)) == "wrong shape"


@pytest.mark.parametrize("ids, why", [
    (protocol.packb([]), "1 to 1024"),
    (protocol.packb([b"r"] * 1025), "1 to 1024"),
    (protocol.packb({"a": 1}), "got a map"),
    (protocol.packb(["text"]), "binary request-ids"),
    (protocol.packb([b""]), "request-id must be 1 to 255"),
    (protocol.packb([b"x" * 256]), "request-id must be 1 to 255"),
    (protocol.packb([b"a", b"a"]), "unique"),
    (b"\xc1", "not valid msgpack"),
    (b"\xdd\xff\xff\xff\xff", "not valid msgpack"),  # an array that declares 4G entries
])
def test_hostile_group_ids_are_refused_with_a_reason(ids, why):
    frames = _group([b"a"])
    frames[5] = ids
    with pytest.raises(ProtocolError, match=why):
        protocol.parse_request_group(frames)


def test_group_tensor_count_must_match_ids_times_inputs():
    frames = _group([b"a", b"b"])
    with pytest.raises(ProtocolError, match="needs 2 tensor frames, got 1"):
        protocol.parse_request_group(frames[:-1])
    with pytest.raises(ProtocolError, match="with 0 inputs"):
        protocol.parse_request_group(_group([b"a"], header={"inputs": "x"}))


@pytest.mark.parametrize("index", [[], [[b"a", 200]], [[b"a", 99, 1]], [[b"a", 200, 0]], [["a", 200, 1]],
                                   [[b"a", 200, 5]], [[b"a", True, 1]]])
def test_hostile_reply_group_index_is_refused(index):
    frames = [b"", protocol.CLIENT, b"m", b"", protocol.packb(index), protocol.packb(OUT_HEADER)]
    with pytest.raises(ProtocolError):
        protocol.parse_reply_group(frames)


# --- broker ------------------------------------------------------------------------------------


def test_a_group_is_queued_request_by_request_and_answered_grouped_per_client(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m", max_batch_size=8, prefetch=0)
    state.client_message(ALICE, _group([b"a1", b"a2", b"a3"], values=[1, 2, 3]))
    infer(state, BOB, "m", b"b1", dispatch=False)
    state.dispatch()
    [(worker, items)] = batches(state)
    assert [(i.client, i.rid) for i in items] == [(ALICE, b"a1"), (ALICE, b"a2"), (ALICE, b"a3"), (BOB, b"b1")]
    assert [np.frombuffer(i.body[1], "<f4")[0] for i in items[:3]] == [1, 2, 3]
    assert protocol.unpack_header(items[0].body[0]) == X
    body = [protocol.packb(OUT_HEADER), b"\0\0\x80?"]
    replies = [protocol.ReplyItem(i.client, i.rid, protocol.OK, body) for i in items]
    state.worker_message(W1, protocol.encode_replies(replies))
    out = _client_out(state)
    assert sorted((who, [r.rid for r in rs]) for who, rs in out) == [(ALICE, [b"a1", b"a2", b"a3"]), (BOB, [b"b1"])]
    assert all(r.status == protocol.OK and r.tensors == [body[1]] for _, rs in out for r in rs)
    assert state.models[b"m"].served == 4 and not state.held


def test_each_request_of_a_group_is_admitted_on_its_own_past_the_queue_limit(clock):
    state = make_state(clock, "m")
    state.models[b"m"].max_queue = 2
    state.models[b"m"].expected = 1  # a replica is starting: requests wait
    state.client_message(ALICE, _group([b"a", b"b", b"c"]))
    [(who, [rep])] = _client_out(state)
    assert rep.rid == b"c" and rep.status == b"429" and isinstance(protocol.reply_error(rep), Overloaded)
    assert state.models[b"m"].queued == 2


def test_a_group_for_an_unknown_model_or_with_bad_options_answers_every_request(clock):
    state = make_state(clock, "m")
    state.client_message(ALICE, _group([b"a", b"b"], model="nope"))
    out = _client_out(state)
    assert [(r.rid, r.status) for _, [r] in out] == [(b"a", b"404"), (b"b", b"404")]
    assert isinstance(protocol.reply_error(out[0][1][0]), ModelNotFound)
    state.client_message(ALICE, _group([b"c"], header={**X, "timeout_ms": "soon"}))
    [(_, [rep])] = _client_out(state)
    assert rep.status == b"400" and "timeout_ms" in str(protocol.reply_error(rep))
    state.client_message(ALICE, _group([b"d"], header={**X, "op": "metadata"}))
    [(_, [rep])] = _client_out(state)
    assert rep.status == b"400" and "inference requests only" in str(protocol.reply_error(rep))


def test_a_malformed_group_is_answered_per_id_when_the_ids_can_be_read_else_dropped(clock):
    state = make_state(clock, "m")
    frames = _group([b"a", b"b"])
    state.client_message(ALICE, frames[:-1])  # one tensor frame short
    out = _client_out(state)
    assert [(r.rid, r.status) for _, [r] in out] == [(b"a", b"400"), (b"b", b"400")]
    assert "needs 2 tensor frames" in str(protocol.reply_error(out[0][1][0]))
    frames[5] = b"\xc1"
    state.client_message(ALICE, frames)
    assert _client_out(state) == [] and not state.held


def test_a_second_copy_of_a_grouped_request_is_dropped(clock):
    state = make_state(clock, "m")
    state.models[b"m"].expected = 1
    state.client_message(ALICE, _group([b"a", b"b"]))
    state.client_message(ALICE, _group([b"b", b"c"]))
    assert state.models[b"m"].queued == 3 and state.duplicates == 1


def test_health_lists_the_group_extension(clock):
    assert "group" in make_state(clock, "m").health()["extensions"]


def test_broker_errors_for_grouped_requests_are_plain_replies(clock):
    state = make_state(clock, "m")
    state.models[b"m"].expected = 1
    state.client_message(ALICE, _group([b"a"], header={**X, "timeout_ms": 10}))
    clock.advance(1.0)
    state.tick()
    [(who, [rep])] = _client_out(state)
    assert rep.rid == b"a" and rep.status == b"504"
