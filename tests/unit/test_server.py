"""The broker's socket loop pieces with real ZeroMQ sockets and fake workers (no TensorFlow).

Drives ``Broker._drain_frontend`` / ``_drain_backend`` by hand, so what leaves in one message is
deterministic: requests read together must leave as one BATCH.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from modelpool.broker.config import ModelConfig, PoolConfig
from modelpool.broker.server import Broker
from modelpool.client import protocol
from modelpool.client.protocol import Command

pytestmark = pytest.mark.timeout(60)


@pytest.fixture()
def rig(tmp_path):
    model = tmp_path / "m.keras"
    model.write_bytes(b"")  # the config checks the path exists; nothing loads it here
    config = PoolConfig(models=(ModelConfig(name="m", path=str(model)),), frontend=f"ipc://{tmp_path}/front.ipc",
                        backend=f"ipc://{tmp_path}/back.ipc", log_level="WARNING")
    broker = Broker(config, supervise=False)
    ctx = zmq.Context()
    sockets = []

    def connect(kind: int, endpoint: str, identity: bytes) -> zmq.Socket:
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sockets.append(sock)
        return sock

    yield broker, connect, config
    for sock in sockets:
        sock.close(linger=0)
    ctx.term()
    broker.close()


def _register(broker: Broker, connect, config, identity: bytes, max_batch_size: int = 16,
              prefetch: int = 1) -> zmq.Socket:
    worker = connect(zmq.DEALER, config.backend, identity)
    info = {"version": "1", "max_batch_size": max_batch_size, "prefetch": prefetch, "pid": 1}
    worker.send_multipart(protocol.encode_ready("m", info))
    assert broker.backend.poll(5000)
    broker._drain_backend()
    assert broker.state.workers[identity].max_rows == max_batch_size
    return worker


def _send_requests(broker: Broker, client: zmq.Socket, count: int) -> dict:
    xs = {}
    for i in range(count):
        rid = f"r{i}".encode()
        xs[rid] = np.full((1, 2), i, "float32")
        metas, frames = protocol.encode_tensors({"x": xs[rid]})
        client.send_multipart(protocol.encode_request("m", rid, {"inputs": metas}, frames))
    time.sleep(0.3)  # all of them reach the broker's socket before it reads any
    assert broker.frontend.poll(5000)
    broker._drain_frontend()
    return xs


def _worker_messages(worker: zmq.Socket) -> list:
    out = []
    while worker.poll(300):
        out.append(protocol.parse_worker_message(worker.recv_multipart()))
    return out


def test_requests_read_together_reach_the_worker_as_one_batch(rig):
    broker, connect, config = rig
    worker = _register(broker, connect, config, b"w1")
    client = connect(zmq.DEALER, config.frontend, b"c1")
    xs = _send_requests(broker, client, 5)
    messages = _worker_messages(worker)
    assert [m.command for m in messages] == [Command.BATCH]
    items = messages[0].fields
    assert [item.rid for item in items] == list(xs)
    # the worker answers the whole batch with one REPLIES; the client gets five ordinary replies
    replies = []
    for item in items:
        header = protocol.unpack_header(item.body[0])
        x = protocol.decode_tensors(header["inputs"], item.body[1:])["x"]
        metas, frames = protocol.encode_tensors({"y": x * 2})
        replies.append(protocol.ReplyItem(item.client, item.rid, protocol.OK,
                                          [protocol.packb({"model_name": "m", "outputs": metas}), *frames]))
    worker.send_multipart(protocol.encode_replies(replies))
    assert broker.backend.poll(5000)
    broker._drain_backend()
    got = {}
    while client.poll(1000) and len(got) < 5:
        reply = protocol.parse_reply(client.recv_multipart())
        got[reply.rid] = protocol.decode_tensors(reply.header["outputs"], reply.tensors)["y"]
    assert sorted(got) == sorted(xs)
    for rid, x in xs.items():
        np.testing.assert_array_equal(got[rid], x * 2)


def test_requests_past_what_workers_take_wait_in_the_broker(rig):
    broker, connect, config = rig
    worker = _register(broker, connect, config, b"w1", max_batch_size=2, prefetch=1)
    client = connect(zmq.DEALER, config.frontend, b"c1")
    _send_requests(broker, client, 7)
    messages = _worker_messages(worker)
    assert [len(m.fields) for m in messages] == [2, 2]  # one running, one prefetched
    entry = broker.state.models[b"m"]
    assert (entry.queued, entry.in_flight) == (3, 4)


def test_a_second_peer_with_a_registered_identity_gets_nothing_meant_for_the_first(rig):
    broker, connect, config = rig
    worker = _register(broker, connect, config, b"w1")
    impostor = connect(zmq.DEALER, config.backend, b"w1")  # with ROUTER_HANDOVER it would take over
    impostor.send_multipart(protocol.encode_ready("m", {"version": "1", "max_batch_size": 16, "pid": 2}))
    time.sleep(0.3)
    if broker.backend.poll(200):
        broker._drain_backend()
    client = connect(zmq.DEALER, config.frontend, b"c1")
    _send_requests(broker, client, 3)
    assert [m.command for m in _worker_messages(worker)] == [Command.BATCH]
    assert not impostor.poll(300)
    # and a second client presenting c1's identity gets none of c1's replies
    thief = connect(zmq.DEALER, config.frontend, b"c1")
    time.sleep(0.2)
    broker.state.outbox_clients.append([b"c1", b"", *protocol.encode_error(b"m", b"r0", protocol.ProtocolError("x"))])
    broker._flush()
    assert client.poll(2000) and not thief.poll(300)
