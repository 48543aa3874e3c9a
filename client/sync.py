"""Blocking client: one DEALER socket per thread, replies matched by request-id, pipelining, fork safety.

Three ways to send, from the lowest latency to the highest throughput:

- ``predict()`` / ``infer()`` and the management calls: one round trip on the calling thread's socket.
- ``predict_many()``: a bounded window of requests in flight on the calling thread's socket.
- ``submit()`` / ``submit_infer()``: a ``concurrent.futures.Future`` per request, sent and collected by
  one lazily started background I/O thread with a socket of its own.

Lazy Pirate (ZeroMQ guide, chapter 4): a socket that let a request time out is closed (linger 0) and
replaced by a fresh one, and the request is sent again, ``retries`` times at most, the tries sharing the
request's timeout equally. Only requests that are safe to run twice are resent: inference, metadata and
``mmi.*`` queries all are. Requests still in flight on a replaced socket are resent at once on the new one
(their replies would go to the closed socket). So a broker that restarted, or a request lost with a dead
connection, costs one try's share of the timeout instead of a hang.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
import weakref
from concurrent.futures import Future, InvalidStateError
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import zmq

from modelpool.client import protocol
from modelpool.client.base import (
    DEFAULT_ENDPOINT,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    ModelSchema,
    ReadyWait,
    RequestBuilder,
    SchemaCache,
    attempt_timeout,
    check_settings,
    header_or_raise,
    inherit,
    open_dealer,
    pick_outputs,
    single_output,
    timeout_error,
    track_forks,
    wanted_outputs,
)
from modelpool.client.errors import PoolError, ProtocolError, RequestTimeout
from modelpool.client.transport import REPLY_TENSORS, recv_frames, send_frames

log = logging.getLogger(__name__)

MAX_WINDOW = 1000  # libzmq's default send high-water mark: a larger window could block a send
SUBMIT_WINDOW = 256  # requests the submit() I/O thread keeps in flight; the rest wait in its queue


class _Entry:
    """One pipelined request: its frames, its timeout budget and where its outcome goes."""

    __slots__ = ("tag", "frames", "wait", "attempt", "deadline", "retries_left", "tries", "ends", "decode")

    def __init__(self, tag: Any, frames: list, wait: float, retries: int,
                 decode: Callable[[protocol.Reply], Any] | None = None) -> None:
        self.tag = tag
        self.frames = frames
        self.wait = wait
        self.attempt = attempt_timeout(wait, retries + 1)
        self.deadline = math.inf  # set when it first goes on the wire
        self.retries_left = retries
        self.tries = 0
        self.ends = math.inf
        self.decode = decode


class _Pipe:
    """Requests in flight on one DEALER socket: send, match replies by request-id, expire, resend."""

    def __init__(self, builder: RequestBuilder, endpoint: str, open_socket: Callable[[], zmq.Socket],
                 drop_socket: Callable[[zmq.Socket], None]) -> None:
        self.builder = builder
        self.endpoint = endpoint
        self.open_socket = open_socket
        self.drop_socket = drop_socket
        self.sock: zmq.Socket | None = None
        self.pending: dict[bytes, _Entry] = {}

    def __len__(self) -> int:
        return len(self.pending)

    def send(self, entry: _Entry, now: float) -> None:
        """Put a request on the wire under a fresh request-id."""
        if self.sock is None:
            self.sock = self.open_socket()
        if entry.tries == 0:
            entry.deadline = now + entry.wait
        rid = self.builder.next_id()
        entry.frames[3] = rid
        entry.tries += 1
        entry.ends = min(now + entry.attempt, entry.deadline)
        send_frames(self.sock, entry.frames)
        self.pending[rid] = entry

    def timeout_ms(self, now: float) -> int | None:
        """Milliseconds until the next try runs out, None when nothing is in flight."""
        if not self.pending:
            return None
        ends = min(e.ends for e in self.pending.values())
        return max(0, math.ceil((ends - now) * 1000))

    def wait(self) -> list[tuple[_Entry, Any]]:
        """Block until some requests are answered or run out of time; (entry, Reply or error) for each."""
        timeout = self.timeout_ms(time.monotonic())
        if self.sock is not None and self.sock.poll(timeout, zmq.POLLIN):
            done = self.receive()
            if done:
                return done
        return self.expire(time.monotonic())

    def receive(self) -> list[tuple[_Entry, Any]]:
        """Every reply waiting on the socket that answers a request in flight."""
        done: list[tuple[_Entry, Any]] = []
        while self.sock is not None:
            try:
                frames = recv_frames(self.sock, REPLY_TENSORS)
            except zmq.Again:
                break
            try:
                reply = protocol.parse_reply(frames)
            except ProtocolError as exc:
                log.debug("dropped a malformed reply from %s: %s", self.endpoint, exc)
                continue
            entry = self.pending.pop(reply.rid, None)
            if entry is not None:  # otherwise a late reply to a request given up on
                done.append((entry, reply))
        return done

    def expire(self, now: float) -> list[tuple[_Entry, Any]]:
        """Time out tries that ran out; Lazy Pirate: replace the socket and resend what may be resent."""
        late = [rid for rid, e in self.pending.items() if e.ends <= now]
        if not late:
            return []
        failed: list[tuple[_Entry, Any]] = []
        resend: list[_Entry] = []
        for rid in late:
            entry = self.pending.pop(rid)
            if entry.retries_left > 0 and entry.deadline > now:
                entry.retries_left -= 1
                resend.append(entry)
            else:
                failed.append((entry, timeout_error(entry.wait, self.endpoint, entry.tries)))
        resend.extend(self.pending.values())  # their replies would reach the socket about to be closed
        self.pending.clear()
        self.reset()
        for entry in resend:
            self.send(entry, now)
        return failed

    def reset(self) -> None:
        """Close the socket (linger 0); the next send opens a fresh one."""
        sock, self.sock = self.sock, None
        if sock is not None:
            self.drop_socket(sock)


def _settle(future: Future, entry: _Entry, outcome: Any) -> None:
    if future.cancelled():
        return
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(entry.decode(outcome) if entry.decode is not None else outcome)
    except InvalidStateError:  # cancelled by its owner meanwhile
        pass
    except Exception as exc:  # a typed error carried by the reply, or a malformed one
        try:
            future.set_exception(exc)
        except InvalidStateError:
            pass


class _Dispatcher:
    """The submit() I/O thread: its own DEALER socket, a queue of requests in, futures completed by request-id."""

    def __init__(self, ctx: zmq.Context, endpoint: str, builder: RequestBuilder, window: int = SUBMIT_WINDOW) -> None:
        self._ctx = ctx
        self._endpoint = endpoint
        self._builder = builder
        self._window = window
        self._inbox: collections.deque[_Entry] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._pipe_lock = threading.Lock()  # the thread closes the pipe on its way out; nobody writes after
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="modelpool-client-io", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def put(self, entry: _Entry) -> None:
        """Queue a request; the I/O thread sends it (deque appends are thread-safe)."""
        self._inbox.append(entry)
        self._wake()

    def _wake(self) -> None:
        with self._pipe_lock:
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"\0")
            except OSError:  # the pipe is full: the thread is awake anyway
                pass

    def request_stop(self) -> None:
        """Ask the thread to finish (requests not answered yet are cancelled) without waiting for it."""
        self._stopping = True
        self._wake()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the thread and wait for it; True once it has ended."""
        self.request_stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("modelpool client I/O thread did not stop within %.0fs", timeout)
            return False
        return True

    def forget(self) -> None:
        """In a forked child: the thread does not exist here; release this process's copies of the pipe."""
        # Single-threaded here, and the lock may have been held by a thread of the parent: do not take it.
        self._pipe_lock = threading.Lock()
        self._close_pipe()

    def _close_pipe(self) -> None:
        with self._pipe_lock:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    def _run(self) -> None:
        pipe = _Pipe(self._builder, self._endpoint, lambda: open_dealer(self._ctx, self._endpoint),
                     lambda sock: sock.close(linger=0))
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        polled: zmq.Socket | None = None
        try:
            while not self._stopping:
                self._admit(pipe)
                if pipe.sock is not polled:
                    if polled is not None:
                        poller.unregister(polled)
                    polled = pipe.sock
                    if polled is not None:
                        poller.register(polled, zmq.POLLIN)
                events = dict(poller.poll(pipe.timeout_ms(time.monotonic())))
                if self._wake_r in events:
                    self._drain_wake()
                done = pipe.receive() if polled is not None and polled in events else []
                done += pipe.expire(time.monotonic())
                for entry, outcome in done:
                    _settle(entry.tag, entry, outcome)
        except Exception as exc:  # a bug or a dead context: fail every waiter instead of leaving it hanging
            log.exception("modelpool client I/O thread failed")
            for entry in [*pipe.pending.values(), *self._inbox]:
                _settle(entry.tag, entry, PoolError(f"client I/O thread failed: {exc}"))
            pipe.pending.clear()
            self._inbox.clear()
        finally:
            for entry in [*pipe.pending.values(), *self._inbox]:
                entry.tag.cancel()
            pipe.reset()
            self._close_pipe()

    def _admit(self, pipe: _Pipe) -> None:
        now = time.monotonic()
        while len(pipe) < self._window:
            try:
                entry = self._inbox.popleft()
            except IndexError:
                return
            if not entry.tag.cancelled():
                pipe.send(entry, now)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:  # BlockingIOError: drained
            pass


