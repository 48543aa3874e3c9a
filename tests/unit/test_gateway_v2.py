"""KServe V2 <-> the pool's wire request, without sockets or processes; the [http]/[grpc] config and flags."""
from __future__ import annotations

import argparse
import asyncio
import gzip
import json

import numpy as np
import pytest

from modelpool.broker import config as pool_config
from modelpool.broker.config import ConfigError, GrpcConfig, HttpConfig
from modelpool.cli import apply_door_flags, build_parser, door_port, gateway_lines
from modelpool.client import protocol
from modelpool.client.errors import InvalidInput, ModelNotFound, NotSupported
from modelpool.gateway import v2


def _parse(doc: dict, binary: bytes = b"", limit: int = 1 << 20) -> v2.InferRequest:
    return v2.parse_http_infer(doc, memoryview(binary), limit)


def _tensor(name: str = "x", datatype: str = "FP32", shape=(2, 3), **extra) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(shape), **extra}


def _decoded(request: v2.InferRequest) -> dict[str, np.ndarray]:
    return protocol.decode_tensors(request.header["inputs"], request.tensors)


# --- HTTP requests ---------------------------------------------------------------------------


def test_json_data_goes_through_numpy_once_flat_or_nested():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for data in (x.tolist(), x.reshape(-1).tolist()):
        request = _parse({"inputs": [_tensor(data=data)]})
        assert request.header == {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3]}]}
        np.testing.assert_array_equal(_decoded(request)["x"], x)


def test_binary_data_passes_through_as_views_of_the_body():
    a = np.arange(6, dtype="<f4").reshape(2, 3)
    b = np.array([[1, 2]], dtype="<i8")
    body = a.tobytes() + b.tobytes()
    doc = {"inputs": [_tensor(parameters={"binary_data_size": a.nbytes}),
                      _tensor("b", "INT64", (1, 2), parameters={"binary_data_size": b.nbytes})],
           "outputs": [{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}],
           "parameters": {"binary_data_output": True, "timeout": 250_000}, "id": "r1"}
    request = _parse(doc, body)
    assert all(isinstance(t, memoryview) for t in request.tensors)
    got = _decoded(request)
    np.testing.assert_array_equal(got["x"], a)
    np.testing.assert_array_equal(got["b"], b)
    assert request.header["outputs"] == [{"name": "y"}, {"name": "z"}]
    assert request.timeout == 0.25 and request.request_id == "r1"
    assert not request.wants_binary("y") and request.wants_binary("z") and request.wants_binary("other")


@pytest.mark.parametrize("doc,binary,message", [
    ({"inputs": []}, b"", "inputs must be a non-empty array"),
    ({"inputs": [_tensor(data=[1.0] * 5)]}, b"", "shape [2, 3] needs 6 values, data has 5"),
    ({"inputs": [_tensor(data=[[1.0, 2.0, 3.0], [1.0]])]}, b"", "not a regular array"),
    ({"inputs": [_tensor(data=["a"] * 6)]}, b"", "datatype FP32 takes numbers, data holds strings"),
    ({"inputs": [_tensor(datatype="INT32", data=[1.5] * 6)]}, b"", "INT32 takes whole numbers, data holds fractional numbers"),
    ({"inputs": [_tensor(datatype="UINT8", data=[300] * 6)]}, b"", "outside UINT8's 0 to 255"),
    ({"inputs": [_tensor(datatype="BOOL", data=[1] * 6)]}, b"", "BOOL takes true/false"),
    ({"inputs": [_tensor(datatype="FP8", data=[1] * 6)]}, b"", "unknown datatype \"FP8\""),
    ({"inputs": [_tensor(shape=[-1, 3], data=[1])]}, b"", "shape must be a list of at most 32 non-negative integers"),
    ({"inputs": [_tensor(shape=[1 << 40, 1 << 40], data=[1])]}, b"", "over the pool's 1048576-byte message limit"),
    ({"inputs": [_tensor()]}, b"", "has neither data nor parameters.binary_data_size"),
    ({"inputs": [_tensor(data=[1] * 6, parameters={"binary_data_size": 24})]}, b"\0" * 24, "both data and"),
    ({"inputs": [_tensor(parameters={"binary_data_size": -3})]}, b"", "binary_data_size must be a whole number"),
    ({"inputs": [_tensor(parameters={"binary_data_size": True})]}, b"", "binary_data_size must be a whole number"),
    ({"inputs": [_tensor(parameters={"binary_data_size": 20})]}, b"\0" * 20, "takes 24 bytes, binary_data_size says 20"),
    ({"inputs": [_tensor(parameters={"binary_data_size": 24})]}, b"\0" * 10, "runs past the body's binary data"),
    ({"inputs": [_tensor(parameters={"binary_data_size": 24})]}, b"\0" * 30, "6 bytes of binary data past"),
    ({"inputs": [_tensor(data=[1] * 6)], "parameters": {"timeout": -1}}, b"", "timeout must be a whole number"),
    ({"inputs": [_tensor(data=[1] * 6)], "parameters": {"binary_data_output": "yes"}}, b"", "true or false"),
    ({"inputs": [_tensor(data=[1] * 6)], "outputs": "y"}, b"", "outputs must be an array"),
    ({"inputs": [_tensor(data=[1] * 6)], "id": 7}, b"", "id must be a string"),
])
def test_bad_requests_say_what_to_fix(doc, binary, message):
    with pytest.raises(InvalidInput) as info:
        _parse(doc, binary)
    assert message in str(info.value)


