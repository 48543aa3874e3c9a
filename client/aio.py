"""asyncio client: one DEALER socket, many requests in flight, replies matched by request-id.

A reader task receives every reply and hands it to the future of the request with that id; replies
nobody waits for any more (a cancelled task's, a timed-out try's) are dropped. Cancelling the task
that awaits a request abandons the request cleanly.

Lazy Pirate, as in the sync client: a request whose try got no reply within its share of the timeout
makes the client close its socket (linger 0) and open a fresh one; the request is sent again
(``retries`` times at most, the tries sharing the request's timeout equally), and every other request
in flight on the old socket is resent at once on the new one, since its reply could no longer arrive.
Only requests that are safe to run twice are resent: inference, metadata and ``mmi.*`` queries all are.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable, Generator, Iterable, Mapping, Sequence

import numpy as np
import zmq
import zmq.asyncio

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
    timeout_error,
    track_forks,
    wanted_outputs,
)
from modelpool.client.errors import PoolError, ProtocolError, RequestTimeout

log = logging.getLogger(__name__)


class _Resend(Exception):
    """The socket a request went out on was replaced: its reply can no longer arrive."""


class _Closing:
    """What ``AsyncClient.close()`` returns: awaiting it waits for the reader task to finish."""

    __slots__ = ("_task",)

    def __init__(self, task: asyncio.Task | None) -> None:
        self._task = task

    def __await__(self) -> Generator[Any, None, None]:
        task = self._task
        if task is None or task.done():
            return
        try:
            same_loop = task.get_loop() is asyncio.get_running_loop()
        except RuntimeError:
            same_loop = False
        if same_loop:  # a reader of another (closed) loop cannot be waited for
            yield from asyncio.wait({task}).__await__()


class AsyncClient:
    """Talks to a modelpool broker from asyncio; the methods of ``Client`` as coroutines.

    One ``zmq.asyncio`` DEALER socket carries every request of this client; ``asyncio.gather`` of many
    calls keeps them all in flight. ``timeout`` (seconds) bounds each request, resends included;
    ``retries`` is the Lazy Pirate resend count (see the module docstring). Use ``async with`` or
    ``await client.close()``. A process forked from one holding an AsyncClient gets a fresh context and
    socket on first use in the child; the socket follows the running event loop.
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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[bytes, asyncio.Future] = {}

    def _after_fork(self) -> None:
        # The parent's context, socket and reader task belong to the parent: never close them here.
        inherit(self._ctx, self._sock, self._reader, self._pending)
        self._start_fresh()

    def _ensure(self) -> zmq.asyncio.Socket:
        """The socket of this process and event loop, opened (with its reader task) if needed."""
        if self._pid != os.getpid():
            self._after_fork()
        if self._closed:
            raise RuntimeError("client is closed")
        loop = asyncio.get_running_loop()
        if self._sock is not None and (self._loop is not loop or self._reader is None or self._reader.done()):
            self._replace_socket(_Resend)  # a socket and its reader serve the loop that made them
        if self._sock is None:
            if self._ctx is None:
                self._ctx = zmq.asyncio.Context()
            self._sock = open_dealer(self._ctx, self.endpoint)
            self._loop = loop
            self._reader = loop.create_task(self._read(self._sock), name=f"modelpool-reader {self.endpoint}")
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
            except zmq.ZMQError:  # closed under us: a replaced socket or a closed client
                return

    def _dispatch(self, frames: list) -> None:
        try:
            reply = protocol.parse_reply(frames)
        except ProtocolError as exc:
            log.debug("dropped a malformed reply from %s: %s", self.endpoint, exc)
            return
        future = self._pending.pop(reply.rid, None)
        if future is None or future.done():
            self._late += 1
        else:
            future.set_result(reply)

    def _replace_socket(self, reason: Callable[[], BaseException]) -> None:
        """Close the socket (linger 0) and stop its reader; requests in flight on it fail with ``reason()``."""
        sock, reader = self._sock, self._reader
        self._sock = self._reader = self._loop = None
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                try:
                    future.set_exception(reason())
                except RuntimeError:  # its loop is closed: nobody awaits it
                    pass
        if reader is not None and not reader.done():
            try:
                reader.cancel()
            except RuntimeError:
                pass
        if sock is not None:
            try:
                sock.close(linger=0)
            except RuntimeError:  # the loop it was registered with is closed
                zmq.Socket.close(sock, linger=0)

    # --- round trips ---------------------------------------------------------------------

    async def _roundtrip(self, rid: bytes, frames: list, timeout: float | None) -> protocol.Reply:
        wait = self.timeout if timeout is None else timeout
        tries = self.retries + 1
        attempt = attempt_timeout(wait, tries)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        frames = list(frames)
        sent = timed_out = 0
        while True:
            sock = self._ensure()
            future = loop.create_future()
            self._pending[rid] = future
            sent += 1
            try:
                async with asyncio.timeout_at(min(loop.time() + attempt, deadline)):
                    await sock.send_multipart(frames, copy=False)
                    return await future
            except TimeoutError:
                timed_out += 1
                if self._sock is sock:  # Lazy Pirate: a socket that lost a request is not trusted again
                    self._replace_socket(_Resend)
                if timed_out >= tries or loop.time() >= deadline:
                    raise timeout_error(wait, self.endpoint, sent) from None
            except _Resend:
                if loop.time() >= deadline:
                    raise timeout_error(wait, self.endpoint, sent) from None
            finally:
                if self._pending.get(rid) is future:
                    del self._pending[rid]
            rid = self._builder.next_id()
            frames[3] = rid

    def _wait(self, timeout: float | None) -> tuple[float, float]:
        wait = self.timeout if timeout is None else timeout
        return wait, attempt_timeout(wait, self.retries + 1)

    async def _schema(self, model: str, timeout: float) -> ModelSchema:
        """The model's input names and dtypes, fetched once (one metadata round trip) and cached."""
        schema = self._schemas.get(model)
        return schema if schema is not None else self._schemas.put(model, await self.metadata(model, timeout=timeout))

    async def infer(self, model: str, inputs: Mapping[str, Any] | Any, outputs: Sequence[str] | None = None, *,
                    timeout: float | None = None) -> dict[str, np.ndarray]:
        """Run a model on named inputs (or one array for a one-input model); returns the named outputs.

        ``outputs`` may name intermediate layers; inputs are converted as ``Client.infer`` does.
        """
        wait, attempt = self._wait(timeout)
        inputs = (await self._schema(model, wait)).conform(inputs)
        rid, frames = self._builder.inference(model, inputs, outputs, attempt)
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

    async def metadata(self, model: str, *, timeout: float | None = None) -> dict:
        """Inputs and outputs (names, datatypes, shapes) of a model."""
        rid, frames = self._builder.request(model, {"op": "metadata"})
        return header_or_raise(await self._roundtrip(rid, frames, timeout))

    async def models(self, *, timeout: float | None = None, detail: bool = False) -> list[dict]:
        """Models served, with versions, replicas, queue depths and counters; ``detail`` adds worker
        ids and pids where the pool allows it (``mmi_detail`` in its config)."""
        rid, frames = self._builder.request(protocol.MMI_MODELS.decode(), {"detail": True} if detail else {})
        return header_or_raise(await self._roundtrip(rid, frames, timeout))["models"]

    async def health(self, *, timeout: float | None = None) -> dict:
        """Liveness and readiness of the pool."""
        rid, frames = self._builder.request(protocol.MMI_HEALTH.decode(), {})
        return header_or_raise(await self._roundtrip(rid, frames, timeout))

    async def has_model(self, model: str, *, timeout: float | None = None) -> bool:
        """8/MMI service lookup: is a model of that name served?"""
        rid, frames = self._builder.request(protocol.MMI_SERVICE.decode(), {"name": model})
        return (await self._roundtrip(rid, frames, timeout)).status == protocol.OK

    async def wait_ready(self, models: Sequence[str] | None = None, *, all_replicas: bool = True,
                         timeout: float = 120.0) -> list[dict]:
        """Wait until the models have their replicas ready; as ``Client.wait_ready``."""
        loop = asyncio.get_running_loop()
        wait = ReadyWait(self.endpoint, models, all_replicas, timeout, loop.time())
        while True:
            timeout = wait.next_try(loop.time())  # raises once the wait is over: outside the try below
            try:
                served = await self.models(timeout=timeout)
            except RequestTimeout as exc:  # not answering yet: the pool may still be starting
                wait.last = exc
                continue
            if wait.ready(served):
                return served
            await asyncio.sleep(wait.pause(loop.time()))

    # --- lifetime ------------------------------------------------------------------------

    def close(self) -> _Closing:
        """Cancel the reader, fail requests in flight, close the socket; ``await`` it to let the reader finish."""
        self._closed = True
        reader = self._reader
        if self._pid != os.getpid():
            return _Closing(None)
        endpoint = self.endpoint
        self._replace_socket(lambda: PoolError(f"the client of {endpoint} was closed while the request was in flight"))
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.term()
        return _Closing(reader)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
