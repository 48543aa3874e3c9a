"""The modelpool wire protocol: the one definition, shared by client, broker and workers.

Majordomo (ZeroMQ RFC 7/MDP 0.1) framing, extended for tensors and batching workers. Every frame
is one ZeroMQ message part. ``docs/PROTOCOL.md`` specifies the same thing for other languages.

Client <-> broker (client uses DEALER and sends the empty frame itself, or REQ)::

    request:  ""  "MDPC01"  <model>  <request-id>  <header: msgpack map>  <tensor>...
    reply:    ""  "MDPC01"  <model>  <request-id>  <status: ASCII>  <header: msgpack map>  <tensor>...

    status    "200" ok, "400" invalid input, "404" unknown model, "429" overloaded, "500" model
              raised / request crashed a worker, "501" unknown mmi service, "503" unavailable,
              "504" deadline passed
    header    request: {"inputs": [{"name", "datatype", "shape"}...], "outputs": [{"name"}...],
                        "timeout_ms": int, "parameters": {...}}   or {"op": "metadata"}
              reply:   {"model_name", "model_version", "outputs": [{"name", "datatype", "shape"}...]}
              error:   {"error": {"type": str, "message": str}}   (no tensor frames)
    tensor    raw little-endian row-major bytes, one frame per entry of inputs/outputs, in order

    Management services answered by the broker: "mmi.service" (header {"name": <model>}, status
    "200"/"404"), "mmi.models", "mmi.health", "mmi.metrics" (histograms); any other "mmi.*" is "501".

Groups, an optional extension (a broker lists "group" in mmi.health's "extensions"): many requests
to one model with one header in one message, marked by an empty request-id; the broker answers
them with plain replies or grouped replies::

    requests: ""  "MDPC01"  <model>  ""  <header>  <ids: msgpack array of request-ids>  <tensor>...
    replies:  ""  "MDPC01"  <model>  ""  <index: msgpack [[request-id, status, frames], ...]>
              { <header> <tensor>... }...

    requests  every request has the header's tensors: len(ids) x len(inputs) tensor frames, request
              after request; 1 to MAX_GROUP ids, each unique
    index     per reply: its request-id, status as an integer (200, 400, ...), and how many frames
              follow for it (1 + tensors)

Broker <-> worker (worker uses DEALER; the broker's ROUTER adds/strips the identity)::

    READY      ""  "MDPW01"  0x01  <model>  <info: msgpack {version, pid, max_batch_size, prefetch, metadata,
                                                           load_seconds, rss_bytes}>
    HEARTBEAT  ""  "MDPW01"  0x04  [<stats>]                       (stats from a worker only)
    DISCONNECT ""  "MDPW01"  0x05  [<info: msgpack {model, error} | {reconnect: true}>]
    BATCH      ""  "MDPW01"  0x06  <index>  { <client>  <request-id>  <header>  <tensor>... }...
    REPLIES    ""  "MDPW01"  0x07  <sizes>  { <client>  <request-id>  <status>  <header>  <tensor>... }...  [<stats>]

    index      msgpack map {"sent_ms": <Unix time in ms when the broker sent it, its clock>,
               "items": [[frames, budget_ms], ...]}: per request, how many frames it has (3 +
               tensors) and the milliseconds it had left when sent (nil: no deadline). A worker
               answers 504 for a request whose budget ran out before it ran; a batch can wait in the
               worker's socket behind a running one, so the time since sent_ms counts (on one host
               exact; across hosts it needs synchronised clocks).
    sizes      one little-endian uint32 per reply: how many frames it has (4 + tensors). The frames
               after the replies: none, or one stats frame.
    stats      msgpack map {"calls": [[rows, compute_us], ...], "rss_bytes": int}, both optional: the
               model calls run since the last report (rows >= 1, microseconds), and the worker's
               resident memory; with a REPLIES or a HEARTBEAT. The broker's metrics (compute time,
               batch sizes, memory) come from it.

    Credit: the broker sends a worker at most 1 + prefetch BATCH messages that it has not answered
    in full (every request of a BATCH answered once, in one REPLIES or several). The requests of a
    BATCH are compatible (same input names, datatypes and non-batch dimensions, same outputs) and
    hold at most max_batch_size rows in all, unless it is one request larger than that.
"""
from __future__ import annotations

import enum
import json
import struct
from typing import Any, Iterable, NamedTuple, Sequence

import msgpack
import numpy as np

from modelpool.client.errors import InvalidInput, PoolError, ProtocolError, error_from_wire

CLIENT = b"MDPC01"
WORKER = b"MDPW01"

HEARTBEAT_INTERVAL = 1.0  # seconds between heartbeats, both directions
HEARTBEAT_LIVENESS = 3  # heartbeats missed before a peer is taken for dead
MAX_ID_BYTES = 255

