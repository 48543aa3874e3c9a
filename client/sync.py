"""Blocking client: one DEALER socket per thread, replies matched by request-id, pipelining, fork safety.

Three ways to send, from the lowest latency to the highest throughput:

- ``predict()`` / ``infer()`` and the management calls: one round trip on the calling thread's socket.
- ``predict_many()``: a bounded window of requests in flight on the calling thread's socket.
- ``submit()`` / ``submit_infer()``: a ``concurrent.futures.Future`` per request, sent and collected by
  one lazily started background I/O thread with a socket of its own.

Each socket is a ``_Link``: the socket, the monitor of its connection and a ``Tracker`` (``client/tracker.py``)
of the requests in flight on it. A request's whole ``timeout`` goes to the broker once, as its
``timeout_ms``; the client waits that plus ``DEADLINE_GRACE`` for the answer (the broker's 504 included),
then raises RequestTimeout. A slow answer is never sent again and never costs the socket: a late reply
is dropped by its request-id. The monitor socket is polled in the same ``zmq_poll`` as the socket
itself. While the connection is down (before the first handshake too), requests wait in the tracker;
when it drops, the requests in flight on it are sent again once ZeroMQ has reconnected (``retries``
times at most, under the same request-id, with ``timeout_ms`` cut to what is left), and those with no
retry left fail at once with Unavailable.
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
from zmq.backend import zmq_poll

from modelpool.client import protocol
from modelpool.client.base import (
    DEFAULT_ENDPOINT,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    PROBE,
    PROBE_RID,
    UP_EVENT,
    ModelSchema,
    ReadyWait,
    RequestBuilder,
    SchemaCache,
    check_settings,
    connection_events,
    grouped_messages,
    header_or_raise,
    inherit,
    open_monitored,
    pick_outputs,
    single_output,
    takes_groups,
    track_forks,
    wanted_outputs,
)
from modelpool.client.errors import PoolError, ProtocolError, RequestTimeout, Unavailable
from modelpool.client.tracker import Entry, Tracker, dropped, lost_error, resends, timeout_error
from modelpool.client.protocol import REPLY_TENSORS
from modelpool.client.transport import recv_frames, send_frames

log = logging.getLogger(__name__)

MAX_WINDOW = 1000  # libzmq's default send high-water mark: a larger window could block a send
SUBMIT_WINDOW = 256  # requests the submit() I/O thread keeps in flight; the rest wait in its queue
# A link whose monitor nobody has polled for this long (an idle thread's socket) reads the monitor's
# queued events before it sends: after a disconnect that happened while it was idle, the request must
# wait for the connection, not go into ZeroMQ's pipe and then be taken for lost (and sent twice) when
# the disconnect is read. Busy links are polled continuously and skip it: no extra syscall per request.
MONITOR_STALE = 0.01

Outcome = tuple[Entry, Any]  # (request, Reply or the PoolError it ended with)


class _Link:
    """One DEALER socket, the monitor of its connection and the tracker of the requests in flight on it.

    Used by one thread at a time: a caller's thread (its round trips and ``predict_many``) or the
    ``submit()`` I/O thread. ``abandoned(entry)`` tells it not to resend a request nobody waits for.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, retries: int,
                 abandoned: Callable[[Entry], bool] | None = None) -> None:
        self.endpoint = endpoint
        self.sock, self.monitor = open_monitored(ctx, endpoint)
        self.tracker = Tracker(retries)
        self.abandoned = abandoned
        # The monitor is polled through its file descriptor and read to the end each time it is ready (as
        # an event loop does with ZMQ_FD): as a socket in zmq_poll it would cost a ZMQ_EVENTS check, two
        # syscalls, on every pass of every request.
        self.monitor_fd: int = self.monitor.getsockopt(zmq.FD)
        self.items: list[tuple[Any, int]] = [(self.sock, zmq.POLLIN), (self.monitor_fd, zmq.POLLIN)]
        self.done: list[Outcome] = []  # outcomes not handed out yet
        self.grouping = False  # the broker at the other end takes groups (its mmi.health said so)
        self.watched = 0.0  # when the monitor was last read
        self.watch(time.monotonic())  # read to the end once: only then does its fd signal what comes next

    def send(self, rid: bytes, frames: list, timeout: float, now: float, tag: Any = None,
             decode: Callable[[protocol.Reply], Any] | None = None) -> Entry:
        """Put a request on the wire and track it; while the connection is down, it waits in the tracker."""
        if now - self.watched > MONITOR_STALE:
            self.watch(now)
        if self.tracker.connected:
            send_frames(self.sock, frames)
        return self.tracker.sent(rid, frames, timeout, now, tag, decode)

    def send_many(self, requests: Sequence[tuple[bytes, list, float, Any, Any]], now: float) -> None:
        """``send`` for many (rid, frames, timeout, tag, decode) at once: requests to one model with one
        header travel as groups when the broker takes them."""
        if now - self.watched > MONITOR_STALE:
            self.watch(now)
        sent = self.tracker.sent
        for rid, frames, timeout, tag, decode in requests:
            sent(rid, frames, timeout, now, tag, decode)
        if not self.tracker.connected:
            return
        if not self.grouping or len(requests) == 1:
            for request in requests:
                send_frames(self.sock, request[1])
            return
        for message, _ in grouped_messages([request[1] for request in requests]):
            send_frames(self.sock, message)

    def wait(self) -> list[Outcome]:
        """Block until some requests are answered, fail or run out of time; [] when none is in flight."""
        while not self.done:
            timeout = self.tracker.next_timeout(time.monotonic())
            if timeout is None:
                return []
            self.handle(zmq_poll(self.items, math.ceil(timeout * 1000)), time.monotonic())
        done, self.done = self.done, []
        return done

    def take(self) -> list[Outcome]:
        """The outcomes gathered so far."""
        done, self.done = self.done, []
        return done

    def handle(self, ready: list[tuple[Any, int]], now: float) -> None:
        """Act on what ``zmq_poll`` found ready (other items of the poll are ignored), then on deadlines."""
        data = watch = False
        for item, _ in ready:
            if item is self.sock:
                data = True
            elif item == self.monitor_fd:
                watch = True
        if data:  # before the monitor: a reply that made it is not resent
            self.receive()
        if watch:
            self.watch(now)
        else:
            self.watched = now  # the poll looked at the monitor too: nothing was queued there
        for entry in self.tracker.expired(now):
            self.done.append((entry, timeout_error(entry, self.endpoint)))

    def receive(self) -> None:
        """Take the replies waiting on the socket; those answering a request in flight become outcomes."""
        tracker, done = self.tracker, self.done
        while True:
            try:
                frames = recv_frames(self.sock, REPLY_TENSORS)
            except zmq.Again:
                return
            try:
                replies = protocol.parse_reply_group(frames) if frames[3] == b"" else [protocol.parse_reply(frames)]
            except ProtocolError as exc:
                log.debug("dropped a malformed reply from %s: %s", self.endpoint, exc)
                continue
            for reply in replies:
                entry = tracker.reply(reply.rid)
                if entry is not None:  # otherwise a late reply to a request given up on, or the probe's
                    done.append((entry, reply))
                elif reply.rid == PROBE_RID:
                    self.grouping = takes_groups(reply)
            if not tracker:  # nothing else in flight (a lone round trip): skip the empty read
                return

    def watch(self, now: float) -> None:
        """Read the monitor: on a lost connection hold or fail what was in flight; once back, resend."""
        self.watched = now
        for event in connection_events(self.monitor):
            if event == zmq.EVENT_DISCONNECTED:
                self.grouping = False  # until the next broker says it takes groups
                self.done.extend((entry, lost_error(entry, self.endpoint))
                                 for entry in dropped(self.tracker, now, self.endpoint))
            elif event == UP_EVENT:
                send_frames(self.sock, PROBE)
                for entry in resends(self.tracker, now, self.abandoned):
                    send_frames(self.sock, entry.frames)

    def close(self) -> None:
        """Close the socket and its monitor (linger 0)."""
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


