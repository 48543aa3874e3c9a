"""The broker's socket loop pieces with real ZeroMQ sockets and fake workers (no TensorFlow).

Drives ``Broker._drain_frontend`` / ``_drain_backend`` by hand, so what leaves in one message is
deterministic: requests that wait together for a batched worker must leave as one REQUESTS.
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


def _register(broker: Broker, connect, config, identity: bytes, batched: bool) -> zmq.Socket:
    worker = connect(zmq.DEALER, config.backend, identity)
    info = {"version": "1", "capacity": 16, "pid": 1}
    if batched:
        info["batched"] = True
    worker.send_multipart(protocol.encode_ready("m", info))
    assert broker.backend.poll(5000)
    broker._drain_backend()
    assert broker.state.workers[identity].batched is batched
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


def test_requests_waiting_together_reach_a_batched_worker_as_one_message(rig):
    broker, connect, config = rig
    worker = _register(broker, connect, config, b"w1", batched=True)
    client = connect(zmq.DEALER, config.frontend, b"c1")
    xs = _send_requests(broker, client, 5)
    messages = _worker_messages(worker)
    assert [m.command for m in messages] == [Command.REQUESTS]
    groups = messages[0].fields
    assert [rid for _, rid, _, _ in groups] == list(xs)
    # the worker answers the whole batch with one REPLIES; the client gets five ordinary replies
    replies = []
    for client_id, rid, _, body in groups:
        header = protocol.unpack_header(body[0])
        x = protocol.decode_tensors(header["inputs"], body[1:])["x"]
        metas, frames = protocol.encode_tensors({"y": x * 2})
        replies.append([client_id, rid, protocol.OK, protocol.packb({"model_name": "m", "outputs": metas}), *frames])
    worker.send_multipart(protocol.encode_worker_replies(replies))
    assert broker.backend.poll(5000)
    broker._drain_backend()
    got = {}
    while client.poll(1000) and len(got) < 5:
        reply = protocol.parse_reply(client.recv_multipart())
        got[reply.rid] = protocol.decode_tensors(reply.header["outputs"], reply.tensors)["y"]
    assert sorted(got) == sorted(xs)
    for rid, x in xs.items():
        np.testing.assert_array_equal(got[rid], x * 2)


def test_a_worker_without_batched_gets_one_request_per_message(rig):
    broker, connect, config = rig
    worker = _register(broker, connect, config, b"w1", batched=False)
    client = connect(zmq.DEALER, config.frontend, b"c1")
    xs = _send_requests(broker, client, 4)
    messages = _worker_messages(worker)
    assert [m.command for m in messages] == [Command.REQUEST] * 4
    assert [m.fields[2] for m in messages] == list(xs)


def test_a_single_waiting_request_still_leaves_as_a_plain_request(rig):
    broker, connect, config = rig
    worker = _register(broker, connect, config, b"w1", batched=True)
    client = connect(zmq.DEALER, config.frontend, b"c1")
    _send_requests(broker, client, 1)
    assert [m.command for m in _worker_messages(worker)] == [Command.REQUEST]


def test_messages_queued_between_requests_keep_their_order(rig):
    broker, connect, config = rig
    worker = _register(broker, connect, config, b"w1", batched=True)
    body = [protocol.packb({"inputs": []})]
    outbox = broker.state.outbox_workers
    for rid in (b"r1", b"r2"):
        outbox.append([b"w1", *protocol.encode_worker_request(b"c1", rid, b"", body)])
    outbox.append([b"w1", *protocol.encode_heartbeat()])
    outbox.append([b"w1", *protocol.encode_worker_request(b"c1", b"r3", b"S", body)])
    broker._flush()
    messages = _worker_messages(worker)
    assert [m.command for m in messages] == [Command.REQUESTS, Command.HEARTBEAT, Command.REQUEST]
    assert [rid for _, rid, _, _ in messages[0].fields] == [b"r1", b"r2"]
    assert messages[2].fields[2:4] == [b"r3", b"S"]


def test_a_second_peer_with_a_registered_identity_gets_nothing_meant_for_the_first(rig):
    broker, connect, config = rig
    worker = _register(broker, connect, config, b"w1", batched=False)
    impostor = connect(zmq.DEALER, config.backend, b"w1")  # with ROUTER_HANDOVER it would take over
    impostor.send_multipart(protocol.encode_ready("m", {"version": "1", "capacity": 16, "pid": 2}))
    time.sleep(0.3)
    if broker.backend.poll(200):
        broker._drain_backend()
    client = connect(zmq.DEALER, config.frontend, b"c1")
    _send_requests(broker, client, 3)
    assert [m.command for m in _worker_messages(worker)] == [Command.REQUEST] * 3
    assert not impostor.poll(300)
    # and a second client presenting c1's identity gets none of c1's replies
    thief = connect(zmq.DEALER, config.frontend, b"c1")
    time.sleep(0.2)
    broker.state.outbox_clients.append([b"c1", b"", *protocol.encode_error(b"m", b"r0", protocol.ProtocolError("x"))])
    broker._flush()
    assert client.poll(2000) and not thief.poll(300)
