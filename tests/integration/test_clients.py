"""The Python clients end to end: AsyncClient, pipelining, fork safety, deadlines and lost connections, the CLI."""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import select
import shutil
import signal
import tempfile
import threading
import time

import numpy as np
import pytest
import zmq

from modelpool.client import (
    AsyncClient,
    Client,
    InvalidInput,
    ModelNotFound,
    NotSupported,
    RequestTimeout,
    Unavailable,
    protocol,
)
from modelpool.client.base import header_or_raise
from modelpool.client.tracker import DEADLINE_GRACE
from poolutil import Pool, wait_until
from modelpool import cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _expected(model, x):
    return np.asarray(model(x, training=False))


def _rows(n: int, seed: int) -> list[np.ndarray]:
    """n distinct one-row inputs for model "a"."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(1, 8)).astype("float32") + i for i in range(n)]


def _want_rows(models, xs: list[np.ndarray]) -> np.ndarray:
    return _expected(models.keras["a"], np.concatenate(xs))


# --- AsyncClient -------------------------------------------------------------------------------


def test_async_gather_1000_predicts_on_one_client_each_answer_matches(pool, models):
    xs = _rows(1000, seed=11)
    want = _want_rows(models, xs)

    async def run():
        async with AsyncClient(pool.endpoint, timeout=120) as client:
            await client.predict("a", xs[0])  # opens the socket
            sock = client._sock
            tasks = [asyncio.create_task(client.predict("a", x)) for x in xs]
            await asyncio.sleep(0)  # every task runs up to waiting for its reply
            peak = len(client._pending)
            got = await asyncio.gather(*tasks)
            assert client._sock is sock, "every request went over the one socket"
            assert not client._pending
            assert client._grouping, "the broker said it takes groups: the requests went out as groups"
            return got, peak

    got, peak = asyncio.run(run())
    assert peak > 100, f"requests were not in flight together (at most {peak})"
    assert len(got) == len(xs)
    for i, g in enumerate(got):
        assert g.shape == (1, 4)
        np.testing.assert_allclose(g[0], want[i], **TOL, err_msg=f"request {i}")


def test_async_cancelled_requests_are_abandoned_and_later_ones_get_their_own_answers(pool, models):
    doomed = _rows(20, seed=12)
    xs = _rows(60, seed=13)
    want = _want_rows(models, xs)

    async def run():
        async with AsyncClient(pool.endpoint) as client:
            await client.predict("a", xs[0])
            sent = []  # request-ids put on the wire, alone or in groups
            plain_send = client._send

            def send(sock, frames):
                ok = plain_send(sock, frames)
                if ok and len(frames) > 5:
                    sent.extend(protocol.unpack_any(frames[5], "ids") if frames[3] == b"" else [frames[3]])
                return ok

            client._send = send
            delivered = []  # request-ids whose reply found its request still registered
            tracker = client._tracker
            plain_reply = tracker.reply

            def reply(rid):
                entry = plain_reply(rid)
                if entry is not None:
                    delivered.append(rid)
                return entry

            tracker.reply = reply
            tasks = [asyncio.create_task(client.predict("a", x)) for x in doomed]
            await asyncio.sleep(0)  # every task has made its request and waits for the reply
            assert len(client._pending) == len(doomed)
            await asyncio.sleep(0)  # the requests of that turn of the loop are on the wire
            cancelled = sum(task.cancel() for task in tasks)
            on_the_wire = len(sent)
            # A reply may win the race with cancel() (it arrived during the two turns of the loop above):
            # its request is then answered, not late.
            raced = len(set(delivered) & set(sent[:on_the_wire]))
            await asyncio.gather(*tasks, return_exceptions=True)
            assert cancelled == len(doomed) and sum(t.cancelled() for t in tasks) == cancelled
            assert not client._pending, "a cancelled request must not stay registered"
            got = await asyncio.gather(*(client.predict("a", x) for x in xs))
            deadline = time.monotonic() + 20
            while client._late < on_the_wire - raced and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return got, on_the_wire, client._late + raced

    got, on_the_wire, late = asyncio.run(run())
    for i, g in enumerate(got):
        np.testing.assert_allclose(g[0], want[i], **TOL, err_msg=f"request {i}")
    assert on_the_wire == len(doomed), "every request had gone out before it was cancelled"
    assert late == on_the_wire, "the replies of cancelled requests arrive late and are dropped"


def test_async_errors_are_typed_and_management_calls_work(pool, models):
    async def run():
        async with AsyncClient(pool.endpoint) as client:
            with pytest.raises(ModelNotFound, match='"nope" is not served'):
                await client.predict("nope", np.ones((1, 8), "float32"))
            with pytest.raises(InvalidInput, match="got \\[2, 5\\]"):
                await client.predict("a", np.ones((2, 5), "float32"))
            with pytest.raises(InvalidInput, match='unknown output "nope"'):
                await client.infer("a", {"x": np.ones((1, 8), "float32")}, outputs=["nope"])
            rid, frames = client._builder.request("mmi.nothing", {})
            with pytest.raises(NotSupported):
                header_or_raise(await client._roundtrip(rid, frames, 5.0))
            meta = await client.metadata("multi")
            assert [i["name"] for i in meta["inputs"]] == ["in_a", "in_b"]
            listed = {m["name"] for m in await client.models()}
            assert {"a", "b", "multi"} <= listed
            assert (await client.health())["live"]
            assert await client.has_model("a") and not await client.has_model("zzz")
            a, b = np.ones((2, 4), "float32"), np.ones((2, 3), "float32")
            out = await client.infer("multi", {"in_a": a, "in_b": b}, outputs=["out_cls"])
            np.testing.assert_allclose(out["out_cls"], models.keras["multi"]([a, b], training=False)[1], **TOL)
            many = await client.predict_many("a", [np.ones((1, 8), "float32"), np.ones((1, 5), "float32")],
                                             return_exceptions=True)
            assert many[0].shape == (1, 4) and isinstance(many[1], InvalidInput)
            return await client.predict("a", np.ones((1, 8), "float32"))

    np.testing.assert_allclose(asyncio.run(run()), _expected(models.keras["a"], np.ones((1, 8), "float32")), **TOL)


def test_a_raw_group_gets_each_requests_answer_and_a_broken_one_leaves_the_pool_serving(pool, models):
    """The group extension as another language would use it: one message, grouped replies back."""
    xs = _rows(5, seed=21)
    want = _want_rows(models, xs)
    header = protocol.packb({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8]}], "timeout_ms": 20_000})
    rids = [b"g%d" % i for i in range(5)]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pool.endpoint)
    try:
        sock.send_multipart(protocol.encode_request("mmi.health", b"h", {}))
        assert sock.poll(20_000)
        assert "group" in protocol.parse_reply(sock.recv_multipart()).header["extensions"]
        broken = protocol.encode_request_group("a", header, [b"b1", b"b2"], [[xs[0].tobytes()]])  # a tensor short
        sock.send_multipart(broken)
        sock.send_multipart(protocol.encode_request_group("a", header, rids, [[x.tobytes()] for x in xs]))
        answers = {}
        while len(answers) < 7:
            assert sock.poll(20_000), f"answers so far: {sorted(answers)}"
            frames = sock.recv_multipart()
            for reply in protocol.parse_reply_group(frames) if protocol.is_group(frames) else [protocol.parse_reply(frames)]:
                answers[reply.rid] = reply
    finally:
        sock.close(0)
        ctx.term()
    for rid in (b"b1", b"b2"):
        assert answers[rid].status == b"400" and "needs 2 tensor frames" in str(protocol.reply_error(answers[rid]))
    for i, rid in enumerate(rids):
        got = protocol.decode_tensors(answers[rid].header["outputs"], answers[rid].tensors)
        np.testing.assert_allclose(next(iter(got.values()))[0], want[i], **TOL)


def test_call_sends_wire_headers_and_raw_tensors_and_returns_errors_as_replies(pool, models):
    x = np.arange(16, dtype="<f4").reshape(2, 8)
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 8]}]}
    want = _expected(models.keras["a"], x)

    def check(ok, bad):
        assert ok.status == protocol.OK and ok.header["outputs"][0]["shape"] == [2, 4]
        got = protocol.decode_tensors(ok.header["outputs"], ok.tensors)
        np.testing.assert_allclose(next(iter(got.values())), want, **TOL)
        assert bad.status == b"400"
        assert isinstance(protocol.reply_error(bad), InvalidInput)

    bad_header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 5]}]}
    with Client(pool.endpoint) as client:
        check(client.call("a", header, [x.tobytes()]), client.call("a", bad_header, [x[:, :5].tobytes()]))

    async def run():
        async with AsyncClient(pool.endpoint) as aclient:
            return (await aclient.call("a", header, [x.tobytes()], timeout=10),
                    await aclient.call("a", bad_header, [x[:, :5].tobytes()]))

    check(*asyncio.run(run()))
    assert "timeout_ms" not in header, "the caller's header is not changed"


def test_async_timeout_and_closed_client(tmp_path):
    nobody = f"ipc://{tmp_path}/nobody.ipc"

    async def run():
        client = AsyncClient(nobody, timeout=0.4, retries=1)
        started = time.monotonic()
        with pytest.raises(RequestTimeout, match="^no connection to ipc://.* within 0.400s; is the pool running"):
            await client.predict("a", np.ones((1, 8), "float32"))
        elapsed = time.monotonic() - started
        assert 0.35 < elapsed < 0.4 + DEADLINE_GRACE  # no broker could answer 504: no grace to wait
        assert not client._pending
        await client.close()
        with pytest.raises(RuntimeError, match="closed"):
            await client.predict("a", np.ones((1, 8), "float32"))

    asyncio.run(run())


# --- the sync client pipelines ------------------------------------------------------------------


def test_predict_many_keeps_order_and_matches(pool, models):
    xs = _rows(300, seed=14)
    want = _want_rows(models, xs)
    with Client(pool.endpoint) as client:
        got = client.predict_many("a", xs, window=32)
        assert len(got) == 300
        for i, g in enumerate(got):
            np.testing.assert_allclose(g[0], want[i], **TOL, err_msg=f"request {i}")
        # multi-row batches too, from a generator
        batches = [np.concatenate(xs[i:i + 3]) for i in range(0, 30, 3)]
        for i, g in enumerate(client.predict_many("a", (b for b in batches), window=4)):
            np.testing.assert_allclose(g, want[3 * i:3 * i + 3], **TOL)

        mixed = [xs[0], np.ones((1, 5), "float32"), xs[2], [[1, 2], [3]], xs[4]]
        out = client.predict_many("a", mixed, return_exceptions=True)
        assert isinstance(out[1], InvalidInput) and "got [1, 5]" in str(out[1])
        assert isinstance(out[3], InvalidInput)
        for i in (0, 2, 4):
            np.testing.assert_allclose(out[i][0], want[i], **TOL)
        with pytest.raises(InvalidInput):
            client.predict_many("a", mixed)
        with pytest.raises(ModelNotFound):
            client.predict_many("nope", xs[:5])
        with pytest.raises(ValueError):
            client.predict_many("a", xs, window=0)
        # the abandoned requests' late replies do not confuse the next calls on this thread's socket
        np.testing.assert_allclose(client.predict("a", xs[7])[0], want[7], **TOL)
        assert client.predict_many("a", []) == []


def test_submit_futures(pool, models):
    xs = _rows(200, seed=15)
    want = _want_rows(models, xs)
    client = Client(pool.endpoint)
    try:
        futures = [client.submit("a", x) for x in xs]
        for i, f in enumerate(futures):
            np.testing.assert_allclose(f.result(60)[0], want[i], **TOL, err_msg=f"request {i}")
        bad = client.submit("nope", xs[0])
        with pytest.raises(ModelNotFound):
            bad.result(30)
        unencodable = client.submit("a", [[1, 2], [3]])
        with pytest.raises(InvalidInput):
            unencodable.result(1)
        a, b = np.ones((1, 4), "float32"), np.ones((1, 3), "float32")
        multi = client.submit_infer("multi", {"in_a": a, "in_b": b}, outputs=["out_sum"]).result(30)
        np.testing.assert_allclose(multi["out_sum"], models.keras["multi"]([a, b], training=False)[0], **TOL)
        # submit() from several threads at once, blocking calls alongside
        with_threads = []

        def worker(k):
            fs = [client.submit("a", xs[j]) for j in range(k, 200, 4)]
            direct = client.predict("a", xs[k])
            with_threads.append((k, [f.result(60) for f in fs], direct))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(with_threads) == 4
        for k, got, direct in with_threads:
            np.testing.assert_allclose(direct[0], want[k], **TOL)
            for j, g in zip(range(k, 200, 4), got):
                np.testing.assert_allclose(g[0], want[j], **TOL)
        io_thread = client._dispatcher._thread
        assert io_thread.daemon and io_thread.is_alive()
    finally:
        client.close()
    assert not io_thread.is_alive(), "close() stops the I/O thread"
    with pytest.raises(RuntimeError, match="closed"):
        client.submit("a", xs[0])


# --- fork safety -----------------------------------------------------------------------------------


def _child_checks(client: Client, aclient: AsyncClient, xs, want, write_fd: int) -> None:
    """Runs in a forked child: no TensorFlow here, only the clients and numpy."""
    report = {"pid": os.getpid(), "ok": 0, "errors": []}
    try:
        for x, w in zip(xs, want):
            got = client.predict("a", x, timeout=60)
            if np.allclose(got, w, **TOL):
                report["ok"] += 1
            else:
                report["errors"].append(f"predict mismatch {got} != {w}")
        got = [f.result(60) for f in [client.submit("a", x, timeout=60) for x in xs]]
        report["ok"] += sum(bool(np.allclose(g, w, **TOL)) for g, w in zip(got, want))
        got = asyncio.run(aclient.predict_many("a", xs, timeout=60))
        report["ok"] += sum(bool(np.allclose(g, w, **TOL)) for g, w in zip(got, want))
    except BaseException as exc:  # reported to the parent, which fails the test
        report["errors"].append(repr(exc))
    os.write(write_fd, pickle.dumps(report))


def _collect_child(pid: int, read_fd: int, timeout: float) -> tuple[int, dict]:
    """(exit code, report) of a forked child; killed if it takes longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    data = b""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], 0.1)
            if ready:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                data += chunk
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status), pickle.loads(data) if data else {}
            time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"forked child {pid} did not finish within {timeout}s")


