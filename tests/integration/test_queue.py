"""The broker is the only queue: deadlines that reach into workers, and bounded queues that say
what really waits. Real spawned workers, a real Keras model that records every row it runs."""
from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from modelpool.client import protocol
from poolutil import Pool, wait_until
from tally_layers import read_tally

pytestmark = pytest.mark.timeout(300)

SLOW = 2.0  # seconds the first request sleeps in the model, holding the only worker


@pytest.fixture(scope="module")
def tally_model(tmp_path_factory):
    import keras

    import tally_layers

    d = tmp_path_factory.mktemp("tally")
    path = d / "tally.txt"
    x = keras.Input(shape=(8,), name="x")
    y = keras.layers.Dense(2, name="y")(tally_layers.Tally(str(path), name="tally")(x))
    keras.Model(x, y).save(d / "tally.keras")
    return d / "tally.keras", path


@pytest.fixture(scope="module")
def qpool(tally_model):
    model, _ = tally_model
    p = Pool([{"name": "t", "path": str(model), "max_batch_size": 8, "prefetch": 1, "max_queue": 8,
               "imports": ["tally_layers"]},
              {"name": "d", "path": str(model), "max_batch_size": 8, "prefetch": 1, "imports": ["tally_layers"]}])
    yield p
    assert p.stop() == 0, p.read_log()


def _row(tag: float, sleep: float = 0.0) -> np.ndarray:
    x = np.zeros((1, 8), "float32")
    x[0, 0], x[0, 1] = tag, sleep
    return x


def _send(sock: zmq.Socket, model: str, rid: bytes, x: np.ndarray, **header) -> None:
    metas, frames = protocol.encode_tensors({"x": x})
    sock.send_multipart(protocol.encode_request(model, rid, {"inputs": metas, **header}, frames))


def _collect(sock: zmq.Socket, count: int, timeout: float = 60.0) -> dict[bytes, tuple[float, protocol.Reply]]:
    out = {}
    deadline = time.monotonic() + timeout
    while len(out) < count:
        assert sock.poll(max(1, int((deadline - time.monotonic()) * 1000))), f"{len(out)} of {count} answered"
        reply = protocol.parse_reply(sock.recv_multipart())
        out[reply.rid] = (time.monotonic(), reply)
    return out


@pytest.fixture()
def dealer(qpool):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(qpool.endpoint)
    yield sock
    sock.close(linger=0)


def _status(pool, model: str) -> dict:
    return {m["name"]: m for m in pool.client.models()}[model]


def test_requests_queued_behind_a_slow_batch_expire_504_and_never_run(qpool, tally_model, dealer):
    _, tally = tally_model
    before = sum(len(call) for call in read_tally(tally))
    _send(dealer, "d", b"slow", _row(1.0, SLOW))
    time.sleep(0.3)  # the slow batch runs
    started = time.monotonic()
    for i in range(300):
        _send(dealer, "d", b"q%d" % i, _row(2.0 + i), timeout_ms=500)
    wait_until(lambda: _status(qpool, "d")["in_flight"] > 1, 5.0, 0.02, "a batch prefetched to the worker")
    replies = _collect(dealer, 301)
    slow_at, slow = replies.pop(b"slow")
    assert slow.status == b"200"
    statuses = {reply.status for _, reply in replies.values()}
    assert statuses == {b"504"}, statuses
    messages = [protocol.reply_error(reply).message for _, reply in replies.values()]
    in_broker = sum("never reached the model" in m for m in messages)
    in_worker = sum("the model did not run it" in m for m in messages)
    # the batch prefetched to the worker (at most max_batch_size rows) expired there; the rest in the queue
    assert 1 <= in_worker <= 8 and in_worker + in_broker == 300, (in_worker, in_broker)
    assert max(t for t, r in replies.values() if b"never" in r.header["error"]["message"].encode()) < slow_at
    calls = read_tally(tally)
    ran = [tag for call in calls for tag in call]
    assert len(ran) - before == 1 and ran[-1] == 1.0, calls[-3:]  # only the slow request ever ran
    summary = _status(qpool, "d")
    assert summary["expired"] >= in_broker and summary["queue_depth"] == 0 and summary["in_flight"] == 0
    print(f"\n504s: {in_broker} in the broker queue, {in_worker} in the worker; first 504 after "
          f"{min(t for t, _ in replies.values()) - started:.2f}s; slow answer after {slow_at - started:.2f}s")


def test_a_full_queue_answers_429_at_once_and_reports_what_really_waits(qpool, tally_model, dealer):
    _send(dealer, "t", b"slow", _row(1.0, SLOW))
    time.sleep(0.3)
    started = time.monotonic()
    for i in range(255):  # 256 in flight in all
        _send(dealer, "t", b"q%d" % i, _row(3.0 + i))
    refused = {}
    while dealer.poll(500):  # refusals come at once; the others wait for the slow batch (2 s)
        reply = protocol.parse_reply(dealer.recv_multipart())
        assert reply.status == b"429", (reply.rid, reply.status, reply.header)
        refused[reply.rid] = time.monotonic()
    refusals_done = max(refused.values()) - started
    summary = _status(qpool, "t")
    # what is not refused waits in the broker (max_queue = 8) or went ahead to the worker as one
    # batch of at most max_batch_size = 8 rows behind the slow one
    assert summary["queue_depth"] == 8 and summary["queue_rows"] == 8
    ahead = summary["in_flight"] - 1
    assert 1 <= ahead <= 8 and len(refused) == 255 - 8 - ahead, (len(refused), summary)
    message = protocol.reply_error(reply).message
    assert '"t"' in message and "queue is full (8 requests waiting)" in message
    assert refusals_done < SLOW - 0.3, refusals_done  # at once: before the slow batch ends
    answered = _collect(dealer, 1 + 8 + ahead)
    assert {r.status for _, r in answered.values()} == {b"200"}
    assert set(answered).isdisjoint(refused)
    assert _status(qpool, "t")["queue_depth"] == 0
    print(f"\n429: {len(refused)} refused within {refusals_done:.2f}s; {1 + 8 + ahead} answered 200; "
          f"queue_depth was 8, {ahead} ahead in the worker")