@pytest.mark.parametrize("doc", [
    {"inputs": [_tensor(parameters={"shared_memory_region": "r"})]},
    {"inputs": [_tensor(data=[1] * 6)], "outputs": [{"name": "y", "parameters": {"classification": 3}}]},
    {"inputs": [_tensor(data=[1] * 6)], "parameters": {"sequence_id": 4}},
])
def test_triton_features_modelpool_lacks_are_501(doc):
    with pytest.raises(NotSupported, match="not supported by modelpool"):
        _parse(doc)


def test_bytes_inputs_use_the_pools_length_prefixed_encoding():
    request = _parse({"inputs": [_tensor("s", "BYTES", (2,), data=["héllo", ""])]})
    assert bytes(request.tensors[0]) == b"\x06\0\0\0h\xc3\xa9llo\0\0\0\0"
    assert list(_decoded(request)["s"]) == ["héllo".encode(), b""]


def test_split_body_and_json():
    head, binary = v2.split_body(b'{"a":1}xyz', "7")
    assert bytes(head) == b'{"a":1}' and bytes(binary) == b"xyz"
    assert v2.parse_json(head) == {"a": 1}
    for value, message in (("8x", "whole number"), ("99", "body has only 10 bytes"), ("-1", "whole number")):
        with pytest.raises(InvalidInput, match=message):
            v2.split_body(b'{"a":1}xyz', value)
    for raw, message in ((b"{", "not valid JSON"), (b"[1]", "must be a JSON object, got an array"),
                         (b"[" * 5000 + b"]" * 5000, "not valid JSON")):
        with pytest.raises(InvalidInput, match=message):
            v2.parse_json(raw)


def test_decompress_is_bounded():
    assert v2.decompress(gzip.compress(b"abc"), "gzip", 10) == b"abc"
    with pytest.raises(InvalidInput, match="inflates to more than"):
        v2.decompress(gzip.compress(b"\0" * 1000), "gzip", 100)
    with pytest.raises(InvalidInput, match="not supported"):
        v2.decompress(b"x", "br", 100)


# --- replies ---------------------------------------------------------------------------------


def _reply(*arrays: tuple[str, np.ndarray]) -> protocol.Reply:
    metas, frames = protocol.encode_tensors(list(arrays))
    return protocol.Reply(b"m", b"1", b"200", {"model_name": "m", "model_version": "2", "outputs": metas}, frames)


