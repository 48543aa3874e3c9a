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

from client import protocol
from client.errors import InvalidInput, PoolError, RequestTimeout

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 1
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class RequestBuilder:
    """Request ids, headers and frames for one client object."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4)

    def next_id(self) -> bytes:
        """A request-id unique for this client object (and its forks, through the pid)."""
        return self._prefix + os.getpid().to_bytes(4, "little") + next(self._ids).to_bytes(8, "little")

    def inference(self, model: str, inputs: Mapping[str, Any], outputs: Sequence[str] | None,
                  timeout: float | None, parameters: dict | None = None) -> tuple[bytes, list]:
        """(request-id, frames) of an inference request."""
        if not isinstance(inputs, Mapping) or not inputs:
            raise InvalidInput("inputs must be a non-empty dict of name -> array")
        try:
            metas, tensors = protocol.encode_tensors(inputs)
        except PoolError:
            raise
        except Exception as exc:  # np.asarray on ragged lists and the like
            raise InvalidInput(f"inputs could not be turned into arrays: {exc}") from None
        size = sum(memoryview(t).nbytes for t in tensors)
        if size > self.max_message_bytes:
            raise InvalidInput(f"request tensors are {size} bytes, over the {self.max_message_bytes}-byte message "
                               "limit; send fewer rows per request or raise max_message_bytes on pool and client")
        header: dict[str, Any] = {"inputs": metas}
        if outputs:
            header["outputs"] = [{"name": name} for name in outputs]
        if timeout is not None:
            header["timeout_ms"] = max(1, math.ceil(timeout * 1000))
        if parameters:
            header["parameters"] = parameters
        return self.request(model, header, tensors)

    def request(self, model: str, header: dict, tensors: Sequence[Any] = ()) -> tuple[bytes, list]:
        """(request-id, frames) of any request."""
        rid = self.next_id()
        return rid, protocol.encode_request(model, rid, header, tensors)


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
        raise InvalidInput(f"model {model!r} returned {len(outputs)} outputs {list(outputs)}; use infer() for "
                           "multi-output models")
    return next(iter(outputs.values()))


# --- sockets and the Lazy Pirate budget -------------------------------------------------------


def open_dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """A DEALER socket connected to a broker frontend, closing without linger."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if endpoint.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)
    sock.connect(endpoint)
    return sock


def check_settings(timeout: float, retries: int) -> None:
    """Validate a client's default timeout and retry count; ValueError otherwise."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer >= 0, got {retries!r}")


def attempt_timeout(wait: float, tries: int) -> float:
    """Seconds one try may take when ``tries`` tries share a budget of ``wait`` seconds."""
    return wait / max(1, tries)


def timeout_error(wait: float, endpoint: str, tries: int) -> RequestTimeout:
    """The RequestTimeout raised when no try of a request was answered."""
    sent = f" (sent {tries} times, each resend on a fresh socket)" if tries > 1 else ""
    return RequestTimeout(f"no reply within {wait:.3f}s from {endpoint}{sent}; is the pool running there?")


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