def test_client_used_across_os_fork(pool, models):
    xs = _rows(4 * 5, seed=16)
    want = _want_rows(models, xs)[:, None, :]  # computed before forking: children never touch TensorFlow
    client = Client(pool.endpoint, timeout=60)
    aclient = AsyncClient(pool.endpoint, timeout=60)
    try:
        np.testing.assert_allclose(client.predict("a", xs[0]), want[0], **TOL)
        np.testing.assert_allclose(client.submit("a", xs[1]).result(60), want[1], **TOL)  # I/O thread running
        np.testing.assert_allclose(asyncio.run(aclient.predict("a", xs[2])), want[2], **TOL)
        children = []
        for k in range(4):
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child
                code = 1
                try:
                    os.close(read_fd)
                    part = slice(5 * k, 5 * k + 5)
                    _child_checks(client, aclient, xs[part], want[part], write_fd)
                    code = 0
                finally:
                    os._exit(code)
            os.close(write_fd)
            children.append((pid, read_fd))
        reports = []
        for pid, read_fd in children:
            code, report = _collect_child(pid, read_fd, 120)
            assert code == 0, report
            reports.append(report)
        for report in reports:
            assert not report["errors"], report
            assert report["ok"] == 15, report
        assert len({r["pid"] for r in reports}) == 4
        # the parent's sockets, I/O thread and async client still work
        np.testing.assert_allclose(client.predict("a", xs[3]), want[3], **TOL)
        np.testing.assert_allclose(client.submit("a", xs[4]).result(60), want[4], **TOL)
        np.testing.assert_allclose(asyncio.run(aclient.predict("a", xs[5])), want[5], **TOL)
    finally:
        client.close()
        aclient.close()


