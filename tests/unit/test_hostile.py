"""Hostile and unlucky input (issue 10): one message from any peer never takes the broker down.

PoolState driven by hand with a fake clock, as in test_state.py; the socket-level fuzz test with a
real broker process is tests/integration/test_fuzz.py.
"""
from __future__ import annotations

import logging

import msgpack
import numpy as np
import pytest

from client import protocol
from client.errors import InvalidInput, ProtocolError
from test_state import ALICE, W1, Clock, client_out, dispatched, infer, make_state, only_error, ready, reply

pytestmark = pytest.mark.timeout(30)

DEEP = b"\x91" * 1000 + b"\x00"  # [[[...[0]...]]] 1000 levels: 1 KB that msgpack's C unpacker accepts


def _map_with(key: str, raw_value: bytes) -> bytes:
    return b"\x81" + protocol.packb(key) + raw_value


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_unpack_header_refuses_deep_nesting_without_recursion():
    with pytest.raises(ProtocolError, match="nests deeper than 32"):
        protocol.unpack_header(_map_with("timeout_ms", DEEP))
    with pytest.raises(ProtocolError, match="nests deeper than 32"):  # past msgpack's own 1024-level stack
        protocol.unpack_header(_map_with("x", b"\x91" * 5000 + b"\x00"))
    ok = protocol.unpack_header(_map_with("x", b"\x91" * 30 + b"\x00"))
    assert "x" in ok


@pytest.mark.parametrize("raw", [
    b"\xdd\xff\xff\xff\xff",  # array of 4 G items
    b"\xdf\xff\xff\xff\xff",  # map of 4 G pairs
    b"\xdb\xff\xff\xff\xff",  # string of 4 GB
    b"\xc6\xff\xff\xff\xff",  # binary of 4 GB
    b"\xc9\x00\x00\x00\x10\x05" + b"\x00" * 16,  # ext type: never part of a header
])
def test_unpack_header_refuses_huge_declared_lengths_and_ext_types(raw):
    with pytest.raises(ProtocolError):
        protocol.unpack_header(_map_with("x", raw))


def test_quote_is_language_neutral_and_forges_no_log_lines():
    assert protocol.quote(b"ab\ncd") == '"ab\\ncd"'
    assert protocol.quote("x" * 100, 8) == '"xxxxxxxx"...'
    assert protocol.quote(b"\xff\x00") == '"\\ufffd\\u0000"'
    assert protocol.quote([[[]]]) == "an array"
    assert protocol.describe(12.5) == "12.5" and protocol.describe({"a": 1}) == "a map"


def test_deeply_nested_timeout_ms_is_answered_400_and_the_broker_carries_on(clock):
    state = make_state(clock, "m", expected=1)
    ready(state, W1, "m")
    state.client_message(ALICE, [b"", protocol.CLIENT, b"m", b"r1", _map_with("timeout_ms", b"\x91" * 30 + b"\x00")])
    message = only_error(state, ALICE, b"r1", b"400", InvalidInput)
    assert "timeout_ms" in message and "got an array" in message
    state.client_message(ALICE, [b"", protocol.CLIENT, b"m", b"r2", _map_with("timeout_ms", DEEP)])
    assert "nests deeper" in only_error(state, ALICE, b"r2", b"400", ProtocolError)
    infer(state, ALICE, "m", b"r3")
    assert [d[2] for d in dispatched(state)] == [b"r3"]


def test_deeply_nested_mmi_service_name_is_400(clock):
    state = make_state(clock, "m")
    state.client_message(ALICE, [b"", protocol.CLIENT, b"mmi.service", b"r1", _map_with("name", DEEP)])
    only_error(state, ALICE, b"r1", b"400", ProtocolError)
    header = protocol.packb({"name": [[1]]})
    state.client_message(ALICE, [b"", protocol.CLIENT, b"mmi.service", b"r2", header])
    assert "name must be a string, got an array" in only_error(state, ALICE, b"r2", b"400", InvalidInput)


def test_ready_with_a_deeply_nested_version_is_dropped_and_a_good_one_still_registers(clock):
    state = make_state(clock, "m", expected=1)
    info = b"\x82" + protocol.packb("capacity") + protocol.packb(1) + protocol.packb("version") + DEEP
    state.worker_message(W1, [b"", protocol.WORKER, protocol.Command.READY.value, b"m", info])
    assert W1 not in state.workers
    state.worker_message(W1, protocol.encode_ready("m", {"version": [[["x"]]], "capacity": 1}))
    assert state.workers[W1].version == ""
    infer(state, ALICE, "m", b"r1")
    assert dispatched(state)[0][2] == b"r1"


def test_no_exception_from_one_message_escapes_and_the_client_gets_400(clock, monkeypatch, caplog):
    state = make_state(clock, "m", expected=1)
    ready(state, W1, "m", capacity=4)

    def boom(entry):
        raise RuntimeError("a bug")

    monkeypatch.setattr(state, "_dispatch", boom)
    with caplog.at_level(logging.ERROR):
        infer(state, ALICE, "m", b"r1")
        reply(state, W1, ALICE, b"r0")
    assert "could not handle" in only_error(state, ALICE, b"r1", b"400", InvalidInput)
    assert sum("internal error" in r.message for r in caplog.records) == 2
    monkeypatch.undo()
    infer(state, ALICE, "m", b"r2")
    assert b"r2" in [d[2] for d in dispatched(state)]


def test_error_messages_carry_no_python_reprs(clock):
    state = make_state(clock, "m", expected=1)
    ready(state, W1, "m")
    metas = [{"name": "x\n", "datatype": b"FP32", "shape": [1]}]
    state.client_message(ALICE, protocol.encode_request("m", b"r1", {"inputs": metas}, [np.zeros(1, "f4").tobytes()]))
    # the broker forwards the body untouched; the worker checks tensors, with the same codec
    with pytest.raises(ProtocolError) as info:
        protocol.decode_tensors(metas, [b"\0" * 4])
    assert "b'" not in str(info.value) and "'" not in str(info.value) and "\n" not in str(info.value)
    state.client_message(ALICE, [b"", b"MDPC\n1", b"m", b"r2", protocol.packb({})])
    message = only_error(state, ALICE, b"r2", b"400", ProtocolError)
    assert "b'" not in message and '"MDPC\\n1"' in message
    client_out(state)


def test_huge_msgpack_declared_length_in_a_request_is_400(clock):
    state = make_state(clock, "m", expected=1)
    header = b"\x81" + protocol.packb("inputs") + b"\xdd\xff\xff\xff\xff"
    state.client_message(ALICE, [b"", protocol.CLIENT, b"m", b"r1", header])
    only_error(state, ALICE, b"r1", b"400", ProtocolError)
    assert msgpack.version >= (1, 0, 0)
