"""Hostile and unlucky input (issue 10): one message from any peer never takes the broker down.

PoolState driven by hand with a fake clock, as in test_state.py; the socket-level fuzz test with a
real broker process is tests/integration/test_fuzz.py.
"""
from __future__ import annotations

import logging

import msgpack
import numpy as np
import pytest

from modelpool.client import protocol
from modelpool.client.errors import InvalidInput, Overloaded, ProtocolError, RequestTimeout, Unavailable
from test_state import ALICE, W1, Clock, client_out, dispatched, infer, make_state, only_error, ready, reply, worker_out

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

    def boom(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(state, "_route", boom)
    monkeypatch.setattr(state, "_worker_reply", boom)
    with caplog.at_level(logging.ERROR):
        infer(state, ALICE, "m", b"r1")
        reply(state, W1, ALICE, b"r0")
    assert "could not handle" in only_error(state, ALICE, b"r1", b"400", InvalidInput)
    assert sum("internal error" in r.message for r in caplog.records) == 2
    monkeypatch.undo()
    infer(state, ALICE, "m", b"r2")
    assert b"r2" in [d[2] for d in dispatched(state)]


def test_a_bug_in_dispatch_is_logged_and_the_requests_wait_for_the_next_one(clock, monkeypatch, caplog):
    state = make_state(clock, "m", expected=1)
    ready(state, W1, "m", capacity=4)
    monkeypatch.setattr(state, "_dispatch", lambda entry: 1 / 0)
    with caplog.at_level(logging.ERROR):
        infer(state, ALICE, "m", b"r1")
    assert any("internal error dispatching" in r.getMessage() for r in caplog.records)
    assert state.outbox_clients == [] and state.models[b"m"].queued == 1
    monkeypatch.undo()
    infer(state, ALICE, "m", b"r2")
    assert [d[2] for d in dispatched(state)] == [b"r1", b"r2"]


def test_error_messages_carry_no_python_reprs(clock):
    state = make_state(clock, "m", expected=1)
    ready(state, W1, "m")
    metas = [{"name": "x\n", "datatype": b"FP32", "shape": [1]}]
    state.client_message(ALICE, protocol.encode_request("m", b"r1", {"inputs": metas}, [np.zeros(1, "f4").tobytes()]))
    # the broker checks the tensor list it batches on, with the same codec as the worker
    message = only_error(state, ALICE, b"r1", b"400", ProtocolError)
    assert "b'" not in message and "'" not in message and "\n" not in message
    with pytest.raises(ProtocolError) as info:
        protocol.decode_tensors(metas, [b"\0" * 4])
    assert str(info.value) == message
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


# --- memory: bytes held by the broker are bounded -------------------------------------------------


def _big(state, client, rid, nbytes, **header):
    meta = [{"name": "x", "datatype": "UINT8", "shape": [nbytes]}]
    state.client_message(client, protocol.encode_request("m", rid, {"inputs": meta, **header}, [bytes(nbytes)]))


def test_model_queue_bytes_bound_answers_429_and_answered_requests_release_their_bytes(clock):
    state = make_state(clock)
    state.add_model("m", expected=1, max_queue_bytes=10_000)
    _big(state, ALICE, b"r1", 6000)
    _big(state, ALICE, b"r2", 6000)
    message = only_error(state, ALICE, b"r2", b"429", Overloaded)
    assert "max_queue_bytes (10000)" in message
    entry = state.models[b"m"]
    assert 6000 < entry.held_bytes < 6200 and state.held_bytes == entry.held_bytes
    ready(state, W1, "m")
    assert dispatched(state)[0][2] == b"r1"
    assert entry.held_bytes > 6000  # in flight: kept for a retry
    reply(state, W1, ALICE, b"r1")
    client_out(state)
    assert entry.held_bytes == 0 and state.held_bytes == 0
    _big(state, ALICE, b"r3", 6000)
    assert [d[2] for d in dispatched(state)] == [b"r3"]


def test_total_bytes_bound_answers_503_and_expired_requests_release_their_bytes(clock):
    state = make_state(clock, max_held_bytes=10_000)
    state.add_model("m", expected=1)
    state.add_model("n", expected=1)
    _big(state, ALICE, b"r1", 6000, timeout_ms=100)
    state.client_message(ALICE, protocol.encode_request(
        "n", b"r2", {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [6000]}]}, [bytes(6000)]))
    assert "max_queued_bytes (10000)" in only_error(state, ALICE, b"r2", b"503", Unavailable)
    clock.advance(0.2)
    state.tick()
    only_error(state, ALICE, b"r1", b"504", RequestTimeout)
    assert state.held_bytes == 0
    summary = state.models[b"m"].summary()
    assert summary["queue_bytes"] == 0 and summary["max_queue_bytes"] > 0


