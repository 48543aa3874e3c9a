"""The KServe V2 doors (HTTP and gRPC) of a real pool, through clients nobody here wrote.

tritonclient.http and tritonclient.grpc must get what the ZeroMQ Client gets for the same input, and
every error with the pool's status and message; raw HTTP (httpx, sockets) checks the V2 JSON shapes
and hostile bodies. The gateway is a process of its own: restarted when killed, gone with the pool,
never importing TensorFlow.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from poolutil import REPO, Pool, process_alive, wait_until
from tritonclient.utils import InferenceServerException

from modelpool import Client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SLEEP_SECONDS = 2.0


@dataclass
class Doors:
    pool: Pool
    http: str  # host:port
    grpc: str
    zmq: Client

    @property
    def url(self) -> str:
        return f"http://{self.http}"

    def gateway_pid(self) -> int:
        return int(re.findall(r"started gateway pid=(\d+)", self.pool.read_log())[-1])


@pytest.fixture(scope="module")
def doors(models):
    pool = Pool([
        {"name": "a", "path": str(models.a), "replicas": 2, "max_batch_size": 16},
        {"name": "multi", "path": str(models.multi), "version": "3"},
        {"name": "sleepy", "path": str(models.sleepy), "max_batch_size": 1, "prefetch": 0, "max_queue": 1,
         "imports": ["custom_layers"]},
        {"name": "poison", "path": str(models.poison), "imports": ["custom_layers"]},
    ], gateway=True, max_message_bytes=1 << 20)
    try:
        ports = pool.gateway_ports()
        with Client(pool.endpoint, timeout=30.0) as zmq:
            yield Doors(pool, "%s:%d" % ports["http"], "%s:%d" % ports["grpc"], zmq)
    finally:
        code = pool.stop()
    assert code == 0, pool.read_log()


@pytest.fixture(params=["http", "grpc"])
def triton(request, doors):
    """(tritonclient module, client) for each door."""
    if request.param == "http":
        client = thttp.InferenceServerClient(doors.http, network_timeout=30.0)
        yield thttp, client
    else:
        client = tgrpc.InferenceServerClient(doors.grpc)
        yield tgrpc, client
    client.close()


def _input(mod, name: str, array: np.ndarray, binary: bool = True):
    tensor = mod.InferInput(name, list(array.shape), {np.float32: "FP32", np.int32: "INT32"}[array.dtype.type])
    if mod is thttp:
        tensor.set_data_from_numpy(array, binary_data=binary)
    else:
        tensor.set_data_from_numpy(array)
    return tensor


def _output(mod, name: str, binary: bool = True):
    return mod.InferRequestedOutput(name, binary_data=binary) if mod is thttp else mod.InferRequestedOutput(name)


def _error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def _status(mod, exc: InferenceServerException) -> str:
    """The HTTP status (http) or gRPC code name (grpc) of an error."""
    return exc.status() if mod is thttp else str(exc.status()).replace("StatusCode.", "")


def _pool_message(zmq: Client, model: str, inputs, **kw) -> str:
    with pytest.raises(Exception) as info:
        zmq.infer(model, inputs, **kw)
    return str(info.value)


# --- health and metadata ---------------------------------------------------------------------


def test_health_and_server_metadata(triton):
    mod, client = triton
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("a") and client.is_model_ready("multi", "3")
    assert not client.is_model_ready("multi", "4") and not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    if mod is tgrpc:
        meta = {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}
    assert meta["name"] == "modelpool" and meta["version"]
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_is_v2_shaped(triton):
    mod, client = triton
    meta = client.get_model_metadata("multi", as_json=True) if mod is tgrpc else client.get_model_metadata("multi")
    assert meta["name"] == "multi" and meta["versions"] == ["3"] and meta["platform"] == "keras"
    inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]}
    outputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]}
    assert inputs == {"in_a": ("FP32", [-1, 4]), "in_b": ("FP32", [-1, 3])}
    assert outputs == {"out_sum": ("FP32", [-1, 2]), "out_cls": ("FP32", [-1, 3])}


# --- inference -------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_single_input_model_answers_as_the_zeromq_client(triton, doors, binary):
    mod, client = triton
    x = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    want = doors.zmq.predict("a", x)
    result = client.infer("a", [_input(mod, "x", x, binary)], outputs=[_output(mod, "y", binary)])
    np.testing.assert_allclose(result.as_numpy("y"), want, atol=1e-6)
    default = client.infer("a", [_input(mod, "x", x, binary)])  # no outputs named: all of them, binary
    np.testing.assert_allclose(default.as_numpy("y"), want, atol=1e-6)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_two_inputs_two_outputs_and_an_intermediate_layer(triton, doors, binary):
    mod, client = triton
    rng = np.random.default_rng(2)
    inputs = {"in_a": rng.normal(size=(3, 4)).astype(np.float32), "in_b": rng.normal(size=(3, 3)).astype(np.float32)}
    names = ["out_cls", "bottleneck", "out_sum"]
    want = doors.zmq.infer("multi", inputs, outputs=names)
    result = client.infer("multi", [_input(mod, n, v, binary) for n, v in inputs.items()], model_version="3",
                          outputs=[_output(mod, n, binary) for n in names])
    for name in names:
        np.testing.assert_allclose(result.as_numpy(name), want[name], atol=1e-6)
    if mod is thttp:
        assert [o["name"] for o in result.get_response()["outputs"]] == names
        assert result.get_response()["model_version"] == "3"


def test_grpc_typed_contents_inputs(doors):
    """ModelInfer with InferTensorContents instead of raw_input_contents (what non-Triton clients send)."""
    from tritonclient.grpc import service_pb2

    x = np.random.default_rng(3).normal(size=(2, 8)).astype(np.float32)
    request = service_pb2.ModelInferRequest(model_name="a", id="req-7")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 8])
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    client = tgrpc.InferenceServerClient(doors.grpc)
    try:
        response = client._client_stub.ModelInfer(request, timeout=30)
    finally:
        client.close()
    assert response.id == "req-7" and response.outputs[0].name == "y" and list(response.outputs[0].shape) == [2, 4]
    got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 4)
    np.testing.assert_allclose(got, doors.zmq.predict("a", x), atol=1e-6)


# --- errors ----------------------------------------------------------------------------------


def test_unknown_model_is_404_with_the_pools_message(triton, doors):
    mod, client = triton
    x = np.zeros((1, 8), np.float32)
    exc = _error(lambda: client.infer("nope", [_input(mod, "x", x)]))
    assert _status(mod, exc) in ("404", "NOT_FOUND")
    assert exc.message() == _pool_message(doors.zmq, "nope", {"x": x})
    assert "models served: a, multi, poison, sleepy" in exc.message()
    assert _status(mod, _error(lambda: client.get_model_metadata("nope"))) in ("404", "NOT_FOUND")


def test_wrong_shape_and_datatype_are_400_with_the_pools_message(triton, doors):
    mod, client = triton
    wide = np.zeros((2, 5), np.float32)
    exc = _error(lambda: client.infer("a", [_input(mod, "x", wide)]))
    assert _status(mod, exc) in ("400", "INVALID_ARGUMENT")
    assert exc.message() == _pool_message(doors.zmq, "a", {"x": wide})
    ints = np.zeros((2, 8), np.int32)
    exc = _error(lambda: client.infer("a", [_input(mod, "x", ints)]))
    assert _status(mod, exc) in ("400", "INVALID_ARGUMENT")
    assert "INT32" in exc.message() and "FP32" in exc.message()


def test_wrong_version_is_404(triton):
    mod, client = triton
    x = np.zeros((1, 8), np.float32)
    exc = _error(lambda: client.infer("a", [_input(mod, "x", x)], model_version="9"))
    assert _status(mod, exc) in ("404", "NOT_FOUND")
    assert exc.message().startswith('model "a" has no version "9" loaded; versions served: 1 (leave ')
    assert _status(mod, _error(lambda: client.get_model_metadata("a", "9"))) in ("404", "NOT_FOUND")


def test_a_model_that_raises_is_500_with_the_pools_message(triton, doors):
    from custom_layers import RAISE_VALUE

    mod, client = triton
    x = np.zeros((1, 8), np.float32)
    x[0, 0] = RAISE_VALUE
    exc = _error(lambda: client.infer("poison", [_input(mod, "x", x)]))
    assert _status(mod, exc) in ("500", "INTERNAL")
    assert exc.message() == _pool_message(doors.zmq, "poison", {"x": x})
    assert "refuses rows starting with -555" in exc.message()
    ok = client.infer("poison", [_input(mod, "x", np.ones((1, 8), np.float32))])
    assert ok.as_numpy("y").shape == (1, 4)


def _occupy_sleepy(doors: Doors) -> tuple[threading.Thread, list]:
    """Start a request that keeps sleepy's only worker busy SLEEP_SECONDS; returns once it runs."""
    busy = np.zeros((1, 8), np.float32)
    busy[0, 1] = SLEEP_SECONDS
    done: list = []
    thread = threading.Thread(target=lambda: done.append(doors.zmq.predict("sleepy", busy, timeout=30)))
    thread.start()
    wait_until(lambda: doors.pool.models(detail=False)["sleepy"]["in_flight"] == 1, 10.0, what="sleepy busy")
    return thread, done