MMI_PREFIX = b"mmi."
MMI_SERVICE = b"mmi.service"
MMI_MODELS = b"mmi.models"
MMI_HEALTH = b"mmi.health"
EXTENSIONS = ("group",)  # what a broker of this version lists in mmi.health's "extensions"
MAX_GROUP = 1024  # requests in one group message
MMI_METRICS = b"mmi.metrics"
MMI_SCALE = b"mmi.scale"  # runtime control, from the pool's own host: {"model", "replicas"}
MMI_RELOAD = b"mmi.reload"  # {"model"}: every replica replaced by a fresh process, warmed first
MMI_LOAD = b"mmi.load"  # {"model"}: serve it (from the config or the model repository), or re-read it
MMI_UNLOAD = b"mmi.unload"  # {"model"}: stop serving it; its replicas finish what they hold and exit
MMI_REPOSITORY = b"mmi.repository"  # {}: every model the pool can serve, loaded or not (the V2 repository index)
MMI_CONTROL = (MMI_SCALE, MMI_RELOAD, MMI_LOAD, MMI_UNLOAD)

OK = b"200"

# Frames before the first tensor frame: the transport receives those as bytes, the rest as zmq.Frame.
REQUEST_TENSORS = 5  # a request after the ROUTER identity: "" MDPC01 model rid header | tensor...
REPLY_TENSORS = 6  # a reply as a DEALER client receives it: "" MDPC01 model rid status header | tensor...
WORKER_CONTROL = 4  # a worker message: "" MDPW01 command index/sizes/model | the rest


class Command(bytes, enum.Enum):
    """MDP worker commands."""

    READY = b"\x01"
    HEARTBEAT = b"\x04"
    DISCONNECT = b"\x05"
    BATCH = b"\x06"
    REPLIES = b"\x07"


_COMMANDS = {c.value: c for c in Command}

# Open Inference Protocol datatype names <-> numpy dtypes (little-endian on the wire).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_DTYPE_NAMES: dict[tuple[str, int], str] = {(dt.kind, dt.itemsize): name for name, dt in DATATYPES.items()}


def datatype_of(dtype: np.dtype) -> str:
    """The OIP datatype name of a numpy dtype; raises ProtocolError for unsupported ones."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    name = _DTYPE_NAMES.get((dtype.kind, dtype.itemsize))
    if name is None:
        raise ProtocolError(f"dtype {dtype} has no wire datatype; use one of {', '.join(DATATYPES)} or BYTES")
    return name


# Bounds on what a peer's msgpack header may hold: a header names tensors and a few options, so
# these are generous; they stop a few bytes that declare a huge length or a deep nesting from
# costing memory or, later, a RecursionError where the value is formatted or compared.
MAX_HEADER_DEPTH = 32
_UNPACK_LIMITS = {"max_str_len": 1 << 20, "max_bin_len": 1 << 20, "max_array_len": 1 << 16,
                  "max_map_len": 1 << 16, "max_ext_len": 0}
# Every nesting level starts with a container marker byte (fixmap, fixarray, array16/32, map16/32); a
# header with no more marker-valued bytes than the depth limit cannot nest past it, so only such
# headers are walked (counting bytes is C speed; the walk costs about 5 us a header).
_NOT_CONTAINER_MARKERS = bytes(b for b in range(256) if not (0x80 <= b <= 0x9F or 0xDC <= b <= 0xDF))
_WIRE_TYPES = ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
               ((bytes, bytearray, memoryview), "binary"), ((list, tuple), "an array"), (dict, "a map"))


def wire_type(value: Any) -> str:
    """The msgpack type of a decoded value in words ("an array"), for error messages."""
    if value is None:
        return "nil"
    for kinds, name in _WIRE_TYPES:
        if isinstance(value, kinds):
            return name
    return type(value).__name__


def quote(value: Any, limit: int = 64) -> str:
    """Peer-supplied text, safe for logs and error messages in any language.

    Strings and bytes are cut to ``limit`` characters and written as a JSON string (every control
    and non-ASCII character escaped, so a peer cannot forge log lines); anything else is named by
    its wire type, never formatted (a nested value could be arbitrarily large or deep).
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value[: limit * 4]).decode("utf-8", errors="replace")
    elif not isinstance(value, str):
        return wire_type(value)
    text = json.dumps(value[:limit])
    return text + "..." if len(value) > limit else text