_FORK_POOL_CLIENT: Client | None = None


def _predict_in_pool_worker(x: np.ndarray) -> tuple[int, np.ndarray]:
    return os.getpid(), np.array(_FORK_POOL_CLIENT.predict("a", x))


def test_client_in_multiprocessing_fork_pool(pool, models):
    global _FORK_POOL_CLIENT
    xs = _rows(40, seed=17)
    want = _want_rows(models, xs)
    _FORK_POOL_CLIENT = Client(pool.endpoint, timeout=60)
    try:
        np.testing.assert_allclose(_FORK_POOL_CLIENT.predict("a", xs[0])[0], want[0], **TOL)
        with multiprocessing.get_context("fork").Pool(4) as workers:
            got = workers.map(_predict_in_pool_worker, xs, chunksize=2)
        assert len({pid for pid, _ in got} - {os.getpid()}) >= 2
        for i, (_, g) in enumerate(got):
            np.testing.assert_allclose(g[0], want[i], **TOL, err_msg=f"request {i}")
        np.testing.assert_allclose(_FORK_POOL_CLIENT.predict("a", xs[1])[0], want[1], **TOL)
    finally:
        _FORK_POOL_CLIENT.close()
        _FORK_POOL_CLIENT = None


# --- deadlines and lost connections (no TensorFlow: a fake broker) ----------------------------------