def test_socket_hwm_is_sized_from_the_byte_bound(tmp_path):
    from modelpool.broker.config import ModelConfig, PoolConfig
    from modelpool.broker.server import socket_hwm

    (tmp_path / "m.keras").write_bytes(b"")
    model = ModelConfig(name="m", path=str(tmp_path / "m.keras"))
    assert socket_hwm(PoolConfig(models=(model,))) == 1000  # was 100,000 messages of up to 64 MiB
    small = PoolConfig(models=(model,), max_message_bytes=1024, max_queued_bytes=10 * 1024 * 1024)
    assert socket_hwm(small) == 10240


def test_queued_bytes_smaller_than_one_message_is_a_config_error(tmp_path):
    from modelpool.broker.config import ConfigError, ModelConfig, PoolConfig

    (tmp_path / "m.keras").write_bytes(b"")
    model = ModelConfig(name="m", path=str(tmp_path / "m.keras"))
    with pytest.raises(ConfigError, match="max_queued_bytes"):
        PoolConfig(models=(model,), max_queued_bytes=1 << 20)
    small = ModelConfig(name="m", path=str(tmp_path / "m.keras"), max_queue_bytes=1 << 20)
    with pytest.raises(ConfigError, match="max_queue_bytes"):
        PoolConfig(models=(small,))


def test_trimmer_gives_memory_back_after_a_burst_and_once_more_when_it_ends():
    from modelpool.broker.server import _Trimmer

    calls = []
    trimmer = _Trimmer()
    trimmer.trim = calls.append
    trimmer.note(100, 0, 0.0)
    assert calls == []
    trimmer.note(30_000, 0, 1.0)
    assert calls == [0]
    trimmer.note(50, 0, 1.5)  # rate-limited
    trimmer.note(0, 0, 2.1)  # the burst is over: one more for what the tail freed
    assert calls == [0, 0]
    trimmer.note(0, 0, 5.0)
    assert calls == [0, 0]
    trimmer.note(0, 100 << 20, 6.0)
    trimmer.note(0, 0, 7.0)  # 100 MiB of payload let go of
    assert len(calls) == 3


# --- a worker peer is not trusted with everything --------------------------------------------------


def test_registrations_for_unknown_models_do_not_pile_up_or_make_health_false(clock):
    state = make_state(clock, "m", expected=1)
    ready(state, W1, "m")
    for i in range(1000):
        ready(state, b"x%d" % i, f"junk{i}")
    assert list(state.models) == [b"m"] and list(state.workers) == [W1]
    assert state.health()["ready"] is True
    # a registration for a served model that then goes silent is dropped at its heartbeat expiry
    ready(state, b"silent", "m")
    clock.advance(4.0)
    reply(state, W1, ALICE, b"none")  # W1 keeps talking
    state.tick()
    assert list(state.workers) == [W1] and state.health()["ready"] is True


def test_advertised_batch_size_and_prefetch_are_bounded(clock):
    from modelpool.broker.state import MAX_BATCH_ROWS, MAX_PREFETCH

    state = make_state(clock, "m", expected=1)
    ready(state, W1, "m", max_batch_size=10 ** 12, prefetch=10 ** 12)
    assert (state.workers[W1].max_rows, state.workers[W1].slots) == (MAX_BATCH_ROWS, 1 + MAX_PREFETCH)
    ready(state, W1, "m", max_batch_size=True, prefetch=-5)
    assert (state.workers[W1].max_rows, state.workers[W1].slots) == (1, 1)


