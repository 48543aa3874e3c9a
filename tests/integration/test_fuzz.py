"""Seeded fuzzing of the broker from both sides (issue 10), without TensorFlow.

A real broker loop runs in a subprocess (tests/integration/fakepool.py) with an echo worker. A few
thousand mutated messages go to the client and the worker sockets: every frame position replaced by
garbage, msgpack nested 1000 deep, huge declared lengths, oversized frames, frames added and removed.
Afterwards the broker must be alive, answer a valid request correctly, and its RSS stay bounded.
"""
from __future__ import annotations

import random
import time

import numpy as np
import pytest
import zmq

from modelpool.client import protocol
from fakepool import EchoWorker, FakePool
from poolutil import wait_until

pytestmark = pytest.mark.timeout(90)

SEED = 20261123
CLIENT_MESSAGES = 3000
WORKER_MESSAGES = 1500
MAX_MESSAGE = 1 << 20
RSS_GROWTH_LIMIT = 64 << 20  # what the broker may still hold after the fuzz, over its start
LOG_LIMIT = 64 << 10  # bytes of broker log for the whole fuzz (it was 320 KB before rate limiting)


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\x00"


def _garbage(rng: random.Random) -> bytes:
    """One hostile frame."""
    kind = rng.randrange(12)
    if kind == 0:
        return _nested(rng.choice([33, 1000, 1023, 1024, 5000]))
    if kind == 1:
        return b"\x81\xaatimeout_ms" + _nested(1000)
    if kind == 2:  # mmi.service's name, a READY's version, a DISCONNECT's error, nested 1000 deep
        return rng.choice([b"\x81\xa4name", b"\x81\xa7version", b"\x82\xa5model\xa1m\xa5error"]) + _nested(1000)
    if kind == 3:  # huge declared lengths: array, map, str, bin, ext
        return rng.choice([b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xc9"]) + b"\xff\xff\xff\xff" + rng.randbytes(8)
    if kind == 4:
        return b""
    if kind == 5:
        return rng.randbytes(rng.choice([256, 300, 4096]))
    if kind == 6:
        return rng.randbytes(rng.randint(1, 64))
    if kind == 7:
        return protocol.packb(rng.choice([None, 7, -1, 1e308, float("nan"), "x\ny", [1, [2]], {"timeout_ms": "soon"},
                                          {"inputs": "x"}, {"inputs": [{"name": [], "datatype": 1, "shape": "?"}]},
                                          {"max_batch_size": 10 ** 9, "prefetch": -1, "version": {"a": [1]}, "pid": "me"},
                                          {"model": "m", "error": [[1]]}, {"name": {"x": 1}}]))
    if kind == 8:
        return rng.choice([b"MDPC01", b"MDPW01", b"m", b"mmi.service", b"mmi.models", b"mmi.health", b"mmi.x"])
    if kind == 9:
        return bytes([rng.randrange(1, 9)])
    if kind == 10:
        return rng.choice([b"\x04\x00\x00\x00" * rng.randint(1, 4),  # a REPLIES sizes frame
                           protocol.packb({"items": [[3, None]] * rng.randint(1, 4)})])  # a BATCH index
    return rng.randbytes(rng.choice([MAX_MESSAGE // 2, MAX_MESSAGE + 1]))  # near and past max_message_bytes


def _mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(5)
        pos = rng.randrange(len(frames) + 1)
        if op <= 1 and frames:
            frames[min(pos, len(frames) - 1)] = _garbage(rng)
        elif op == 2 and len(frames) > 1:
            del frames[min(pos, len(frames) - 1)]
        elif op == 3:
            frames.insert(pos, _garbage(rng))
        else:
            frames = frames[:pos] or [b""]
    return frames


def _client_templates() -> list[list[bytes]]:
    metas, tensors = protocol.encode_tensors({"x": np.ones((1, 2), "float32")})
    return [
        protocol.encode_request("m", b"r", {"inputs": metas, "timeout_ms": 5000}, [bytes(t) for t in tensors]),
        protocol.encode_request("mmi.service", b"r", {"name": "m"}),
        protocol.encode_request("mmi.models", b"r", {}),
        protocol.encode_request("m", b"r", {"op": "metadata"}),
    ]


def _worker_templates() -> list[list[bytes]]:
    header = protocol.packb({"outputs": []})
    return [
        protocol.encode_ready("m", {"version": "1", "max_batch_size": 2, "pid": 1}),
        protocol.encode_ready("unknown-model", {"version": "1", "max_batch_size": 2}),
        protocol.encode_replies([protocol.ReplyItem(b"\x00client", b"r", protocol.OK, [header])]),
        protocol.encode_replies([protocol.ReplyItem(b"\x00c", b"r1", protocol.OK, [header]),
                                 protocol.ReplyItem(b"\x00c", b"r2", b"500", [header])]),
        protocol.encode_heartbeat(),
        protocol.encode_disconnect({"model": "m", "error": "boom"}),
        protocol.encode_batch([protocol.BatchItem(b"\x00c", b"r", None, [header])]),
    ]


def _drain(sock: zmq.Socket) -> None:
    while sock.poll(0):
        sock.recv_multipart()


def _health(endpoint: str) -> dict:
    with zmq.Context.instance().socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send_multipart(protocol.encode_request("mmi.health", b"h", {}))
        assert sock.poll(5000)
        return protocol.parse_reply(sock.recv_multipart()).header


def _valid_request(endpoint: str) -> protocol.Reply:
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        x = np.arange(6, dtype="float32").reshape(2, 3)
        metas, frames = protocol.encode_tensors({"x": x})
        sock.send_multipart(protocol.encode_request("m", b"check", {"inputs": metas}, frames))
        assert sock.poll(10_000), "no answer to a valid request after the fuzz"
        reply = protocol.parse_reply(sock.recv_multipart())
        assert reply.status == protocol.OK, reply.header
        got = protocol.decode_tensors(reply.header["inputs"], reply.tensors)["x"]
        np.testing.assert_array_equal(got, x)
        return reply


def test_fuzzed_client_and_worker_messages_leave_the_broker_serving(tmp_path):
    # A fuzzing "worker" may stay registered holding a request (its DISCONNECT lost with a connection
    # the broker dropped for an oversized frame): the graceful stop waits drain_timeout for it.
    pool = FakePool(tmp_path, max_message_bytes=MAX_MESSAGE, log_level="WARNING", drain_timeout=5.0)
    worker = EchoWorker(pool.backend)
    worker.start()
    ctx = zmq.Context.instance()
    sockets: list[zmq.Socket] = []
    try:
        wait_until(lambda: _health(pool.frontend)["ready"], 10.0, what="echo worker registered")
        _valid_request(pool.frontend)
        rss_start = pool.rss()
        rng = random.Random(SEED)
        clients = [ctx.socket(zmq.DEALER) for _ in range(3)]
        hostile_workers = [ctx.socket(zmq.DEALER) for _ in range(3)]
        sockets = clients + hostile_workers
        for i, sock in enumerate(sockets):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IDENTITY, f"fuzz-{i}".encode())
            sock.connect(pool.frontend if sock in clients else pool.backend)
        templates = _client_templates()
        wtemplates = _worker_templates()
        peak, started = rss_start, time.monotonic()
        for i in range(CLIENT_MESSAGES + WORKER_MESSAGES):
            if i < CLIENT_MESSAGES:
                rng.choice(clients).send_multipart(_mutate(rng, rng.choice(templates)))
            else:
                rng.choice(hostile_workers).send_multipart(_mutate(rng, rng.choice(wtemplates)))
            if i % 100 == 0:
                for sock in sockets:
                    _drain(sock)
                peak = max(peak, pool.rss())
                assert pool.alive(), pool.read_log()[-3000:]
        for sock in hostile_workers:  # leave, so that no request is routed to a fuzzing "worker"
            sock.send_multipart(protocol.encode_disconnect())
        time.sleep(0.5)
        for sock in sockets:
            _drain(sock)
        elapsed = time.monotonic() - started
        assert pool.alive(), pool.read_log()[-3000:]
        _valid_request(pool.frontend)
        rss_end = pool.rss()
        peak = max(peak, rss_end)
        print(f"\nfuzz: {CLIENT_MESSAGES}+{WORKER_MESSAGES} messages in {elapsed:.1f}s; broker RSS start "
              f"{rss_start >> 20} MiB, peak {peak >> 20} MiB, end {rss_end >> 20} MiB; "
              f"log {len(pool.read_log())} bytes")
        assert rss_end - rss_start < RSS_GROWTH_LIMIT
        assert "Traceback" not in pool.read_log()
        assert len(pool.read_log()) < LOG_LIMIT  # rate-limited: a few lines per kind of event
    finally:
        for sock in sockets:
            sock.close(linger=0)
        worker.stop()
        assert pool.stop() == 0