def describe(value: Any) -> str:
    """A peer's scalar value as text (numbers as themselves, text quoted), else its wire type."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return quote(value)


def _check_depth(value: Any) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable = (*item.keys(), *item.values())
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > MAX_HEADER_DEPTH:
            raise ProtocolError(f"header nests deeper than {MAX_HEADER_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)


def packb(obj: Any) -> bytes:
    """msgpack encoding used for every header."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack_header(frame: Any) -> dict:
    """Decode a msgpack header frame that must be a map; ProtocolError otherwise."""
    raw = frame_bytes(frame)
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=False, **_UNPACK_LIMITS)
    except msgpack.StackError:  # the C unpacker stops at 1024 levels
        raise ProtocolError(f"header nests deeper than {MAX_HEADER_DEPTH} levels") from None
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"header is not valid msgpack ({_reason(exc)})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {wire_type(header)}")
    if len(raw.translate(None, _NOT_CONTAINER_MARKERS)) > MAX_HEADER_DEPTH:
        _check_depth(header)
    return header


def _reason(exc: Exception) -> str:
    """A decoder's complaint in a few words, never empty."""
    text = str(exc).strip()[:120]
    return text or type(exc).__name__


def frame_bytes(frame: Any) -> bytes:
    """The bytes of a frame given as bytes, a zmq.Frame or any buffer."""
    if isinstance(frame, bytes):
        return frame
    raw = getattr(frame, "bytes", None)  # zmq.Frame
    return raw if raw is not None else bytes(frame)


def _check_id(value: bytes, what: str) -> bytes:
    if not 0 < len(value) <= MAX_ID_BYTES:
        raise ProtocolError(f"{what} must be 1 to {MAX_ID_BYTES} bytes, got {len(value)}")
    return value


# --- tensors ---------------------------------------------------------------------------------


def encode_tensor(name: str, value: Any) -> tuple[dict, Any]:
    """(metadata, buffer) for one tensor; the buffer is sent as its own frame without copying."""
    array = np.asarray(value)
    datatype = datatype_of(array.dtype)
    meta = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if datatype == "BYTES":
        return meta, _encode_bytes(array)
    dtype = DATATYPES[datatype]
    if array.dtype != dtype:  # big-endian input, or a bool spelled differently
        array = array.astype(dtype)
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    # memoryview.cast refuses 0-d views and views with a zero in their shape
    return meta, memoryview(array).cast("B") if array.ndim and array.size else array.tobytes()


def _encode_bytes(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        raw = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(len(raw).to_bytes(4, "little"))
        parts.append(raw)
    return b"".join(parts)


def _decode_bytes(buffer: Any, count: int, name: str) -> np.ndarray:
    raw = memoryview(buffer).cast("B")
    if count * 4 > len(raw):  # every element has a 4-byte length; reject before allocating count objects
        raise ProtocolError(f"tensor {quote(name)}: BYTES frame of {len(raw)} bytes cannot hold {count} elements")
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise ProtocolError(f"tensor {quote(name)}: BYTES frame ends inside element {i}")
        size = int.from_bytes(raw[pos : pos + 4], "little")
        pos += 4
        if pos + size > len(raw):
            raise ProtocolError(f"tensor {quote(name)}: BYTES element {i} runs past the frame")
        out[i] = bytes(raw[pos : pos + size])
        pos += size
    if pos != len(raw):
        raise ProtocolError(f"tensor {quote(name)}: {len(raw) - pos} bytes left after {count} BYTES elements")
    return out


def check_tensor_meta(meta: Any) -> tuple[str, str, tuple[int, ...]]:
    """Validate one tensor's metadata map and return (name, datatype, shape)."""
    if not isinstance(meta, dict):
        raise ProtocolError(f"tensor metadata must be a map, got {wire_type(meta)}")
    name, datatype, shape = meta.get("name"), meta.get("datatype"), meta.get("shape")
    if not isinstance(name, str):
        raise ProtocolError(f"tensor name must be a string, got {wire_type(name)}")
    if datatype != "BYTES" and (not isinstance(datatype, str) or datatype not in DATATYPES):
        raise ProtocolError(
            f"tensor {quote(name)}: unknown datatype {quote(datatype)}; expected one of {', '.join(DATATYPES)}, BYTES"
        )
    valid = isinstance(shape, (list, tuple)) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    )
    if not valid:
        raise ProtocolError(
            f"tensor {quote(name)}: shape must be a list of non-negative integers, got {wire_type(shape)}")
    return name, datatype, tuple(shape)


# The last tensor list checked, by identity, and what checking it gave: replies in a group share one
# decoded header (parse_reply_group), so their tensor lists are checked once.
_last_checked: tuple[Any, list] = (None, [])


