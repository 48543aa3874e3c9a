"""asyncio client: one DEALER socket, many requests in flight, replies matched by request-id.

The socket is a plain (not ``zmq.asyncio``) socket watched by the event loop through its file
descriptor (``loop.add_reader``), read and written with the same low-overhead transport as the sync
client and the broker (``client/transport.py``): no future per message, only one per request.
Replies are handed to the future of the request with that id; replies nobody waits for any more (a
cancelled task's, a timed-out request's) are dropped. Cancelling the task that awaits a request
abandons the request cleanly.

Requests made in one turn of the event loop leave together: the first goes at once (a lone request
pays no extra latency), the rest when the loop comes round, as groups when the broker takes them
(the "group" extension, ``client/protocol.py``; a probe on each connection asks the broker).

Deadlines and retries as in the sync client, kept by the same ``Tracker`` (``client/tracker.py``): a
request's whole ``timeout`` goes to the broker once as its ``timeout_ms``, and one timer, set for the
earliest deadline plus ``DEADLINE_GRACE``, fails the requests that ran out of time with RequestTimeout;
a slow answer is never sent again. The socket's monitor is watched the same way. While the connection
is down (before the first handshake too), requests wait in the tracker and are sent when it is up;
when it drops, the requests in flight on it are sent again once ZeroMQ has reconnected (``retries``
times at most, under the same request-id, with ``timeout_ms`` cut to what is left), and those with no
retry left fail at once with Unavailable.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Generator, Iterable, Mapping, Sequence

import numpy as np
import zmq

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
    takes_groups,
    track_forks,
    wanted_outputs,
)
from modelpool.client.errors import PoolError, ProtocolError, RequestTimeout, Unavailable
from modelpool.client.protocol import REPLY_TENSORS
from modelpool.client.tracker import Entry, Tracker, dropped, lost_error, resends, timeout_error
from modelpool.client.transport import recv_frames, send_frames

log = logging.getLogger(__name__)

_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)


class _Closing:
    """What ``AsyncClient.close()`` returns; awaiting it is a no-op kept for ``await client.close()``."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # a generator: awaitable


