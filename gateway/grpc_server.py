"""The KServe V2 gRPC door: ``inference.GRPCInferenceService`` on grpc.aio, in the gateway process.

Pool statuses become gRPC codes with the pool's message; a deadline the client sets on the call (and
a ``timeout`` parameter in microseconds, as Triton's clients send it) becomes the pool's timeout.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Awaitable, Callable

import grpc
import numpy as np
from google.protobuf import json_format

from modelpool.client import protocol
from modelpool.client.errors import InvalidInput, ModelNotFound, PoolError, Unavailable
from modelpool.client.protocol import DATATYPES, quote
from modelpool.gateway import grpc_predict_v2_pb2 as pb
from modelpool.gateway import grpc_predict_v2_pb2_grpc as pb_grpc
from modelpool.gateway import v2
from modelpool.gateway.backend import Backend

log = logging.getLogger(__name__)

CODES = {
    b"400": grpc.StatusCode.INVALID_ARGUMENT,
    b"404": grpc.StatusCode.NOT_FOUND,
    b"429": grpc.StatusCode.RESOURCE_EXHAUSTED,
    b"500": grpc.StatusCode.INTERNAL,
    b"501": grpc.StatusCode.UNIMPLEMENTED,
    b"503": grpc.StatusCode.UNAVAILABLE,
    b"504": grpc.StatusCode.DEADLINE_EXCEEDED,
}
# InferTensorContents field per datatype (FP16 has none: it travels raw).
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def code_of(error: PoolError) -> grpc.StatusCode:
    """The gRPC status code for a pool error."""
    return CODES.get(error.status, grpc.StatusCode.INTERNAL)


def _answers_errors(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Pool errors abort the call with their code and message; anything else is a logged INTERNAL."""

    @functools.wraps(method)
    async def run(self: GrpcDoor, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except PoolError as exc:
            await context.abort(code_of(exc), str(exc))
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError) or type(exc).__name__ == "AbortError":
                raise
            log.exception("gateway error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"internal error in the gateway ({type(exc).__name__}); see the pool's log")

    return run


def _params(params: Any) -> dict:
    """A protobuf map of InferParameter as plain values."""
    out = {}
    for key, value in params.items():
        which = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, which) if which else None
    return out


def input_tensor(item: Any, raw: Any, limit: int) -> tuple[dict, Any]:
    """(pool tensor description, raw bytes) of one ModelInferRequest input."""
    name = item.name
    datatype, shape, count = v2.check_shape(name, item.datatype, list(item.shape))
    size = v2.check_size(name, datatype, shape, count, limit)
    v2.refuse_unsupported(_params(item.parameters), f"input {quote(name)}")
    meta = {"name": name, "datatype": datatype, "shape": shape}
    if raw is not None:
        if datatype != "BYTES" and len(raw) != size:
            raise InvalidInput(f"input {quote(name)}: {datatype} shape {shape} takes {size} bytes, "
                               f"raw_input_contents has {len(raw)}")
        return meta, raw
    field = CONTENTS.get(datatype)
    if field is None:
        raise InvalidInput(f"input {quote(name)}: {datatype} data must be sent in raw_input_contents")
    values = getattr(item.contents, field)
    if datatype == "BYTES":
        if len(values) != count:
            raise InvalidInput(f"input {quote(name)}: shape {shape} needs {count} values, contents has {len(values)}")
        return meta, b"".join(len(v).to_bytes(4, "little") + v for v in values)
    if len(values) != count:
        raise InvalidInput(f"input {quote(name)}: shape {shape} needs {count} values, {field} has {len(values)}")
    array = np.asarray(values)
    if count and datatype in ("INT8", "INT16", "UINT8", "UINT16"):
        info = np.iinfo(DATATYPES[datatype])
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(f"input {quote(name)}: values run from {array.min()} to {array.max()}, outside "
                               f"{datatype}'s {info.min} to {info.max}")
    return meta, np.ascontiguousarray(array, dtype=DATATYPES[datatype]).reshape(-1).view(np.uint8)