def test_a_tcp_backend_needs_the_insecure_opt_in_even_on_loopback(tmp_path):
    from modelpool.broker.config import ConfigError, ModelConfig, PoolConfig

    (tmp_path / "m.keras").write_bytes(b"")
    model = ModelConfig(name="m", path=str(tmp_path / "m.keras"))
    with pytest.raises(ConfigError, match="backend.*insecure_network"):
        PoolConfig(models=(model,), backend="tcp://127.0.0.1:5556")
    assert PoolConfig(models=(model,), backend="tcp://127.0.0.1:5556", insecure_network=True).backend
    assert PoolConfig(models=(model,), backend=f"ipc://{tmp_path}/b.ipc").backend


# --- a broker pause is not a crash; a poison request takes no innocent one with it ----------------


def test_re_registration_of_the_same_process_requeues_without_counting_a_crash(clock):
    state = make_state(clock, "m", expected=1)
    ready(state, W1, "m", capacity=2)
    infer(state, ALICE, "m", b"1")
    infer(state, ALICE, "m", b"2")
    assert len(dispatched(state)) == 2
    for _ in range(3):  # the broker was stopped 10 s: the worker registered again every 3 s
        ready(state, W1, "m", capacity=2)
        assert sorted(dispatched(state)) == [(W1, ALICE, b"1"), (W1, ALICE, b"2")]
    assert state.outbox_clients == []
    entry = state.models[b"m"]
    assert entry.retried == 0 and entry.crashed == 0 and entry.errors == 0
    reply(state, W1, ALICE, b"1")
    reply(state, W1, ALICE, b"2")
    assert [rep.status for _, rep in client_out(state)] == [b"200", b"200"]


def _run(state, worker, rids):
    for client, rid in rids:
        reply(state, worker, client, rid)


def test_a_poison_request_is_quarantined_and_innocents_on_the_same_workers_are_answered(clock):
    from test_state import BOB, W2

    state = make_state(clock, "m", expected=2)
    ready(state, W1, "m", capacity=4)
    ready(state, W2, "m", capacity=4)
    infer(state, ALICE, "m", b"poison")
    for i in range(3):
        infer(state, BOB, "m", b"a%d" % i)
    first = dispatched(state)
    on_w1 = [(c, r) for w, c, r in first if w == W1]
    on_w2 = [(c, r) for w, c, r in first if w == W2]
    assert (ALICE, b"poison") in on_w1
    state.worker_lost(W1, "worker process killed by SIGSEGV")  # the poison crashed W1
    assert state.outbox_clients == []
    # W2 is the last live replica and requests wait for it: no suspect goes there
    infer(state, BOB, "m", b"late")
    assert dispatched(state) == [(W2, BOB, b"late")]
    _run(state, W2, on_w2 + [(BOB, b"late")])
    assert all(rep.status == b"200" for _, rep in client_out(state))
    ready(state, b"w1b", "m", capacity=4)  # the restarted replica
    crashed_again = False
    answered = {}
    for _ in range(10):  # suspects run one at a time, each alone on an idle worker
        sent = dispatched(state)
        by_worker = {}
        for w, c, r in sent:
            by_worker.setdefault(w, []).append((c, r))
        assert all(len(v) == 1 for v in by_worker.values())
        for w, [(c, r)] in by_worker.items():
            if r == b"poison":
                state.worker_lost(w, "worker process killed by SIGSEGV")
                crashed_again = True
            else:
                reply(state, w, c, r)
        for who, rep in client_out(state):
            answered[rep.rid] = rep.status
        if len(answered) == len(on_w1):
            break
    assert crashed_again
    assert answered.pop(b"poison") == b"500"
    assert set(answered.values()) == {b"200"}
    entry = state.models[b"m"]
    assert entry.crashed == 1 and state.held_bytes == 0


# --- logs can be neither flooded nor forged --------------------------------------------------------


