"""What the sync and asyncio clients share: building requests, turning replies into results, sockets, forks."""
from __future__ import annotations

import itertools
import logging
import math
import os
import weakref
from typing import Any, Mapping, Sequence

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from modelpool.client import protocol
from modelpool.client.errors import InvalidInput, ModelNotFound, PoolError, ProtocolError, RequestTimeout, Unavailable

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 1
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


# dtypes sent as they are (little-endian or single-byte): the fast path of RequestBuilder.inference
_WIRE_DTYPES = {dt.str: name for name, dt in protocol.DATATYPES.items()}
_HEADER_CACHE_SIZE = 256


class RequestBuilder:
    """Request ids, headers and frames for one client object.

    Packed headers are cached by (model, input names, dtypes and shapes, outputs, timeout): a client
    sending the same kind of request again pays a dict lookup, not a msgpack encoding; and requests
    whose header is the same object can travel in one group.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self._ids = itertools.count(1)
        self._headers: dict[tuple, bytes] = {}
        self.after_fork()

    def after_fork(self) -> None:
        """A fresh request-id prefix: the pid is part of it, so a forked child's ids differ from its parent's."""
        self._prefix = os.urandom(4) + os.getpid().to_bytes(4, "little")

    def next_id(self) -> bytes:
        """A request-id unique for this client object (and its forks, through the pid)."""
        return self._prefix + next(self._ids).to_bytes(8, "little")

    def inference(self, model: str, inputs: Mapping[str, Any], outputs: Sequence[str] | None,
                  timeout: float | None, version: str | None = None) -> tuple[bytes, list]:
        """(request-id, frames) of an inference request, with ``timeout`` seconds as its ``timeout_ms``
        and ``version`` (None: the newest ready one) as its ``model_version``."""
        if not isinstance(inputs, Mapping) or not inputs:
            raise InvalidInput("inputs must be a non-empty dict of name -> array")
        key, tensors = _fast_tensors(inputs)
        if key is None:
            return self._inference(model, inputs, outputs, timeout, version)
        timeout_ms = None if timeout is None else max(1, math.ceil(timeout * 1000))
        key = (model, key, tuple(outputs) if outputs else (), timeout_ms, version)
        header = self._headers.get(key)
        if header is None:  # the size check is done here: the same shapes and dtypes have the same size
            rid, frames = self._inference(model, inputs, outputs, timeout, version)
            if len(self._headers) >= _HEADER_CACHE_SIZE:
                self._headers.clear()
            self._headers[key] = frames[4]
            return rid, frames
        rid = self._prefix + next(self._ids).to_bytes(8, "little")
        return rid, [b"", protocol.CLIENT, model.encode(), rid, header, *tensors]

    def _check_size(self, tensors: Sequence[Any]) -> None:
        size = sum(memoryview(t).nbytes for t in tensors)
        if size > self.max_message_bytes:
            raise InvalidInput(f"request tensors are {size} bytes, over the {self.max_message_bytes}-byte message "
                               "limit; send fewer rows per request or raise max_message_bytes on pool and client")

    def _inference(self, model: str, inputs: Mapping[str, Any], outputs: Sequence[str] | None,
                   timeout: float | None, version: str | None = None) -> tuple[bytes, list]:
        try:
            metas, tensors = protocol.encode_tensors(inputs)
        except PoolError:
            raise
        except Exception as exc:  # np.asarray on ragged lists and the like
            raise InvalidInput(f"inputs could not be turned into arrays: {exc}") from None
        self._check_size(tensors)
        header: dict[str, Any] = {"inputs": metas}
        if outputs:
            header["outputs"] = [{"name": name} for name in outputs]
        if version is not None:
            header["model_version"] = str(version)
        return self.request(model, header, tensors, timeout)

    def request(self, model: str, header: dict, tensors: Sequence[Any] = (),
                timeout: float | None = None) -> tuple[bytes, list]:
        """(request-id, frames) of any request; ``timeout`` (seconds) goes in the header as ``timeout_ms``."""
        if timeout is not None:
            header["timeout_ms"] = max(1, math.ceil(timeout * 1000))
        rid = self.next_id()
        return rid, protocol.encode_request(model, rid, header, tensors)


def _fast_tensors(inputs: Mapping[str, Any]) -> tuple[tuple | None, list]:
    """(cache key, tensor buffers) when every input is a non-empty C-contiguous array of a wire dtype
    under a string name; (None, []) otherwise (the general path converts and checks)."""
    key, tensors = [], []
    for name, value in inputs.items():
        if (type(value) is not np.ndarray or type(name) is not str or not value.flags.c_contiguous
                or not value.ndim or not value.size):
            return None, []
        dtype = value.dtype.str
        if dtype not in _WIRE_DTYPES:
            return None, []
        key.append((name, dtype, value.shape))
        tensors.append(memoryview(value).cast("B"))
    return tuple(key), tensors


# --- inputs as users pass them --------------------------------------------------------------

# Integers a float type holds exactly: past 2**mantissa bits a cast would change the value.
_EXACT_INT = {2: 2**11, 4: 2**24, 8: 2**53}


class ModelSchema:
    """A model's input names and dtypes (from its metadata): what a client needs to shape a request.

    Users pass what numpy and Keras make by default (float64, int64, Python lists, one bare array
    for a one-input model); Keras's own ``predict`` takes them. The client converts them here when
    the cast cannot change a value, so the wire stays strict: servers never guess.
    """

    __slots__ = ("model", "names", "dtypes")

    def __init__(self, model: str, metadata: dict) -> None:
        self.model = model
        inputs = metadata.get("inputs") if isinstance(metadata, dict) else None
        if not isinstance(inputs, list) or not inputs:
            raise ProtocolError(f"metadata of model '{model}' lists no inputs")
        self.names: list[str] = []
        self.dtypes: dict[str, np.dtype] = {}
        for meta in inputs:
            name, datatype, _ = protocol.check_tensor_meta({**meta, "shape": []} if isinstance(meta, dict) else meta)
            self.names.append(name)
            self.dtypes[name] = np.dtype(object) if datatype == "BYTES" else protocol.DATATYPES[datatype]

    def conform(self, inputs: Any) -> dict[str, np.ndarray]:
        """Named arrays of the model's dtypes, from a dict of inputs or one array for a one-input model."""
        if not isinstance(inputs, Mapping):
            if len(self.names) != 1:
                raise InvalidInput(f"model '{self.model}' has {len(self.names)} inputs ({', '.join(self.names)}); "
                                   "pass a dict of name -> array")
            inputs = {self.names[0]: inputs}
        elif list(inputs) == [""] and len(self.names) == 1:
            inputs = {self.names[0]: inputs[""]}
        if not inputs:
            raise InvalidInput("inputs must be a non-empty dict of name -> array")
        out = {}
        for name, value in inputs.items():
            want = self.dtypes.get(name)
            out[name] = value if want is None else self._cast(name, value, want)  # the server names unknown inputs
        return out

    def _cast(self, name: Any, value: Any, want: np.dtype) -> np.ndarray:
        try:
            array = np.asarray(value)
        except Exception as exc:  # ragged lists and the like
            raise InvalidInput(f"input '{name}' could not be turned into an array: {exc}") from None
        got = array.dtype
        if got == want or want.kind == "O" or got.kind in "OSU":
            return array
        reason = _lossy_cast(array, want)
        if reason:
            raise InvalidInput(
                f"input '{name}' of model '{self.model}' takes {protocol.datatype_of(want)}; got "
                f"{_wire_name(got)} {list(array.shape)}, not converted because {reason}; convert it before sending")
        return array.astype(want)


