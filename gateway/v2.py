"""KServe V2 (Open Inference Protocol) <-> the pool's wire request, for both doors; no I/O here.

The pool's header is already V2-shaped (``{"inputs": [{name, datatype, shape}], "outputs": [{name}]}``,
tensors as raw little-endian C-order bytes), so binary tensor data passes through as memoryviews over
the request body and JSON ``data`` lists go through numpy once. Every problem with a request is an
``InvalidInput`` (400) or ``NotSupported`` (501) whose message says what to fix.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import orjson

from modelpool.client import protocol
from modelpool.client.errors import InvalidInput, ModelNotFound, NotSupported
from modelpool.client.protocol import DATATYPES, quote

HEADER_LENGTH = "inference-header-content-length"
TIMEOUT_HEADER = "inference-timeout-ms"  # ours: the request's deadline in milliseconds
MAX_DIMS = 32
# Platforms the pool's metadata names -> what a V2 client reads.
PLATFORMS = {"keras": "keras", "keras_h5": "keras"}
# What numpy made of a JSON data list (its dtype kind), in words; and what each datatype takes.
_JSON_KINDS = {"b": "booleans", "i": "whole numbers", "u": "whole numbers", "f": "fractional numbers",
               "U": "strings", "S": "strings"}
_TAKES = {"b": ("true/false", ("b",)), "i": ("whole numbers", ("i", "u")), "u": ("whole numbers", ("i", "u")),
          "f": ("numbers", ("i", "u", "f"))}


@dataclass
class InferRequest:
    """One inference request in the pool's terms, with what the V2 client asked about the reply."""

    header: dict
    tensors: list
    request_id: str = ""
    timeout: float | None = None  # seconds, from the request's own parameters
    binary_default: bool = False  # parameters.binary_data_output
    binary_outputs: dict[str, bool] = field(default_factory=dict)  # per requested output

    def wants_binary(self, name: str) -> bool:
        """Whether output ``name`` goes back as binary data (else as a JSON ``data`` list)."""
        return self.binary_outputs.get(name, self.binary_default)


# --- helpers shared by HTTP and gRPC ----------------------------------------------------------


def check_shape(name: str, datatype: Any, shape: Any) -> tuple[str, list[int], int]:
    """(datatype, shape, element count) of a V2 tensor description; InvalidInput if it is not one."""
    if datatype != "BYTES" and (not isinstance(datatype, str) or datatype not in DATATYPES):
        raise InvalidInput(f"input {quote(name)}: unknown datatype {quote(datatype)}; use one of "
                           f"{', '.join(DATATYPES)}, BYTES")
    if (not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape)):
        raise InvalidInput(f"input {quote(name)}: shape must be a list of at most {MAX_DIMS} non-negative "
                           f"integers, got {_describe_shape(shape)}")
    return datatype, [int(d) for d in shape], math.prod(shape)


def _describe_shape(shape: Any) -> str:
    if isinstance(shape, (list, tuple)) and len(shape) <= MAX_DIMS:
        return "[" + ", ".join(protocol.describe(d) for d in shape) + "]"
    return protocol.wire_type(shape)


def check_size(name: str, datatype: str, shape: list[int], count: int, limit: int) -> int:
    """Bytes the tensor takes (fixed-size datatypes); InvalidInput past the pool's message limit."""
    itemsize = 4 if datatype == "BYTES" else DATATYPES[datatype].itemsize  # BYTES: at least the lengths
    size = count * itemsize
    if size > limit:
        raise InvalidInput(f"input {quote(name)}: shape {shape} of {datatype} takes {size} bytes, over the "
                           f"pool's {limit}-byte message limit; send fewer rows per request")
    return size


def timeout_from_micros(value: Any, where: str) -> float | None:
    """Seconds from a V2 ``timeout`` parameter (microseconds, as Triton's clients send it); 0 = none."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{where} must be a whole number of microseconds >= 0, got {protocol.describe(value)}")
    return value / 1e6 if value else None


def pool_header(inputs: list[dict], outputs: Sequence[str]) -> dict:
    """The pool's request header for tensor descriptions and requested output names."""
    header: dict[str, Any] = {"inputs": inputs}
    if outputs:
        header["outputs"] = [{"name": n} for n in outputs]
    return header