def test_reply_json_and_binary_outputs():
    y = np.arange(4, dtype=np.float32).reshape(2, 2)
    z = np.array([[True, False]])
    request = v2.InferRequest({}, [], "id-1", binary_outputs={"z": True})
    head, buffers, length = v2.http_reply(request, _reply(("y", y), ("z", z)))
    doc = json.loads(head)
    assert doc == {"model_name": "m", "model_version": "2", "id": "id-1", "outputs": [
        {"name": "y", "datatype": "FP32", "shape": [2, 2], "data": [0.0, 1.0, 2.0, 3.0]},
        {"name": "z", "datatype": "BOOL", "shape": [1, 2], "parameters": {"binary_data_size": 2}}]}
    assert length == len(head) and b"".join(bytes(b) for b in buffers) == b"\x01\x00"
    head, buffers, length = v2.http_reply(v2.InferRequest({}, []), _reply(("y", y)))
    assert length is None and buffers == [] and "id" not in json.loads(head)


def test_bytes_outputs_as_json_text_or_a_clear_error():
    request = v2.InferRequest({}, [])
    head, _, _ = v2.http_reply(request, _reply(("s", np.array([b"ab", b"c"], dtype=object))))
    assert json.loads(head)["outputs"][0]["data"] == ["ab", "c"]
    with pytest.raises(InvalidInput, match="not UTF-8 text; ask for it as binary data"):
        v2.http_reply(request, _reply(("s", np.array([b"\xff"], dtype=object))))


def test_metadata_statistics_and_versions():
    meta = {"name": "m", "versions": ["2"], "platform": "keras_h5", "layers": ["h"], "max_batch_size": 8,
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}]}
    assert v2.model_metadata(meta, "2") == {"name": "m", "versions": ["2"], "platform": "keras",
                                            "inputs": meta["inputs"], "outputs": meta["outputs"]}
    assert v2.model_metadata({**meta, "platform": "tensorflow_savedmodel"}, "2")["platform"] == "tensorflow"
    stats = v2.model_statistics({"name": "m", "version": "2", "success": 4, "failed": 3, "dispatched": 6,
                                 "queue_seconds": 0.5, "executions": 3, "inferences": 5.0, "compute_seconds": 0.25,
                                 "request_seconds": 1.0, "failed_request_seconds": 0.125,
                                 "last_call_ms": 1_790_000_000_000})
    assert stats["inference_count"] == 5 and stats["execution_count"] == 3
    assert stats["last_inference"] == 1_790_000_000_000
    assert stats["inference_stats"]["success"] == {"count": 4, "ns": 1_000_000_000}
    assert stats["inference_stats"]["fail"] == {"count": 3, "ns": 125_000_000}
    assert stats["inference_stats"]["queue"] == {"count": 6, "ns": 500_000_000}
    assert stats["inference_stats"]["compute_infer"] == {"count": 3, "ns": 250_000_000}
    assert v2.model_statistics({"name": "m", "success": True, "failed": "3"})["inference_stats"]["success"] == {
        "count": 0, "ns": 0}  # what is not a number reads as 0
    versions = [{"name": "m", "version": "3", "default": False}, {"name": "m", "version": "2", "default": True}]
    assert v2.pick_version("m", "", versions)["version"] == "2"  # the one requests go to: the newest ready
    assert v2.pick_version("m", "3", versions)["version"] == "3"
    with pytest.raises(ModelNotFound, match='model "m" has no version "4" loaded; versions served: 3, 2'):
        v2.pick_version("m", "4", versions)


# --- gRPC requests ---------------------------------------------------------------------------


