"""What the sync and asyncio clients share: building requests and turning replies into results."""
from __future__ import annotations

import itertools
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from client import protocol
from client.errors import InvalidInput, PoolError

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_TIMEOUT = 30.0
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