def array_from_values(name: str, datatype: str, shape: list[int], count: int, values: Any) -> Any:
    """The raw wire bytes of a tensor given as (nested) lists of values: one pass through numpy."""
    if datatype == "BYTES":
        return _bytes_from_values(name, shape, count, values)
    want = DATATYPES[datatype]
    try:
        array = np.asarray(values)
    except (ValueError, TypeError, RecursionError):
        raise InvalidInput(f"input {quote(name)}: data is not a regular array (rows of different lengths?); "
                           f"send {count} {datatype} values, flat or nested as shape {shape}") from None
    if array.size != count:
        raise InvalidInput(f"input {quote(name)}: shape {shape} needs {count} values, data has {array.size}")
    if count:
        _check_kind(name, datatype, want, array)
    return np.ascontiguousarray(array, dtype=want).reshape(-1).view(np.uint8)


def _check_kind(name: str, datatype: str, want: np.dtype, array: np.ndarray) -> None:
    """InvalidInput unless the parsed values fit the datatype without changing (no float to int, no overflow)."""
    takes, kinds = _TAKES[want.kind]
    if array.dtype.kind not in kinds:
        got = _JSON_KINDS.get(array.dtype.kind, "mixed values")
        raise InvalidInput(f"input {quote(name)}: datatype {datatype} takes {takes}, data holds {got}")
    if want.kind in "iu":
        info = np.iinfo(want)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(f"input {quote(name)}: values run from {array.min()} to {array.max()}, outside "
                               f"{datatype}'s {info.min} to {info.max}")


def _bytes_from_values(name: str, shape: list[int], count: int, values: Any) -> bytes:
    flat = _flatten(values, name)
    if len(flat) != count:
        raise InvalidInput(f"input {quote(name)}: shape {shape} needs {count} values, data has {len(flat)}")
    parts = []
    for item in flat:
        if not isinstance(item, str):
            raise InvalidInput(f"input {quote(name)}: BYTES data must be strings, got {protocol.wire_type(item)}")
        raw = item.encode()
        parts += (len(raw).to_bytes(4, "little"), raw)
    return b"".join(parts)


def _flatten(values: Any, name: str) -> list:
    if not isinstance(values, list):
        return [values]
    out: list = []
    stack = [iter(values)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) >= MAX_DIMS:
                    raise InvalidInput(f"input {quote(name)}: data nests deeper than {MAX_DIMS} levels")
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def output_values(datatype: str, shape: Sequence[int], frame: Any, name: str) -> Any:
    """A reply tensor as a flat array (numbers) or list of strings (BYTES), for a JSON ``data`` list."""
    buffer = frame.buffer if hasattr(frame, "buffer") else frame
    if datatype != "BYTES":
        return np.frombuffer(buffer, dtype=DATATYPES[datatype])
    items = protocol.decode_tensors([{"name": name, "datatype": "BYTES", "shape": list(shape)}], [buffer])[name]
    try:
        return [bytes(v).decode() for v in items.reshape(-1)]
    except UnicodeDecodeError:
        raise InvalidInput(f"output {quote(name)} holds bytes that are not UTF-8 text; ask for it as binary data "
                           "(binary_data: true)") from None


def frame_size(frame: Any) -> int:
    """Bytes in a reply tensor frame (zmq.Frame or buffer)."""
    return memoryview(frame.buffer if hasattr(frame, "buffer") else frame).nbytes


def pick_version(model: str, version: str, versions: list[dict]) -> dict:
    """The mmi.models entry of ``version`` ("": the one a request naming none goes to) out of a
    model's versions; ModelNotFound naming the versions served when it is not one of them."""
    if not version:
        return next((e for e in versions if e.get("default")), versions[0])
    for entry in versions:
        if str(entry.get("version") or "") == version:
            return entry
    served = ", ".join(str(e.get("version") or "") for e in versions)
    raise ModelNotFound(f"model {quote(model)} has no version {quote(version)} loaded; versions served: {served} "
                        "(leave the version out for the newest ready one)")


def model_metadata(meta: dict, version: str) -> dict:
    """V2 model metadata from the pool's ``op: metadata`` answer."""
    def tensors(key: str) -> list[dict]:
        return [{"name": t.get("name"), "datatype": t.get("datatype"), "shape": list(t.get("shape", []))}
                for t in meta.get(key, []) if isinstance(t, dict)]

    versions = meta.get("versions") or ([version] if version else [])
    return {"name": meta.get("name"), "versions": [str(v) for v in versions],
            "platform": PLATFORMS.get(str(meta.get("platform")), "tensorflow"),
            "inputs": tensors("inputs"), "outputs": tensors("outputs")}


