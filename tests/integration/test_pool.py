"""End to end through a real launcher, broker and spawned TensorFlow workers."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import msgpack
import numpy as np
import pytest
import zmq

from modelpool.client import Client, InvalidInput, ModelNotFound, NotSupported, ProtocolError, errors, protocol

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _expected(model, x):
    return np.asarray(model(x, training=False))


def test_two_models_two_replicas_eight_threads_never_cross(pool, models):
    """The classic Keras bug (two models in one process answer for each other) cannot happen here."""
    rng = np.random.default_rng(1)
    inputs = [rng.normal(size=(int(rng.integers(1, 5)), 8)).astype("float32") for _ in range(160)]
    names = ["a" if i % 3 else "b" for i in range(len(inputs))]
    want = [_expected(models.keras[n], x) for n, x in zip(names, inputs)]
    assert not np.allclose(want[0][:1], _expected(models.keras["b" if names[0] == "a" else "a"], inputs[0])[:1])

    def call(i: int) -> np.ndarray:
        return pool.client.predict(names[i], inputs[i])

    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(call, range(len(inputs))))
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"request {i} model {names[i]}")
    served = {m["name"]: m for m in pool.client.models(detail=True)}
    assert served["a"]["replicas_ready"] == 2 and served["b"]["replicas_ready"] == 2
    assert all(w["pid"] for w in served["a"]["workers"] + served["b"]["workers"])


def test_pipelined_requests_on_one_socket_match_by_request_id(pool, models):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(pool.endpoint)
    try:
        xs = {f"r{i}".encode(): np.full((1, 8), i, dtype="float32") for i in range(40)}
        for rid, x in xs.items():
            metas, frames = protocol.encode_tensors({"x": x})
            sock.send_multipart(protocol.encode_request("a", rid, {"inputs": metas}, frames))
        got = {}
        while len(got) < len(xs):
            assert sock.poll(20_000), "pipelined replies stopped coming"
            reply = protocol.parse_reply(sock.recv_multipart())
            assert reply.status == b"200"
            got[reply.rid] = protocol.decode_tensors(reply.header["outputs"], reply.tensors)["y"]
        for rid, x in xs.items():
            np.testing.assert_allclose(got[rid], _expected(models.keras["a"], x), rtol=1e-5, atol=1e-5)
    finally:
        sock.close(linger=0)


def test_multi_input_multi_output_and_intermediate_layer(pool, models):
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 4)).astype("float32"), rng.normal(size=(3, 3)).astype("float32")
    out = pool.client.infer("multi", {"in_a": a, "in_b": b})
    want_sum, want_cls = models.keras["multi"]([a, b], training=False)
    np.testing.assert_allclose(out["out_sum"], want_sum, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["out_cls"], want_cls, rtol=1e-5, atol=1e-5)

    import keras

    bottleneck = keras.Model(models.keras["multi"].inputs, models.keras["multi"].get_layer("bottleneck").output)
    feats = pool.client.infer("multi", {"in_a": a, "in_b": b}, outputs=["bottleneck", "out_cls"])
    assert list(feats) == ["bottleneck", "out_cls"]
    np.testing.assert_allclose(feats["bottleneck"], bottleneck([a, b]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats["out_cls"], want_cls, rtol=1e-5, atol=1e-5)
    again = pool.client.infer("multi", {"in_a": a, "in_b": b}, outputs=["bottleneck"])  # cached sub-model
    np.testing.assert_allclose(again["bottleneck"], feats["bottleneck"])


@pytest.mark.parametrize("name", ["h5", "saved"])
def test_h5_and_savedmodel_formats(pool, models, name):
    x = np.random.default_rng(3).normal(size=(5, 8)).astype("float32")
    got = pool.client.predict(name, x)
    np.testing.assert_allclose(got, _expected(models.keras[name], x), rtol=1e-5, atol=1e-5)
    meta = pool.client.metadata(name)
    assert meta["platform"] == {"h5": "keras_h5", "saved": "tensorflow_savedmodel"}[name]
    assert [i["datatype"] for i in meta["inputs"]] == ["FP32"]
    assert meta["inputs"][0]["shape"] == [-1, 8]


def test_metadata_models_health(pool):
    meta = pool.client.metadata("multi")
    assert [i["name"] for i in meta["inputs"]] == ["in_a", "in_b"]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"out_sum": [-1, 2], "out_cls": [-1, 3]}
    listed = {m["name"]: m for m in pool.client.models()}
    assert set(listed) == {"a", "b", "multi", "h5", "saved"}
    assert listed["b"]["version"] == "7"
    health = pool.client.health()
    assert health["live"] and health["ready"] and health["models"]["a"]
    assert pool.client.has_model("a") and not pool.client.has_model("zzz")


def _ok(pool):
    x = np.ones((1, 8), "float32")
    assert pool.client.predict("a", x).shape == (1, 4)


def test_wrong_dtype_on_the_wire_names_expected_and_received(pool):
    """The client converts numpy's float64 default; the wire itself stays strict (servers never guess)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(pool.endpoint)
    try:
        metas, frames = protocol.encode_tensors({"x": np.ones((2, 8), "float64")})
        sock.send_multipart(protocol.encode_request("a", b"r1", {"inputs": metas}, frames))
        assert sock.poll(20_000)
        reply = protocol.parse_reply(sock.recv_multipart())
    finally:
        sock.close(linger=0)
    assert reply.status == b"400"
    message = reply.header["error"]["message"]
    assert "expected FP32" in message and "got FP64 [2, 8]" in message
    _ok(pool)