def _checked(metas: Any) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, datatype, shape, element count) per entry of a header's tensor list, checked."""
    global _last_checked
    last = _last_checked
    if last[0] is metas:
        return last[1]
    if not isinstance(metas, (list, tuple)):
        raise ProtocolError(f"tensor list must be an array of maps, got {wire_type(metas)}")
    out, names = [], set()
    for meta in metas:
        name, datatype, shape = check_tensor_meta(meta)
        if name in names:
            raise ProtocolError(f"tensor {quote(name)} appears twice")
        names.add(name)
        count = 1
        for d in shape:
            count *= d
        out.append((name, datatype, shape, count))
    _last_checked = (metas, out)
    return out


def decode_tensors(metas: Any, frames: Sequence[Any]) -> dict[str, np.ndarray]:
    """Arrays (read-only views over the frames, no copy) for a header's tensor list."""
    specs = _checked(metas)
    if len(specs) != len(frames):
        raise ProtocolError(f"header lists {len(specs)} tensors but {len(frames)} tensor frames follow")
    out: dict[str, np.ndarray] = {}
    for (name, datatype, shape, count), frame in zip(specs, frames):
        buffer = frame.buffer if hasattr(frame, "buffer") else frame
        if datatype == "BYTES":
            out[name] = _decode_bytes(buffer, count, name).reshape(shape)
            continue
        dtype = DATATYPES[datatype]
        nbytes = memoryview(buffer).nbytes
        if nbytes != count * dtype.itemsize:
            raise ProtocolError(
                f"tensor {quote(name)}: {datatype} shape {list(shape)} needs {count * dtype.itemsize} bytes, "
                f"frame has {nbytes}"
            )
        out[name] = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    return out


def output_names(outputs: Any) -> tuple[str, ...]:
    """The names a request's ``outputs`` asks for; () for all outputs (absent, nil or empty).

    Entries are ``{"name": string}`` maps (as in KServe V2) or bare strings; a name given twice is
    an error.
    """
    if outputs is None:
        return ()
    if not isinstance(outputs, (list, tuple)):
        raise InvalidInput(f"outputs must be an array of names or {{\"name\": string}} maps, got {wire_type(outputs)}")
    names = []
    for item in outputs:
        name = item.get("name") if isinstance(item, dict) else item
        if not isinstance(name, str):
            raise InvalidInput(f"outputs entries must be names or {{\"name\": string}} maps, got {wire_type(item)}")
        names.append(name)
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise InvalidInput(f"outputs names {', '.join(quote(n) for n in repeated)} more than once; ask for each "
                           "tensor once")
    return tuple(names)


def batch_key(header: dict, tensors: int) -> tuple[Any, int]:
    """(key, rows) of an inference request, for batching: requests with equal keys can run in one call.

    The key holds each input's name, datatype and dimensions after the first, and the outputs asked
    for; rows is the first dimension, which every input must share. Raises InvalidInput or
    ProtocolError for a header that no model could run.
    """
    inputs = header.get("inputs")
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise InvalidInput(f"inputs must be a non-empty array of tensor maps, got {wire_type(inputs)}")
    if len(inputs) != tensors:
        raise ProtocolError(f"header lists {len(inputs)} tensors but {tensors} tensor frames follow")
    signature = []
    rows = None
    for meta in inputs:
        name, datatype, shape = check_tensor_meta(meta)
        if not shape:
            raise InvalidInput(f"input {quote(name)}: a scalar has no batch dimension; send shape [1] for one row")
        if rows is None:
            rows = shape[0]
        elif shape[0] != rows:
            raise InvalidInput(f"inputs disagree on the batch size: {rows} and {shape[0]} rows")
        signature.append((name, datatype, shape[1:]))
    return (tuple(signature), output_names(header.get("outputs"))), rows


def encode_tensors(tensors: dict[str, Any] | Iterable[tuple[str, Any]]) -> tuple[list[dict], list[Any]]:
    """(metadata list, frame list) for named tensors."""
    items = tensors.items() if isinstance(tensors, dict) else tensors
    metas, frames = [], []
    for name, value in items:
        meta, frame = encode_tensor(name, value)
        metas.append(meta)
        frames.append(frame)
    return metas, frames


# --- client <-> broker -----------------------------------------------------------------------


class Request(NamedTuple):
    """A parsed client request; tensor frames are left as received."""

    model: bytes
    rid: bytes
    header: dict
    tensors: list


class Reply(NamedTuple):
    """A parsed reply; ``header`` is decoded, tensors are left as received."""

    model: bytes
    rid: bytes
    status: bytes
    header: dict
    tensors: list


def encode_request(model: str | bytes, rid: bytes, header: dict, tensors: Sequence[Any] = ()) -> list:
    """Frames a DEALER client sends (the leading empty frame included)."""
    model_b = model.encode() if isinstance(model, str) else model
    return [b"", CLIENT, model_b, rid, packb(header), *tensors]