class Client:
    """Talks to a modelpool broker; safe to share between threads and across ``os.fork()``.

    ``timeout`` (seconds) bounds each request, resends included; ``retries`` is how many times a request
    that got no answer is sent again on a fresh socket (Lazy Pirate, see the module docstring). A child
    process forked from one that holds a Client gets a fresh zmq context and sockets on first use, and
    the parent keeps its own.
    """

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        check_settings(timeout, retries)
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries
        self._builder = RequestBuilder(max_message_bytes)
        self._schemas = SchemaCache()
        self._closed = False
        self._start_fresh()
        track_forks(self)

    def _start_fresh(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._ctx: zmq.Context | None = None
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self._dispatcher: _Dispatcher | None = None

    def _after_fork(self) -> None:
        # In a forked child the parent's context, sockets and I/O thread belong to the parent: start
        # afresh and never close them (the lock may even have been held by a thread that is not here).
        if self._dispatcher is not None:
            self._dispatcher.forget()
        inherit(self._ctx, self._sockets, self._local, self._dispatcher)
        self._start_fresh()

    def _context(self) -> zmq.Context:
        if self._pid != os.getpid():  # forked without Python's fork hooks (e.g. from C)
            self._after_fork()
        if self._closed:
            raise RuntimeError("client is closed")
        ctx = self._ctx
        if ctx is None:
            with self._lock:
                if self._ctx is None:
                    self._ctx = zmq.Context()
                ctx = self._ctx
        return ctx

    def _socket(self) -> zmq.Socket:
        if self._pid != os.getpid():
            self._after_fork()
        sock = getattr(self._local, "socket", None)
        if sock is None:
            sock = open_dealer(self._context(), self.endpoint)
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
        wait = self.timeout if timeout is None else timeout
        tries = self.retries + 1
        attempt = attempt_timeout(wait, tries)
        deadline = time.monotonic() + wait
        for n in range(tries):
            sock = self._socket()
            if n:
                rid = self._builder.next_id()
                frames = [*frames[:3], rid, *frames[4:]]
            send_frames(sock, frames)
            reply = self._await_reply(sock, rid, min(time.monotonic() + attempt, deadline))
            if reply is not None:
                return reply
            # Lazy Pirate: a socket that lost a request is not trusted again
            self._discard_socket()
            if time.monotonic() >= deadline:
                tries = n + 1
                break
        raise timeout_error(wait, self.endpoint, tries)

    def _await_reply(self, sock: zmq.Socket, rid: bytes, until: float) -> protocol.Reply | None:
        while True:
            left = until - time.monotonic()
            if left <= 0 or not sock.poll(math.ceil(left * 1000), zmq.POLLIN):
                return None
            try:
                reply = protocol.parse_reply(recv_frames(sock, REPLY_TENSORS, block=True))
            except ProtocolError:
                continue  # not a reply we could have asked for; keep waiting for ours
            if reply.rid == rid:
                return reply
            # a late reply to an abandoned request: drop it

    def _wait(self, timeout: float | None) -> tuple[float, float]:
        """(whole budget, one try's share) of a request's timeout."""
        wait = self.timeout if timeout is None else timeout
        return wait, attempt_timeout(wait, self.retries + 1)

    def _schema(self, model: str, timeout: float) -> ModelSchema:
        """The model's input names and dtypes, fetched once (one metadata round trip) and cached."""
        schema = self._schemas.get(model)
        return schema if schema is not None else self._schemas.put(model, self.metadata(model, timeout=timeout))

    def infer(self, model: str, inputs: Mapping[str, Any] | Any, outputs: Sequence[str] | None = None, *,
              timeout: float | None = None) -> dict[str, np.ndarray]:
        """Run a model on named inputs (or one array for a one-input model); returns the named outputs.

        ``outputs`` may name intermediate layers. float64/int64 arrays and lists are converted to the
        model's dtypes when no value changes (see ``ModelSchema``); results are read-only arrays.
        """
        wait, attempt = self._wait(timeout)
        inputs = self._schema(model, wait).conform(inputs)
        rid, frames = self._builder.inference(model, inputs, outputs, attempt)
        return self._schemas.outputs(model, self._roundtrip(rid, frames, wait))

    def predict(self, model: str, x: Any, *, outputs: str | Sequence[str] | None = None,
                timeout: float | None = None) -> Any:
        """Run a one-input model on a batch ``x`` (first axis = rows).

        Returns the model's one output; with ``outputs="layer"`` that output or layer instead, and with
        ``outputs=[...]`` a list of arrays in that order.
        """
        results = self.infer(model, x, wanted_outputs(outputs), timeout=timeout)
        return pick_outputs(results, model, outputs)

    def metadata(self, model: str, *, timeout: float | None = None) -> dict:
        """Inputs and outputs (names, datatypes, shapes) of a model."""
        rid, frames = self._builder.request(model, {"op": "metadata"})
        return header_or_raise(self._roundtrip(rid, frames, timeout))

    def models(self, *, timeout: float | None = None, detail: bool = False) -> list[dict]:
        """Models served, with versions, replicas, queue depths and counters; ``detail`` adds worker
        ids and pids where the pool allows it (``mmi_detail`` in its config)."""
        rid, frames = self._builder.request(protocol.MMI_MODELS.decode(), {"detail": True} if detail else {})
        return header_or_raise(self._roundtrip(rid, frames, timeout))["models"]

    def health(self, *, timeout: float | None = None) -> dict:
        """Liveness and readiness of the pool."""
        rid, frames = self._builder.request(protocol.MMI_HEALTH.decode(), {})
        return header_or_raise(self._roundtrip(rid, frames, timeout))

    def has_model(self, model: str, *, timeout: float | None = None) -> bool:
        """8/MMI service lookup: is a model of that name served?"""
        rid, frames = self._builder.request(protocol.MMI_SERVICE.decode(), {"name": model})
        return self._roundtrip(rid, frames, timeout).status == protocol.OK

    def wait_ready(self, models: Sequence[str] | None = None, *, all_replicas: bool = True,
                   timeout: float = 120.0) -> list[dict]:
        """Block until the models (default: every model served) have their replicas ready.

        ``all_replicas=False`` waits for one replica of each. Returns the last ``models()`` answer.
        Raises ModelNotFound for a model the pool does not serve, Unavailable for one that failed to
        load, and RequestTimeout when ``timeout`` passes first (or the pool never answered).
        """
        wait = ReadyWait(self.endpoint, models, all_replicas, timeout, time.monotonic())
        while True:
            timeout = wait.next_try(time.monotonic())  # raises once the wait is over: outside the try below
            try:
                served = self.models(timeout=timeout)
            except RequestTimeout as exc:  # not answering yet: the pool may still be starting
                wait.last = exc
                continue
            if wait.ready(served):
                return served
            time.sleep(wait.pause(time.monotonic()))

    # --- pipelining ----------------------------------------------------------------------

    def predict_many(self, model: str, xs: Iterable[Any], *, window: int = 64, timeout: float | None = None,
                     return_exceptions: bool = False) -> list:
        """``predict`` on each batch of ``xs``, up to ``window`` requests in flight; results in input order.

        ``timeout`` applies to each request from the moment it is sent. The first error is raised (its
        requests still in flight are abandoned) unless ``return_exceptions``, which puts errors in the list.
        """
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be an integer from 1 to {MAX_WINDOW}, got {window!r}")
        wait, attempt = self._wait(timeout)
        schema = self._schema(model, wait)
        pipe = _Pipe(self._builder, self.endpoint, self._socket, lambda sock: self._discard_socket())
        results: list = []
        items = iter(xs)
        more = True
        while True:
            while more and len(pipe) < window:
                try:
                    x = next(items)
                except StopIteration:
                    more = False
                    break
                results.append(None)
                try:
                    _, frames = self._builder.inference(model, schema.conform(x), None, attempt)
                except PoolError as exc:
                    if not return_exceptions:
                        raise
                    results[-1] = exc
                    continue
                pipe.send(_Entry(len(results) - 1, frames, wait, self.retries), time.monotonic())
            if not pipe.pending:
                return results
            for entry, outcome in pipe.wait():
                try:
                    if isinstance(outcome, PoolError):
                        raise outcome
                    results[entry.tag] = single_output(self._schemas.outputs(model, outcome), model)
                except PoolError as exc:
                    if not return_exceptions:
                        raise
                    results[entry.tag] = exc

    def submit(self, model: str, x: Any, *, timeout: float | None = None) -> Future:
        """``predict`` without waiting: a Future of the output array (or of the typed error).

        Requests are sent by a background I/O thread with its own socket, many at a time; ``timeout``
        counts from the moment a request is sent. Cancelling the Future abandons the request.
        """
        return self._submit(model, x, None, timeout,
                            lambda reply: single_output(self._schemas.outputs(model, reply), model))

    def submit_infer(self, model: str, inputs: Mapping[str, Any] | Any, outputs: Sequence[str] | None = None, *,
                     timeout: float | None = None) -> Future:
        """``infer`` without waiting: a Future of the dict of named outputs (see ``submit``)."""
        return self._submit(model, inputs, outputs, timeout,
                            lambda reply: self._schemas.outputs(model, reply))

    def _submit(self, model: str, inputs: Mapping[str, Any] | Any, outputs: Sequence[str] | None,
                timeout: float | None, decode: Callable[[protocol.Reply], Any]) -> Future:
        future: Future = Future()
        wait, attempt = self._wait(timeout)
        try:
            _, frames = self._builder.inference(model, self._schema(model, wait).conform(inputs), outputs, attempt)
        except PoolError as exc:
            future.set_exception(exc)
            return future
        self._io().put(_Entry(future, frames, wait, self.retries, decode))
        return future

    def _io(self) -> _Dispatcher:
        ctx = self._context()
        dispatcher = self._dispatcher
        if dispatcher is None or not dispatcher.alive:
            with self._lock:
                if self._closed:
                    raise RuntimeError("client is closed")
                if self._dispatcher is None or not self._dispatcher.alive:
                    self._dispatcher = _Dispatcher(ctx, self.endpoint, self._builder)
                    # a client dropped without close() must not leave its thread behind
                    weakref.finalize(self, self._dispatcher.request_stop)
                dispatcher = self._dispatcher
        return dispatcher

    # --- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the I/O thread (cancelling what it has in flight) and close every socket this client opened."""
        self._closed = True
        if self._pid != os.getpid():
            return
        with self._lock:
            dispatcher, self._dispatcher = self._dispatcher, None
        stopped = dispatcher.stop() if dispatcher is not None else True
        with self._lock:
            for sock in self._sockets:
                sock.close(linger=0)
            self._sockets.clear()
            ctx, self._ctx = self._ctx, None
        if ctx is not None and stopped:
            ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
