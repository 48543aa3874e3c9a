"""Starts, watches and restarts the KServe V2 gateway process, next to the worker supervisor.

The broker's loop polls the process sentinel and the pipe on which the gateway reports the ports it
bound. Ports asked as 0 are kept once known, so a restarted gateway listens where the first did.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Callable

from modelpool.broker.config import PoolConfig
from modelpool.gateway.process import EXIT_BIND_FAILED, GatewaySpec

log = logging.getLogger(__name__)

STABLE_AFTER = 10.0  # seconds up after which a crash counts as the first of a new series


class GatewaySupervisor:
    """One gateway process (HTTP and/or gRPC), restarted with capped exponential backoff."""

    def __init__(self, config: PoolConfig, frontend: str, *, version: str = "",
                 now: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.now = now
        self.ctx = multiprocessing.get_context("spawn")
        http, grpc = config.http, config.grpc
        self.spec = GatewaySpec(
            frontend=frontend, http_host=http.host, http_port=http.port if http.enabled else None,
            grpc_host=grpc.host, grpc_port=grpc.port if grpc.enabled else None,
            http_timeout=http.default_timeout, grpc_timeout=grpc.default_timeout,
            max_message_bytes=config.max_message_bytes, max_reading_bytes=config.max_queued_bytes, version=version,
            parent_pid=os.getpid(),
            log_level=config.log_level)
        self.process: BaseProcess | None = None
        self.conn: Connection | None = None
        self.eof = False  # the gateway closed its end of the pipe (exiting)
        self.ports: dict[str, int] = {}  # door -> port bound, once reported
        self.error: str | None = None  # why the last start could not bind
        self.started_once = False  # the gateway has reported its ports at least once
        self.failures = 0
        self.restart_at: float | None = 0.0
        self.up_since: float | None = None
        self.stopping = False

    @property
    def enabled(self) -> bool:
        """At least one door is configured."""
        return self.spec.http_port is not None or self.spec.grpc_port is not None

    def start_due(self) -> bool:
        """Start the gateway if it is not running and its restart time has come; True if started."""
        if self.stopping or not self.enabled or self.process is not None or self.restart_at is None:
            return False
        if self.restart_at > self.now():
            return False
        spec = self.spec
        if self.ports:  # the ports the OS picked the first time
            spec = _replace_ports(spec, self.ports)
        receiver, sender = self.ctx.Pipe(duplex=False)
        from modelpool.gateway.process import main as gateway_main  # TensorFlow- and server-free import

        process = self.ctx.Process(target=gateway_main, args=(spec, sender), name="modelpool-gateway", daemon=True)
        process.start()
        sender.close()
        self.process, self.conn, self.restart_at, self.up_since = process, receiver, None, None
        self.eof = False
        log.info("started gateway pid=%d", process.pid)
        return True

    def fds(self) -> list[int]:
        """File descriptors the loop polls: the process sentinel and the report pipe."""
        if self.process is None:
            return []
        return [self.process.sentinel] + ([self.conn.fileno()] if self.conn is not None and not self.eof else [])

    def read_reports(self) -> dict[str, int] | None:
        """Take what the gateway reported; the ports when it first reports them, else None."""
        conn, first = self.conn, None
        while conn is not None and not self.eof and conn.poll():
            try:
                report = conn.recv()
            except (EOFError, OSError):
                self.eof = True  # closed once reaped; the loop stops polling it first
                break
            if "error" in report:
                self.error = str(report["error"])
                continue
            self.error = None
            self.up_since = self.now()
            if not self.started_once:
                self.started_once = True
                self.ports = {k: int(v) for k, v in report.items()}
                first = dict(self.ports)
        return first

    def reap(self) -> str | None:
        """Collect an exited gateway and schedule its restart; None while it cannot be collected yet."""
        process = self.process
        process.join(0)
        if process.exitcode is None:
            return None
        self.read_reports()
        self._forget()
        reason = _describe_exit(process.exitcode)
        if self.stopping:
            return reason
        if self.up_since is not None and self.now() - self.up_since >= STABLE_AFTER:
            self.failures = 0
        delay = 0.0 if self.failures == 0 else min(self.config.restart_backoff_max, 0.5 * 2 ** (self.failures - 1))
        if process.exitcode == EXIT_BIND_FAILED:
            delay = min(self.config.restart_backoff_max, 1.0 * 2 ** self.failures)
        self.failures += 1
        self.restart_at = self.now() + delay
        log.warning("gateway pid=%d %s%s; restart in %.1fs", process.pid, reason,
                    f" ({self.error})" if self.error else "", delay)
        return reason

    def next_restart(self) -> float | None:
        """When the pending restart is due."""
        return self.restart_at if self.process is None and not self.stopping and self.enabled else None

    def stop_admitting(self) -> None:
        """First step of a graceful stop: SIGTERM; the gateway finishes what is in flight and exits."""
        self.stopping = True
        if self.process is not None and self.process.pid:
            try:
                os.kill(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float) -> None:
        """Wait for the gateway to exit after stop_admitting, then terminate, then kill."""
        self.stop_admitting()
        process = self.process
        if process is not None:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join(2.0)
        self._forget()

    def kill(self) -> None:
        """Forced stop: SIGKILL the gateway now."""
        self.stopping = True
        if self.process is not None:
            self.process.kill()
            self.process.join(2.0)
        self._forget()

    def _forget(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.process = self.conn = None


def _replace_ports(spec: GatewaySpec, ports: dict[str, int]) -> GatewaySpec:
    from dataclasses import replace

    changes = {f"{door}_port": port for door, port in ports.items() if getattr(spec, f"{door}_port") is not None}
    return replace(spec, **changes)


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == EXIT_BIND_FAILED:
        return "could not bind its ports"
    return f"exited with code {code}"
