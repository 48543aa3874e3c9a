"""Closed-loop load generators: N requests kept in flight for a time window.

For modelpool the published generators are the public clients, as a user calls them: ``submit``
(``Client.submit`` futures) and ``async`` (``AsyncClient`` coroutines). ``dealer`` is a hand-written raw
DEALER socket, not a user API: it shows what the clients cost.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Awaitable, Callable

import numpy as np
import zmq

from modelpool.client import AsyncClient, Client, protocol
from modelpool.client.protocol import REPLY_TENSORS
from modelpool.client.transport import recv_frames, send_frames

from bench.measure import STALL_SECONDS, Window, perf


def threadpool_load(fn: Callable, x1: np.ndarray, n: int, workers: int, warmup: float, seconds: float) -> Window:
    """N requests in flight against a ThreadPoolExecutor; each completion submits the next."""
    win = Window(warmup, seconds)
    lock = threading.Lock()
    outstanding = [0]
    finished = threading.Event()

    def done(sent: float, fut: Any) -> None:
        t = perf()
        if fut.exception() is not None:
            win.error(type(fut.exception()).__name__, t)
        else:
            win.record(sent, t)
        if t < win.end:
            submit()
            return
        with lock:
            outstanding[0] -= 1
            if outstanding[0] == 0:
                finished.set()

    def submit() -> None:
        sent = perf()
        ex.submit(lambda: fn(x1).numpy()).add_done_callback(lambda f: done(sent, f))

    with ThreadPoolExecutor(workers) as ex:
        outstanding[0] = n
        for _ in range(n):
            submit()
        if not finished.wait(win.end - perf() + STALL_SECONDS):
            win.note = "stalled"
    return win


def submit_load(endpoint: str, model: str, x1: np.ndarray, n: int, warmup: float, seconds: float) -> Window:
    """One Client, N ``Client.submit`` futures in flight; this thread submits the next as each completes."""
    win = Window(warmup, seconds)
    done: queue.SimpleQueue[tuple[float, float, Future]] = queue.SimpleQueue()

    def submit(client: Client) -> None:
        sent = perf()
        client.submit(model, x1).add_done_callback(lambda f: done.put((sent, perf(), f)))

    with Client(endpoint) as client:
        for _ in range(n):
            submit(client)
        outstanding = n
        while outstanding:
            try:
                sent, t, fut = done.get(timeout=max(win.end - perf(), 0.0) + STALL_SECONDS)
            except queue.Empty:
                win.note = f"stalled: {outstanding} requests unanswered for {STALL_SECONDS:.0f}s"
                break
            exc = fut.exception()
            if exc is not None:
                win.error(type(exc).__name__, t)
            else:
                win.record(sent, t)
            if win.open():
                submit(client)
            else:
                outstanding -= 1
    return win


def coroutine_load(open_call: Callable[[], Awaitable[tuple[Callable[[], Awaitable[Any]], Callable[[], Awaitable[None]]]]],
                   n: int, warmup: float, seconds: float) -> Window:
    """N coroutines on one event loop, each awaiting ``call()`` in a loop.

    ``open_call()`` runs inside the loop and returns ``(call, close)``, so that loop-bound clients are
    made and closed on the loop that uses them.
    """
    win = Window(warmup, seconds)

    async def loop(call: Callable[[], Awaitable[Any]]) -> None:
        while win.open():
            t0 = perf()
            try:
                await call()
            except Exception as exc:  # typed pool errors or Ray errors; counted, not fatal
                win.error(type(exc).__name__, perf())
                continue
            win.record(t0, perf())

    async def main() -> None:
        call, close = await open_call()
        try:
            await asyncio.wait_for(asyncio.gather(*(loop(call) for _ in range(n))),
                                   win.end - perf() + STALL_SECONDS)
        finally:
            await close()

    try:
        asyncio.run(main())
    except asyncio.TimeoutError:
        win.note = "stalled"
    return win


def async_load(endpoint: str, model: str, x1: np.ndarray, n: int, warmup: float, seconds: float) -> Window:
    """N coroutines sharing one AsyncClient, each awaiting ``predict`` in a loop."""

    async def open_call() -> tuple:
        client = AsyncClient(endpoint)

        async def close() -> None:
            await client.close()

        return (lambda: client.predict(model, x1)), close

    return coroutine_load(open_call, n, warmup, seconds)


def dealer_load(endpoint: str, model: str, x1: np.ndarray, n: int, warmup: float, seconds: float) -> Window:
    """One raw DEALER socket keeping N requests in flight, replies matched by request-id (not a user API)."""
    win = Window(warmup, seconds)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(endpoint)
    metas, tensors = protocol.encode_tensors({"": x1})
    # what Client.predict sends: the inputs and its default 30 s deadline
    header = protocol.packb({"inputs": metas, "timeout_ms": 30_000})
    payload = bytes(tensors[0])
    head = [b"", protocol.CLIENT, model.encode()]
    sent: dict[bytes, float] = {}
    seq = 0
    last = perf()
    try:
        while True:
            if perf() < win.end:
                while len(sent) < n:
                    seq += 1
                    rid = seq.to_bytes(8, "little")
                    send_frames(sock, [*head, rid, header, payload])
                    sent[rid] = perf()
            elif not sent:
                break
            if not sock.poll(100, zmq.POLLIN):
                if perf() - last > STALL_SECONDS:
                    win.note = f"stalled: {len(sent)} requests unanswered for {STALL_SECONDS:.0f}s"
                    break
                continue
            while True:
                try:
                    frames = recv_frames(sock, REPLY_TENSORS)
                except zmq.Again:
                    break
                t = last = perf()
                reply = protocol.parse_reply(frames)
                t0 = sent.pop(reply.rid, None)
                if t0 is None:
                    continue
                if reply.status != protocol.OK:
                    win.error(reply.status.decode(), t)
                    continue
                protocol.decode_tensors(reply.header.get("outputs", []), reply.tensors)
                win.record(t0, t)
    finally:
        sock.close(linger=0)
        ctx.term()
    return win


def threads_load(endpoint: str, model: str, x1: np.ndarray, n: int, warmup: float, seconds: float) -> Window:
    """N threads sharing one Client, each calling ``predict`` in a loop (what a threaded web server does)."""
    win = Window(warmup, seconds)
    with Client(endpoint) as client:
        def loop() -> None:
            while win.open():
                t0 = perf()
                try:
                    client.predict(model, x1)
                except Exception as exc:  # typed pool errors; counted, not fatal
                    win.error(type(exc).__name__, perf())
                    continue
                win.record(t0, perf())

        threads = [threading.Thread(target=loop, daemon=True) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(win.end - perf() + STALL_SECONDS)
        if any(t.is_alive() for t in threads):
            win.note = "stalled"
    return win


def many_load(endpoint: str, model: str, x1: np.ndarray, n: int, warmup: float, seconds: float) -> Window:
    """One Client, ``predict_many`` with a window of N over a stream of requests; latency is not seen
    per request (results come back as one list), so each is recorded with the call's mean."""
    win = Window(warmup, seconds)

    def stream():
        while win.open():
            yield x1

    with Client(endpoint) as client:
        while perf() < win.start:  # warm-up: whole calls of 4 windows each
            client.predict_many(model, [x1] * (4 * n), window=n)
        t0 = perf()
        results = client.predict_many(model, stream(), window=n, return_exceptions=True)
        mean = (perf() - t0) / max(1, len(results)) * n  # about the time one request spent in flight
        for r in results:
            if isinstance(r, Exception):
                win.error(type(r).__name__, win.start)
            else:
                win.latencies.append(mean)
    return win


# name -> (generator, how the table names it)
GENERATORS: dict[str, tuple[Callable[..., Window], str]] = {
    "submit": (submit_load, "Client.submit"),
    "async": (async_load, "AsyncClient"),
    "dealer": (dealer_load, "raw DEALER, not a user API"),
    "many": (many_load, "Client.predict_many"),
    "threads": (threads_load, "Client.predict, N threads"),
}
GENERATOR_TEXT = {
    "submit": "one `Client`, N `Client.submit` futures in flight; the benchmark thread submits the next request "
              "as each future completes",
    "async": "N coroutines on one `AsyncClient`, each awaiting `predict` in a loop",
    "dealer": "one hand-written DEALER socket pipelining N requests built with `client.protocol`, matched by "
              "request-id; not a user API, shown so that the clients' own cost is visible beside it",
    "many": "one `Client`, `predict_many` with a window of N over a stream of requests",
    "threads": "N threads sharing one `Client`, each calling `predict` in a loop",
}