def parse_request(frames: Sequence[Any]) -> Request:
    """Parse a client request as the broker's ROUTER sees it, after the identity frame."""
    if len(frames) < 5:
        raise ProtocolError(f"a request needs at least 5 frames ('', MDPC01, model, id, header), got {len(frames)}")
    if frame_bytes(frames[0]) != b"":
        raise ProtocolError("a request must start with an empty delimiter frame")
    if frame_bytes(frames[1]) != CLIENT:
        raise ProtocolError(f"unknown protocol {quote(frame_bytes(frames[1]), 16)}, expected \"MDPC01\"")
    model = _check_id(frame_bytes(frames[2]), "model name")
    rid = _check_id(frame_bytes(frames[3]), "request-id")
    return Request(model, rid, unpack_header(frames[4]), list(frames[5:]))


class RequestGroup(NamedTuple):
    """A parsed group of requests: one model and header, each request's id and tensor frames."""

    model: bytes
    header_frame: Any  # the shared header as received: forwarded to workers with each request
    header: dict
    rids: list
    tensors: list  # per request, its tensor frames


def encode_request_group(model: str | bytes, header_frame: bytes, rids: Sequence[bytes],
                         tensors: Sequence[Sequence[Any]]) -> list:
    """Frames of a group of requests sharing ``header_frame`` (a packed header), the empty frame included."""
    model_b = model.encode() if isinstance(model, str) else model
    frames = [b"", CLIENT, model_b, b"", header_frame, packb(list(rids))]
    for request in tensors:
        frames.extend(request)
    return frames


def is_group(frames: Sequence[Any]) -> bool:
    """Whether a client message (after the identity) or a reply is a group: its request-id frame is empty."""
    return len(frames) > 4 and frame_bytes(frames[3]) == b""


def parse_request_group(frames: Sequence[Any]) -> RequestGroup:
    """Parse a group of requests as the broker's ROUTER sees it, after the identity frame."""
    if len(frames) < 7:
        raise ProtocolError(f"a group needs at least 7 frames ('', MDPC01, model, '', header, ids, tensor), "
                            f"got {len(frames)}")
    if frame_bytes(frames[0]) != b"" or frame_bytes(frames[1]) != CLIENT:
        raise ProtocolError("a group must start with '', 'MDPC01'")
    model = _check_id(frame_bytes(frames[2]), "model name")
    header = unpack_header(frames[4])
    ids = unpack_any(frames[5], "group ids")
    if not isinstance(ids, list) or not 0 < len(ids) <= MAX_GROUP:
        raise ProtocolError(f"group ids must be an array of 1 to {MAX_GROUP} request-ids, got {wire_type(ids)}"
                            + (f" of {len(ids)}" if isinstance(ids, list) else ""))
    for rid in ids:
        if not isinstance(rid, bytes):
            raise ProtocolError(f"group ids must be binary request-ids, got {wire_type(rid)}")
        _check_id(rid, "request-id")
    if len(set(ids)) != len(ids):
        raise ProtocolError("group ids must be unique")
    inputs = header.get("inputs")
    per = len(inputs) if isinstance(inputs, list) else 0
    tensors = list(frames[6:])
    if per == 0 or len(tensors) != per * len(ids):
        raise ProtocolError(f"a group of {len(ids)} requests with {per} inputs each needs {per * len(ids)} "
                            f"tensor frames, got {len(tensors)}")
    return RequestGroup(model, frames[4], header, ids,
                        [tensors[i:i + per] for i in range(0, len(tensors), per)])


def encode_reply_group(model: bytes, replies: Sequence[tuple[bytes, bytes, Sequence[Any]]]) -> list:
    """Grouped reply frames after the empty delimiter: (request-id, status, header + tensor frames) each."""
    index, frames = [], [CLIENT, model, b"", b""]
    for rid, status, body in replies:
        index.append((rid, int(status), len(body)))
        frames.extend(body)
    frames[3] = packb(index)
    return frames