class FakeBroker:
    """A ROUTER that answers each request with its input after ``delay`` seconds, or never (``hold``).

    ``seen`` lists (client identity, request-id, header) in arrival order; metadata requests (one per
    model and client, to convert inputs) and the clients' mmi.health probes are answered at once and
    not listed (the probe's answer lists no extensions: plain requests only).
    """

    METADATA = {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 8]}]}

    def __init__(self, endpoint: str, *, delay: float = 0.0, hold: bool = False) -> None:
        self.delay = delay
        self.hold = hold
        self.seen: list[tuple[bytes, bytes, dict]] = []
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        due: list[tuple[float, list]] = []
        while not self.stopping:
            while due and due[0][0] <= time.monotonic():
                self.sock.send_multipart(due.pop(0)[1])
            if not self.sock.poll(10):
                continue
            identity, *frames = self.sock.recv_multipart()
            request = protocol.parse_request(frames)
            if request.header.get("op") == "metadata" or request.model == protocol.MMI_HEALTH:
                answer = self.METADATA if request.model != protocol.MMI_HEALTH else {"live": True}
                self.sock.send_multipart([identity, b"", *protocol.encode_reply(
                    request.model, request.rid, protocol.OK, answer)])
                continue
            self.seen.append((identity, request.rid, request.header))
            if self.hold:
                continue
            header = {}
            if "inputs" in request.header:
                meta = dict(request.header["inputs"][0], name="y")
                header = {"model_name": request.model.decode(), "model_version": "1", "outputs": [meta]}
            due.append((time.monotonic() + self.delay, [identity, b"", *protocol.encode_reply(
                request.model, request.rid, protocol.OK, header, request.tensors)]))

    def rids(self) -> list[bytes]:
        return [rid for _, rid, _ in self.seen]

    def close(self) -> None:
        """Close the socket: every connected client sees its connection drop."""
        self.stopping = True
        self.thread.join(5)
        self.sock.close(linger=0)
        self.ctx.term()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_slow_answer_within_the_timeout_is_waited_for_and_sent_once(tmp_path):
    """The whole timeout goes to the broker as timeout_ms and the client waits for it: no try splits it."""
    endpoint = f"ipc://{tmp_path}/fake.ipc"
    x = np.arange(8, dtype="float32").reshape(1, 8)
    fake = FakeBroker(endpoint, delay=0.8)
    try:
        with Client(endpoint, timeout=1.0, retries=1) as client:
            np.testing.assert_array_equal(client.predict("m", x), x)
            np.testing.assert_array_equal(client.submit("m", x + 1).result(10), x + 1)
            got = client.predict_many("m", [x + i for i in range(4)], window=4)
            assert all(np.array_equal(g, x + i) for i, g in enumerate(got))

        async def run():
            async with AsyncClient(endpoint, timeout=1.0, retries=1) as aclient:
                return await aclient.predict("m", x + 2)

        np.testing.assert_array_equal(asyncio.run(run()), x + 2)
        assert len(fake.seen) == 7 and len(set(fake.rids())) == 7, "each request went out once"
        assert {header["timeout_ms"] for _, _, header in fake.seen} == {1000}
    finally:
        fake.close()