class AsyncClient:
    """Talks to a modelpool broker from asyncio; the methods of ``Client`` as coroutines.

    One DEALER socket carries every request of this client; ``asyncio.gather`` of many calls keeps
    them all in flight. ``timeout`` (seconds) is each request's whole budget, and ``retries`` how many
    times a request is sent again after the connection was lost with it in flight (see the module
    docstring). Use ``async with`` or ``await client.close()``. A process forked from one holding an
    AsyncClient gets a fresh context and socket on first use in the child; the socket follows the
    running event loop.
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
        self._late = 0  # replies dropped because nobody waits for them any more
        self._start_fresh()
        track_forks(self)

    def _start_fresh(self) -> None:
        self._pid = os.getpid()
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._fds: tuple[int, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tracker = Tracker(self.retries)
        self._timer: asyncio.TimerHandle | None = None
        self._out: list[list] = []  # requests to send when the loop comes round (or when there is room)
        self._flushing = False  # a flush is scheduled
        self._grouping = False  # the broker takes groups (the probe's answer)

    @property
    def _pending(self) -> dict:
        """The requests in flight, by request-id."""
        return self._tracker.pending

    def _after_fork(self) -> None:
        # The parent's context and sockets belong to the parent: never close them here.
        inherit(self._ctx, self._sock, self._monitor, self._tracker)
        self._builder.after_fork()
        self._start_fresh()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        """The running loop, with this process's socket opened and watched by it if needed."""
        if self._pid != os.getpid():
            self._after_fork()
        if self._closed:
            raise RuntimeError("client is closed")
        loop = asyncio.get_running_loop()
        if self._sock is not None and self._loop is not loop:
            # a socket is watched by the loop that opened it
            self._drop_socket(lambda: PoolError("the client was used from another event loop while the request "
                                                "was in flight"))
        if self._sock is None:
            if self._ctx is None:
                self._ctx = zmq.Context()
            self._sock, self._monitor = open_monitored(self._ctx, self.endpoint)
            self._loop = loop
            self._fds = (self._sock.getsockopt(zmq.FD), self._monitor.getsockopt(zmq.FD))
            loop.add_reader(self._fds[0], self._on_socket)
            loop.add_reader(self._fds[1], self._on_monitor)
            # ZeroMQ's descriptors signal edges: read what is there already once
            loop.call_soon(self._on_monitor)
        return loop

    # --- the socket ----------------------------------------------------------------------

    def _on_socket(self) -> None:
        """The socket's descriptor fired: take every reply waiting, and send what waits for room."""
        sock = self._sock
        if sock is None:
            return
        try:
            while True:
                try:
                    frames = recv_frames(sock, REPLY_TENSORS)
                except zmq.Again:
                    break
                self._dispatch(frames)
            if self._out and not self._flushing:
                self._flush()
        except zmq.ZMQError:  # closed under us
            return

    def _dispatch(self, frames: list) -> None:
        try:
            replies = protocol.parse_reply_group(frames) if frames[3] == b"" else [protocol.parse_reply(frames)]
        except ProtocolError as exc:
            log.debug("dropped a malformed reply from %s: %s", self.endpoint, exc)
            return
        tracker = self._tracker
        for reply in replies:
            entry = tracker.reply(reply.rid)
            if entry is not None and not entry.tag.done():
                entry.tag.set_result(reply)
            elif reply.rid == PROBE_RID:
                self._grouping = takes_groups(reply)
            else:
                self._late += 1

    def _on_monitor(self) -> None:
        """Hold or fail the requests in flight when the connection drops; resend the held ones once it is back."""
        monitor, loop = self._monitor, self._loop
        if monitor is None or loop is None:
            return
        try:
            events = connection_events(monitor)
        except zmq.ZMQError:  # closed under us
            return
        for event in events:
            now = loop.time()
            if event == zmq.EVENT_DISCONNECTED:
                self._grouping = False  # until the next broker says it takes groups
                for entry in dropped(self._tracker, now, self.endpoint):
                    _fail(entry.tag, lost_error(entry, self.endpoint))
                self._arm()
            elif event == UP_EVENT:
                self._queue(PROBE)
                for entry in resends(self._tracker, now, _cancelled):
                    self._queue(entry.frames)

    def _queue(self, frames: list) -> None:
        """Send a request: at once when it is the first of this turn of the loop, else with the flush."""
        if self._flushing:
            self._out.append(frames)
            return
        self._flushing = True
        self._loop.call_soon(self._flush)
        if self._out or not self._send(self._sock, frames):
            self._out.append(frames)

    def _flush(self) -> None:
        """Send what this turn of the loop queued (as groups where it can); what finds no room waits."""
        self._flushing = False
        sock, out = self._sock, self._out
        if sock is None:
            out.clear()
            return
        if out:
            pending = self._tracker.pending
            live = [f for f in out if f is PROBE or _still_wanted(pending.get(f[3]))]
            messages = grouped_messages(live) if self._grouping else [(f, 1) for f in live]
            done = 0
            try:
                for message, count in messages:
                    if not self._send(sock, message):
                        break
                    done += count
            except zmq.ZMQError:  # closed under us
                return
            self._out = live[done:]
        try:
            if sock.getsockopt(_EVENTS) & _POLLIN:  # a send may have taken the descriptor's edge
                self._on_socket()
        except zmq.ZMQError:
            return

    def _send(self, sock: zmq.Socket, frames: list) -> bool:
        """Put one message on the socket without blocking; False when its queue is full."""
        try:
            send_frames(sock, frames, _NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _arm(self) -> None:
        """Set the one timer for the earliest deadline (plus grace) of the requests in flight."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        timeout = self._tracker.next_timeout(now)
        if timeout is None:
            return
        when = now + timeout
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._timer = loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._timer = None
        for entry in self._tracker.expired(asyncio.get_running_loop().time()):
            _fail(entry.tag, timeout_error(entry, self.endpoint))
        self._arm()

    def _drop_socket(self, reason: Any) -> None:
        """Stop watching and close the socket and its monitor (linger 0); requests in flight fail with ``reason()``."""
        sock, monitor, fds, loop = self._sock, self._monitor, self._fds, self._loop
        self._sock = self._monitor = self._fds = self._loop = None
        self._out.clear()
        self._flushing = False
        self._grouping = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for entry in self._tracker.clear():
            _fail(entry.tag, reason())
        self._tracker = Tracker(self.retries)  # the next socket starts unconnected
        if loop is not None and fds is not None and not loop.is_closed():
            for fd in fds:
                loop.remove_reader(fd)
        for s in (monitor, sock):
            if s is not None:
                s.close(linger=0)

    # --- round trips ---------------------------------------------------------------------

    async def _roundtrip(self, rid: bytes, frames: list, timeout: float | None) -> protocol.Reply:
        loop = self._ensure()
        future = loop.create_future()
        entry = self._tracker.sent(rid, frames, self._wait(timeout), loop.time(), future)
        if self._tracker.connected:  # otherwise it waits in the tracker until the connection is up
            self._queue(frames)
        timer = self._timer
        if timer is None or entry.due < timer.when():
            self._arm()
        try:
            return await future
        finally:
            self._tracker.discard(rid)  # cancelled: nobody waits for it any more

    def _wait(self, timeout: float | None) -> float:
        """A request's budget in seconds: the call's ``timeout``, or the client's."""
        return self.timeout if timeout is None else timeout

    async def _schema(self, model: str, timeout: float) -> ModelSchema:
        """The model's input names and dtypes, fetched once (one metadata round trip) and cached."""
        schema = self._schemas.get(model)
        return schema if schema is not None else self._schemas.put(model, await self.metadata(model, timeout=timeout))

    async def infer(self, model: str, inputs: Mapping[str, Any] | Any, outputs: Sequence[str] | None = None, *,
                    timeout: float | None = None, version: str | None = None) -> dict[str, np.ndarray]:
        """Run a model on named inputs (or one array for a one-input model); returns the named outputs.

        ``outputs`` may name intermediate layers; inputs are converted as ``Client.infer`` does;
        ``version`` picks a loaded version (default: the newest ready one).
        """
        wait = self._wait(timeout)
        inputs = (await self._schema(model, wait)).conform(inputs)
        rid, frames = self._builder.inference(model, inputs, outputs, wait, version)
        return self._schemas.outputs(model, await self._roundtrip(rid, frames, wait))

    async def predict(self, model: str, x: Any, *, outputs: str | Sequence[str] | None = None,
                      timeout: float | None = None, version: str | None = None) -> Any:
        """Run a one-input model on a batch ``x``; ``outputs`` and ``version`` as in ``Client.predict``."""
        results = await self.infer(model, x, wanted_outputs(outputs), timeout=timeout, version=version)
        return pick_outputs(results, model, outputs)

    async def predict_many(self, model: str, xs: Iterable[Any], *, window: int = 64, timeout: float | None = None,
                           return_exceptions: bool = False) -> list:
        """``predict`` on each batch of ``xs``, up to ``window`` in flight; results in input order.

        The first error is raised and the other requests are cancelled, unless ``return_exceptions``.
        """
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        slots = asyncio.Semaphore(window)

        async def one(x: Any) -> np.ndarray:
            async with slots:
                return await self.predict(model, x, timeout=timeout)

        tasks = [asyncio.ensure_future(one(x)) for x in xs]
        try:
            return await asyncio.gather(*tasks, return_exceptions=return_exceptions)
        finally:
            for task in tasks:
                task.cancel()

    async def call(self, model: str, header: dict, tensors: Sequence[Any] = (), *,
                   timeout: float | None = None) -> protocol.Reply:
        """Send one request as the wire protocol has it (header map and raw tensor frames); the Reply.

        For gateways that already hold V2-shaped tensors: nothing is converted, and an error status is
        returned in the Reply (``protocol.reply_error(reply)`` gives the typed error), not raised.
        """
        wait = self._wait(timeout)
        rid, frames = self._builder.request(model, dict(header), tensors, timeout=wait)
        return await self._roundtrip(rid, frames, wait)

    async def metadata(self, model: str, *, timeout: float | None = None) -> dict:
        """Inputs and outputs (names, datatypes, shapes) of a model."""
        wait = self._wait(timeout)
        rid, frames = self._builder.request(model, {"op": "metadata"}, timeout=wait)
        return header_or_raise(await self._roundtrip(rid, frames, wait))

    async def models(self, *, timeout: float | None = None, detail: bool = False) -> list[dict]:
        """Models served, with versions, replicas, queue depths and counters; ``detail`` adds worker
        ids and pids where the pool allows it (``mmi_detail`` in its config)."""
        wait = self._wait(timeout)
        rid, frames = self._builder.request(protocol.MMI_MODELS.decode(), {"detail": True} if detail else {},
                                            timeout=wait)
        return header_or_raise(await self._roundtrip(rid, frames, wait))["models"]

    async def health(self, *, timeout: float | None = None) -> dict:
        """Liveness and readiness of the pool."""
        return await self._manage(protocol.MMI_HEALTH, {}, timeout)

    async def scale(self, model: str, replicas: int, *, timeout: float | None = None) -> dict:
        """As ``Client.scale``."""
        return await self._manage(protocol.MMI_SCALE, {"model": model, "replicas": replicas}, timeout)

    async def reload(self, model: str, *, timeout: float | None = None) -> dict:
        """As ``Client.reload``."""
        return await self._manage(protocol.MMI_RELOAD, {"model": model}, timeout)

    async def load(self, model: str, *, timeout: float | None = None) -> dict:
        """As ``Client.load``."""
        return await self._manage(protocol.MMI_LOAD, {"model": model}, timeout)

    async def unload(self, model: str, *, timeout: float | None = None) -> dict:
        """As ``Client.unload``."""
        return await self._manage(protocol.MMI_UNLOAD, {"model": model}, timeout)

    async def repository(self, *, timeout: float | None = None) -> list[dict]:
        """As ``Client.repository``."""
        return (await self._manage(protocol.MMI_REPOSITORY, {}, timeout))["models"]

    async def _manage(self, service: bytes, header: dict, timeout: float | None) -> dict:
        wait = self._wait(timeout)
        rid, frames = self._builder.request(service.decode(), header, timeout=wait)
        return header_or_raise(await self._roundtrip(rid, frames, wait))

    async def has_model(self, model: str, *, timeout: float | None = None) -> bool:
        """8/MMI service lookup: is a model of that name served?"""
        wait = self._wait(timeout)
        rid, frames = self._builder.request(protocol.MMI_SERVICE.decode(), {"name": model}, timeout=wait)
        return (await self._roundtrip(rid, frames, wait)).status == protocol.OK

    async def wait_ready(self, models: Sequence[str] | None = None, *, all_replicas: bool = True,
                         timeout: float = 120.0) -> list[dict]:
        """Wait until the models have their replicas ready; as ``Client.wait_ready``."""
        loop = asyncio.get_running_loop()
        wait = ReadyWait(self.endpoint, models, all_replicas, timeout, loop.time())
        while True:
            timeout = wait.next_try(loop.time())  # raises once the wait is over: outside the try below
            try:
                served = await self.models(timeout=timeout)
            except (RequestTimeout, Unavailable) as exc:  # not answering yet: the pool may be (re)starting
                wait.last = exc
                continue
            if wait.ready(served):
                return served
            await asyncio.sleep(wait.pause(loop.time()))

    # --- lifetime ------------------------------------------------------------------------

    def close(self) -> _Closing:
        """Fail requests in flight and close the sockets; may be awaited (``await client.close()``)."""
        self._closed = True
        if self._pid != os.getpid():
            return _Closing()
        endpoint = self.endpoint
        self._drop_socket(lambda: PoolError(f"the client of {endpoint} was closed while the request was in flight"))
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.term()
        return _Closing()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _cancelled(entry: Entry) -> bool:
    """A request whose task was cancelled meanwhile: not sent again."""
    return entry.tag.done()


def _still_wanted(entry: Any) -> bool:
    """A queued request is still to be sent: tracked, not cancelled, not held for a reconnect."""
    return entry is not None and not entry.held and not entry.tag.done()


def _fail(future: asyncio.Future, error: BaseException) -> None:
    """Fail a request's future unless it is done already (cancelled) or its loop is gone."""
    if not future.done():
        try:
            future.set_exception(error)
        except RuntimeError:  # its loop is closed: nobody awaits it
            pass