def parse_reply_group(frames: Sequence[Any]) -> list[Reply]:
    """Parse grouped replies as a DEALER client receives them (the empty frame first).

    Replies with the same header bytes share one decoded header map: treat it as read-only.
    """
    if len(frames) < 6 or frame_bytes(frames[0]) != b"" or frame_bytes(frames[1]) != CLIENT:
        raise ProtocolError("a grouped reply must start with '', 'MDPC01' and hold at least 6 frames")
    model = frame_bytes(frames[2])
    index = unpack_any(frames[4], "grouped reply index")
    if not isinstance(index, list) or not index:
        raise ProtocolError(f"grouped reply index must be a non-empty array, got {wire_type(index)}")
    replies, pos = [], 5
    headers: dict[bytes, dict] = {}  # the replies of one batch mostly carry the same header: decoded once
    for entry in index:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], bytes) and _is_int(entry[1])
                and 100 <= entry[1] <= 999 and _is_int(entry[2]) and entry[2] >= 1):
            raise ProtocolError("grouped reply index entries must be [request-id, status 100-999, frames >= 1]")
        end = pos + entry[2]
        if end > len(frames):
            raise ProtocolError(f"grouped reply index counts more frames than the message has ({len(frames) - 5})")
        raw = frame_bytes(frames[pos])
        header = headers.get(raw)
        if header is None:
            header = headers[raw] = unpack_header(raw)
        replies.append(Reply(model, entry[0], _STATUS_BYTES.get(entry[1]) or str(entry[1]).encode(), header,
                             list(frames[pos + 1:end])))
        pos = end
    if pos != len(frames):
        raise ProtocolError(f"grouped reply: {len(frames) - pos} frames left after the replies the index counts")
    return replies


_STATUS_BYTES = {code: str(code).encode() for code in (200, 400, 404, 429, 500, 501, 503, 504)}


def encode_reply(
    model: bytes, rid: bytes, status: bytes, header: dict | Any, tensors: Sequence[Any] = ()
) -> list:
    """Reply frames after the empty delimiter (the broker prepends identity and ''); ``header`` is a
    map, or a frame already encoded (a worker's, forwarded untouched)."""
    packed = packb(header) if isinstance(header, dict) else header
    return [CLIENT, model, rid, status, packed, *tensors]


def error_header(error: PoolError | type[PoolError], message: str | None = None) -> bytes:
    """Packed error header for a typed error."""
    cls = error if isinstance(error, type) else type(error)
    text = message if message is not None else str(error)
    return packb({"error": {"type": cls.__name__, "message": text}})


def encode_error(model: bytes, rid: bytes, error: PoolError) -> list:
    """Error reply frames after the empty delimiter."""
    return [CLIENT, model, rid, error.status, error_header(error)]


def parse_reply(frames: Sequence[Any]) -> Reply:
    """Parse a reply as a DEALER client receives it (the empty frame first)."""
    if len(frames) < 6:
        raise ProtocolError(f"a reply needs at least 6 frames, got {len(frames)}")
    if frame_bytes(frames[0]) != b"" or frame_bytes(frames[1]) != CLIENT:
        raise ProtocolError("a reply must start with '', 'MDPC01'")
    status = frame_bytes(frames[4])
    if len(status) != 3 or not status.isdigit():
        raise ProtocolError(f"status must be three ASCII digits, got {quote(status, 8)}")
    return Reply(frame_bytes(frames[2]), frame_bytes(frames[3]), status, unpack_header(frames[5]), list(frames[6:]))


def reply_error(reply: Reply) -> PoolError | None:
    """The typed error a reply carries, or None for status 200."""
    if reply.status == OK:
        return None
    err = reply.header.get("error")
    if not isinstance(err, dict):
        return error_from_wire(reply.status, None, f"status {reply.status.decode()} with no error message")
    type_name = err.get("type")
    return error_from_wire(
        reply.status, type_name if isinstance(type_name, str) else None, str(err.get("message", ""))
    )


# --- broker <-> worker -----------------------------------------------------------------------


class BatchItem(NamedTuple):
    """One request of a BATCH: who asked, its id, the milliseconds it had left when the broker sent it
    (None: no deadline), the client's header and tensor frames (untouched), and when the broker sent
    it (Unix time in ms, the broker's clock; None if not said)."""

    client: bytes
    rid: bytes
    budget_ms: int | None
    body: list
    sent_ms: int | None = None


class ReplyItem(NamedTuple):
    """One answer of a REPLIES: the request it answers, its status, and header and tensor frames."""

    client: bytes
    rid: bytes
    status: bytes
    body: list


class WorkerStats(NamedTuple):
    """A worker's stats frame (REPLIES, HEARTBEAT): its model calls as [rows, compute microseconds]
    pairs and its resident memory in bytes (None: not said)."""

    calls: Sequence = ()
    rss_bytes: int | None = None


class WorkerMessage(NamedTuple):
    """A parsed MDPW01 message: READY ``[model, info]``, DISCONNECT ``[info]`` or ``[]``, HEARTBEAT
    ``[]``, BATCH a list of BatchItem, REPLIES a list of ReplyItem; ``stats`` the WorkerStats a
    REPLIES or HEARTBEAT carried, else None."""

    command: Command
    fields: list
    stats: WorkerStats | None = None


