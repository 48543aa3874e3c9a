"""The worker's batching logic with a fake model (no TensorFlow): stacking, splitting, grouping."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pytest
import zmq

from modelpool.client import protocol
from modelpool.client.errors import InvalidInput
from modelpool.modelproc.spec import WorkerSpec
from modelpool.modelproc import worker as worker_module
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
            raise InvalidInput(f"model expects inputs [\"x\"], got {json.dumps(sorted(tensors))}")
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


def _item(rid: bytes, x: np.ndarray, budget_ms: int | None = None, name: str = "x") -> protocol.BatchItem:
    metas, frames = protocol.encode_tensors({name: x})
    return protocol.BatchItem(b"client", rid, budget_ms, [protocol.packb({"inputs": metas}), *frames])


def _send(router, *items: protocol.BatchItem) -> None:
    router.send_multipart([b"w1", *protocol.encode_batch(items)])


def _settle(worker, batches: int) -> None:
    """Run the worker's serve-loop steps until ``batches`` BATCH messages were received and run."""
    ran = 0
    while ran < batches:
        if not worker.batches:
            assert worker.socket.poll(5000)
            worker._drain()
        while worker.batches:
            worker._run_batch(*worker.batches.popleft())
            ran += 1
        if worker.replies:
            worker._send_replies()


def _replies(router, count: int, messages: list | None = None) -> dict:
    """``count`` replies by request-id (the REPLIES messages they came in go to ``messages``)."""
    out = {}
    while len(out) < count:
        assert router.poll(5000)
        frames = router.recv_multipart()
        message = protocol.parse_worker_message(frames[1:])
        assert message.command is protocol.Command.REPLIES
        if messages is not None:
            messages.append(len(message.fields))
        for item in message.fields:
            header, tensors = protocol.unpack_header(item.body[0]), item.body[1:]
            assert item.rid not in out
            out[item.rid] = (item.status, header, protocol.decode_tensors(header.get("outputs", []), tensors)
                             if item.status == b"200" else None)
    return out


def test_a_batch_runs_as_one_call_and_is_split_back_in_one_replies(rig):
    worker, router = rig
    xs = {f"r{i}".encode(): np.full((i + 1, 3), i, "float32") for i in range(3)}  # 1 + 2 + 3 rows
    _send(router, *[_item(rid, x) for rid, x in xs.items()])
    _settle(worker, 1)
    assert worker.runner.calls == [6]
    messages: list = []
    replies = _replies(router, 3, messages)
    assert messages == [3]
    for rid, x in xs.items():
        status, header, outputs = replies[rid]
        assert status == b"200" and header["model_name"] == "m"
        np.testing.assert_array_equal(outputs["y"], x * 2)


def test_each_batch_is_its_own_call_even_when_another_waits(rig):
    worker, router = rig
    _send(router, _item(b"a", np.ones((2, 3), "float32")))
    _send(router, _item(b"b", np.ones((3, 3), "float32")), _item(b"c", np.ones((1, 3), "float32")))
    time.sleep(0.2)
    _settle(worker, 2)
    assert worker.runner.calls == [2, 4]
    assert set(_replies(router, 3)) == {b"a", b"b", b"c"}


def test_a_bad_item_is_answered_400_and_the_rest_run(rig):
    worker, router = rig
    good = {b"q0": np.full((1, 3), 1, "float32"), b"q1": np.full((2, 3), 2, "float32")}
    _send(router, _item(b"q0", good[b"q0"]), _item(b"bad", np.ones((1, 3), "float32"), name="z"),
          _item(b"q1", good[b"q1"]))
    _settle(worker, 1)
    assert worker.runner.calls == [3]
    replies = _replies(router, 3)
    status, header, _ = replies[b"bad"]
    assert status == b"400" and header["error"]["message"] == 'model expects inputs ["x"], got ["z"]'
    for rid, x in good.items():
        np.testing.assert_array_equal(replies[rid][2]["y"], x * 2)


def test_different_shapes_in_one_batch_are_never_stacked(rig):
    worker, router = rig
    _send(router, _item(b"wide", np.ones((1, 4), "float32")), _item(b"narrow", np.ones((1, 2), "float32")),
          _item(b"wide2", np.ones((2, 4), "float32")))
    _settle(worker, 1)
    assert worker.runner.calls == [3, 1]
    replies = _replies(router, 3)
    assert replies[b"narrow"][2]["y"].shape == (1, 2) and replies[b"wide2"][2]["y"].shape == (2, 4)


def test_a_raising_batch_is_bisected_to_the_bad_request(rig):
    worker, router = rig
    items = []
    for i in range(8):
        x = np.full((1, 2), i, "float32")
        if i == 5:
            x[0, 0] = -1
        items.append(_item(b"r%d" % i, x))
    _send(router, *items)
    _settle(worker, 1)
    # 8 fails -> [0-3] ok, [4-7] fails -> [4, 5] fails -> [4] ok, [5] fails; [6, 7] ok: 7 calls, not 1 + 8
    assert worker.runner.calls == [8, 4, 4, 2, 1, 1, 2]
    replies = _replies(router, 8)
    status, header, _ = replies[b"r5"]
    assert status == b"500" and header["error"]["type"] == "ModelError"
    assert "row starts with -1" in header["error"]["message"]
    for i in (0, 1, 2, 3, 4, 6, 7):
        assert replies[b"r%d" % i][0] == b"200"
        np.testing.assert_array_equal(replies[b"r%d" % i][2]["y"], np.full((1, 2), 2 * i, "float32"))


