"""The gateway process: spawn target, one asyncio loop running uvicorn (HTTP) and grpc.aio (gRPC).

Started by the launcher (``broker/gateway.py``) with a frozen ``GatewaySpec`` and one end of a pipe,
on which it reports the ports it bound (``{"http": port, "grpc": port}``) or why it could not bind
(``{"error": text}``). SIGTERM stops it gracefully (no new connections, requests in flight finish);
it ignores SIGINT (the launcher decides) and dies with the launcher. Never imports TensorFlow.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

EXIT_BIND_FAILED = 4
_PR_SET_PDEATHSIG = 1
PARENT_POLL = 1.0  # seconds between checks that the launcher is still there
GRACE = 10.0  # seconds requests in flight get to finish after SIGTERM
MAX_CONCURRENCY = 1024  # HTTP connections and gRPC calls at once, per door (past it: HTTP 503, RESOURCE_EXHAUSTED)


@dataclass(frozen=True)
class GatewaySpec:
    """Everything the gateway process needs; ``None`` ports are doors that stay closed."""

    frontend: str
    http_host: str = "127.0.0.1"
    http_port: int | None = 8000
    grpc_host: str = "127.0.0.1"
    grpc_port: int | None = 8001
    http_timeout: float = 30.0
    grpc_timeout: float = 30.0
    max_message_bytes: int = 64 * 1024 * 1024
    max_reading_bytes: int = 512 * 1024 * 1024  # HTTP request bodies still arriving, all connections together
    version: str = ""
    parent_pid: int = 0
    log_level: str = "INFO"


def main(spec: GatewaySpec, conn: Any) -> None:
    """Spawn target: serve both doors until SIGTERM or the launcher is gone."""
    if spec.parent_pid:
        _die_with_parent(spec.parent_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the launcher decides
    logging.basicConfig(level=spec.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s gateway[{os.getpid()}] %(name)s: %(message)s")
    try:
        code = asyncio.run(_serve(spec, conn))
    finally:
        conn.close()
    sys.exit(code)


def _die_with_parent(parent_pid: int) -> None:
    """Linux SIGKILLs this process when the launcher dies; a task also watches the parent pid."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def bind_http(host: str, port: int) -> socket.socket:
    """A listening TCP socket (SO_REUSEADDR, never SO_REUSEPORT: a port in use is an error)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind HTTP to {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


async def _serve(spec: GatewaySpec, conn: Any) -> int:
    from modelpool.client import AsyncClient
    from modelpool.gateway.backend import Backend

    client = AsyncClient(spec.frontend, timeout=max(spec.http_timeout, spec.grpc_timeout),
                         max_message_bytes=spec.max_message_bytes)
    backend = Backend(client, version=spec.version)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        doors = await _open(spec, backend)
    except OSError as exc:
        log.error("%s", exc)
        conn.send({"error": str(exc)})
        await client.close()
        return EXIT_BIND_FAILED
    conn.send({name: port for name, (_, port) in doors.items()})
    log.info("gateway listening %s", " ".join(f"{name}={port}" for name, (_, port) in doors.items()))
    watcher = asyncio.create_task(_watch_parent(spec.parent_pid, stop))
    await stop.wait()
    watcher.cancel()
    log.info("gateway stopping: finishing requests in flight (up to %.0fs)", GRACE)
    await asyncio.gather(*(closer() for closer, _ in doors.values()))
    await client.close()
    return 0


async def _open(spec: GatewaySpec, backend: Any) -> dict[str, tuple[Any, int]]:
    """Start the doors the spec opens; name -> (async close function, port bound)."""
    doors: dict[str, tuple[Any, int]] = {}
    try:
        if spec.http_port is not None:
            doors["http"] = await _open_http(spec, backend)
        if spec.grpc_port is not None:
            doors["grpc"] = await _open_grpc(spec, backend)
    except OSError:
        await asyncio.gather(*(closer() for closer, _ in doors.values()))
        raise
    return doors


async def _open_http(spec: GatewaySpec, backend: Any) -> tuple[Any, int]:
    import uvicorn

    from modelpool.gateway.http_server import HttpDoor

    sock = bind_http(spec.http_host, spec.http_port)
    door = HttpDoor(backend, max_body=spec.max_message_bytes, default_timeout=spec.http_timeout,
                    max_reading=spec.max_reading_bytes)
    config = uvicorn.Config(door.app, log_config=None, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=GRACE, server_header=False, limit_concurrency=MAX_CONCURRENCY)
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # this process's loop handles SIGTERM for both doors
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if task.done():
        sock.close()
        raise OSError(f"HTTP server did not start: {task.exception()!r}")

    async def close() -> None:
        server.should_exit = True
        await task
        sock.close()

    return close, sock.getsockname()[1]


async def _open_grpc(spec: GatewaySpec, backend: Any) -> tuple[Any, int]:
    from modelpool.gateway.grpc_server import make_server

    server, port = make_server(backend, spec.grpc_host, spec.grpc_port, max_message_bytes=spec.max_message_bytes,
                               default_timeout=spec.grpc_timeout, max_concurrent=MAX_CONCURRENCY)
    await server.start()

    async def close() -> None:
        await server.stop(GRACE)

    return close, port


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    while parent_pid:
        await asyncio.sleep(PARENT_POLL)
        if os.getppid() != parent_pid:
            log.error("launcher pid=%d is gone; stopping", parent_pid)
            stop.set()
            return