def _duration(count: Any, seconds: Any) -> dict:
    count = count if isinstance(count, int) and not isinstance(count, bool) else 0
    ns = int(seconds * 1e9) if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else 0
    return {"count": count, "ns": ns}


def model_statistics(entry: dict) -> dict:
    """Triton's statistics extension entry for one model, from its ``mmi.models`` entry.

    The broker counts requests by outcome with their durations (from admission to answer), queue time,
    and the model calls its workers report (executions, rows, compute time); Triton's finer split of
    compute time (input, infer, output) and its per-batch-size table are not measured: compute_infer
    holds all of it and batch_stats is empty.
    """
    def num(key: str) -> Any:
        value = entry.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0

    return {
        "name": entry.get("name", ""), "version": str(entry.get("version") or ""),
        "last_inference": int(num("last_call_ms")), "inference_count": int(num("inferences")),
        "execution_count": num("executions"),
        "inference_stats": {
            "success": _duration(num("success"), num("request_seconds")),
            "fail": _duration(num("failed"), num("failed_request_seconds")),
            "queue": _duration(num("dispatched"), num("queue_seconds")),
            "compute_input": _duration(0, 0),
            "compute_infer": _duration(num("executions"), num("compute_seconds")),
            "compute_output": _duration(0, 0),
        },
        "batch_stats": [],
    }


# --- HTTP/REST: JSON and the binary tensor data extension -------------------------------------


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The request body after ``Content-Encoding`` (gzip, deflate or none), at most ``limit`` bytes."""
    if not encoding or encoding == "identity":
        return body
    wbits = {"gzip": 31, "deflate": 15}.get(encoding.strip().lower())
    if wbits is None:
        raise InvalidInput(f"Content-Encoding {quote(encoding)} is not supported; send gzip, deflate or none")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"request body is not valid {encoding} data ({exc})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise InvalidInput(f"request body inflates to more than the pool's {limit}-byte message limit")
    return out


def split_body(body: bytes, header_length: str | None) -> tuple[bytes | memoryview, memoryview]:
    """(JSON part, binary part) of a request body per ``Inference-Header-Content-Length``."""
    view = memoryview(body)
    if header_length is None:
        return body, view[len(body):]
    text = header_length.strip()
    if not text.isdigit() or len(text) > 19:
        raise InvalidInput(f"Inference-Header-Content-Length must be a whole number of bytes, got {quote(header_length)}")
    length = int(text)
    if length > len(body):
        raise InvalidInput(f"Inference-Header-Content-Length is {length} but the body has only {len(body)} bytes")
    return view[:length], view[length:]


def parse_json(raw: bytes | memoryview, what: str = "request") -> dict:
    """A JSON object from the body; InvalidInput with the parser's complaint otherwise."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{what} body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"{what} body must be a JSON object, got {_json_type(doc)}")
    return doc


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _parameters(obj: dict, where: str) -> dict:
    params = obj.get("parameters", {})
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidInput(f"{where} parameters must be a JSON object, got {_json_type(params)}")
    return params


def _bool_param(params: dict, key: str, where: str) -> bool | None:
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidInput(f"{where} parameter {key} must be true or false, got {_json_type(value)}")
    return value


_UNSUPPORTED = {"shared_memory_region": "shared memory is", "classification": "the classification extension is",
                "class_count": "the classification extension is", "sequence_id": "sequences are",
                "priority": "priorities are"}


def refuse_unsupported(params: Any, where: str) -> None:
    """NotSupported (501) for a parameter that asks for a Triton feature modelpool does not have."""
    for key, what in _UNSUPPORTED.items():
        if params.get(key) not in (None, 0, "", False):
            raise NotSupported(f"{where} parameter {key}: {what} not supported by modelpool")


