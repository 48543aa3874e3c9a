"""Round trips and rejections for every message kind of the wire protocol (no sockets, no processes)."""
from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
import zmq

from modelpool.client import errors, protocol
from modelpool.client.errors import PoolError, ProtocolError
from modelpool.client.protocol import Command

NUMERIC = sorted(protocol.DATATYPES)
ALL_DATATYPES = NUMERIC + ["BYTES"]
RID = b"\x00\x00\x00\x01"
CLIENT_ADDR = b"\x00k\x8bEg"


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    """A distinctive array of the given wire datatype and shape."""
    count = int(np.prod(shape, dtype=np.int64))
    if datatype == "BYTES":
        items = [f"s{i}-é".encode() * (i % 3) for i in range(count)]
        return np.array(items, dtype=object).reshape(shape)
    dtype = protocol.DATATYPES[datatype]
    if datatype == "BOOL":
        return (np.arange(count) % 3 == 0).reshape(shape)
    if dtype.kind == "f":
        return (np.arange(count, dtype=dtype) - 1.5).reshape(shape) / 4
    info = np.iinfo(dtype)
    return np.resize(np.array([info.min, info.max, 0, 1, 2, 3], dtype=dtype), count).reshape(shape)


def roundtrip(name: str, value) -> np.ndarray:
    metas, frames = protocol.encode_tensors({name: value})
    return protocol.decode_tensors(metas, frames)[name]


def assert_same(got: np.ndarray, want) -> None:
    want = np.asarray(want)
    assert got.shape == want.shape
    if got.dtype == object:
        expected = [x.encode() if isinstance(x, str) else bytes(x) for x in want.reshape(-1)]
        assert list(got.reshape(-1)) == expected
    else:
        assert got.dtype == protocol.DATATYPES[protocol.datatype_of(want.dtype)]
        np.testing.assert_array_equal(got, want)


# --- tensors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_tensor_round_trips_for_every_datatype(datatype):
    value = sample(datatype)
    metas, frames = protocol.encode_tensors({"x": value})
    assert metas == [{"name": "x", "datatype": datatype, "shape": [2, 3]}]
    assert_same(protocol.decode_tensors(metas, frames)["x"], value)


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_zero_d_tensor_round_trips(datatype):
    value = sample(datatype, ())
    metas, frames = protocol.encode_tensors({"x": value})
    assert metas[0]["shape"] == []
    assert_same(protocol.decode_tensors(metas, frames)["x"], value)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 4)])
@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_empty_tensor_round_trips(datatype, shape):
    value = sample(datatype, shape)
    metas, frames = protocol.encode_tensors({"x": value})
    assert metas[0]["shape"] == list(shape)
    assert bytes(frames[0]) == b""
    assert_same(protocol.decode_tensors(metas, frames)["x"], value)


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a.T,
        lambda a: a[:, ::2],
        lambda a: a[::-1],
        lambda a: np.asfortranarray(a),
    ],
    ids=["transposed", "strided", "reversed", "fortran"],
)
@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_non_contiguous_tensor_round_trips(datatype, make):
    value = make(sample(datatype, (4, 6)))
    assert_same(roundtrip("x", value), value)


@pytest.mark.parametrize("datatype", [n for n in NUMERIC if protocol.DATATYPES[n].itemsize > 1])
def test_big_endian_tensor_is_sent_little_endian(datatype):
    value = sample(datatype).astype(protocol.DATATYPES[datatype].newbyteorder(">"))
    metas, frames = protocol.encode_tensors({"x": value})
    assert metas[0]["datatype"] == datatype
    assert bytes(frames[0]) == value.astype(protocol.DATATYPES[datatype]).tobytes()
    got = protocol.decode_tensors(metas, frames)["x"]
    assert got.dtype.byteorder in "<=|"
    np.testing.assert_array_equal(got, value)


def test_wire_bytes_are_little_endian_row_major():
    _, frames = protocol.encode_tensors({"x": np.array([[1, 2], [3, 4]], dtype=">i2").T})
    assert bytes(frames[0]) == b"\x01\x00\x03\x00\x02\x00\x04\x00"


def test_bytes_tensor_wire_encoding():
    meta, frame = protocol.encode_tensor("s", np.array([b"ab", b"", b"\x00z"], dtype=object))
    assert meta == {"name": "s", "datatype": "BYTES", "shape": [3]}
    assert bytes(frame) == b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00\x00z"