def _settle(entry: Entry, outcome: Any) -> None:
    future: Future = entry.tag
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


class _Submitted:
    """A submit() request waiting in the I/O thread's queue."""

    __slots__ = ("future", "rid", "frames", "timeout", "decode")

    def __init__(self, future: Future, rid: bytes, frames: list, timeout: float,
                 decode: Callable[[protocol.Reply], Any]) -> None:
        self.future, self.rid, self.frames, self.timeout, self.decode = future, rid, frames, timeout, decode


class _Dispatcher:
    """The submit() I/O thread: its own link, a queue of requests in, futures completed by request-id."""

    def __init__(self, ctx: zmq.Context, endpoint: str, retries: int, window: int = SUBMIT_WINDOW) -> None:
        self._ctx = ctx
        self._endpoint = endpoint
        self._retries = retries
        self._window = window
        self._inbox: collections.deque[_Submitted] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._pipe_lock = threading.Lock()  # the thread closes the pipe on its way out; nobody writes after
        self._stopping = False
        # True while the thread may block in zmq_poll: only then does a new request write to the pipe.
        # The thread sets it before it looks at the inbox a last time, and a caller appends before it
        # reads it, so (the GIL ordering both) a request is either seen or wakes the thread.
        self._asleep = True
        self._thread = threading.Thread(target=self._run, name="modelpool-client-io", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def put(self, item: _Submitted) -> None:
        """Queue a request; the I/O thread sends it (deque appends are thread-safe)."""
        self._inbox.append(item)
        if self._asleep:
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
        try:
            link = _Link(self._ctx, self._endpoint, self._retries, abandoned=lambda entry: entry.tag.cancelled())
        except zmq.ZMQError as exc:  # the context was closed meanwhile
            self._fail([], PoolError(f"client I/O thread could not open its socket: {exc}"))
            self._close_pipe()
            return
        items = [*link.items, (self._wake_r, zmq.POLLIN)]
        try:
            while not self._stopping:
                self._admit(link)
                self._asleep = True
                if self._inbox and len(link.tracker) < self._window:
                    timeout = 0.0
                else:
                    timeout = 0 if link.done else link.tracker.next_timeout(time.monotonic())
                ready = zmq_poll(items, -1 if timeout is None else math.ceil(timeout * 1000))
                self._asleep = False
                if any(item == self._wake_r for item, _ in ready):
                    self._drain_wake()
                link.handle(ready, time.monotonic())
                for entry, outcome in link.take():
                    _settle(entry, outcome)
        except Exception as exc:  # a bug or a dead context: fail every waiter instead of leaving it hanging
            log.exception("modelpool client I/O thread failed")
            self._fail(link.tracker.clear(), PoolError(f"client I/O thread failed: {exc}"))
        finally:
            for entry in link.tracker.clear():
                entry.tag.cancel()
            for item in self._inbox:
                item.future.cancel()
            self._inbox.clear()
            link.close()
            self._close_pipe()

    def _fail(self, entries: list[Entry], error: PoolError) -> None:
        for entry in entries:
            _settle(entry, error)
        while self._inbox:
            future = self._inbox.popleft().future
            if not future.cancelled():
                try:
                    future.set_exception(error)
                except InvalidStateError:
                    pass

    def _admit(self, link: _Link) -> None:
        room = self._window - len(link.tracker)
        inbox, batch = self._inbox, []
        while room > 0 and inbox:
            item = inbox.popleft()
            if not item.future.cancelled():
                batch.append((item.rid, item.frames, item.timeout, item.future, item.decode))
                room -= 1
        if batch:
            link.send_many(batch, time.monotonic())

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:  # BlockingIOError: drained
            pass


class Client:
    """Talks to a modelpool broker; safe to share between threads and across ``os.fork()``.

    ``timeout`` (seconds) is each request's whole budget: sent to the broker as its deadline, and
    waited for plus ``DEADLINE_GRACE``. ``retries`` is how many times a request is sent again after the
    connection to the broker was lost with it in flight (never after a mere timeout; see the module
    docstring). A child process forked from one that holds a Client gets a fresh zmq context and
    sockets on first use, and the parent keeps its own.
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
        self._links: list[_Link] = []
        self._dispatcher: _Dispatcher | None = None
        self._inside: set[int] = set()  # threads in a round trip now

    def _after_fork(self) -> None:
        # In a forked child the parent's context, sockets and I/O thread belong to the parent: start
        # afresh and never close them (the lock may even have been held by a thread that is not here).
        if self._dispatcher is not None:
            self._dispatcher.forget()
        inherit(self._ctx, self._links, self._local, self._dispatcher)
        self._builder.after_fork()
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

    def _link(self) -> _Link:
        """The calling thread's socket and the requests in flight on it."""
        if self._pid != os.getpid():
            self._after_fork()
        link = getattr(self._local, "link", None)
        if link is None:
            link = _Link(self._context(), self.endpoint, self.retries)
            self._local.link = link
            with self._lock:
                self._links.append(link)
        return link

    # --- round trips ---------------------------------------------------------------------

    def _roundtrip(self, rid: bytes, frames: list, timeout: float | None) -> protocol.Reply:
        """One request answered: on the calling thread's own socket when it is alone (the lowest
        latency), through the I/O thread when other threads are waiting too (their requests then
        travel together, in groups, instead of each thread paying for its own socket's round trip)."""
        me = threading.get_ident()
        inside = self._inside
        if len(inside) > (me in inside):
            return self._io_roundtrip(rid, frames, timeout)
        inside.add(me)
        try:
            return self._own_roundtrip(rid, frames, timeout)
        finally:
            inside.discard(me)

    def _io_roundtrip(self, rid: bytes, frames: list, timeout: float | None) -> protocol.Reply:
        future: Future = Future()
        self._io().put(_Submitted(future, rid, frames, self._wait(timeout), None))
        try:
            return future.result()
        finally:
            future.cancel()  # interrupted: nobody waits for it any more

    def _own_roundtrip(self, rid: bytes, frames: list, timeout: float | None) -> protocol.Reply:
        link = self._link()
        entry = link.send(rid, frames, self._wait(timeout), time.monotonic())
        others: list[Outcome] = []
        try:
            while True:
                outcomes = link.wait()
                if not outcomes:  # nothing in flight: our request cannot be; never spin on it
                    raise PoolError(f"request {rid.hex()} was dropped by the client's tracker")
                for done, outcome in outcomes:
                    if done is not entry:
                        others.append((done, outcome))
                    elif isinstance(outcome, PoolError):
                        raise outcome
                    else:
                        return outcome
        finally:
            link.tracker.discard(rid)  # interrupted: nobody waits for it any more
            link.done.extend(others)  # a predict_many this call runs inside (from its iterable) takes them

    def _wait(self, timeout: float | None) -> float:
        """A request's budget in seconds: the call's ``timeout``, or the client's."""
        return self.timeout if timeout is None else timeout

    def _schema(self, model: str, timeout: float) -> ModelSchema:
        """The model's input names and dtypes, fetched once (one metadata round trip) and cached."""
        schema = self._schemas.get(model)
        return schema if schema is not None else self._schemas.put(model, self.metadata(model, timeout=timeout))

    def infer(self, model: str, inputs: Mapping[str, Any] | Any, outputs: Sequence[str] | None = None, *,
              timeout: float | None = None, version: str | None = None) -> dict[str, np.ndarray]:
        """Run a model on named inputs (or one array for a one-input model); returns the named outputs.

        ``outputs`` may name intermediate layers. float64/int64 arrays and lists are converted to the
        model's dtypes when no value changes (see ``ModelSchema``); results are read-only arrays.
        ``version`` picks a loaded version of the model (default: the newest ready one).
        """
        wait = self._wait(timeout)
        inputs = self._schema(model, wait).conform(inputs)
        rid, frames = self._builder.inference(model, inputs, outputs, wait, version)
        return self._schemas.outputs(model, self._roundtrip(rid, frames, wait))

    def predict(self, model: str, x: Any, *, outputs: str | Sequence[str] | None = None,
                timeout: float | None = None, version: str | None = None) -> Any:
        """Run a one-input model on a batch ``x`` (first axis = rows).

        Returns the model's one output; with ``outputs="layer"`` that output or layer instead, and with
        ``outputs=[...]`` a list of arrays in that order. ``version``: as for ``infer``.
        """
        results = self.infer(model, x, wanted_outputs(outputs), timeout=timeout, version=version)
        return pick_outputs(results, model, outputs)

    def call(self, model: str, header: dict, tensors: Sequence[Any] = (), *,
             timeout: float | None = None) -> protocol.Reply:
        """Send one request as the wire protocol has it (header map and raw tensor frames); the Reply.

        Nothing is converted, and an error status is returned in the Reply (``protocol.reply_error(reply)``
        gives the typed error), not raised.
        """
        wait = self._wait(timeout)
        rid, frames = self._builder.request(model, dict(header), tensors, timeout=wait)
        return self._roundtrip(rid, frames, wait)

    def metadata(self, model: str, *, timeout: float | None = None) -> dict:
        """Inputs and outputs (names, datatypes, shapes) of a model."""
        wait = self._wait(timeout)
        rid, frames = self._builder.request(model, {"op": "metadata"}, timeout=wait)
        return header_or_raise(self._roundtrip(rid, frames, wait))

    def models(self, *, timeout: float | None = None, detail: bool = False) -> list[dict]:
        """Models served, with versions, replicas, queue depths and counters; ``detail`` adds worker
        ids and pids where the pool allows it (``mmi_detail`` in its config)."""
        wait = self._wait(timeout)
        rid, frames = self._builder.request(protocol.MMI_MODELS.decode(), {"detail": True} if detail else {},
                                            timeout=wait)
        return header_or_raise(self._roundtrip(rid, frames, wait))["models"]

    def health(self, *, timeout: float | None = None) -> dict:
        """Liveness and readiness of the pool."""
        return self._manage(protocol.MMI_HEALTH, {}, timeout)

    def scale(self, model: str, replicas: int, *, timeout: float | None = None) -> dict:
        """Run ``replicas`` local replicas of ``model`` (mmi.scale; from the pool's host only). Answers
        at once; new replicas take requests once warmed up, removed ones finish what they hold."""
        return self._manage(protocol.MMI_SCALE, {"model": model, "replicas": replicas}, timeout)

    def reload(self, model: str, *, timeout: float | None = None) -> dict:
        """Replace every replica of ``model`` by a fresh process that reads the model file again, each
        warmed up before the old one retires (mmi.reload; from the pool's host only)."""
        return self._manage(protocol.MMI_RELOAD, {"model": model}, timeout)

    def load(self, model: str, *, timeout: float | None = None) -> dict:
        """Serve ``model`` from the pool's config or model repository, or read a served one again (new
        versions start, changed ones are replaced warm); mmi.load, from the pool's host only."""
        return self._manage(protocol.MMI_LOAD, {"model": model}, timeout)

    def unload(self, model: str, *, timeout: float | None = None) -> dict:
        """Stop serving ``model``: its replicas finish what they hold and exit (mmi.unload)."""
        return self._manage(protocol.MMI_UNLOAD, {"model": model}, timeout)

    def repository(self, *, timeout: float | None = None) -> list[dict]:
        """Every model the pool can serve, loaded or not: name, version, state, reason (mmi.repository)."""
        return self._manage(protocol.MMI_REPOSITORY, {}, timeout)["models"]

    def _manage(self, service: bytes, header: dict, timeout: float | None) -> dict:
        wait = self._wait(timeout)
        rid, frames = self._builder.request(service.decode(), header, timeout=wait)
        return header_or_raise(self._roundtrip(rid, frames, wait))

    def has_model(self, model: str, *, timeout: float | None = None) -> bool:
        """8/MMI service lookup: is a model of that name served?"""
        wait = self._wait(timeout)
        rid, frames = self._builder.request(protocol.MMI_SERVICE.decode(), {"name": model}, timeout=wait)
        return self._roundtrip(rid, frames, wait).status == protocol.OK

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
            except (RequestTimeout, Unavailable) as exc:  # not answering yet: the pool may be (re)starting
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
        wait = self._wait(timeout)
        schema = self._schema(model, wait)
        link = self._link()
        mine: set[bytes] = set()  # this call's requests in flight (a nested call may share the link)
        others: list[Outcome] = []
        results: list = []
        items = iter(xs)
        more = True
        try:
            while True:
                batch = []
                while more and len(mine) + len(batch) < window:
                    try:
                        x = next(items)
                    except StopIteration:
                        more = False
                        break
                    results.append(None)
                    try:
                        rid, frames = self._builder.inference(model, schema.conform(x), None, wait)
                    except PoolError as exc:
                        if not return_exceptions:
                            raise
                        results[-1] = exc
                        continue
                    batch.append((rid, frames, wait, len(results) - 1, None))
                if batch:
                    link.send_many(batch, time.monotonic())
                    mine.update(request[0] for request in batch)
                if not mine:
                    return results
                done = link.wait()
                if not done:  # nothing in flight: ours cannot be; never spin on them
                    raise PoolError(f"{len(mine)} requests were dropped by the client's tracker")
                others += [(entry, outcome) for entry, outcome in done if entry.rid not in mine]
                for entry, outcome in done:
                    if entry.rid not in mine:
                        continue
                    mine.discard(entry.rid)
                    try:
                        if isinstance(outcome, PoolError):
                            raise outcome
                        results[entry.tag] = single_output(self._schemas.outputs(model, outcome), model)
                    except PoolError as exc:
                        if not return_exceptions:
                            raise
                        results[entry.tag] = exc
        finally:
            for rid in mine:  # abandoned after an error: their replies will be dropped
                link.tracker.discard(rid)
            link.done.extend(others)

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
        wait = self._wait(timeout)
        try:
            rid, frames = self._builder.inference(model, self._schema(model, wait).conform(inputs), outputs, wait)
        except PoolError as exc:
            future.set_exception(exc)
            return future
        self._io().put(_Submitted(future, rid, frames, wait, decode))
        return future

    def _io(self) -> _Dispatcher:
        ctx = self._context()
        dispatcher = self._dispatcher
        if dispatcher is None or not dispatcher.alive:
            with self._lock:
                if self._closed:
                    raise RuntimeError("client is closed")
                if self._dispatcher is None or not self._dispatcher.alive:
                    self._dispatcher = _Dispatcher(ctx, self.endpoint, self.retries)
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
            for link in self._links:
                link.close()
            self._links.clear()
            ctx, self._ctx = self._ctx, None
        if ctx is not None and stopped:
            ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