def parse_http_infer(doc: dict, binary: memoryview, limit: int) -> InferRequest:
    """The pool request for a V2 HTTP inference body (JSON object plus the binary part after it)."""
    params = _parameters(doc, "request")
    refuse_unsupported(params, "request")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput(f"inputs must be a non-empty array of tensors, got {_json_type(inputs)}")
    metas, tensors, offset = [], [], 0
    for item in inputs:
        meta, tensor, offset = _http_input(item, binary, offset, limit)
        metas.append(meta)
        tensors.append(tensor)
    if offset != len(binary):
        raise InvalidInput(f"the body has {len(binary) - offset} bytes of binary data past what the inputs' "
                           f"binary_data_size add up to ({offset})")
    names, binary_outputs = _http_outputs(doc.get("outputs"))
    timeout = timeout_from_micros(params["timeout"], "parameter timeout") if "timeout" in params else None
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput(f"id must be a string, got {_json_type(request_id)}")
    return InferRequest(pool_header(metas, names), tensors, request_id, timeout,
                        bool(_bool_param(params, "binary_data_output", "request")), binary_outputs)


def _http_input(item: Any, binary: memoryview, offset: int, limit: int) -> tuple[dict, Any, int]:
    if not isinstance(item, dict):
        raise InvalidInput(f"each input must be a JSON object, got {_json_type(item)}")
    name = item.get("name")
    if not isinstance(name, str):
        raise InvalidInput(f"input name must be a string, got {_json_type(name)}")
    datatype, shape, count = check_shape(name, item.get("datatype"), item.get("shape"))
    size = check_size(name, datatype, shape, count, limit)
    params = _parameters(item, f"input {quote(name)}")
    refuse_unsupported(params, f"input {quote(name)}")
    meta = {"name": name, "datatype": datatype, "shape": shape}
    nbytes = params.get("binary_data_size")
    if nbytes is None:
        if "data" not in item:
            raise InvalidInput(f"input {quote(name)} has neither data nor parameters.binary_data_size")
        return meta, array_from_values(name, datatype, shape, count, item["data"]), offset
    if "data" in item:
        raise InvalidInput(f"input {quote(name)} has both data and binary_data_size; send one")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise InvalidInput(f"input {quote(name)}: binary_data_size must be a whole number of bytes >= 0, got "
                           f"{protocol.describe(nbytes)}")
    if datatype != "BYTES" and nbytes != size:
        raise InvalidInput(f"input {quote(name)}: {datatype} shape {shape} takes {size} bytes, binary_data_size "
                           f"says {nbytes}")
    if offset + nbytes > len(binary):
        raise InvalidInput(f"input {quote(name)}: binary_data_size {nbytes} runs past the body's binary data "
                           f"({len(binary) - offset} bytes left at offset {offset})")
    return meta, binary[offset:offset + nbytes], offset + nbytes


def _http_outputs(outputs: Any) -> tuple[list[str], dict[str, bool]]:
    if outputs is None:
        return [], {}
    if not isinstance(outputs, list):
        raise InvalidInput(f"outputs must be an array of {{\"name\": ...}} objects, got {_json_type(outputs)}")
    names, binary = [], {}
    for item in outputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput("each output must be a JSON object with a string name")
        name = item["name"]
        params = _parameters(item, f"output {quote(name)}")
        refuse_unsupported(params, f"output {quote(name)}")
        wanted = _bool_param(params, "binary_data", f"output {quote(name)}")
        if wanted is not None:
            binary[name] = wanted
        names.append(name)
    return names, binary


def http_reply(request: InferRequest, reply: protocol.Reply) -> tuple[bytes, list, int | None]:
    """(JSON header, binary buffers, header length or None) of a V2 HTTP answer to a 200 reply."""
    outputs, buffers = [], []
    for meta, frame in zip(reply.header.get("outputs", []), reply.tensors):
        name, datatype, shape = meta["name"], meta["datatype"], meta["shape"]
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if request.wants_binary(name):
            out["parameters"] = {"binary_data_size": frame_size(frame)}
            buffers.append(frame.buffer if hasattr(frame, "buffer") else frame)
        else:
            out["data"] = output_values(datatype, shape, frame, name)
        outputs.append(out)
    doc: dict[str, Any] = {"model_name": reply.header.get("model_name", ""),
                           "model_version": str(reply.header.get("model_version", ""))}
    if request.request_id:
        doc["id"] = request.request_id
    doc["outputs"] = outputs
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    return head, buffers, len(head) if buffers else None


def error_json(message: str) -> bytes:
    """The V2 error body."""
    return orjson.dumps({"error": message})
