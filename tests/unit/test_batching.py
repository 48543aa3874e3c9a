"""The worker's batching logic with a fake model (no TensorFlow): stacking, splitting, grouping."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
import zmq

from modelpool.client import protocol
from modelpool.client.errors import InvalidInput
from modelpool.modelproc.spec import WorkerSpec
from modelpool.modelproc.worker import Worker

pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class Spec:
    name: str


class FakeRunner:
    """Doubles its input; raises on rows whose first value is -1; records every call's rows."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def check_inputs(self, tensors: dict) -> list:
        if list(tensors) != ["x"]:
            raise InvalidInput(f"model expects inputs ['x'], got {sorted(tensors)}")
        return [tensors["x"]]

    def check_outputs(self, outputs) -> tuple:
        return ()

    def run(self, inputs: list, key: tuple) -> list:
        x = inputs[0]
        self.calls.append(x.shape[0])
        if np.any(x[:, 0] == -1):
            raise ValueError("row starts with -1")
        return [(Spec("y"), x * 2)]


@pytest.fixture()
def rig(tmp_path):
    """A worker connected to a ROUTER that plays the broker."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    endpoint = f"ipc://{tmp_path}/b.ipc"
    router.bind(endpoint)
    worker = Worker(WorkerSpec(model="m", path="unused", backend=endpoint, identity=b"w1", max_batch_size=8))
    worker.runner = FakeRunner()
    worker._connect()
    worker.socket.send_multipart(protocol.encode_heartbeat())  # lets the ROUTER learn the identity
    assert router.poll(5000)
    router.recv_multipart()
    yield worker, router
    worker.socket.close(linger=0)
    worker.ctx.term()
    router.close(linger=0)
    ctx.term()


def _send(router, rid: bytes, x: np.ndarray, flags: bytes = b"") -> None:
    metas, frames = protocol.encode_tensors({"x": x})
    router.send_multipart([b"w1", *protocol.encode_worker_request(b"client", rid, flags, [protocol.packb({"inputs": metas}), *frames])])


def _settle(worker, count: int) -> None:
    """Run the worker's serve-loop steps until ``count`` requests were taken and all batches ran."""
    time.sleep(0.2)  # let every message reach the worker's socket, as under load
    got = 0
    while got < count or worker.pending:
        if got < count and worker.socket.poll(5000 if not worker.pending else 0):
            before = len(worker.pending)
            worker._drain()
            got += len(worker.pending) - before
        if worker.pending:
            worker._run_pending()
        if worker.replies:
            worker._send_replies()


def _replies(router, count: int, messages: list | None = None) -> dict:
    """``count`` replies by request-id, from REPLY or REPLIES messages (their commands go to ``messages``)."""
    out = {}
    while len(out) < count:
        assert router.poll(5000)
        frames = router.recv_multipart()
        message = protocol.parse_worker_message(frames[1:])
        assert message.command in (protocol.Command.REPLY, protocol.Command.REPLIES)
        if messages is not None:
            messages.append(message.command)
        for _, rid, status, body in protocol.message_groups(message):
            header, tensors = protocol.unpack_header(body[0]), body[1:]
            assert rid not in out
            out[rid] = (status, header,
                        protocol.decode_tensors(header.get("outputs", []), tensors) if status == b"200" else None)
    return out


def test_waiting_requests_run_as_one_call_and_are_split_back(rig):
    worker, router = rig
    xs = {f"r{i}".encode(): np.full((i + 1, 3), i, "float32") for i in range(3)}  # 1 + 2 + 3 rows
    for rid, x in xs.items():
        _send(router, rid, x)
    _settle(worker, 3)
    assert worker.runner.calls == [6]
    replies = _replies(router, 3)
    for rid, x in xs.items():
        status, header, outputs = replies[rid]
        assert status == b"200" and header["model_name"] == "m"
        np.testing.assert_array_equal(outputs["y"], x * 2)


def test_one_batch_is_answered_with_one_replies_message(rig):
    worker, router = rig
    xs = {f"r{i}".encode(): np.full((1, 3), i, "float32") for i in range(4)}
    for rid, x in xs.items():
        _send(router, rid, x)
    _settle(worker, 4)
    assert worker.runner.calls == [4]
    messages: list = []
    replies = _replies(router, 4, messages)
    assert messages == [protocol.Command.REPLIES]
    for rid, x in xs.items():
        np.testing.assert_array_equal(replies[rid][2]["y"], x * 2)