def test_grpc_raw_and_typed_contents():
    from modelpool.gateway import grpc_predict_v2_pb2 as pb
    from modelpool.gateway.grpc_server import parse_infer

    x = np.arange(6, dtype="<f4").reshape(2, 3)
    raw = pb.ModelInferRequest(model_name="m", raw_input_contents=[x.tobytes()])
    raw.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    raw.parameters["timeout"].int64_param = 2_000_000
    request = parse_infer(raw, 1 << 20)
    np.testing.assert_array_equal(_decoded(request)["x"], x)
    assert request.timeout == 2.0
    typed = pb.ModelInferRequest(model_name="m")
    tensor = typed.inputs.add(name="i", datatype="INT16", shape=[3])
    tensor.contents.int_contents.extend([1, -2, 3])
    typed.outputs.add(name="y")
    request = parse_infer(typed, 1 << 20)
    np.testing.assert_array_equal(_decoded(request)["i"], np.array([1, -2, 3], np.int16))
    assert request.header["outputs"] == [{"name": "y"}]
    tensor.contents.int_contents[0] = 1 << 20
    with pytest.raises(InvalidInput, match="outside INT16's"):
        parse_infer(typed, 1 << 20)
    fp16 = pb.ModelInferRequest(model_name="m")
    fp16.inputs.add(name="h", datatype="FP16", shape=[1])
    with pytest.raises(InvalidInput, match="FP16 data must be sent in raw_input_contents"):
        parse_infer(fp16, 1 << 20)
    short = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"\0" * 4])
    short.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    with pytest.raises(InvalidInput, match="takes 24 bytes, raw_input_contents has 4"):
        parse_infer(short, 1 << 20)


def test_grpc_codes_for_pool_statuses():
    import grpc

    from modelpool.client.errors import error_from_wire
    from modelpool.gateway.grpc_server import code_of

    want = {b"400": "INVALID_ARGUMENT", b"404": "NOT_FOUND", b"429": "RESOURCE_EXHAUSTED", b"500": "INTERNAL",
            b"501": "UNIMPLEMENTED", b"503": "UNAVAILABLE", b"504": "DEADLINE_EXCEEDED"}
    for status, name in want.items():
        assert code_of(error_from_wire(status, None, "m")) is getattr(grpc.StatusCode, name)


# --- config and flags ------------------------------------------------------------------------


def _config(tmp_path, **tables) -> pool_config.PoolConfig:
    model = tmp_path / "m.keras"
    model.write_bytes(b"")
    return pool_config.from_dict({"models": [{"name": "m", "path": str(model)}], **tables})


def test_doors_default_on_loopback_triton_ports(tmp_path):
    cfg = _config(tmp_path)
    assert (cfg.http.enabled, cfg.http.host, cfg.http.port) == (True, "127.0.0.1", 8000)
    assert (cfg.grpc.enabled, cfg.grpc.host, cfg.grpc.port) == (True, "127.0.0.1", 8001)
    cfg = _config(tmp_path, http={"port": 0, "default_timeout": 5}, grpc={"enabled": False})
    assert cfg.http.port == 0 and cfg.http.default_timeout == 5 and not cfg.grpc.enabled


@pytest.mark.parametrize("tables,message", [
    ({"http": {"port": 70000}}, "[http].port must be an integer from 0 to 65535"),
    ({"grpc": {"port": "8001"}}, "[grpc].port must be an integer"),
    ({"http": {"enabled": "yes"}}, "[http].enabled must be true or false"),
    ({"http": {"host": ""}}, "[http].host must be an IP address"),
    ({"grpc": {"default_timeout": 0}}, "[grpc].default_timeout must be a positive number"),
    ({"http": {"prot": 1}}, "[http]: unknown key(s) prot"),
    ({"http": 8000}, "http must be a table"),
    ({"http": {"host": "0.0.0.0"}}, "[http].host '0.0.0.0' is not a loopback address"),
    ({"grpc": {"host": "10.1.2.3"}}, "set pool.insecure_network = true"),
])
def test_door_config_errors(tmp_path, tables, message):
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, **tables)
    assert message in str(info.value)


def test_a_network_host_needs_the_insecure_opt_in(tmp_path):
    cfg = _config(tmp_path, pool={"insecure_network": True}, http={"host": "0.0.0.0"})
    assert cfg.http.host == "0.0.0.0"
    assert _config(tmp_path, http={"host": "0.0.0.0", "enabled": False}).http.enabled is False