def test_a_flood_of_malformed_messages_logs_a_few_lines_and_a_count(clock, caplog):
    state = make_state(clock, "m", expected=1)
    with caplog.at_level(logging.INFO, logger="modelpool.broker.state"):
        for i in range(10_000):
            state.client_message(ALICE, [b"", protocol.CLIENT, b"m", b"r%d" % i, b"\xc1"])
            state.worker_message(b"w%d" % i, [b"", b"junk"])
        clock.advance(11.0)
        state.tick()
    client_out(state)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) <= 12, lines
    assert "malformed client messages: 9995 more not logged in the last 10s" in lines
    assert "malformed worker messages: 9995 more not logged in the last 10s" in lines


def test_peer_text_in_logs_is_escaped_so_no_line_can_be_forged(clock, caplog):
    state = make_state(clock, "m", expected=1)
    forged = "x\n2026-01-01 00:00:00 INFO broker.state: all good"
    with caplog.at_level(logging.INFO, logger="modelpool.broker.state"):
        ready(state, b"evil\nid", forged)
        state.worker_message(W1, protocol.encode_disconnect({"model": "m", "error": "boom\nINFO forged"}))
        state.client_message(ALICE, [b"", protocol.CLIENT, b"m\nINFO forged", b"r1", b"\xc1"])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert all("\n" not in m and "\r" not in m for m in messages), messages
    assert '"x\\n2026-01-01' in messages[0] and '"evil\\nid"' in messages[0]


def test_log_limiter_allows_a_burst_per_key_then_counts():
    from modelpool.broker.logutil import LogLimiter

    lines = []

    class Sink:
        def isEnabledFor(self, level):
            return True

        def log(self, level, msg, *args, exc_info=False):
            lines.append(msg % args)

    clock = Clock(0.0)
    limiter = LogLimiter(Sink(), interval=10.0, burst=2, now=clock)
    for i in range(5):
        limiter.warning("a", "a %d", i)
    limiter.warning("b", "b")
    assert lines == ["a 0", "a 1", "b"]
    clock.advance(10.0)
    limiter.warning("a", "a again")
    assert lines[3:] == ["a: 3 more not logged in the last 10s", "a again"]


# --- operational detail is for operators -------------------------------------------------------------


@pytest.mark.parametrize("allowed, asked, shown", [(False, False, False), (False, True, False),
                                                    (True, False, False), (True, True, True)])
def test_mmi_models_gives_worker_ids_and_pids_only_when_the_config_allows_and_the_request_asks(
        clock, allowed, asked, shown):
    from test_state import BOB, request

    state = make_state(clock, "m", expected=1, mmi_detail=allowed)
    ready(state, W1, "m")
    request(state, BOB, "mmi.models", b"q", {"detail": True} if asked else {})
    [(_, rep)] = client_out(state)
    [worker] = rep.header["models"][0]["workers"]
    assert ("pid" in worker and "id" in worker) is shown
    assert worker["state"] == "ready" and worker["max_batch_size"] == 1


# --- a model's error reaches the client short, without the server's traceback ---------------------


def test_model_error_text_for_clients_has_no_traceback_or_paths():
    from modelpool.modelproc.worker import short_error

    class InvalidArgumentError(Exception):
        pass

    # as TensorFlow 2.x words a Python error raised inside tf.numpy_function
    tf_like = InvalidArgumentError(
        'Graph execution error:\n\nDetected at node PyFunc defined at (most recent call last):\n  File "<string>", '
        'line 8, in <module>\n\n  File "<string>", line 7, in f\n\nValueError: this model refuses rows starting with '
        '-555\nTraceback (most recent call last):\n\n  File "/srv/venv/lib/python3.11/site-packages/tensorflow/python/'
        'ops/script_ops.py", line 269, in __call__\n    ret = func(*args)\n          ^^^^^^^^^^^\n\n  File "<string>", '
        'line 5, in chk\n\nValueError: this model refuses rows starting with -555\n\n\n\t [[{{node PyFunc}}]] '
        '[Op:__inference_f_8]')
    text = short_error(tf_like)
    assert text == ("InvalidArgumentError: Graph execution error: ValueError: this model refuses rows starting "
                    "with -555 (details in the worker log)")
    assert short_error(ValueError("cannot read /home/me/models/x.keras: bad zip")) == \
        "ValueError: cannot read <path>: bad zip"
    assert short_error(RuntimeError()) == "RuntimeError"
    assert len(short_error(ValueError("x" * 5000))) < 260