@pytest.mark.parametrize(
    "value",
    [np.array(["héllo", "", "x"]), np.array([b"a\x00", b"bc"]), np.array([["é", "b"]], dtype=object)],
    ids=["unicode", "bytes", "object-str"],
)
def test_bytes_tensor_accepts_str_and_bytes(value):
    assert_same(roundtrip("s", value), value)


def test_python_scalars_and_lists_round_trip():
    assert_same(roundtrip("f", 1.5), np.float64(1.5))
    assert_same(roundtrip("i", [[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]]))
    assert_same(roundtrip("b", True), np.bool_(True))


@pytest.mark.parametrize("dtype", ["complex64", "datetime64[s]", "V4", "timedelta64[ms]"])
def test_unsupported_dtype_is_a_protocol_error(dtype):
    with pytest.raises(ProtocolError, match="no wire datatype"):
        protocol.encode_tensor("x", np.zeros(2, dtype=dtype))


def test_datatype_of_maps_every_wire_datatype():
    for name, dtype in protocol.DATATYPES.items():
        assert protocol.datatype_of(dtype) == name
        assert protocol.datatype_of(dtype.newbyteorder(">")) == name
    for dtype in ("O", "S3", "U2"):
        assert protocol.datatype_of(np.dtype(dtype)) == "BYTES"


def test_encode_tensors_keeps_order_of_pairs():
    metas, frames = protocol.encode_tensors([("b", np.int8(1)), ("a", np.int8(2))])
    assert [m["name"] for m in metas] == ["b", "a"]
    assert [bytes(f) for f in frames] == [b"\x01", b"\x02"]


def test_encode_does_not_copy_contiguous_arrays():
    value = np.arange(16, dtype="<f4").reshape(4, 4)
    _, frames = protocol.encode_tensors({"x": value})
    assert np.shares_memory(np.frombuffer(frames[0], dtype=np.uint8), value)


def test_decoded_tensors_are_read_only_views_of_bytes_frames():
    metas, frames = protocol.encode_tensors({"x": np.arange(6, dtype="<i4")})
    frame = bytes(frames[0])
    got = protocol.decode_tensors(metas, [frame])["x"]
    assert not got.flags.writeable
    assert got.base is not None


@pytest.mark.parametrize("kind", ["bytes", "zmq.Frame"])
def test_request_tensors_decode_zero_copy(kind):
    value = np.arange(64, dtype="<f4").reshape(1, 64)
    metas, tensor_frames = protocol.encode_tensors({"pixels": value})
    raw = bytes(tensor_frames[0])
    frame = raw if kind == "bytes" else zmq.Frame(raw)
    sent = protocol.encode_request("digits", RID, {"inputs": metas}, [frame])
    # The broker's ROUTER strips the identity: the parser gets the frames as the client sent them.
    request = protocol.parse_request(sent)
    got = protocol.decode_tensors(request.header["inputs"], request.tensors)["pixels"]
    np.testing.assert_array_equal(got, value)
    assert got.base is not None
    backing = frame if kind == "bytes" else frame.buffer
    assert np.shares_memory(got, np.frombuffer(backing, dtype=np.uint8))


@pytest.mark.parametrize("seed", range(20))
def test_random_numeric_arrays_round_trip(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(d) for d in rng.integers(0, 5, size=rng.integers(0, 5)))
    datatype = NUMERIC[seed % len(NUMERIC)]
    dtype = protocol.DATATYPES[datatype].newbyteorder(">" if seed % 2 else "<")
    value = np.frombuffer(rng.bytes(int(np.prod(shape)) * dtype.itemsize), dtype=dtype).reshape(shape)
    if datatype == "BOOL":
        value = value.view(np.uint8) % 2 == 1
    got = roundtrip("x", value)
    assert got.shape == value.shape
    assert got.tobytes() == value.astype(got.dtype).tobytes()  # bitwise, so NaNs compare equal


# --- tensor rejections ---------------------------------------------------------------------------


def meta(name="x", datatype="FP32", shape=(2,)):
    return {"name": name, "datatype": datatype, "shape": list(shape) if isinstance(shape, tuple) else shape}