def encode_ready(model: str | bytes, info: dict) -> list:
    """READY frames from a worker."""
    model_b = model.encode() if isinstance(model, str) else model
    return [b"", WORKER, Command.READY.value, model_b, packb(info)]


def encode_heartbeat(stats: dict | None = None) -> list:
    """HEARTBEAT frames, either direction; a worker may add its stats map (``rss_bytes``, ``calls``)."""
    frames = [b"", WORKER, Command.HEARTBEAT.value]
    if stats is not None:
        frames.append(packb(stats))
    return frames


def encode_disconnect(info: dict | None = None) -> list:
    """DISCONNECT frames, either direction; a worker that failed to load puts the reason in info."""
    frames = [b"", WORKER, Command.DISCONNECT.value]
    if info is not None:
        frames.append(packb(info))
    return frames


def encode_batch(items: Sequence[BatchItem], sent_ms: int | None = None) -> list:
    """BATCH frames from the broker (the worker's identity is prepended by the caller)."""
    index, frames = [], [b"", WORKER, _BATCH, b""]
    for item in items:
        index.append((2 + len(item.body), item.budget_ms))
        frames.append(item.client)
        frames.append(item.rid)
        frames.extend(item.body)
    frames[3] = packb({"sent_ms": sent_ms, "items": index})
    return frames


def encode_replies(items: Sequence[ReplyItem], stats: dict | None = None) -> list:
    """REPLIES frames from a worker; ``stats`` ({"calls": [[rows, compute_us], ...], "rss_bytes": int})
    becomes the last frame."""
    sizes = struct.pack(f"<{len(items)}I", *[3 + len(item.body) for item in items])
    frames = [b"", WORKER, _REPLIES, sizes]
    for item in items:
        frames.append(item.client)
        frames.append(item.rid)
        frames.append(item.status)
        frames.extend(item.body)
    if stats is not None:
        frames.append(packb(stats))
    return frames


def _parse_batch(fields: list) -> list[BatchItem]:
    header = unpack_any(fields[0], "BATCH index")
    if not isinstance(header, dict):
        raise ProtocolError(f"BATCH: index must be a map, got {wire_type(header)}")
    index, sent_ms = header.get("items"), header.get("sent_ms")
    if not isinstance(index, list) or not index:
        raise ProtocolError(f"BATCH: index items must be a non-empty array, got {wire_type(index)}")
    if sent_ms is not None and not _is_int(sent_ms):
        raise ProtocolError(f"BATCH: sent_ms must be an integer or nil, got {wire_type(sent_ms)}")
    items, pos = [], 1
    for entry in index:
        if not (isinstance(entry, list) and len(entry) == 2 and _is_int(entry[0]) and entry[0] >= 3
                and (entry[1] is None or _is_int(entry[1]) and entry[1] >= 0)):
            raise ProtocolError("BATCH: index entries must be [frames >= 3, budget_ms >= 0 or nil]")
        end = pos + entry[0]
        if end > len(fields):
            raise ProtocolError(f"BATCH: index counts more frames than the message has ({len(fields) - 1})")
        client = _check_id(frame_bytes(fields[pos]), "client address")
        rid = _check_id(frame_bytes(fields[pos + 1]), "request-id")
        items.append(BatchItem(client, rid, entry[1], fields[pos + 2:end], sent_ms))
        pos = end
    if pos != len(fields):
        raise ProtocolError(f"BATCH: {len(fields) - pos} frames left after the items the index counts")
    return items


def _parse_replies(fields: list) -> tuple[list[ReplyItem], WorkerStats | None]:
    sizes_frame = frame_bytes(fields[0])
    if not sizes_frame or len(sizes_frame) % 4:
        raise ProtocolError(f"REPLIES: sizes frame must hold one uint32 per reply, got {len(sizes_frame)} bytes")
    sizes = struct.unpack(f"<{len(sizes_frame) // 4}I", sizes_frame)
    total = sum(sizes)
    stats = None
    if total == len(fields) - 2:  # one frame after the replies: the stats
        stats = parse_stats(fields[-1], "REPLIES")
    elif total != len(fields) - 1:
        raise ProtocolError(f"REPLIES: sizes add up to {total} frames, message has {len(fields) - 1} "
                            "(the replies and at most one stats frame)")
    items, pos = [], 1
    for size in sizes:
        if size < 4:
            raise ProtocolError(f"REPLIES: a reply needs at least 4 frames (client, id, status, header), got {size}")
        status = frame_bytes(fields[pos + 2])
        if len(status) != 3 or not status.isdigit():
            raise ProtocolError(f"REPLIES: status must be three ASCII digits, got {quote(status, 8)}")
        items.append(ReplyItem(_check_id(frame_bytes(fields[pos]), "client address"),
                               _check_id(frame_bytes(fields[pos + 1]), "request-id"), status,
                               fields[pos + 3:pos + size]))
        pos += size
    return items, stats