def test_a_requests_message_is_taken_as_its_requests(rig):
    worker, router = rig
    groups, xs = [], {}
    for i in range(3):
        rid = f"q{i}".encode()
        xs[rid] = np.full((i + 1, 3), i, "float32")
        metas, frames = protocol.encode_tensors({"x": xs[rid]})
        groups.append([f"client{i}".encode(), rid, b"", protocol.packb({"inputs": metas}), *frames])
    groups.append([b"client9", b"bad", b"", protocol.packb({"inputs": []})])  # wrong inputs: 400, others run
    router.send_multipart([b"w1", *protocol.encode_worker_requests(groups)])
    _settle(worker, 3)
    assert worker.runner.calls == [6]
    replies = _replies(router, 4)
    assert replies[b"bad"][0] == b"400"
    for rid, x in xs.items():
        assert replies[rid][0] == b"200"
        np.testing.assert_array_equal(replies[rid][2]["y"], x * 2)


def test_batches_never_exceed_max_batch_size(rig):
    worker, router = rig
    for i in range(5):
        _send(router, f"r{i}".encode(), np.full((3, 2), i, "float32"))  # 15 rows, limit 8
    _settle(worker, 5)
    assert all(n <= 8 for n in worker.runner.calls) and sum(worker.runner.calls) == 15
    replies = _replies(router, 5)
    for i in range(5):
        np.testing.assert_array_equal(replies[f"r{i}".encode()][2]["y"], np.full((3, 2), 2 * i, "float32"))


def test_different_shapes_are_never_stacked(rig):
    worker, router = rig
    _send(router, b"wide", np.ones((1, 4), "float32"))
    _send(router, b"narrow", np.ones((1, 2), "float32"))
    _send(router, b"wide2", np.ones((2, 4), "float32"))
    _settle(worker, 3)
    assert sorted(worker.runner.calls) == [1, 3]
    replies = _replies(router, 3)
    assert replies[b"narrow"][2]["y"].shape == (1, 2) and replies[b"wide2"][2]["y"].shape == (2, 4)


def test_solo_requests_run_alone(rig):
    worker, router = rig
    _send(router, b"a", np.ones((1, 2), "float32"))
    _send(router, b"retry", np.ones((1, 2), "float32"), flags=protocol.FLAG_SOLO)
    _send(router, b"b", np.ones((1, 2), "float32"))
    _settle(worker, 3)
    assert sorted(worker.runner.calls) == [1, 2]
    assert set(_replies(router, 3)) == {b"a", b"retry", b"b"}


def test_a_raising_row_fails_alone_and_the_batch_is_answered(rig):
    worker, router = rig
    bad = np.ones((1, 2), "float32")
    bad[0, 0] = -1
    _send(router, b"ok1", np.ones((1, 2), "float32"))
    _send(router, b"bad", bad)
    _send(router, b"ok2", np.full((1, 2), 3, "float32"))
    _settle(worker, 3)
    replies = _replies(router, 3)
    assert replies[b"ok1"][0] == b"200" and replies[b"ok2"][0] == b"200"
    status, header, _ = replies[b"bad"]
    assert status == b"500" and header["error"]["type"] == "ModelError"
    assert "row starts with -1" in header["error"]["message"]


def test_bad_request_is_answered_400_without_running(rig):
    worker, router = rig
    metas, frames = protocol.encode_tensors({"z": np.ones((1, 2), "float32")})
    router.send_multipart([b"w1", *protocol.encode_worker_request(b"client", b"r", b"", [protocol.packb({"inputs": metas}), *frames])])
    assert worker.socket.poll(5000)
    worker._drain()
    assert not worker.pending and worker.runner.calls == []
    worker._send_replies()
    status, header, _ = _replies(router, 1)[b"r"]
    assert status == b"400" and "expects inputs ['x']" in header["error"]["message"]


def test_request_larger_than_max_batch_is_chunked(rig):
    worker, router = rig
    x = np.arange(40, dtype="float32").reshape(20, 2)
    _send(router, b"big", x)
    _settle(worker, 1)
    assert worker.runner.calls == [8, 8, 4]
    np.testing.assert_array_equal(_replies(router, 1)[b"big"][2]["y"], x * 2)