def test_a_deadline_passing_in_the_queue_is_504(triton, doors):
    mod, client = triton
    thread, done = _occupy_sleepy(doors)
    x = np.zeros((1, 8), np.float32)
    exc = _error(lambda: client.infer("sleepy", [_input(mod, "x", x)], timeout=300_000))  # microseconds
    thread.join(30)
    assert done, "the request that kept the worker busy did not finish"
    assert _status(mod, exc) in ("504", "DEADLINE_EXCEEDED")
    assert "deadline" in exc.message().lower() or "timeout" in exc.message().lower(), exc.message()


def test_a_grpc_deadline_becomes_the_pools_timeout(doors):
    thread, _ = _occupy_sleepy(doors)
    client = tgrpc.InferenceServerClient(doors.grpc)
    try:
        x = np.zeros((1, 8), np.float32)
        started = time.monotonic()
        exc = _error(lambda: client.infer("sleepy", [_input(tgrpc, "x", x)], client_timeout=0.4))
        assert time.monotonic() - started < SLEEP_SECONDS
        assert _status(tgrpc, exc) == "DEADLINE_EXCEEDED"
    finally:
        client.close()
        thread.join(30)
    wait_until(lambda: doors.pool.models(detail=False)["sleepy"]["in_flight"] == 0, 10.0, what="sleepy idle")