def test_requests_whose_budget_ran_out_are_answered_504_and_never_run(rig):
    worker, router = rig
    _send(router, _item(b"ok", np.ones((1, 2), "float32"), budget_ms=60_000),
          _item(b"late", np.ones((1, 2), "float32"), budget_ms=50),
          _item(b"none", np.ones((1, 2), "float32")))
    assert worker.socket.poll(5000)
    worker._drain()
    time.sleep(0.1)  # as if the batch waited behind a running one
    worker._run_batch(*worker.batches.popleft())
    worker._send_replies()
    assert worker.runner.calls == [2]
    replies = _replies(router, 3)
    status, header, _ = replies[b"late"]
    assert status == b"504" and header["error"]["type"] == "RequestTimeout"
    assert "the model did not run it" in header["error"]["message"]
    assert replies[b"ok"][0] == replies[b"none"][0] == b"200"
    assert worker.expired == 1


def test_request_larger_than_max_batch_is_run_in_slices(rig):
    worker, router = rig
    x = np.arange(40, dtype="float32").reshape(20, 2)
    _send(router, _item(b"big", x))
    _settle(worker, 1)
    assert worker.runner.calls == [8, 8, 4]
    np.testing.assert_array_equal(_replies(router, 1)[b"big"][2]["y"], x * 2)


def test_a_batch_read_late_is_aged_from_when_the_broker_sent_it(rig):
    """A prefetched batch waits in the socket while the worker runs another: reading it is not when it came."""
    worker, router = rig
    sent_ms = int((time.time() - 0.2) * 1000)  # sent 200 ms ago, read only now
    items = [_item(b"late", np.ones((1, 2), "float32"), budget_ms=100),
             _item(b"ok", np.ones((1, 2), "float32"), budget_ms=60_000)]
    router.send_multipart([b"w1", *protocol.encode_batch(items, sent_ms)])
    _settle(worker, 1)
    replies = _replies(router, 2)
    assert replies[b"late"][0] == b"504" and replies[b"ok"][0] == b"200"
    assert worker.runner.calls == [1]


def test_replies_report_each_model_call_that_returned_and_the_workers_memory(rig, monkeypatch):
    monkeypatch.setattr(worker_module, "STATS_EVERY", 0.0)  # every REPLIES carries its calls
    worker, router = rig
    # three requests of 1 row and one of 20 rows (max_batch_size 8: three slices), one that raises
    batches = [[_item(b"r%d" % i, np.full((1, 3), i, "float32")) for i in range(3)],
               [_item(b"big", np.ones((20, 3), "float32"))], [_item(b"bad", np.full((1, 3), -1, "float32"))]]
    stats = []
    for items in batches:
        _send(router, *items)
        _settle(worker, 1)
        assert router.poll(5000)
        message = protocol.parse_worker_message(router.recv_multipart()[1:])
        stats.append(message.stats)
    assert [[rows for rows, _ in s.calls] for s in stats[:2]] == [[3], [8, 8, 4]]
    assert stats[2] is None  # the call that raised is not counted; nothing else to say: no stats frame
    assert all(0 <= us < 5_000_000 for s in stats[:2] for _, us in s.calls)
    assert stats[0].rss_bytes > 10 << 20  # this Python process's resident memory, once per heartbeat interval
    assert stats[1].rss_bytes is None
    assert worker.calls == []


def test_calls_are_gathered_between_reports_and_an_idle_worker_sends_them_in_a_heartbeat(rig, monkeypatch):
    monkeypatch.setattr(worker_module, "STATS_EVERY", 3600.0)
    worker, router = rig
    worker.broker_expiry = time.monotonic() + 3600  # the broker is alive: housekeeping only heartbeats
    stats = []
    for i in range(3):
        _send(router, _item(b"r%d" % i, np.full((i + 1, 3), i, "float32")))
        _settle(worker, 1)
        assert router.poll(5000)
        stats.append(protocol.parse_worker_message(router.recv_multipart()[1:]).stats)
    assert [[rows for rows, _ in s.calls] for s in stats if s is not None and s.calls] == [[1]]  # then held
    assert [rows for rows, _ in worker.calls] == [2, 3]
    assert worker._poll_ms(1.0) == pytest.approx(1000.0)  # not due for an hour: the usual heartbeat wait
    worker.last_sent = time.monotonic()  # no heartbeat due either
    worker._housekeeping()
    assert not router.poll(100)  # not due yet: nothing sent
    worker._calls_at = time.monotonic()  # the hour has passed
    assert worker._poll_ms(1.0) == 0
    worker._housekeeping()
    assert router.poll(5000)
    message = protocol.parse_worker_message(router.recv_multipart()[1:])
    assert message.command is protocol.Command.HEARTBEAT
    assert [rows for rows, _ in message.stats.calls] == [2, 3] and worker.calls == []