# --- a SIGKILLed launcher's private ipc directory is removed by the next one -----------------------


def test_stale_ipc_directories_of_dead_launchers_are_removed_and_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    from modelpool.broker.server import remove_stale_dirs

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / "modelpool-dead"
    dead.mkdir()
    (dead / "launcher.pid").write_text(f"{gone.pid} 1\n")
    (dead / "backend.ipc").write_bytes(b"")
    live = tmp_path / "modelpool-live"
    live.mkdir()
    (live / "launcher.pid").write_text(f"{os.getppid()}\n")
    reused = tmp_path / "modelpool-reused"  # the pid lives, but it is another process now
    reused.mkdir()
    (reused / "launcher.pid").write_text(f"{os.getppid()} 1\n")
    unknown = tmp_path / "modelpool-unknown"  # no record: not ours to judge
    unknown.mkdir()
    other = tmp_path / "other-dir"
    other.mkdir()
    (other / "launcher.pid").write_text(f"{gone.pid}\n")
    removed = remove_stale_dirs(str(tmp_path))
    assert sorted(removed) == sorted([str(dead), str(reused)])
    assert live.exists() and unknown.exists() and other.exists() and not dead.exists()


def test_the_broker_records_its_pid_in_its_private_directory(tmp_path):
    import os

    from modelpool.broker.config import ModelConfig, PoolConfig
    from modelpool.broker.server import Broker

    (tmp_path / "m.keras").write_bytes(b"")
    config = PoolConfig(models=(ModelConfig(name="m", path=str(tmp_path / "m.keras")),),
                        frontend=f"ipc://{tmp_path}/front.ipc")
    broker = Broker(config, supervise=False)
    try:
        record = open(os.path.join(broker._tmpdir, "launcher.pid")).read().split()
        assert int(record[0]) == os.getpid() and record[1].isdigit()
    finally:
        broker.close()
    assert not os.path.exists(broker._tmpdir)


def test_registrations_per_model_are_capped(clock):
    from modelpool.broker.state import MAX_WORKERS_PER_MODEL

    state = make_state(clock, "m", expected=1)
    for i in range(MAX_WORKERS_PER_MODEL + 10):
        ready(state, b"w%d" % i, "m")
    assert len(state.workers) == MAX_WORKERS_PER_MODEL
    refused = [m for _, m in worker_out(state) if m.command is protocol.Command.DISCONNECT]
    assert len(refused) == 10 and "registered already" in refused[0].fields[0]["error"]


@pytest.mark.parametrize("stats", [
    b"\xc1",  # not msgpack
    protocol.packb({"calls": [[1, 10]] * 65537}),  # past the 65,536-entry bound
    protocol.packb({"calls": [[1, 1 << 45]]}),  # 1,100 years of compute
    protocol.packb({"calls": [[0, 10]]}),  # a call of no rows
    protocol.packb({"rss_bytes": -1}),
    b"\xdd\xff\xff\xff\xff",  # declares an array of 4 G entries
])
def test_a_malformed_stats_frame_drops_that_replies_and_counts_nothing(clock, caplog, stats):
    state = make_state(clock, "m", expected=1)
    ready(state, W1, "m")
    infer(state, ALICE, "m", b"1")
    assert dispatched(state) == [(W1, ALICE, b"1")]
    body = [protocol.packb({"outputs": []})]
    frames = protocol.encode_replies([protocol.ReplyItem(ALICE, b"1", protocol.OK, body)])
    with caplog.at_level(logging.WARNING):
        state.worker_message(W1, [*frames, stats])
    assert client_out(state) == [] and "dropped malformed worker message" in caplog.text
    entry = state.models[b"m"]
    assert entry.metrics.compute.count == 0 and entry.memory_bytes is None and entry.in_flight == 1
    reply(state, W1, ALICE, b"1")  # the same answer, well formed, is taken
    assert [rep.status for _, rep in client_out(state)] == [protocol.OK] and entry.served == 1