def test_a_full_queue_is_429(triton, doors):
    mod, client = triton
    thread, _ = _occupy_sleepy(doors)
    queued = threading.Thread(target=lambda: doors.zmq.predict("sleepy", np.zeros((1, 8), np.float32), timeout=30))
    queued.start()
    try:
        wait_until(lambda: doors.pool.models(detail=False)["sleepy"]["queue_depth"] == 1, 10.0, what="queue full")
        exc = _error(lambda: client.infer("sleepy", [_input(mod, "x", np.zeros((1, 8), np.float32))]))
    finally:
        thread.join(30)
        queued.join(30)
    assert _status(mod, exc) in ("429", "RESOURCE_EXHAUSTED")
    assert "queue" in exc.message()


def test_statistics(triton, doors):
    mod, client = triton
    client.infer("a", [_input(mod, "x", np.zeros((1, 8), np.float32))])
    stats = client.get_inference_statistics("a", as_json=True) if mod is tgrpc else client.get_inference_statistics("a")
    (entry,) = stats["model_stats"]
    assert entry["name"] == "a" and entry["version"] == "1"
    assert int(entry["inference_count"]) >= 1 and int(entry["execution_count"]) >= 1
    assert int(entry["inference_stats"]["success"]["count"]) >= 1
    assert int(entry["inference_stats"]["compute_infer"]["ns"]) > 0
    assert abs(int(entry["last_inference"]) / 1000 - time.time()) < 600  # Unix ms of a recent model call


# --- raw HTTP: the V2 JSON shapes and hostile input ------------------------------------------