def _wire_name(dtype: np.dtype) -> str:
    try:
        return protocol.datatype_of(dtype)
    except ProtocolError:
        return str(dtype)


def _lossy_cast(array: np.ndarray, want: np.dtype) -> str:
    """Why casting ``array`` to ``want`` could change a value ('' when it cannot)."""
    got = array.dtype
    if want.kind == "f":
        if got.kind == "f":
            return ""  # float64 -> float32 rounds as Keras's own predict does
        if got.kind in "iub":
            limit = _EXACT_INT[want.itemsize]
            if array.size and got.kind != "b" and (array.max() > limit or array.min() < -limit):
                return f"some integers are larger than {protocol.datatype_of(want)} holds exactly (2**{limit.bit_length() - 1})"
            return ""
    elif want.kind in "iu":
        if got.kind in "iub":
            info = np.iinfo(want)
            if array.size and got.kind != "b" and (array.max() > info.max or array.min() < info.min):
                return f"values run from {array.min()} to {array.max()}, outside {info.min} to {info.max}"
            return ""
        if got.kind == "f":
            return "floats are not turned into integers (send whole numbers as an integer array)"
    elif want.kind == "b":
        return "only booleans are sent as BOOL"
    return f"{_wire_name(got)} does not convert to {protocol.datatype_of(want)}"