@pytest.mark.parametrize(
    "metas, frames, match",
    [
        ([meta()], [], "1 tensors but 0 tensor frames"),
        ([meta(), meta("y")], [b"\x00" * 8], "2 tensors but 1"),
        ([], [b""], "0 tensors but 1"),
        ([meta()], [b"\x00" * 7], "needs 8 bytes, frame has 7"),
        ([meta()], [b"\x00" * 12], "needs 8 bytes, frame has 12"),
        ([meta(shape=())], [b""], "needs 4 bytes"),
        ([meta(shape=(0, 2))], [b"\x00"], "needs 0 bytes"),
        ([meta(datatype="FP8")], [b"\x00" * 2], "unknown datatype"),
        ([meta(datatype="float32")], [b"\x00" * 8], "unknown datatype"),
        ([meta(datatype=None)], [b"\x00" * 8], "unknown datatype"),
        ([meta(datatype=["FP32"])], [b"\x00" * 8], "unknown datatype"),
        ([meta(shape=(-1,))], [b""], "non-negative"),
        ([meta(shape=(2, -2))], [b""], "non-negative"),
        ([meta(shape=(2.0,))], [b"\x00" * 8], "non-negative integers"),
        ([meta(shape=(True,))], [b"\x00" * 4], "non-negative integers"),
        ([meta(shape="2")], [b"\x00" * 8], "list of non-negative"),
        ([{"name": "x", "datatype": "FP32"}], [b""], "shape"),
        ([meta(), meta()], [b"\x00" * 8, b"\x00" * 8], "appears twice"),
        ([meta(name=5)], [b"\x00" * 8], "name must be a string"),
        ([meta(name=b"x")], [b"\x00" * 8], "name must be a string"),
        (["x"], [b""], "metadata must be a map"),
        ({"x": meta()}, [b"\x00" * 8], "array of maps"),
        (None, [], "array of maps"),
    ],
)
def test_malformed_tensors_raise_protocol_error(metas, frames, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.decode_tensors(metas, frames)


@pytest.mark.parametrize(
    "frame, shape, match",
    [
        (b"\x05\x00\x00\x00abc", (1,), "runs past the frame"),
        (b"\x01\x00\x00", (1,), "cannot hold 1 elements"),
        (b"\x03\x00\x00\x00abc\x01\x00", (2,), "ends inside element 1"),
        (b"\x01\x00\x00\x00a\x00\x00\x00\x00", (3,), "cannot hold 3 elements"),
        (b"\x01\x00\x00\x00ab", (1,), "1 bytes left after 1 BYTES elements"),
        (b"\x00\x00\x00\x00", (0,), "4 bytes left after 0"),
        (b"\x00\x00\x00\x00", (2**62,), "cannot hold"),
        (b"", (), "cannot hold 1 elements"),
    ],
)
def test_truncated_or_padded_bytes_tensor_raises_protocol_error(frame, shape, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.decode_tensors([meta(datatype="BYTES", shape=shape)], [frame])


# --- client <-> broker ---------------------------------------------------------------------------


def test_request_round_trips():
    value = sample("FP32", (1, 64))
    metas, tensor_frames = protocol.encode_tensors({"pixels": value})
    header = {"inputs": metas, "outputs": [{"name": "dense_1"}], "timeout_ms": 1000, "parameters": {"k": 1}}
    frames = protocol.encode_request("digits", RID, header, tensor_frames)
    assert [bytes(f) for f in frames[:4]] == [b"", b"MDPC01", b"digits", RID]
    request = protocol.parse_request(frames)
    assert request.model == b"digits"
    assert request.rid == RID
    assert request.header == header
    assert len(request.tensors) == 1
    assert_same(protocol.decode_tensors(request.header["inputs"], request.tensors)["pixels"], value)


def test_request_from_req_socket_parses_the_same():
    # A REQ socket adds the empty delimiter itself; the broker sees the same frames.
    dealer = protocol.encode_request(b"digits", RID, {"op": "metadata"})
    req_sent = dealer[1:]
    request = protocol.parse_request([b""] + req_sent)
    assert request == protocol.Request(b"digits", RID, {"op": "metadata"}, [])


def test_request_accepts_zmq_frames():
    frames = [zmq.Frame(bytes(f)) for f in protocol.encode_request("m", RID, {"op": "metadata"})]
    request = protocol.parse_request(frames)
    assert (request.model, request.rid, request.header) == (b"m", RID, {"op": "metadata"})


@pytest.mark.parametrize("service", [protocol.MMI_SERVICE, protocol.MMI_MODELS, protocol.MMI_HEALTH])
def test_management_request_round_trips(service):
    request = protocol.parse_request(protocol.encode_request(service, RID, {"name": "digits"}))
    assert request.model == service
    assert request.model.startswith(protocol.MMI_PREFIX)
    assert request.header == {"name": "digits"}


def test_reply_round_trips():
    value = sample("FP32", (1, 10))
    metas, tensor_frames = protocol.encode_tensors({"probs": value})
    header = {"model_name": "digits", "model_version": "1", "outputs": metas}
    frames = [b""] + protocol.encode_reply(b"digits", RID, protocol.OK, header, tensor_frames)
    reply = protocol.parse_reply(frames)
    assert (reply.model, reply.rid, reply.status, reply.header) == (b"digits", RID, b"200", header)
    assert protocol.reply_error(reply) is None
    assert_same(protocol.decode_tensors(reply.header["outputs"], reply.tensors)["probs"], value)


def test_reply_accepts_a_prepacked_header():
    packed = protocol.packb({"models": []})
    frames = protocol.encode_reply(b"mmi.models", RID, b"200", packed)
    assert frames[4] is packed
    assert protocol.parse_reply([b""] + frames).header == {"models": []}


def by_name(value) -> str:
    return value.decode() if isinstance(value, bytes) else value.__name__


ERROR_CLASSES = sorted(errors.ERROR_TYPES.values(), key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=by_name)
def test_error_reply_round_trips_to_the_same_type(cls):
    frames = [b""] + protocol.encode_error(b"digits", RID, cls("it went wrong: é"))
    assert frames[4] == cls.status
    assert len(frames) == 6  # no tensor frames
    reply = protocol.parse_reply(frames)
    assert reply.header == {"error": {"type": cls.__name__, "message": "it went wrong: é"}}
    error = protocol.reply_error(reply)
    assert type(error) is cls
    assert isinstance(error, PoolError)
    assert error.status == cls.status
    assert str(error) == error.message == "it went wrong: é"


@pytest.mark.parametrize("status, cls", sorted(errors.STATUS_TYPES.items()), ids=by_name)
def test_error_reply_without_type_falls_back_to_status(status, cls):
    for error in ({"message": "m"}, {"type": "NoSuchError", "message": "m"}, {"type": ["x"], "message": "m"}):
        reply = protocol.parse_reply([b""] + protocol.encode_reply(b"m", RID, status, {"error": error}))
        got = protocol.reply_error(reply)
        assert type(got) is cls
        assert (got.status, got.message) == (status, "m")


def test_error_reply_without_error_header():
    reply = protocol.parse_reply([b""] + protocol.encode_reply(b"m", RID, b"503", {}))
    error = protocol.reply_error(reply)
    assert type(error) is errors.Unavailable
    assert "503" in str(error)


def test_error_reply_with_unknown_status_is_a_pool_error():
    reply = protocol.parse_reply([b""] + protocol.encode_reply(b"m", RID, b"418", {"error": {"message": "tea"}}))
    error = protocol.reply_error(reply)
    assert type(error) is PoolError
    assert (error.status, error.message) == (b"418", "tea")


def test_error_header_takes_a_class_and_a_message():
    header = msgpack.unpackb(protocol.error_header(errors.Overloaded, "queue full"))
    assert header == {"error": {"type": "Overloaded", "message": "queue full"}}
    header = msgpack.unpackb(protocol.error_header(errors.ModelError("boom"), "override"))
    assert header == {"error": {"type": "ModelError", "message": "override"}}


def test_error_keeps_an_overridden_status():
    frames = [b""] + protocol.encode_error(b"m", RID, errors.Unavailable("model failed to load", status=b"503"))
    assert protocol.reply_error(protocol.parse_reply(frames)).status == b"503"


# --- client <-> broker rejections ----------------------------------------------------------------


def good_request() -> list:
    return protocol.encode_request("digits", RID, {"op": "metadata"})


def replace(frames: list, index: int, value: bytes) -> list:
    frames = list(frames)
    frames[index] = value
    return frames


@pytest.mark.parametrize(
    "frames, match",
    [
        ([], "at least 5 frames"),
        (good_request()[:4], "at least 5 frames"),
        (good_request()[1:], "at least 5 frames"),
        (replace(good_request(), 0, b"x"), "empty delimiter"),
        (replace(good_request(), 1, b"MDPC02"), "unknown protocol"),
        (replace(good_request(), 1, protocol.WORKER), "unknown protocol"),
        (replace(good_request(), 1, b""), "unknown protocol"),
        (replace(good_request(), 2, b""), "model name must be 1 to 255 bytes, got 0"),
        (replace(good_request(), 2, b"m" * 256), "model name must be 1 to 255 bytes, got 256"),
        (replace(good_request(), 3, b""), "request-id must be 1 to 255 bytes, got 0"),
        (replace(good_request(), 3, b"i" * 256), "request-id must be 1 to 255 bytes, got 256"),
        (replace(good_request(), 4, b"\xc1"), "not valid msgpack"),
        (replace(good_request(), 4, b"\x92\x01"), "not valid msgpack"),
        (replace(good_request(), 4, b"\x81\xa2op"), "not valid msgpack"),
        (replace(good_request(), 4, b"\x80\x80"), "not valid msgpack"),
        (replace(good_request(), 4, b""), "not valid msgpack"),
        (replace(good_request(), 4, protocol.packb([1, 2])), "must be a msgpack map, got an array"),
        (replace(good_request(), 4, protocol.packb("inputs")), "must be a msgpack map, got a string"),
        (replace(good_request(), 4, protocol.packb(None)), "must be a msgpack map, got nil"),
        (replace(good_request(), 4, protocol.packb(7)), "must be a msgpack map, got an integer"),
    ],
)
def test_malformed_request_raises_protocol_error(frames, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.parse_request(frames)


def test_request_ids_of_255_bytes_are_accepted():
    request = protocol.parse_request(protocol.encode_request(b"m" * 255, b"\xff" * 255, {}))
    assert (len(request.model), len(request.rid)) == (255, 255)


def good_reply() -> list:
    return [b""] + protocol.encode_reply(b"digits", RID, b"200", {})


@pytest.mark.parametrize(
    "frames, match",
    [
        (good_reply()[:5], "at least 6 frames"),
        (replace(good_reply(), 0, b"x"), "must start with"),
        (replace(good_reply(), 1, b"MDPW01"), "must start with"),
        (replace(good_reply(), 4, b"20"), "three ASCII digits"),
        (replace(good_reply(), 4, b"2000"), "three ASCII digits"),
        (replace(good_reply(), 4, b"OK!"), "three ASCII digits"),
        (replace(good_reply(), 5, b"\xc1"), "not valid msgpack"),
        (replace(good_reply(), 5, protocol.packb([])), "must be a msgpack map"),
    ],
)
def test_malformed_reply_raises_protocol_error(frames, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.parse_reply(frames)


# --- broker <-> worker ---------------------------------------------------------------------------


READY_INFO = {
    "version": "3",
    "capacity": 4,
    "max_batch_size": 32,
    "pid": 4242,
    "metadata": {"name": "digits", "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]},
}


def test_commands_are_single_bytes():
    assert {c.name: c.value for c in Command} == {
        "READY": b"\x01",
        "HEARTBEAT": b"\x04",
        "DISCONNECT": b"\x05",
        "BATCH": b"\x06",
        "REPLIES": b"\x07",
    }


def test_ready_round_trips():
    frames = protocol.encode_ready("digits", READY_INFO)
    assert frames[:3] == [b"", b"MDPW01", b"\x01"]
    message = protocol.parse_worker_message(frames)
    assert message == protocol.WorkerMessage(Command.READY, [b"digits", READY_INFO])


def test_batch_to_worker_round_trips_item_by_item():
    values = [sample("INT32", (3, 2)), sample("INT32", (1, 2))]
    items = []
    for i, value in enumerate(values):
        metas, tensor_frames = protocol.encode_tensors({"x": value})
        client = protocol.encode_request("digits", b"rid%d" % i, {"inputs": metas, "timeout_ms": 5}, tensor_frames)
        items.append(protocol.BatchItem(b"client%d" % i, b"rid%d" % i, 250 if i else None, client[4:]))
    frames = protocol.encode_batch(items, 1_700_000_000_123)
    assert frames[:3] == [b"", b"MDPW01", b"\x06"]
    assert msgpack.unpackb(frames[3]) == {"sent_ms": 1_700_000_000_123, "items": [[4, None], [4, 250]]}
    # what a DEALER hands on: control frames as bytes, the rest as zmq.Frames
    message = protocol.parse_worker_message([zmq.Frame(bytes(f)) if i > 3 else f for i, f in enumerate(frames)])
    assert message.command is Command.BATCH
    for i, (item, value) in enumerate(zip(message.fields, values)):
        assert (item.client, item.rid, item.budget_ms) == (b"client%d" % i, b"rid%d" % i, 250 if i else None)
        assert item.sent_ms == 1_700_000_000_123
        header = protocol.unpack_header(item.body[0])
        assert header["timeout_ms"] == 5  # the client's header, untouched
        assert_same(protocol.decode_tensors(header["inputs"], item.body[1:])["x"], value)


def test_replies_from_worker_round_trip_and_reach_the_client():
    value = sample("FP32", (3, 10))
    metas, tensor_frames = protocol.encode_tensors({"probs": value})
    header = {"model_name": "digits", "model_version": "3", "outputs": metas}
    error = errors.InvalidInput("expected FP32 [batch, 64], got FP32 [1, 63]")
    frames = protocol.encode_replies([
        protocol.ReplyItem(CLIENT_ADDR, RID, b"200", [protocol.packb(header), *tensor_frames]),
        protocol.ReplyItem(b"other", b"2", error.status, [protocol.error_header(error)]),
    ])
    assert frames[:3] == [b"", b"MDPW01", b"\x07"] and struct.unpack("<2I", frames[3]) == (5, 4)
    message = protocol.parse_worker_message([zmq.Frame(bytes(f)) if i > 3 else f for i, f in enumerate(frames)])
    assert message.command is Command.REPLIES
    ok, failed = message.fields
    assert (ok.client, ok.rid, ok.status, failed.client, failed.rid, failed.status) == (
        CLIENT_ADDR, RID, b"200", b"other", b"2", b"400")
    # The broker forwards status, header and tensors to the client as they are.
    reply = protocol.parse_reply([b"", *protocol.encode_reply(b"digits", ok.rid, ok.status, bytes(ok.body[0]),
                                                              ok.body[1:])])
    assert reply.header == header
    assert_same(protocol.decode_tensors(reply.header["outputs"], reply.tensors)["probs"], value)
    reply = protocol.parse_reply([b"", *protocol.encode_reply(b"digits", failed.rid, failed.status,
                                                              bytes(failed.body[0]))])
    got = protocol.reply_error(reply)
    assert type(got) is errors.InvalidInput and (got.status, got.message) == (b"400", error.message)


def test_replies_carry_the_model_calls_and_memory_in_a_last_stats_frame():
    items = [protocol.ReplyItem(CLIENT_ADDR, RID, b"200", [protocol.packb({})]),
             protocol.ReplyItem(b"other", b"2", b"504", [protocol.packb({})])]
    stats = {"calls": [[8, 1250], [3, 0]], "rss_bytes": 123 << 20}
    frames = protocol.encode_replies(items, stats)
    assert len(frames) == 4 + 8 + 1 and msgpack.unpackb(frames[-1]) == stats
    message = protocol.parse_worker_message([zmq.Frame(bytes(f)) if i > 3 else f for i, f in enumerate(frames)])
    assert [(i.rid, i.status) for i in message.fields] == [(RID, b"200"), (b"2", b"504")]
    assert message.stats == protocol.WorkerStats([[8, 1250], [3, 0]], 123 << 20)
    # without a stats frame, as before; an empty map or nil values mean nothing to report
    assert protocol.parse_worker_message(protocol.encode_replies(items)).stats is None
    assert protocol.parse_worker_message(protocol.encode_replies(items, {})).stats == protocol.WorkerStats((), None)
    nils = protocol.encode_replies(items, {"calls": None, "rss_bytes": None, "later": [1, 2]})
    assert protocol.parse_worker_message(nils).stats == protocol.WorkerStats()


def test_heartbeat_round_trips():
    frames = protocol.encode_heartbeat()
    assert frames == [b"", b"MDPW01", b"\x04"]
    assert protocol.parse_worker_message(frames) == protocol.WorkerMessage(Command.HEARTBEAT, [])
    frames = protocol.encode_heartbeat({"rss_bytes": 4096})
    assert frames[:3] == [b"", b"MDPW01", b"\x04"] and msgpack.unpackb(frames[3]) == {"rss_bytes": 4096}
    assert protocol.parse_worker_message(frames) == protocol.WorkerMessage(
        Command.HEARTBEAT, [], protocol.WorkerStats((), 4096))


def test_disconnect_without_info_round_trips():
    frames = protocol.encode_disconnect()
    assert frames == [b"", b"MDPW01", b"\x05"]
    assert protocol.parse_worker_message(frames) == protocol.WorkerMessage(Command.DISCONNECT, [])


def test_disconnect_with_info_round_trips():
    info = {"model": "digits", "error": "OSError: no file /models/digits.keras"}
    message = protocol.parse_worker_message(protocol.encode_disconnect(info))
    assert message == protocol.WorkerMessage(Command.DISCONNECT, [info])


def test_worker_messages_accept_zmq_frames():
    frames = [zmq.Frame(bytes(f)) for f in protocol.encode_ready(b"digits", READY_INFO)]
    assert protocol.parse_worker_message(frames).fields == [b"digits", READY_INFO]


def test_heartbeat_constants():
    assert protocol.HEARTBEAT_INTERVAL > 0
    assert protocol.HEARTBEAT_LIVENESS >= 1


# --- broker <-> worker rejections ----------------------------------------------------------------


def worker_batch() -> list:
    return protocol.encode_batch([protocol.BatchItem(CLIENT_ADDR, RID, None, [protocol.packb({})]),
                                  protocol.BatchItem(b"other", b"2", 10, [protocol.packb({})])])


def worker_replies() -> list:
    return protocol.encode_replies([protocol.ReplyItem(CLIENT_ADDR, RID, b"200", [protocol.packb({})]),
                                    protocol.ReplyItem(b"other", b"2", b"500", [protocol.packb({})])])


@pytest.mark.parametrize(
    "frames, match",
    [
        ([], "at least 3 frames"),
        ([b"", b"MDPW01"], "at least 3 frames"),
        ([b"x", b"MDPW01", b"\x04"], "must start with"),
        ([b"", b"MDPC01", b"\x04"], "must start with"),
        ([b"", b"MDPW02", b"\x04"], "must start with"),
        ([b"", b"MDPW01", b"\x08"], "unknown worker command"),
        ([b"", b"MDPW01", b"\x00"], "unknown worker command"),
        ([b"", b"MDPW01", b""], "unknown worker command"),
        ([b"", b"MDPW01", b"READY"], "unknown worker command"),
        ([b"", b"MDPW01", b"\x01\x01"], "unknown worker command"),
        ([b"", b"MDPW01", b"\x02"], "unknown worker command"),  # MDP's REQUEST: not in this protocol
        ([b"", b"MDPW01", b"\x01", b"digits"], "READY needs at least 2 frames after the command, got 1"),
        (protocol.encode_ready(b"m", {})[:3], "READY needs at least 2 frames after the command, got 0"),
        (replace(protocol.encode_ready(b"m", {}), 3, b""), "model name must be 1 to 255"),
        (replace(protocol.encode_ready(b"m", {}), 3, b"m" * 256), "model name must be 1 to 255"),
        (replace(protocol.encode_ready(b"m", {}), 4, b"\xc1"), "not valid msgpack"),
        (replace(protocol.encode_ready(b"m", {}), 4, protocol.packb([4])), "must be a msgpack map"),
        (worker_batch()[:8], "BATCH: index counts more frames"),
        (worker_batch()[:4], "BATCH needs at least 4 frames after the command, got 1"),
        (worker_replies()[:7], "REPLIES needs at least 5 frames after the command, got 4"),
        (replace(worker_batch(), 3, b"\xc1"), "BATCH index is not valid msgpack"),
        (replace(worker_batch(), 3, protocol.packb([[3, None], [3, None]])), "index must be a map, got an array"),
        (replace(worker_batch(), 3, protocol.packb({"items": []})), "index items must be a non-empty array"),
        (replace(worker_batch(), 3, protocol.packb({"a": 1})), "index items must be a non-empty array, got nil"),
        (replace(worker_batch(), 3, protocol.packb({"items": [[3, None], [3, None]], "sent_ms": "now"})),
         "sent_ms must be an integer or nil"),
        (replace(worker_batch(), 3, protocol.packb({"items": [[3, None], [2, None]]})), "frames >= 3"),
        (replace(worker_batch(), 3, protocol.packb({"items": [[3, None], [3, -1]]})), "budget_ms >= 0"),
        (replace(worker_batch(), 3, protocol.packb({"items": [[3, None], [3, "soon"]]})), "budget_ms >= 0"),
        (replace(worker_batch(), 3, protocol.packb({"items": [[3, None]]})), "3 frames left after the items"),
        (replace(worker_batch(), 4, b""), "client address must be 1 to 255"),
        (replace(worker_batch(), 8, b"i" * 256), "request-id must be 1 to 255"),
        (replace(worker_replies(), 3, b""), "sizes frame must hold one uint32 per reply, got 0 bytes"),
        (replace(worker_replies(), 3, b"\x05"), "sizes frame must hold one uint32 per reply, got 1 bytes"),
        (replace(worker_replies(), 3, struct.pack("<2I", 5, 4)), "sizes add up to 9 frames, message has 8"),
        (replace(worker_replies(), 3, struct.pack("<3I", 4, 3, 1)), "a reply needs at least 4 frames"),
        (replace(worker_replies(), 4, b""), "client address must be 1 to 255"),
        (replace(worker_replies(), 9, b"i" * 256), "request-id must be 1 to 255"),
        (replace(worker_replies(), 6, b"OK"), "status must be three ASCII digits"),
        (worker_replies() + [b"\xc1"], "REPLIES stats is not valid msgpack"),
        (worker_replies() + [protocol.packb([[1, 2]])], "REPLIES: stats must be a map, got an array"),
        (worker_replies() + [protocol.packb({}), protocol.packb({})], "sizes add up to 8 frames, message has 10"),
        (worker_replies() + [protocol.packb({"calls": {"rows": 1}})], "stats calls must be an array, got a map"),
        (worker_replies() + [protocol.packb({"calls": [[0, 10]]})], r"entries must be \[rows 1 to"),
        (worker_replies() + [protocol.packb({"calls": [[1 << 32, 10]]})], r"entries must be \[rows 1 to"),
        (worker_replies() + [protocol.packb({"calls": [[4, -1]]})], "compute_us 0 to"),
        (worker_replies() + [protocol.packb({"calls": [[4, 1 << 41]]})], "compute_us 0 to"),
        (worker_replies() + [protocol.packb({"calls": [[4, 1.5]]})], "compute_us 0 to"),
        (worker_replies() + [protocol.packb({"calls": [[True, 10]]})], "rows 1 to"),
        (worker_replies() + [protocol.packb({"calls": [[4, 10, 1]]})], "rows 1 to"),
        (worker_replies() + [protocol.packb({"calls": [4, 10]})], "rows 1 to"),
        (worker_replies() + [protocol.packb({"rss_bytes": -1})], "rss_bytes must be an integer from 0 to"),
        (worker_replies() + [protocol.packb({"rss_bytes": "1G"})], 'rss_bytes must be an integer .*got "1G"'),
        (worker_replies() + [protocol.packb({"rss_bytes": 1 << 60})], "rss_bytes must be an integer from 0"),
        (protocol.encode_heartbeat() + [b"\xc1"], "HEARTBEAT stats is not valid msgpack"),
        (protocol.encode_heartbeat() + [protocol.packb("x")], "HEARTBEAT: stats must be a map, got a string"),
        (protocol.encode_heartbeat({}) + [protocol.packb({})], "HEARTBEAT has at most one frame"),
        (protocol.encode_heartbeat({"rss_bytes": 2.5}), "rss_bytes must be an integer"),
        (protocol.encode_disconnect() + [b"\xc1"], "not valid msgpack"),
        (protocol.encode_disconnect() + [protocol.packb("bye")], "must be a msgpack map"),
    ],
)
def test_malformed_worker_message_raises_protocol_error(frames, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.parse_worker_message(frames)


# --- codec details ------------------------------------------------------------------------------


def test_headers_use_msgpack_str_not_bin():
    packed = protocol.packb({"name": "x", "raw": b"\x00"})
    assert msgpack.unpackb(packed, raw=True) == {b"name": b"x", b"raw": b"\x00"}
    assert packed == b"\x82\xa4name\xa1x\xa3raw\xc4\x01\x00"


def test_worked_example_header_matches_the_spec():
    metas, _ = protocol.encode_tensors({"pixels": np.zeros((1, 64), dtype="<f4")})
    packed = protocol.packb({"inputs": metas, "timeout_ms": 1000})
    assert packed.hex(" ") == (
        "82 a6 69 6e 70 75 74 73 91 83 a4 6e 61 6d 65 a6 70 69 78 65 6c 73 a8 64 61 74 61 74 79 70 65 a4 "
        "46 50 33 32 a5 73 68 61 70 65 92 01 40 aa 74 69 6d 65 6f 75 74 5f 6d 73 cd 03 e8"
    )


def test_stats_example_of_the_spec_packs_as_written():
    packed = protocol.packb({"calls": [[8, 2150]], "rss_bytes": 412000256})
    assert packed.hex(" ") == "82 a5 63 61 6c 6c 73 91 92 08 cd 08 66 a9 72 73 73 5f 62 79 74 65 73 ce 18 8e a0 00"
    assert protocol.parse_stats(packed, "REPLIES") == protocol.WorkerStats([[8, 2150]], 412000256)
