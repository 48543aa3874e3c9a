"""Blocking client: one DEALER socket per thread, replies matched by request-id."""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np
import zmq

from client import protocol
from client.base import (
    DEFAULT_ENDPOINT,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT,
    RequestBuilder,
    decode_outputs,
    header_or_raise,
    single_output,
)
from client.errors import ProtocolError, RequestTimeout


class Client:
    """Talks to a modelpool broker; safe to share between threads and across ``os.fork()``."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, timeout: float = DEFAULT_TIMEOUT,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._builder = RequestBuilder(max_message_bytes)
        self._lock = threading.Lock()
        self._closed = False
        self._reset()

    def _reset(self) -> None:
        # After fork the parent's context and sockets belong to the parent: start afresh, never close them.
        self._pid = os.getpid()
        self._ctx = zmq.Context()
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []

    def _socket(self) -> zmq.Socket:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._reset()
        sock = getattr(self._local, "socket", None)
        if sock is None:
            if self._closed:
                raise RuntimeError("client is closed")
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self.endpoint.startswith("tcp://["):
                sock.setsockopt(zmq.IPV6, 1)
            sock.connect(self.endpoint)
            self._local.socket = sock
            with self._lock:
                self._sockets.append(sock)
        return sock

    def _discard_socket(self) -> None:
        sock = getattr(self._local, "socket", None)
        if sock is not None:
            self._local.socket = None
            with self._lock:
                if sock in self._sockets:
                    self._sockets.remove(sock)
            sock.close(linger=0)

    # --- round trips ---------------------------------------------------------------------

    def _roundtrip(self, rid: bytes, frames: list, timeout: float | None) -> protocol.Reply:
        sock = self._socket()
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        sock.send_multipart(frames, copy=False)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(left * 1000, zmq.POLLIN):
                raise RequestTimeout(f"no reply within {wait:.3f}s from {self.endpoint}")
            try:
                reply = protocol.parse_reply(sock.recv_multipart(copy=False))
            except ProtocolError:
                continue  # not a reply we could have asked for; keep waiting for ours
            if reply.rid == rid:
                return reply
            # a late reply to an abandoned request: drop it

    def infer(self, model: str, inputs: Mapping[str, Any], outputs: Sequence[str] | None = None, *,
              timeout: float | None = None, parameters: dict | None = None) -> dict[str, np.ndarray]:
        """Run a model on named inputs; returns the named outputs (layer names allowed in ``outputs``)."""
        wait = self.timeout if timeout is None else timeout
        rid, frames = self._builder.inference(model, inputs, outputs, wait, parameters)
        return decode_outputs(self._roundtrip(rid, frames, wait))

    def predict(self, model: str, x: Any, *, timeout: float | None = None) -> np.ndarray:
        """Run a single-input, single-output model on a batch ``x`` (first axis = rows)."""
        return single_output(self.infer(model, {"": x}, timeout=timeout), model)

    def metadata(self, model: str, *, timeout: float | None = None) -> dict:
        """Inputs and outputs (names, datatypes, shapes) of a model."""
        rid, frames = self._builder.request(model, {"op": "metadata"})
        return header_or_raise(self._roundtrip(rid, frames, timeout))

    def models(self, *, timeout: float | None = None) -> list[dict]:
        """Models served, with versions, replicas, queue depths and counters."""
        rid, frames = self._builder.request(protocol.MMI_MODELS.decode(), {})
        return header_or_raise(self._roundtrip(rid, frames, timeout))["models"]

    def health(self, *, timeout: float | None = None) -> dict:
        """Liveness and readiness of the pool."""
        rid, frames = self._builder.request(protocol.MMI_HEALTH.decode(), {})
        return header_or_raise(self._roundtrip(rid, frames, timeout))

    def has_model(self, model: str, *, timeout: float | None = None) -> bool:
        """8/MMI service lookup: is a model of that name served?"""
        rid, frames = self._builder.request(protocol.MMI_SERVICE.decode(), {"name": model})
        return self._roundtrip(rid, frames, timeout).status == protocol.OK

    # --- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Close every socket this client opened (in this process)."""
        self._closed = True
        if self._pid != os.getpid():
            return
        with self._lock:
            for sock in self._sockets:
                sock.close(linger=0)
            self._sockets.clear()
        self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