MAX_CALL_ROWS = (1 << 32) - 1
MAX_COMPUTE_US = 1 << 40  # about 12.7 days: any real call is shorter
MAX_RSS_BYTES = 1 << 56


def parse_stats(frame: Any, what: str) -> WorkerStats:
    """A worker's stats frame: {"calls": [[rows, compute_us], ...], "rss_bytes": int}, both optional
    (nil counts as absent), other keys ignored; ProtocolError for anything else.

    On the broker's path (with at most one REPLIES in 10 ms per worker, see modelproc.worker), so
    written for speed: exact type checks (msgpack gives plain ints and lists) and unpacking limits
    passed as constants (about 1.5 us in all).
    """
    try:
        stats = msgpack.unpackb(frame_bytes(frame), max_str_len=4096, max_bin_len=4096, max_array_len=1 << 16,
                                max_map_len=256, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"{what} stats is not valid msgpack ({_reason(exc)})") from None
    if type(stats) is not dict:
        raise ProtocolError(f"{what}: stats must be a map, got {wire_type(stats)}")
    calls, rss = stats.get("calls"), stats.get("rss_bytes")
    if calls is None:
        calls = ()
    elif type(calls) is not list:
        raise ProtocolError(f"{what}: stats calls must be an array, got {wire_type(calls)}")
    for call in calls:
        if type(call) is not list or len(call) != 2:
            raise _bad_call(what)
        rows, micros = call
        if type(rows) is not int or type(micros) is not int or not (
                0 < rows <= MAX_CALL_ROWS and 0 <= micros <= MAX_COMPUTE_US):
            raise _bad_call(what)
    if rss is not None and (type(rss) is not int or not 0 <= rss <= MAX_RSS_BYTES):
        raise ProtocolError(f"{what}: stats rss_bytes must be an integer from 0 to {MAX_RSS_BYTES}, got "
                            f"{describe(rss)}")
    return _make_stats((calls, rss))


_make_stats = WorkerStats._make  # skips the keyword handling of WorkerStats(...)


def _bad_call(what: str) -> ProtocolError:
    return ProtocolError(f"{what}: stats calls entries must be [rows 1 to {MAX_CALL_ROWS}, compute_us 0 to "
                         f"{MAX_COMPUTE_US}]")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def unpack_any(frame: Any, what: str) -> Any:
    """Decode a msgpack frame of any type within the header limits; ProtocolError otherwise."""
    try:
        return msgpack.unpackb(frame_bytes(frame), raw=False, strict_map_key=False, **_UNPACK_LIMITS)
    except Exception as exc:
        raise ProtocolError(f"{what} is not valid msgpack ({_reason(exc)})") from None


_BATCH = Command.BATCH.value
_REPLIES = Command.REPLIES.value
_MIN_FIELDS = {Command.READY: 2, Command.HEARTBEAT: 0, Command.DISCONNECT: 0, Command.BATCH: 4,
               Command.REPLIES: 5}


def parse_worker_message(frames: Sequence[Any]) -> WorkerMessage:
    """Parse an MDPW01 message (after the ROUTER identity, if any); see WorkerMessage for the fields."""
    if len(frames) < 3:
        raise ProtocolError(f"a worker message needs at least 3 frames, got {len(frames)}")
    if frame_bytes(frames[0]) != b"" or frame_bytes(frames[1]) != WORKER:
        raise ProtocolError("a worker message must start with '', 'MDPW01'")
    command = _COMMANDS.get(frame_bytes(frames[2]))
    if command is None:
        raise ProtocolError(f"unknown worker command 0x{frame_bytes(frames[2])[:8].hex()}")
    fields = list(frames[3:])
    if len(fields) < _MIN_FIELDS[command]:
        raise ProtocolError(f"{command.name} needs at least {_MIN_FIELDS[command]} frames after the command, "
                            f"got {len(fields)}")
    stats = None
    if command is Command.BATCH:
        fields = _parse_batch(fields)
    elif command is Command.REPLIES:
        fields, stats = _parse_replies(fields)
    elif command is Command.READY:
        fields = [_check_id(frame_bytes(fields[0]), "model name"), unpack_header(fields[1])]
    elif command is Command.DISCONNECT:
        fields = [unpack_header(fields[0])] if fields else []
    elif command is Command.HEARTBEAT:
        if len(fields) > 1:
            raise ProtocolError(f"HEARTBEAT has at most one frame (stats) after the command, got {len(fields)}")
        stats = parse_stats(fields[0], "HEARTBEAT") if fields else None
        fields = []
    return WorkerMessage(command, fields, stats)