def test_a_request_nobody_answers_times_out_after_grace_and_is_not_resent(tmp_path):
    endpoint = f"ipc://{tmp_path}/fake.ipc"
    x = np.arange(8, dtype="float32").reshape(1, 8)
    fake = FakeBroker(endpoint, hold=True)
    try:
        with Client(endpoint, timeout=0.5, retries=3) as client:
            started = time.monotonic()
            with pytest.raises(RequestTimeout, match="^no reply within 0.500s from ipc://.*; is the pool running"):
                client.predict("m", x)
            elapsed = time.monotonic() - started
            assert 0.5 + DEADLINE_GRACE - 0.05 < elapsed < 0.5 + DEADLINE_GRACE + 1.0
            with pytest.raises(RequestTimeout):
                client.submit("m", x).result(10)
            out = client.predict_many("m", [x, x], return_exceptions=True)
            assert all(isinstance(o, RequestTimeout) for o in out)
            assert len(fake.seen) == 4, "a slow answer is never a reason to send again"
            assert len({identity for identity, _, _ in fake.seen[:1] + fake.seen[2:]}) == 1, \
                "the calling thread keeps its socket after a timeout"
            fake.hold = False
            np.testing.assert_array_equal(client.predict("m", x + 1), x + 1)  # the same socket still works
            assert fake.seen[-1][0] == fake.seen[0][0]

        async def run():
            fake.hold = True
            async with AsyncClient(endpoint, timeout=0.5, retries=3) as aclient:
                with pytest.raises(RequestTimeout, match="no reply within 0.500s"):
                    await aclient.predict("m", x)
                assert not aclient._pending

        before = len(fake.seen)
        asyncio.run(run())
        assert len(fake.seen) == before + 1
    finally:
        fake.close()


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_requests_lost_with_the_connection_are_resent_once_with_same_rid(tmp_path, transport):
    """The broker vanishes with requests in flight and comes back: each of them is sent again exactly once."""
    endpoint = f"tcp://127.0.0.1:{_free_port()}" if transport == "tcp" else f"ipc://{tmp_path}/fake.ipc"
    xs = [np.full((1, 8), i, "float32") for i in range(12)]
    first = FakeBroker(endpoint, hold=True)
    second = None
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    client = Client(endpoint, timeout=20, retries=1)
    aclient = AsyncClient(endpoint, timeout=20, retries=1)
    try:
        submitted = [client.submit("m", x) for x in xs[:4]]
        threads_out: dict[int, object] = {}

        def call(k):
            try:
                threads_out[k] = client.predict("m", xs[k]) if k == 4 else client.predict_many("m", xs[5:8], window=3)
            except Exception as exc:  # reported below
                threads_out[k] = exc

        threads = [threading.Thread(target=call, args=(k,)) for k in (4, 5)]
        for t in threads:
            t.start()
        awaited = [asyncio.run_coroutine_threadsafe(aclient.predict("m", x), loop) for x in xs[8:]]
        wait_until(lambda: len(first.seen) == 12, 20.0, what="every request reached the first broker")
        lost = first.rids()
        assert len(set(lost)) == 12
        sent_at = {rid: header["timeout_ms"] for _, rid, header in first.seen}
        first.close()
        time.sleep(0.5)  # the clients see the connection drop; nothing is resent while nobody listens
        second = FakeBroker(endpoint)
        for i, f in enumerate(submitted):
            np.testing.assert_array_equal(f.result(20), xs[i])
        for t in threads:
            t.join(20)
        np.testing.assert_array_equal(threads_out[4], xs[4])
        for i, g in enumerate(threads_out[5]):
            np.testing.assert_array_equal(g, xs[5 + i])
        for i, f in enumerate(awaited):
            np.testing.assert_array_equal(f.result(20), xs[8 + i])
        assert sorted(second.rids()) == sorted(lost), "each lost request was sent again once, with its request-id"
        for _, rid, header in second.seen:
            assert 0 < header["timeout_ms"] < sent_at[rid], "a resend carries what is left of the budget"
        # later requests go out once, on the same sockets
        np.testing.assert_array_equal(client.predict("m", xs[0]), xs[0])
        np.testing.assert_array_equal(client.submit("m", xs[1]).result(20), xs[1])
        np.testing.assert_array_equal(asyncio.run_coroutine_threadsafe(aclient.predict("m", xs[2]), loop).result(20),
                                      xs[2])
        assert len(second.seen) == 15
    finally:
        client.close()
        asyncio.run_coroutine_threadsafe(_aclose(aclient), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(10)
        loop.close()
        for fake in (first, second):
            if fake is not None and not fake.stopping:
                fake.close()


def test_requests_to_a_pool_that_is_not_there_neither_pile_up_nor_reach_it_later(tmp_path):
    """Requests wait for a connection in the client, not in ZeroMQ's queue: past its 1000-message limit a
    send would block for good, and the requests that timed out would all reach the pool when it came up."""
    endpoint = f"ipc://{tmp_path}/later.ipc"
    x = np.arange(8, dtype="float32").reshape(1, 8)
    with Client(endpoint, timeout=0.001) as client:
        for _ in range(1100):
            with pytest.raises(RequestTimeout, match="^no connection to"):
                client.health()

        async def run():
            async with AsyncClient(endpoint, timeout=0.2) as aclient:
                out = await asyncio.gather(*(aclient.health() for _ in range(1100)), return_exceptions=True)
                assert all(isinstance(o, RequestTimeout) for o in out)
                fake = FakeBroker(endpoint)
                try:
                    np.testing.assert_array_equal(await aclient.predict("m", x, timeout=10), x)
                    return fake.seen
                finally:
                    fake.close()

        seen = asyncio.run(run())
        assert len(seen) == 1, "only the request made once the pool was there reached it"
        fake = FakeBroker(endpoint)
        try:
            np.testing.assert_array_equal(client.predict("m", x, timeout=10), x)
            assert len(fake.seen) == 1
        finally:
            fake.close()


def test_a_lost_request_with_no_retries_left_fails_at_once(tmp_path):
    endpoint = f"ipc://{tmp_path}/fake.ipc"
    x = np.arange(8, dtype="float32").reshape(1, 8)
    fake = FakeBroker(endpoint, hold=True)
    client = Client(endpoint, timeout=30, retries=0)
    try:
        future = client.submit("m", x)
        wait_until(lambda: len(fake.seen) == 1, 10.0, what="the request reached the broker")
        started = time.monotonic()
        fake.close()
        with pytest.raises(Unavailable, match="connection to the broker at ipc://.* was lost while the request was "
                                              "in flight \\(sent once, no retries left\\)"):
            future.result(10)
        assert time.monotonic() - started < 5, "the loss is reported at once, not at the deadline"
    finally:
        client.close()
        if not fake.stopping:
            fake.close()


def test_clients_recover_after_the_broker_restarts(models):
    """A broker restart on the same endpoint: the same clients' next requests succeed instead of hanging."""
    where = tempfile.mkdtemp(prefix="mp-")
    endpoint = f"ipc://{where}/front.ipc"
    spec = [{"name": "a", "path": str(models.a), "max_batch_size": 8}]
    xs = _rows(3, seed=18)
    want = _want_rows(models, xs)
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    pools: list[Pool] = []
    client = Client(endpoint, timeout=60)
    aclient = AsyncClient(endpoint, timeout=60)

    def on_loop(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop)

    try:
        pools.append(Pool(spec, frontend=endpoint))
        np.testing.assert_allclose(client.predict("a", xs[0])[0], want[0], **TOL)
        np.testing.assert_allclose(on_loop(aclient.predict("a", xs[0])).result(60)[0], want[0], **TOL)
        assert pools[0].stop() == 0

        # one async request already waiting while no broker listens; the new pool comes up meanwhile
        waiting = on_loop(aclient.predict("a", xs[1]))
        pools.append(Pool(spec, frontend=endpoint))
        started = time.monotonic()
        np.testing.assert_allclose(client.predict("a", xs[1])[0], want[1], **TOL)
        np.testing.assert_allclose(waiting.result(60)[0], want[1], **TOL)
        np.testing.assert_allclose(on_loop(aclient.predict("a", xs[2])).result(60)[0], want[2], **TOL)
        np.testing.assert_allclose(client.predict_many("a", xs), want[:, None, :], **TOL)
        assert time.monotonic() - started < 45
    finally:
        client.close()
        on_loop(_aclose(aclient)).result(10)
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(10)
        loop.close()
        for p in pools:
            if p.proc.poll() is None:
                assert p.stop() == 0
        shutil.rmtree(where, ignore_errors=True)


async def _aclose(aclient: AsyncClient) -> None:
    await aclient.close()


# --- command line against a real pool ---------------------------------------------------------------


def test_cli_status_and_predict_against_the_pool(pool, models, tmp_path, capsys):
    assert cli.main(["status", "--endpoint", pool.endpoint]) == 0
    out = capsys.readouterr().out
    assert "MODEL" in out and "SERVED" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert rows["a"][1] == "1" and rows["a"][2] == "2/2"
    assert rows["b"][1] == "7"

    x = np.random.default_rng(19).normal(size=(3, 8)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    saved = tmp_path / "y.npy"
    code = cli.main(["predict", "a", "--input", str(tmp_path / "x.npy"), "--output", str(saved),
                     "--endpoint", pool.endpoint])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "output 'y': shape [3, 4] dtype float32" in captured.out
    np.testing.assert_allclose(np.load(saved), _expected(models.keras["a"], x), **TOL)

    assert cli.main(["predict", "nope", "--input", str(tmp_path / "x.npy"), "--endpoint", pool.endpoint]) == 1
    err = capsys.readouterr().err
    assert err.startswith("modelpool: ModelNotFound: ") and err.count("\n") == 1


# --- inputs as users pass them, and waiting for a pool ---------------------------------------------


def test_numpy_defaults_lists_and_bare_arrays_answer_as_keras_does(pool, models):
    """float64 and Python lists are what users have; Keras's own predict takes them, so the client does too."""
    x64 = np.random.default_rng(23).normal(size=(3, 8))  # float64
    want = _expected(models.keras["a"], x64.astype("float32"))
    np.testing.assert_allclose(pool.client.predict("a", x64), want, **TOL)
    np.testing.assert_allclose(pool.client.predict("a", x64.tolist()), want, **TOL)
    out = pool.client.infer("a", x64)  # one array for a one-input model
    assert list(out) == ["y"]
    np.testing.assert_allclose(out["y"], want, **TOL)
    np.testing.assert_allclose(pool.client.submit("a", x64).result(30), want, **TOL)
    got = pool.client.predict_many("a", [row[None].tolist() for row in x64])
    np.testing.assert_allclose(np.concatenate(got), want, **TOL)

    a, b = np.random.default_rng(24).normal(size=(2, 4)), np.random.default_rng(25).normal(size=(2, 3))
    multi = pool.client.infer("multi", {"in_a": a, "in_b": b.tolist()})
    want_sum, _ = models.keras["multi"]([a.astype("float32"), b.astype("float32")], training=False)
    np.testing.assert_allclose(multi["out_sum"], want_sum, **TOL)
    with pytest.raises(InvalidInput, match="model 'multi' has 2 inputs \\(in_a, in_b\\); pass a dict"):
        pool.client.infer("multi", a)


def test_predict_returns_named_outputs_and_intermediate_layers(pool, models):
    import keras

    x = np.random.default_rng(26).normal(size=(2, 8)).astype("float32")
    model = models.keras["a"]
    hidden = np.asarray(keras.Model(model.input, model.get_layer("hidden").output)(x))
    np.testing.assert_allclose(pool.client.predict("a", x, outputs="hidden"), hidden, **TOL)
    got_hidden, got_y = pool.client.predict("a", x, outputs=["hidden", "y"])
    np.testing.assert_allclose(got_hidden, hidden, **TOL)
    np.testing.assert_allclose(got_y, _expected(model, x), **TOL)

    async def run():
        async with AsyncClient(pool.endpoint, timeout=30) as client:
            first = await client.predict("a", x.astype("float64"), outputs="hidden")
            both = await client.predict("a", x.tolist(), outputs=["y", "hidden"])
            served = await client.wait_ready(["a", "b"])
            return first, both, served

    first, (y, h), served = asyncio.run(run())
    np.testing.assert_allclose(first, hidden, **TOL)
    np.testing.assert_allclose(h, hidden, **TOL)
    np.testing.assert_allclose(y, _expected(model, x), **TOL)
    assert {m["name"] for m in served} >= {"a", "b"}


def test_wait_ready_and_status_wait_for_a_starting_pool(models, capsys):
    p = Pool([{"name": "a", "path": str(models.a)}], wait_ready=False)
    try:
        code = cli.main(["status", "--wait", "--timeout", "120", "--endpoint", p.endpoint])
        out = capsys.readouterr().out
        assert code == 0, out
        row = next(line.split() for line in out.splitlines() if line.startswith("a "))
        assert row[2] == "1/1"
        with Client(p.endpoint, timeout=5) as client:
            assert client.wait_ready(["a"], timeout=5)[0]["replicas_ready"] == 1
            with pytest.raises(ModelNotFound, match="model 'nope' is not served here; models served: a"):
                client.wait_ready(["nope"], timeout=5)
    finally:
        assert p.stop() == 0, p.read_log()
    with Client(p.endpoint, timeout=0.3) as client:  # nobody there any more
        with pytest.raises(RequestTimeout, match="pool not ready within 1s"):
            client.wait_ready(timeout=1.0)


def test_a_model_that_cannot_load_at_start_stops_the_launcher_with_its_error(models):
    p = Pool([{"name": "a", "path": str(models.a)}, {"name": "broken", "path": str(models.broken)}],
             wait_ready=False)
    try:
        code = p.proc.wait(120)
    finally:
        p.stop()
    log = p.read_log()
    assert code == 3, log
    assert "model 'broken' failed to load: " in log and "broken.keras" in log
    assert "set exit_on_error = false in [pool] to serve the other models anyway" in log
    assert "modelpool listening" not in log  # never announced as ready