def decode_outputs(reply: protocol.Reply) -> dict[str, np.ndarray]:
    """Named output arrays of a reply, or its typed error raised."""
    error = protocol.reply_error(reply)
    if error is not None:
        raise error
    return protocol.decode_tensors(reply.header.get("outputs", []), reply.tensors)


def header_or_raise(reply: protocol.Reply) -> dict:
    """The reply's header, or its typed error raised."""
    error = protocol.reply_error(reply)
    if error is not None:
        raise error
    return reply.header


def single_output(outputs: dict[str, np.ndarray], model: str) -> np.ndarray:
    """The one output of a single-output model."""
    if len(outputs) != 1:
        raise InvalidInput(f"model '{model}' returned {len(outputs)} outputs ({', '.join(outputs)}); name the ones "
                           "you want with outputs=[...], or use infer() for a dict of all of them")
    return next(iter(outputs.values()))


def wanted_outputs(outputs: str | Sequence[str] | None) -> list[str] | None:
    """``predict``'s ``outputs`` argument (one name or a list of names) as the request's list."""
    if outputs is None:
        return None
    return [outputs] if isinstance(outputs, str) else list(outputs)


def pick_outputs(results: dict[str, np.ndarray], model: str, outputs: str | Sequence[str] | None) -> Any:
    """What ``predict`` returns: the one output, the named one, or a list in the order asked for."""
    if outputs is None:
        return single_output(results, model)
    if isinstance(outputs, str):
        return results[outputs]
    return [results[name] for name in outputs]


class SchemaCache:
    """Model schemas a client has fetched, by model name; a stale one is dropped when the server says so."""

    def __init__(self) -> None:
        self._schemas: dict[str, ModelSchema] = {}

    def get(self, model: str) -> ModelSchema | None:
        return self._schemas.get(model)

    def put(self, model: str, metadata: dict) -> ModelSchema:
        schema = self._schemas[model] = ModelSchema(model, metadata)
        return schema

    def outputs(self, model: str, reply: protocol.Reply) -> dict[str, np.ndarray]:
        """``decode_outputs``; an InvalidInput answer forgets the schema (the model may have changed)."""
        try:
            return decode_outputs(reply)
        except InvalidInput:
            self._schemas.pop(model, None)
            raise


# --- waiting for a pool ---------------------------------------------------------------------

READY_POLL = 0.2  # seconds between mmi.models polls while waiting for replicas


def readiness(models: list[dict], wanted: Sequence[str] | None, all_replicas: bool) -> list[str]:
    """What keeps the wanted models from being ready, one line each ([] when they all are).

    Raises ModelNotFound for a wanted model the pool does not serve, and Unavailable for one that
    failed to load and has no replica ready: waiting longer would not help.
    """
    by_name = {m.get("name"): m for m in models}
    missing = []
    for name in (list(wanted) if wanted is not None else list(by_name)):
        entry = by_name.get(name)
        if entry is None:
            served = ", ".join(sorted(str(n) for n in by_name)) or "none"
            raise ModelNotFound(f"model '{name}' is not served here; models served: {served}")
        ready = entry.get("replicas_ready") or 0
        need = max(1, entry.get("replicas_expected") or 1) if all_replicas else 1
        if ready >= need:
            continue
        if entry.get("load_error") and ready == 0:
            raise Unavailable(f"model '{name}' failed to load: {entry['load_error']}")
        missing.append(f"model '{name}': {ready}/{need} replicas ready")
    return missing


class ReadyWait:
    """``wait_ready``'s bookkeeping, shared by the sync and asyncio clients (which only add the I/O)."""

    def __init__(self, endpoint: str, models: Sequence[str] | None, all_replicas: bool, timeout: float,
                 now: float) -> None:
        self.endpoint, self.models, self.all_replicas, self.timeout = endpoint, models, all_replicas, timeout
        self.deadline = now + timeout
        self.missing: list[str] = []
        self.last: Exception | None = None  # why the pool did not answer, while it did not

    def next_try(self, now: float) -> float:
        """The timeout of the next mmi.models query; RequestTimeout once the wait is over."""
        left = self.deadline - now
        if left <= 0:
            why = "; ".join(self.missing) or f"the pool at {self.endpoint} did not answer ({self.last})"
            raise RequestTimeout(f"pool not ready within {self.timeout:g}s: {why}")
        return min(left, 2.0)

    def ready(self, served: list[dict]) -> bool:
        """True when the answer shows every wanted model ready (see ``readiness``)."""
        self.missing = readiness(served, self.models, self.all_replicas)
        return not self.missing

    def pause(self, now: float) -> float:
        """Seconds to sleep before asking again."""
        return min(READY_POLL, max(0.0, self.deadline - now))


