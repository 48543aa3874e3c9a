"""asyncio client: one DEALER socket, many requests in flight, replies matched by request-id.

A reader task receives every reply and hands it to the future of the request with that id; replies
nobody waits for any more (a cancelled task's, a timed-out request's) are dropped. Cancelling the task
that awaits a request abandons the request cleanly.

Deadlines and retries as in the sync client, kept by the same ``Tracker`` (``client/tracker.py``): a
request's whole ``timeout`` goes to the broker once as its ``timeout_ms``, and one timer, set for the
earliest deadline plus ``DEADLINE_GRACE``, fails the requests that ran out of time with RequestTimeout;
a slow answer is never sent again. A watcher task reads the socket's monitor. While the connection is
down (before the first handshake too), requests wait in the tracker and the watcher sends them when
it is up; when it drops, the requests in flight on it are sent again once ZeroMQ has reconnected
(``retries`` times at most, under the same request-id, with ``timeout_ms`` cut to what is left), and
those with no retry left fail at once with Unavailable.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Generator, Iterable, Mapping, Sequence

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from modelpool.client import protocol
from modelpool.client.base import (
    DEFAULT_ENDPOINT,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    UP_EVENT,
    ModelSchema,
    ReadyWait,
    RequestBuilder,
    SchemaCache,
    check_settings,
    header_or_raise,
    inherit,
    open_monitored,
    pick_outputs,
    track_forks,
    wanted_outputs,
)
from modelpool.client.errors import PoolError, ProtocolError, RequestTimeout, Unavailable
from modelpool.client.tracker import Entry, Tracker, lost_error, timeout_error

log = logging.getLogger(__name__)


class _Closing:
    """What ``AsyncClient.close()`` returns: awaiting it waits for the reader and watcher tasks to finish."""

    __slots__ = ("_tasks",)

    def __init__(self, tasks: list[asyncio.Task]) -> None:
        self._tasks = [t for t in tasks if t is not None and not t.done()]

    def __await__(self) -> Generator[Any, None, None]:
        if not self._tasks:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        tasks = {t for t in self._tasks if t.get_loop() is loop}  # tasks of another (closed) loop cannot be waited for
        if tasks:
            yield from asyncio.wait(tasks).__await__()


class AsyncClient:
    """Talks to a modelpool broker from asyncio; the methods of ``Client`` as coroutines.

    One ``zmq.asyncio`` DEALER socket carries every request of this client; ``asyncio.gather`` of many
    calls keeps them all in flight. ``timeout`` (seconds) is each request's whole budget, and
    ``retries`` how many times a request is sent again after the connection was lost with it in flight
    (see the module docstring). Use ``async with`` or ``await client.close()``. A process forked from
    one holding an AsyncClient gets a fresh context and socket on first use in the child; the socket
    follows the running event loop.
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
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._tracker = Tracker(self.retries)
        self._timer: asyncio.TimerHandle | None = None

    @property
    def _pending(self) -> dict[bytes, Entry]:
        """The requests in flight, by request-id."""
        return self._tracker.pending

    def _after_fork(self) -> None:
        # The parent's context, sockets and tasks belong to the parent: never close them here.
        inherit(self._ctx, self._sock, self._monitor, self._reader, self._watcher, self._tracker)
        self._builder.after_fork()
        self._start_fresh()

    def _ensure(self) -> zmq.asyncio.Socket:
        """The socket of this process and event loop, opened (with its reader and watcher tasks) if needed."""
        if self._pid != os.getpid():
            self._after_fork()
        if self._closed:
            raise RuntimeError("client is closed")
        loop = asyncio.get_running_loop()
        if self._sock is not None and (self._loop is not loop or self._reader is None or self._reader.done()):
            # a socket and its tasks serve the loop that made them
            self._drop_socket(lambda: PoolError("the client was used from another event loop while the request "
                                                "was in flight"))
        if self._sock is None:
            if self._ctx is None:
                self._ctx = zmq.asyncio.Context()
            self._sock, self._monitor = open_monitored(self._ctx, self.endpoint)
            self._loop = loop
            self._reader = loop.create_task(self._read(self._sock), name=f"modelpool-reader {self.endpoint}")
            self._watcher = loop.create_task(self._watch(self._sock, self._monitor),
                                             name=f"modelpool-monitor {self.endpoint}")
        return self._sock

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                self._dispatch(await sock.recv_multipart(copy=False))
                # then take what else has arrived without a round through the event loop per message
                while True:
                    self._dispatch(sock.recv_multipart(zmq.NOBLOCK, copy=False).result())
            except zmq.Again:
                continue
            except zmq.ZMQError:  # closed under us: a dropped socket or a closed client
                return

    def _dispatch(self, frames: list) -> None:
        try:
            reply = protocol.parse_reply(frames)
        except ProtocolError as exc:
            log.debug("dropped a malformed reply from %s: %s", self.endpoint, exc)
            return
        entry = self._tracker.reply(reply.rid)
        if entry is None or entry.tag.done():
            self._late += 1
        else:
            entry.tag.set_result(reply)

    async def _watch(self, sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        """Hold or fail the requests in flight when the connection drops; resend the held ones once it is back."""
        while True:
            try:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
            except zmq.ZMQError:  # closed under us
                return
            now = asyncio.get_running_loop().time()
            if event == zmq.EVENT_DISCONNECTED:
                held, failed = self._tracker.connection_lost(now)
                if held or failed:
                    log.warning("lost the connection to %s with %d requests in flight: %d to resend, %d failed",
                                self.endpoint, len(held) + len(failed), len(held), len(failed))
                for entry in failed:
                    _fail(entry.tag, lost_error(entry, self.endpoint))
                self._arm()
            elif event == UP_EVENT:
                for entry in self._tracker.reconnected(now):
                    if entry.tag.done():  # cancelled meanwhile
                        self._tracker.discard(entry.rid)
                    else:
                        self._send(sock, entry.frames)  # a full queue: it goes when there is room

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
        """Close the socket and its monitor (linger 0), stop their tasks; requests in flight fail with ``reason()``."""
        sock, monitor, tasks = self._sock, self._monitor, (self._reader, self._watcher)
        self._sock = self._monitor = self._reader = self._watcher = self._loop = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for entry in self._tracker.clear():
            _fail(entry.tag, reason())
        self._tracker = Tracker(self.retries)  # the next socket starts unconnected
        for task in tasks:
            if task is not None and not task.done():
                try:
                    task.cancel()
                except RuntimeError:  # its loop is closed
                    pass
        for s in (monitor, sock):
            if s is not None:
                try:
                    s.close(linger=0)
                except RuntimeError:  # the loop it was registered with is closed
                    zmq.Socket.close(s, linger=0)

    def _send(self, sock: zmq.asyncio.Socket, frames: list) -> asyncio.Future:
        """Send a request; the future is done at once unless the socket's queue is full."""
        return sock.send_multipart(frames, copy=False)

    # --- round trips ---------------------------------------------------------------------

    async def _roundtrip(self, rid: bytes, frames: list, timeout: float | None) -> protocol.Reply:
        sock = self._ensure()
        loop = self._loop
        future = loop.create_future()
        # while the connection is down the request waits in the tracker; the watcher sends it
        sending = self._send(sock, frames) if self._tracker.connected else None
        entry = self._tracker.sent(rid, frames, self._wait(timeout), loop.time(), future)
        timer = self._timer
        if timer is None or entry.due < timer.when():
            self._arm()
        try:
            if sending is not None and not sending.done():  # the queue is full: wait for room, not past the deadline
                await asyncio.wait((sending, future), return_when=asyncio.FIRST_COMPLETED)
            if sending is not None and sending.done():
                sending.result()  # a send that failed (a closed socket) raises here
            return await future
        finally:
            if sending is not None and not sending.done():
                sending.cancel()
            self._tracker.discard(rid)  # cancelled: nobody waits for it any more

    def _wait(self, timeout: float | None) -> float:
        """A request's budget in seconds: the call's ``timeout``, or the client's."""
        return self.timeout if timeout is None else timeout

    async def _schema(self, model: str, timeout: float) -> ModelSchema:
        """The model's input names and dtypes, fetched once (one metadata round trip) and cached."""
        schema = self._schemas.get(model)
        return schema if schema is not None else self._schemas.put(model, await self.metadata(model, timeout=timeout))

    async def infer(self, model: str, inputs: Mapping[str, Any] | Any, outputs: Sequence[str] | None = None, *,
                    timeout: float | None = None) -> dict[str, np.ndarray]:
        """Run a model on named inputs (or one array for a one-input model); returns the named outputs.

        ``outputs`` may name intermediate layers; inputs are converted as ``Client.infer`` does.
        """
        wait = self._wait(timeout)
        inputs = (await self._schema(model, wait)).conform(inputs)
        rid, frames = self._builder.inference(model, inputs, outputs, wait)
        return self._schemas.outputs(model, await self._roundtrip(rid, frames, wait))

    async def predict(self, model: str, x: Any, *, outputs: str | Sequence[str] | None = None,
                      timeout: float | None = None) -> Any:
        """Run a one-input model on a batch ``x``; ``outputs`` as in ``Client.predict``."""
        results = await self.infer(model, x, wanted_outputs(outputs), timeout=timeout)
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
        wait = self._wait(timeout)
        rid, frames = self._builder.request(protocol.MMI_HEALTH.decode(), {}, timeout=wait)
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
        """Stop the reader and watcher, fail requests in flight, close the sockets; ``await`` it to let them end."""
        self._closed = True
        tasks = [self._reader, self._watcher]
        if self._pid != os.getpid():
            return _Closing([])
        endpoint = self.endpoint
        self._drop_socket(lambda: PoolError(f"the client of {endpoint} was closed while the request was in flight"))
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.term()
        return _Closing(tasks)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _fail(future: asyncio.Future, error: BaseException) -> None:
    """Fail a request's future unless it is done already (cancelled) or its loop is gone."""
    if not future.done():
        try:
            future.set_exception(error)
        except RuntimeError:  # its loop is closed: nobody awaits it
            pass