def parse_infer(request: Any, limit: int) -> v2.InferRequest:
    """The pool request for a ModelInferRequest."""
    params = _params(request.parameters)
    v2.refuse_unsupported(params, "request")
    if not request.inputs:
        raise InvalidInput("inputs must hold at least one tensor")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one "
                           "per input, in order")
    metas, tensors = [], []
    for i, item in enumerate(request.inputs):
        if raw and item.HasField("contents"):
            raise InvalidInput(f"input {quote(item.name)} has contents while raw_input_contents is used; send one")
        meta, tensor = input_tensor(item, raw[i] if raw else None, limit)
        metas.append(meta)
        tensors.append(tensor)
    names = [o.name for o in request.outputs]
    for o in request.outputs:
        v2.refuse_unsupported(_params(o.parameters), f"output {quote(o.name)}")
    timeout = v2.timeout_from_micros(params["timeout"], "parameter timeout") if "timeout" in params else None
    return v2.InferRequest(v2.pool_header(metas, names), tensors, request.id, timeout)


def infer_response(request_id: str, reply: protocol.Reply) -> Any:
    """ModelInferResponse with raw_output_contents for a 200 reply."""
    response = pb.ModelInferResponse(model_name=reply.header.get("model_name", ""),
                                     model_version=str(reply.header.get("model_version", "")), id=request_id)
    for meta, frame in zip(reply.header.get("outputs", []), reply.tensors):
        response.outputs.add(name=meta["name"], datatype=meta["datatype"], shape=meta["shape"])
        response.raw_output_contents.append(frame.bytes if hasattr(frame, "bytes") else bytes(frame))
    return response


class GrpcDoor(pb_grpc.GRPCInferenceServiceServicer):
    """The servicer over one Backend."""

    def __init__(self, backend: Backend, *, max_message_bytes: int, default_timeout: float) -> None:
        self.backend = backend
        self.max_message_bytes = max_message_bytes
        self.default_timeout = default_timeout

    @_answers_errors
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=await self._probe(self.backend.live))

    @_answers_errors
    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=await self._probe(self.backend.ready))

    async def _probe(self, probe: Callable[[], Awaitable[bool]]) -> bool:
        try:
            return await probe()
        except PoolError as exc:
            raise Unavailable(f"the broker does not answer: {exc}") from None

    @_answers_errors
    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            ready = await self.backend.model_ready(request.name, request.version)
        except ModelNotFound:  # a boolean API: an unknown model or version is not ready
            ready = False
        return pb.ModelReadyResponse(ready=ready)

    @_answers_errors
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(**self.backend.server_metadata())

    @_answers_errors
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        meta = await self.backend.model_metadata(request.name, request.version)
        return json_format.ParseDict(meta, pb.ModelMetadataResponse())

    @_answers_errors
    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        stats = await self.backend.statistics(request.name, request.version)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

    @_answers_errors
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        infer = parse_infer(request, self.max_message_bytes)
        reply = await self.backend.infer(request.model_name, request.model_version, infer.header, infer.tensors,
                                         self._timeout(infer, context))
        return infer_response(request.id, reply)

    def _timeout(self, infer: v2.InferRequest, context: grpc.aio.ServicerContext) -> float:
        """The smaller of the call's gRPC deadline and the request's timeout parameter, else the default."""
        candidates = [infer.timeout] if infer.timeout else []
        left = context.time_remaining()
        if left is not None:
            candidates.append(max(left, 0.001))
        return min(candidates) if candidates else self.default_timeout


def make_server(backend: Backend, host: str, port: int, *, max_message_bytes: int,
                default_timeout: float, max_concurrent: int | None = None) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with the door added and bound; (server, the port bound). Past
    ``max_concurrent`` calls at once, grpc answers RESOURCE_EXHAUSTED."""
    limit = max_message_bytes + (1 << 20)  # tensors plus the protobuf around them
    server = grpc.aio.server(maximum_concurrent_rpcs=max_concurrent, options=[
        ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),  # a port in use is an error, never shared with another server
    ])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        GrpcDoor(backend, max_message_bytes=max_message_bytes, default_timeout=default_timeout), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot bind gRPC to {address}: {exc}") from None
    if not bound:
        raise OSError(f"cannot bind gRPC to {address} (in use?)")
    return server, bound