def test_v2_json_shapes(doors):
    x = np.random.default_rng(4).normal(size=(2, 8)).astype(np.float32)
    with httpx.Client(base_url=doors.url, timeout=30) as http:
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/a/ready", "/v2/models/multi/versions/3/ready"):
            answer = http.get(path)
            assert (answer.status_code, answer.content) == (200, b""), path
        assert http.get("/v2/models/nope/ready").status_code == 404
        assert http.get("/v2/models/multi/versions/1/ready").status_code == 404
        assert http.get("/v2").json() == {"name": "modelpool", "version": http.get("/v2").json()["version"],
                                          "extensions": ["binary_tensor_data", "statistics", "model_repository"]}
        body = {"id": "42", "inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP32", "data": x.tolist()}],
                "outputs": [{"name": "y"}]}
        answer = http.post("/v2/models/a/infer", json=body)
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
        doc = answer.json()
        assert doc["model_name"] == "a" and doc["model_version"] == "1" and doc["id"] == "42"
        (out,) = doc["outputs"]
        assert (out["name"], out["datatype"], out["shape"]) == ("y", "FP32", [2, 4])
        np.testing.assert_allclose(np.array(out["data"]).reshape(2, 4), doors.zmq.predict("a", x), atol=1e-6)
        missing = http.get("/v2/nothing")
        assert missing.status_code == 404 and "error" in missing.json()
        assert http.get("/v2/models/a/infer").status_code == 405


def _post(doors: Doors, body: bytes, headers: dict | None = None, path: str = "/v2/models/a/infer") -> httpx.Response:
    with httpx.Client(base_url=doors.url, timeout=30) as http:
        return http.post(path, content=body, headers=headers or {})


def _json(**inputs) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], **inputs}]}).encode()


HOSTILE = {
    "malformed JSON": (b'{"inputs": [', {}, "not valid JSON"),
    "not an object": (b"[1, 2]", {}, "must be a JSON object"),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, {}, "not valid JSON"),
    "deep data": (_json(data=json.loads("[" * 40 + "1" + "]" * 40)), {}, "shape [1, 8] needs 8 values"),
    "data not matching shape": (_json(data=[1.0, 2.0]), {}, "shape [1, 8] needs 8 values, data has 2"),
    "ragged data": (_json(data=[[1.0] * 8, [1.0]]), {}, "not a regular array"),
    "strings for FP32": (_json(data=["a"] * 8), {}, "datatype FP32 takes numbers"),
    "header length past the body": (_json(data=[0.0] * 8), {"Inference-Header-Content-Length": "100000"},
                                    "Inference-Header-Content-Length is 100000"),
    "header length not a number": (_json(data=[0.0] * 8), {"Inference-Header-Content-Length": "-5"},
                                   "must be a whole number"),
    "negative binary size": (_json(parameters={"binary_data_size": -1}), None,
                             "binary_data_size must be a whole number of bytes >= 0, got -1"),
    "huge binary size": (_json(parameters={"binary_data_size": 1 << 40}), None, "binary_data_size"),
    "binary size past the body": (_json(parameters={"binary_data_size": 32}), None,
                                  "binary_data_size 32 runs past the body's binary data (16 bytes left"),
    "binary size not the shape's": (_json(parameters={"binary_data_size": 16}), None,
                                    "FP32 shape [1, 8] takes 32 bytes, binary_data_size says 16"),
    "huge declared shape": (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1 << 30, 1 << 30],
                                                    "data": [0]}]}).encode(), {}, "over the pool's"),
    "oversize body": (b" " * ((1 << 20) + 1), {}, "over the pool's 1048576-byte message limit"),
    "unknown datatype": (json.dumps({"inputs": [{"name": "x", "datatype": "FP8", "shape": [1], "data": [0]}]}).encode(),
                         {}, "unknown datatype"),
    "bad gzip": (b"not gzip", {"Content-Encoding": "gzip"}, "not valid gzip"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_bodies_get_a_clear_400_and_the_pool_keeps_serving(doors, case):
    body, headers, message = HOSTILE[case]
    if headers is None:  # a binary part after the JSON, shorter or longer than declared
        headers = {"Inference-Header-Content-Length": str(len(body))}
        body += b"\0" * 16
    answer = _post(doors, body, headers)
    assert answer.status_code == 400, (case, answer.status_code, answer.text[:300])
    error = answer.json()["error"]
    assert message in error, (case, error)
    assert "Traceback" not in error and "object at 0x" not in error
    x = np.zeros((1, 8), np.float32)
    ok = _post(doors, _json(data=x.tolist()))
    assert ok.status_code == 200, ok.text


def test_binary_request_and_reply_by_hand(doors):
    """The binary tensor data extension without tritonclient: sizes, header length, gzip body."""
    x = np.random.default_rng(5).normal(size=(3, 8)).astype(np.float32)
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 8],
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    answer = _post(doors, gzip.compress(head + x.tobytes()),
                   {"Inference-Header-Content-Length": str(len(head)), "Content-Encoding": "gzip"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/octet-stream"
    length = int(answer.headers["inference-header-content-length"])
    doc = json.loads(answer.content[:length])
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 3 * 4 * 4}
    got = np.frombuffer(answer.content[length:], dtype="<f4").reshape(3, 4)
    np.testing.assert_allclose(got, doors.zmq.predict("a", x), atol=1e-6)


def test_timeout_header_and_unsupported_features(doors):
    x = np.zeros((1, 8), np.float32)
    answer = _post(doors, _json(data=x.tolist()), {"Inference-Timeout-Ms": "soon"})
    assert answer.status_code == 400 and "Inference-Timeout-Ms" in answer.json()["error"]
    shm = _json(parameters={"shared_memory_region": "r0"})
    answer = _post(doors, shm)
    assert answer.status_code == 501 and "shared memory is not supported" in answer.json()["error"]


def test_raw_socket_short_body_and_garbage(doors):
    """A Content-Length larger than what is sent, then the connection closed; and a garbage request line."""
    host, port = doors.http.rsplit(":", 1)
    body = _json(data=[0.0] * 8)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/a/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (len(body) + 50)
                     + body)
        sock.shutdown(socket.SHUT_WR)
        reply = _read_all(sock)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 400"), reply[:200]
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01 garbage\r\n\r\n")
        reply = _read_all(sock)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert _post(doors, _json(data=[0.0] * 8)).status_code == 200


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