def test_port_flags(tmp_path):
    cfg = _config(tmp_path)
    args = build_parser().parse_args(["serve", "--demo", "--http-port", "off", "--grpc-port", "0"])
    changed = apply_door_flags(cfg, {"http": args.http_port, "grpc": args.grpc_port})
    assert not changed.http.enabled and changed.grpc == GrpcConfig(port=0)
    args = build_parser().parse_args(["serve", "--demo"])
    assert apply_door_flags(cfg, {"http": args.http_port, "grpc": args.grpc_port}) == cfg
    assert door_port("OFF") is None and door_port("9000") == 9000
    with pytest.raises(argparse.ArgumentTypeError, match="port number or 'off'"):
        door_port("http")
    with pytest.raises(argparse.ArgumentTypeError, match="from 0 to 65535"):
        door_port("65536")
    assert gateway_lines(_config(tmp_path), {"http": 8000, "grpc": 8001}) == [
        "KServe V2 HTTP listening on http://127.0.0.1:8000 (e.g. curl http://127.0.0.1:8000/v2/health/ready)",
        "KServe V2 gRPC listening on 127.0.0.1:8001"]
    assert HttpConfig().port == 8000


# --- the HTTP door over a fake backend: what a slow or greedy client gets ------------------------


class _FakeBackend:
    """Answers infer with the request's first input; raises ``error`` when set."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    async def infer(self, model, version, header, tensors, timeout):
        if self.error is not None:
            raise self.error
        return protocol.Reply(model=b"m", rid=b"1", status=protocol.OK, header={"outputs": header["inputs"]}, tensors=list(tensors))


def _door_client(backend, **limits):
    import httpx

    from modelpool.gateway.http_server import HttpDoor

    door = HttpDoor(backend, max_body=1 << 16, default_timeout=5.0, **limits)
    return door, httpx.AsyncClient(transport=httpx.ASGITransport(app=door.app), base_url="http://gateway")


_BODY = json.dumps({"inputs": [_tensor(shape=(1, 2), data=[1.0, 2.0])]}).encode()


async def _slow(body: bytes, pause: float, gate=None):
    yield body[:10]
    if gate is not None:
        await gate.wait()
    await asyncio.sleep(pause)
    yield body[10:]


@pytest.mark.timeout(30)
def test_a_body_that_does_not_arrive_in_time_is_408_and_releases_its_bytes():
    async def run():
        door, http = _door_client(_FakeBackend(), read_timeout=0.2)
        async with http:
            slow = await http.post("/v2/models/m/infer", content=_slow(_BODY, 1.0))
            fast = await http.post("/v2/models/m/infer", content=_BODY)
        return door, slow, fast

    door, slow, fast = asyncio.run(run())
    assert slow.status_code == 408 and "did not arrive within 0.2 s" in slow.json()["error"]
    assert fast.status_code == 200 and fast.json()["outputs"][0]["data"] == [1.0, 2.0]
    assert door.reading == 0


@pytest.mark.timeout(30)
def test_bodies_arriving_together_past_the_budget_are_503_and_the_rest_go_through():
    async def run():
        door, http = _door_client(_FakeBackend(), max_reading=len(_BODY) + 5)
        gate = asyncio.Event()
        async with http:
            first = asyncio.create_task(http.post("/v2/models/m/infer", content=_slow(_BODY, 0.0, gate)))
            while door.reading < 10:  # the first body is half in
                await asyncio.sleep(0.01)
            second = await http.post("/v2/models/m/infer", content=_BODY)
            gate.set()
            return door, await first, second

    door, first, second = asyncio.run(run())
    assert second.status_code == 503 and "retry later" in second.json()["error"]
    assert first.status_code == 200 and door.reading == 0


def test_pool_errors_keep_their_status_on_the_http_door():
    from modelpool.client.errors import Overloaded, RequestTimeout, Unavailable

    async def status(error):
        _, http = _door_client(_FakeBackend(error))
        async with http:
            reply = await http.post("/v2/models/m/infer", content=_BODY)
        return reply.status_code, reply.json()["error"]

    for error, code in ((Unavailable("model \"m\" failed to load: boom"), 503), (Overloaded("queue full"), 429),
                        (RequestTimeout("late"), 504), (ModelNotFound("no m"), 404)):
        assert asyncio.run(status(error)) == (code, str(error))