# --- groups --------------------------------------------------------------------------------

# A group (see client/protocol.py) holds at most this many tensor bytes: a larger request goes alone,
# and a group never comes near the broker's max_message_bytes (which would cost the connection).
GROUP_BYTES = 1 << 20
# The request-id of the mmi.health request a client sends when its connection comes up, to learn
# whether the broker takes groups; it is never a tracked request's id (those are 16 bytes).
PROBE_RID = b"modelpool-probe"
PROBE = [b"", protocol.CLIENT, protocol.MMI_HEALTH, PROBE_RID, protocol.packb({})]


def takes_groups(reply: protocol.Reply) -> bool:
    """Whether the answer to the probe says the broker takes groups."""
    extensions = reply.header.get("extensions") if reply.status == protocol.OK else None
    return isinstance(extensions, list) and "group" in extensions


def grouped_messages(requests: list[list]) -> list[tuple[list, int]]:
    """(message, how many requests it carries) for request frames in order: consecutive requests with
    the same model and the same header object (a cached one: inference requests only) as groups."""
    out: list[tuple[list, int]] = []
    run: list[list] = []
    size = 0
    for frames in requests:
        nbytes = sum(memoryview(t).nbytes for t in frames[5:])
        if (run and frames[4] is run[0][4] and frames[2] == run[0][2] and len(run) < protocol.MAX_GROUP
                and size + nbytes <= GROUP_BYTES):
            run.append(frames)
            size += nbytes
            continue
        if run:
            out.append(_message(run))
        run, size = [frames], nbytes
    if run:
        out.append(_message(run))
    return out


def _message(run: list[list]) -> tuple[list, int]:
    if len(run) == 1:
        return run[0], 1
    first = run[0]
    return protocol.encode_request_group(first[2], first[4], [f[3] for f in run], [f[5:] for f in run]), len(run)


# --- sockets -------------------------------------------------------------------------------

# What a client's socket monitor reports: the connection dropped, and it is back (the ZMTP handshake
# done, so that a request sent now reaches the new peer).
UP_EVENT = zmq.EVENT_HANDSHAKE_SUCCEEDED if zmq.zmq_version_info() >= (4, 3) else zmq.EVENT_CONNECTED
MONITOR_EVENTS = zmq.EVENT_DISCONNECTED | UP_EVENT
_monitor_ids = itertools.count(1)


def open_monitored(ctx: zmq.Context, endpoint: str) -> tuple[zmq.Socket, zmq.Socket]:
    """(DEALER connected to ``endpoint``, PAIR socket that receives its disconnect and reconnect events)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if endpoint.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)
    # An address of our own: pyzmq's default names it after the socket's fd, which a socket closed a
    # moment ago may still hold.
    monitor = sock.get_monitor_socket(MONITOR_EVENTS, f"inproc://modelpool-monitor-{os.getpid()}-{next(_monitor_ids)}")
    monitor.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock, monitor


def connection_events(monitor: zmq.Socket) -> list[int]:
    """The events waiting on a monitor socket (DISCONNECTED or ``UP_EVENT``), in order, without blocking."""
    events = []
    while True:
        try:
            events.append(recv_monitor_message(monitor, zmq.NOBLOCK)["event"])
        except zmq.Again:
            return events


def check_settings(timeout: float, retries: int) -> None:
    """Validate a client's default timeout and retry count; ValueError otherwise."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer >= 0, got {retries!r}")


# --- fork safety ----------------------------------------------------------------------------

_FORK_AWARE: weakref.WeakSet = weakref.WeakSet()
# What a forked child inherited from its parent (contexts, sockets, threads' state): kept referenced so
# that the child never closes or garbage-collects the parent's objects.
_INHERITED: list = []


def track_forks(client: Any) -> None:
    """Have ``client._after_fork()`` called in every child forked from now on (before any other code)."""
    _FORK_AWARE.add(client)


def inherit(*objects: Any) -> None:
    """Park objects a forked child must neither use nor close."""
    _INHERITED.extend(o for o in objects if o is not None)


def _after_fork_in_child() -> None:
    for client in list(_FORK_AWARE):
        try:
            client._after_fork()
        except Exception:  # never let one client break the child's start
            log.exception("modelpool client could not reset itself after fork")


os.register_at_fork(after_in_child=_after_fork_in_child)