def test_wrong_shape_names_expected_and_received(pool):
    with pytest.raises(InvalidInput) as info:
        pool.client.predict("a", np.ones((2, 5), "float32"))
    assert "expected shape [batch, 8]" in str(info.value) and "got [2, 5]" in str(info.value)
    _ok(pool)


def test_wrong_input_names_and_unknown_output(pool):
    with pytest.raises(InvalidInput, match=r'expects inputs \["in_a", "in_b"\]'):
        pool.client.infer("multi", {"in_a": np.ones((1, 4), "float32")})
    with pytest.raises(InvalidInput, match='unknown output "nope".*layers are'):
        pool.client.infer("a", {"x": np.ones((1, 8), "float32")}, outputs=["nope"])
    _ok(pool)


def test_unknown_model_lists_models(pool):
    with pytest.raises(ModelNotFound) as info:
        pool.client.predict("nope", np.ones((1, 8), "float32"))
    assert '"nope" is not served' in str(info.value) and "a, b, h5, multi, saved" in str(info.value)
    assert info.value.status == b"404"
    _ok(pool)


def test_unknown_mmi_service_is_501(pool):
    with Client(pool.endpoint) as c:
        rid, frames = c._builder.request("mmi.nothing", {})
        with pytest.raises(NotSupported):
            from modelpool.client.base import header_or_raise

            header_or_raise(c._roundtrip(rid, frames, 5.0))
    _ok(pool)


def _raw(pool, frames, wait=True):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(pool.endpoint)
    try:
        sock.send_multipart(frames)
        if not wait:
            return None if not sock.poll(500) else sock.recv_multipart()
        assert sock.poll(10_000), "no answer to a malformed request"
        return sock.recv_multipart()
    finally:
        sock.close(linger=0)


def test_malformed_frames_are_answered_or_dropped(pool):
    garbage_header = _raw(pool, [b"", b"MDPC01", b"a", b"rid1", b"\xc1\xc1not msgpack"])
    reply = protocol.parse_reply(garbage_header)
    err = protocol.reply_error(reply)
    assert isinstance(err, ProtocolError) and reply.status == b"400" and "msgpack" in str(err)

    not_a_map = protocol.parse_reply(_raw(pool, [b"", b"MDPC01", b"a", b"rid2", msgpack.packb([1, 2])]))
    assert not_a_map.status == b"400" and "map" in not_a_map.header["error"]["message"]

    wrong_len = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8]}]}
    bad_tensor = protocol.parse_reply(_raw(pool, [b"", b"MDPC01", b"a", b"rid3", msgpack.packb(wrong_len), b"123"]))
    assert bad_tensor.status == b"400" and "needs 32 bytes, frame has 3" in bad_tensor.header["error"]["message"]

    assert _raw(pool, [b"", b"XXXX01", b"a"], wait=False) is None  # no envelope to answer: dropped
    assert _raw(pool, [b"just one frame"], wait=False) is None
    assert "malformed" in pool.read_log()
    _ok(pool)


def test_model_that_raises_gives_500_and_keeps_serving(models):
    """A model whose call raises: 500 with the exception's message, other rows in the batch answered."""
    from poolutil import Pool
    import custom_layers

    p = Pool([{"name": "poison", "path": str(models.poison), "imports": ["custom_layers"]}])
    try:
        bad = np.ones((1, 8), "float32")
        bad[0, 0] = custom_layers.RAISE_VALUE
        with pytest.raises(errors.ModelError, match="refuses rows starting with -555"):
            p.client.predict("poison", bad)
        good = np.full((1, 8), 0.5, "float32")
        np.testing.assert_allclose(p.client.predict("poison", good), _expected(models.keras["poison"], good),
                                   rtol=1e-5, atol=1e-5)
        # several concurrent requests, one raising: only that one fails
        xs = [np.full((1, 8), i, "float32") for i in range(12)]
        xs[5] = bad
        def call(x):
            try:
                return p.client.predict("poison", x)
            except errors.ModelError as exc:
                return exc
        with ThreadPoolExecutor(6) as ex:
            results = list(ex.map(call, xs))
        assert isinstance(results[5], errors.ModelError)
        assert all(isinstance(r, np.ndarray) for i, r in enumerate(results) if i != 5)
    finally:
        assert p.stop() == 0


def test_workers_are_spawned_and_broker_has_no_tensorflow(pool):
    launcher = pool.proc.pid
    with open(f"/proc/{launcher}/maps") as f:
        maps = f.read()
    assert "tensorflow" not in maps and "libtensorflow" not in maps
    for pid in pool.worker_pids():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ")
        assert b"multiprocessing.spawn" in cmdline and b"spawn_main" in cmdline, cmdline
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().split(") ")[-1].split()[1])
        assert ppid == launcher
        with open(f"/proc/{pid}/maps") as f:
            assert "tensorflow" in f.read()  # the worker does load TF: the check above can fail


def test_one_client_shared_by_threads(pool, models):
    x = np.random.default_rng(9).normal(size=(1, 8)).astype("float32")
    want = _expected(models.keras["a"], x)
    errors_seen = []

    def hammer():
        try:
            for _ in range(25):
                np.testing.assert_allclose(pool.client.predict("a", x), want, rtol=1e-5, atol=1e-5)
        except Exception as exc:  # collected and asserted below
            errors_seen.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors_seen