# --- the gateway process ---------------------------------------------------------------------


def test_the_gateway_never_imports_tensorflow(doors):
    pid = doors.gateway_pid()
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    assert "tensorflow" not in maps and "keras" not in maps
    code = ("import sys, modelpool.gateway.process, modelpool.gateway.http_server, modelpool.gateway.grpc_server, "
            "modelpool.broker.gateway; bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_killed_gateway_is_restarted_on_the_same_ports(doors):
    old = doors.gateway_pid()
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: doors.gateway_pid() != old, 20.0, what="a new gateway process")
    wait_until(lambda: httpx.get(f"{doors.url}/v2/health/live", timeout=2).status_code == 200, 30.0,
               what="HTTP live again")
    client = tgrpc.InferenceServerClient(doors.grpc)
    try:
        wait_until(client.is_server_live, 30.0, what="gRPC live again")
    finally:
        client.close()
    assert not process_alive(old)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_the_gateway_stops_with_the_pool(models, sig):
    pool = Pool([{"name": "a", "path": str(models.a)}], gateway=True)
    try:
        pool.gateway_ports()
        pid = int(re.findall(r"started gateway pid=(\d+)", pool.read_log())[-1])
        assert process_alive(pid)
    finally:
        code = pool.stop(sig)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0), pool.read_log()
    wait_until(lambda: not process_alive(pid), 10.0, what="gateway gone")


def test_a_port_in_use_stops_the_pool_with_a_clear_message(models):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        pool = Pool([{"name": "a", "path": str(models.a)}], gateway=True, http={"port": port}, wait_ready=False)
        try:
            code = pool.proc.wait(60)
        finally:
            pool.stop()
    assert code == 4
    assert f"cannot bind HTTP to 127.0.0.1:{port}" in pool.read_log()
    assert "--http-port" in pool.read_log()
