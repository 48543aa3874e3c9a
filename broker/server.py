"""The broker's socket loop: ROUTER frontend for clients, ROUTER backend for workers.

Thin by design: receive, hand to ``PoolState``, send what it queued. The same loop watches the local
workers' process sentinels and a signal wake-up pipe, so one thread does everything and signal
handlers only record the signal.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Callable

import zmq

from modelpool.broker import repository
from modelpool.broker.config import ConfigError, ModelConfig, PoolConfig, is_local_endpoint, is_local_host
from modelpool.broker.gateway import GatewaySupervisor
from modelpool.broker.state import PoolState
from modelpool.broker.supervisor import EXIT_LOAD_FAILED, Slot, Supervisor
from modelpool.client.errors import InvalidInput, ModelNotFound, Unavailable
from modelpool.client.protocol import (
    MMI_LOAD,
    MMI_RELOAD,
    MMI_REPOSITORY,
    MMI_UNLOAD,
    REQUEST_TENSORS,
    WORKER_CONTROL,
    encode_disconnect,
    quote,
    wire_type,
)
from modelpool.client.transport import recv_frames, send_frames

log = logging.getLogger(__name__)

_DRAIN_BATCH = 256  # messages taken from one socket before looking at the other
# Messages taken before batches are formed and what they queued is sent: requests that arrive
# together become one batch, at a bounded cost in added latency.
_COALESCE = 32
# Frames received as bytes, identity included; the rest stay zero-copy zmq.Frames (client.transport).
_CLIENT_CONTROL = 1 + REQUEST_TENSORS
_WORKER_CONTROL = 1 + WORKER_CONTROL
# After the first load failure at start, how long to keep reading before stopping: a worker's
# DISCONNECT with the loader's error can arrive just after its process sentinel fired.
_LOAD_ERROR_GRACE = 0.5
_MIN_HWM = 1000
_REAP_POLL_MS = 5  # while a worker's process is exiting, look again this soon
_TRIM_AFTER_MESSAGES = 20_000  # a burst this large since the last trim ...
_TRIM_AFTER_BYTES = 64 * 1024 * 1024  # ... or this many payload bytes let go of, then give memory back
_TRIM_INTERVAL = 1.0
MAX_REPLICAS = 64  # mmi.scale's upper bound per model


def socket_hwm(config: PoolConfig) -> int:
    """Messages each ROUTER socket queues per peer and direction.

    ZeroMQ counts messages, not bytes: this is max_queued_bytes in messages of max_message_bytes,
    but at least 1000, so that a client pipelining many small requests has no reply dropped.
    """
    return max(_MIN_HWM, config.max_queued_bytes // config.max_message_bytes)


class _Trimmer:
    """Hands freed heap back to the OS after a flood; glibc's malloc keeps it otherwise."""

    def __init__(self) -> None:
        self.trim = None
        name = ctypes.util.find_library("c")
        if name and os.uname().sysname == "Linux":
            try:
                self.trim = ctypes.CDLL(name).malloc_trim
            except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
                self.trim = None
        self.messages = 0
        self.high = 0
        self.next_at = 0.0
        self.again = False  # trim once more after the burst, for what it freed since

    def note(self, messages: int, held: int, now: float) -> None:
        self.messages += messages
        self.high = max(self.high, held)
        if self.trim is None or now < self.next_at:
            return
        if self.messages >= _TRIM_AFTER_MESSAGES or self.high - held >= _TRIM_AFTER_BYTES or self.again:
            self.trim(0)
            self.again = self.messages > 0 and not self.again
            self.messages, self.high, self.next_at = 0, held, now + _TRIM_INTERVAL


class Broker:
    """One pool: sockets, routing state and the local worker supervisor."""

    def __init__(self, config: PoolConfig, *, supervise: bool = True,
                 on_ready: Callable[[Broker], None] | None = None,
                 on_gateway: Callable[[Broker, dict[str, int]], None] | None = None) -> None:
        self.config = config
        self._tmpdir = None
        backend = config.backend
        if not backend:
            remove_stale_dirs()
            self._tmpdir = tempfile.mkdtemp(prefix=_TMP_PREFIX)
            with open(os.path.join(self._tmpdir, _OWNER_FILE), "w") as f:
                f.write(f"{os.getpid()} {_start_time(os.getpid())}\n")
            backend = f"ipc://{self._tmpdir}/backend.ipc"
        self.backend_endpoint = backend
        self.state = PoolState(heartbeat_interval=config.heartbeat_interval,
                               heartbeat_liveness=config.heartbeat_liveness, hang_timeout=config.hang_timeout,
                               max_held_bytes=config.max_queued_bytes, mmi_detail=config.mmi_detail)
        self.repo = config.repository.path
        self.static = {m.name: m for m in config.models}  # [[models]] tables: served, and loadable by name
        self.applied: dict[str, tuple] = {}  # repository models served: the signature they were read with
        self._seen: dict[str, tuple] = {}  # the poller's last look at each repository model
        self.repo_errors: dict[str, str] = {}  # repository models that cannot be read, and why
        self.unloaded: set[str] = set()  # unloaded by an operator: the poller leaves them alone
        # Versions that leave once every version that replaces them is ready: model -> (leaving, wanted)
        self.unload_after: dict[str, tuple[set[str], set[str]]] = {}
        models = self._initial_models()
        for m in models:
            self._declare(m, expected=m.replicas if supervise else 0)
        self.supervisor = Supervisor(config, backend, models=models) if supervise else None
        self.next_poll = time.monotonic() + config.repository.poll_seconds
        if self.supervisor is not None:
            self.state.control = self._control
        self.on_ready = on_ready
        self.started = False  # every model had its replicas ready (or failed with exit_on_error off)
        self.announced = False
        self._fail_by: float | None = None
        self._trimmer = _Trimmer()
        self.signals: list[int] = []
        self.exit_code = 0
        self.metrics_server = None  # broker.exporter.MetricsServer, once start_metrics() has run
        self.ctx = zmq.Context()
        self.frontend = self._router(config.frontend, config.max_message_bytes)
        self.backend = self._router(backend, config.max_message_bytes)
        self.frontend_endpoint = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        # A frontend reachable from other hosts: each client message is checked for where it came from
        # (runtime control is taken from this host only).
        self._check_peers = not is_local_endpoint(self.frontend_endpoint)
        # The KServe V2 doors, in a process of their own that is a client of the frontend.
        self.gateway = GatewaySupervisor(config, self.frontend_endpoint, version=_version()) if supervise else None
        self.on_gateway = on_gateway

    def _initial_models(self) -> tuple[ModelConfig, ...]:
        """The [[models]] tables, and what the model repository's control mode loads at start."""
        repo = self.config.repository
        models = list(self.config.models)
        if not self.repo:
            return tuple(models)
        names = repository.model_names(self.repo)
        for name in names:
            if name in self.static:
                log.warning("model repository: model %r is also a [[models]] table; the table wins", name)
        wanted = [n for n in names if n not in self.static]
        if repo.control_mode == "explicit":
            wanted = wanted if "*" in repo.load else [n for n in repo.load if n not in self.static]
        for name in wanted:
            model = repository.read_model(self.repo, name)
            if model.error is not None:
                if self.config.exit_on_error:
                    raise ConfigError(f"{model.error} (set exit_on_error = false in [pool] to serve the other "
                                      "models anyway)")
                log.error("model repository: %s", model.error)
                self.repo_errors[name] = model.error
                continue
            models += model.configs
            self.applied[name] = self._seen[name] = model.signature
        return tuple(models)

    def _declare(self, m: ModelConfig, expected: int) -> None:
        self.state.add_model(m.name, max_queue=m.max_queue, expected=expected, version=m.version,
                             max_queue_bytes=m.max_queue_bytes, max_delay_ms=m.max_delay_ms,
                             max_requests=m.max_requests, max_memory_mb=m.max_memory_mb)

    def _router(self, endpoint: str, max_bytes: int) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        # No ROUTER_HANDOVER: with it, a new peer that presents an identity already connected takes
        # over the replies (frontend) or requests (backend) meant for the first. Without it libzmq
        # refuses the second connection; a worker re-registers on its existing connection instead.
        hwm = socket_hwm(self.config)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        if endpoint.startswith("tcp://[") or endpoint.startswith("tcp://::"):
            sock.setsockopt(zmq.IPV6, 1)
        sock.bind(endpoint)
        return sock

    def start_metrics(self) -> str | None:
        """Serve /metrics as the config says, on a daemon thread; its URL, or None when turned off.

        Raises broker.exporter.MetricsError (the port is taken, prometheus_client is missing), with
        the port and the flag to change in its message.
        """
        if not self.config.metrics.enabled:
            return None
        from modelpool.broker.exporter import MetricsServer  # prometheus_client: only when metrics are on

        self.metrics_server = MetricsServer(self.config.metrics.host, self.config.metrics.port,
                                            self.state.metrics_snapshot)
        return self.metrics_server.url

    # --- signals -------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM are recorded and acted on by the loop (wake-up through a pipe)."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._record_signal)

    def _record_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped by a signal; returns the exit code."""
        state, sup = self.state, self.supervisor
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        wake = getattr(self, "_wake_r", None)
        if wake is not None:
            poller.register(wake, zmq.POLLIN)
        watched: dict[int, object] = {}
        gateway_fds: list[int] = []
        exiting: list[Slot] = []  # sentinel fired, process not reaped yet
        interval = self.config.heartbeat_interval
        next_heartbeat = time.monotonic() + interval
        stop_by: float | None = None
        log.info("broker listening frontend=%s backend=%s", self.frontend_endpoint, self.backend_endpoint)
        try:
            while True:
                if sup is not None and sup.start_due():  # sentinels change only when a worker starts
                    self._sync_starting()
                    watched = self._watch(poller, watched, sup.sentinels(), exiting)
                gateway_fds = self._start_gateway(poller, gateway_fds)
                timeout = _REAP_POLL_MS if exiting else self._timeout(next_heartbeat, stop_by)
                events = dict(poller.poll(timeout))
                received = 0
                if self.frontend in events:
                    received += self._drain_frontend()
                if self.backend in events:
                    received += self._drain_backend()
                if wake is not None and wake in events:
                    _read_all(wake)
                for fd in [fd for fd in watched if fd in events]:
                    slot = watched.pop(fd)
                    poller.unregister(fd)
                    if not any(s is slot for s in exiting):  # a sentinel stays readable until reaped
                        exiting.append(slot)
                if exiting:
                    exiting = [slot for slot in exiting if not self._reap(slot)]
                if gateway_fds and any(fd in events for fd in gateway_fds):
                    gateway_fds = self._gateway_events(poller, gateway_fds, events)
                    if self.gateway_failed():
                        return self._finish(forced=False)
                state.tick()
                self._handle_lost()
                if sup is not None and (state.recycle or sup.to_retire):
                    self._replace_and_retire()
                if sup is not None and self.unload_after:
                    self._settle_versions()
                if sup is not None and self.config.repository.control_mode == "poll" and self.repo:
                    self._maybe_poll()
                now = time.monotonic()
                if now >= next_heartbeat:
                    state.heartbeat_all()
                    next_heartbeat = now + interval
                self._flush()
                self._trimmer.note(received, state.held_bytes, now)
                if not self.started and self._check_start():
                    return self._finish(forced=False)
                self._maybe_announce()
                stop_by = self._handle_signals(stop_by)
                if stop_by is not None and (state.drained() or time.monotonic() >= stop_by):
                    return self._finish(forced=False)
        except _ForcedStop:
            return self._finish(forced=True)

    def _timeout(self, next_heartbeat: float, stop_by: float | None) -> int:
        now = time.monotonic()
        candidates = [next_heartbeat]
        deadline = self.state.next_deadline()
        if deadline is not None:
            candidates.append(deadline)
        if self.supervisor is not None:
            restart = self.supervisor.next_restart()
            if restart is not None:
                candidates.append(restart)
        if stop_by is not None:
            candidates.append(now + 0.05)
        if self._fail_by is not None:
            candidates.append(self._fail_by)
        if self.gateway is not None:
            restart = self.gateway.next_restart()
            if restart is not None:
                candidates.append(restart)
        return max(0, int((min(candidates) - now) * 1000) + 1)

    def _drain_frontend(self) -> int:
        sock, state, handle = self.frontend, self.state, self.state.client_message
        check_peers = self._check_peers
        received = 0
        for i in range(1, _DRAIN_BATCH + 1):
            try:
                frames = recv_frames(sock, 0 if check_peers else _CLIENT_CONTROL)
            except zmq.Again:
                break
            received = i
            if check_peers:
                state.peer_local = is_local_host(frames[0].get("Peer-Address") or "")
                frames[:_CLIENT_CONTROL] = [f.bytes for f in frames[:_CLIENT_CONTROL]]
            handle(frames[0], frames[1:])
            if i % _COALESCE == 0:
                self._flush()
        self._flush()
        return received

    def _drain_backend(self) -> int:
        sock, handle, sup = self.backend, self.state.worker_message, self.supervisor
        received = 0
        for i in range(1, _DRAIN_BATCH + 1):
            try:
                frames = recv_frames(sock, _WORKER_CONTROL)
            except zmq.Again:
                break
            received = i
            identity = frames[0]
            handle(identity, frames[1:])
            if sup is not None and identity in self.state.workers and sup.mark_ready(identity):
                self._sync_starting()
            if i % _COALESCE == 0:
                self._flush()
        self._flush()
        return received

    def _flush(self) -> None:
        state = self.state
        state.dispatch()
        for sock, outbox in ((self.frontend, state.outbox_clients), (self.backend, state.outbox_workers)):
            if outbox:
                for frames in outbox:
                    send_frames(sock, frames)
                outbox.clear()

    def _watch(self, poller: zmq.Poller, watched: dict, sentinels: dict, exiting: list[Slot]) -> dict:
        """Poll the sentinels of new workers; not those of exited ones waiting to be reaped (their
        sentinel stays readable: watched again, they would be reaped twice)."""
        for fd, slot in sentinels.items():
            if fd not in watched and not any(s is slot for s in exiting):
                poller.register(fd, zmq.POLLIN)
                watched[fd] = slot
        return watched

    def _reap(self, slot: Slot) -> bool:
        """Collect an exited worker; False if its process cannot be collected yet."""
        if slot.process is None:  # reaped already
            return True
        identity = slot.identity
        never_ready, process = slot.ready_since is None, slot.process
        reason = self.supervisor.reap(slot)
        if reason is None:
            return False
        name, version = slot.model.name, slot.model.version
        if not self.supervisor.stopping and not slot.retiring:
            self.state.count_restart(name, version)
        if identity in self.state.workers:
            self.state.worker_lost(identity, f"worker process {reason}")
        elif never_ready and not self.supervisor.stopping and not slot.retiring and process.exitcode != EXIT_LOAD_FAILED:
            # Died while loading without saying why (a crash in native code, the OOM killer): a load
            # failure all the same. A worker that reports its loader's error overwrites this reason.
            entry = self.state.versions.get(name.encode(), {}).get(version)
            if entry is not None and entry.load_error is None:
                self.state.load_failed(name, f"worker process {reason} before it was ready", version)
        self._sync_starting()
        return True

    def _start_gateway(self, poller: zmq.Poller, fds: list[int]) -> list[int]:
        """Start the gateway when due; the fds polled for it."""
        gateway = self.gateway
        if gateway is None or not gateway.start_due():
            return fds
        for fd in gateway.fds():
            poller.register(fd, zmq.POLLIN)
        return gateway.fds()

    def _gateway_events(self, poller: zmq.Poller, fds: list[int], events: dict) -> list[int]:
        """Read the gateway's reports; reap it when it exited. Returns the fds now polled."""
        gateway = self.gateway
        ports = gateway.read_reports()
        if ports is not None and self.on_gateway is not None:
            self.on_gateway(self, ports)
        process = gateway.process
        if process is not None and process.sentinel in events:
            gateway.reap()  # None: not collectable yet, and its sentinel stays readable for the next poll
        keep = gateway.fds()
        for fd in fds:
            if fd not in keep:
                poller.unregister(fd)
        return keep

    def gateway_failed(self) -> bool:
        """The gateway could not bind at start and exit_on_error says stop."""
        gateway = self.gateway
        if gateway is None or gateway.started_once or gateway.error is None or not self.config.exit_on_error:
            return False
        log.error("KServe V2 gateway failed to start: %s; stopping the pool", gateway.error)
        self.exit_code = EXIT_GATEWAY_FAILED
        return True

    # --- runtime control: scale, reload, recycling -----------------------------------------

    def _control(self, service: bytes, header: dict) -> dict:
        """mmi.scale, reload, load, unload (PoolState checked that the caller may) and mmi.repository."""
        sup = self.supervisor
        if service == MMI_REPOSITORY:
            return {"models": self.repository_index()}
        model = header.get("model")
        if not isinstance(model, str):
            raise InvalidInput(f"{service.decode()}: model must be a string naming a served model, got "
                               f"{wire_type(model)}")
        if sup.stopping:
            raise Unavailable("the pool is stopping")
        if service == MMI_LOAD:
            return self.load(model)
        if model not in sup.replicas:
            raise ModelNotFound(f"model {quote(model)} is not served here; models served: "
                                f"{', '.join(sorted(sup.replicas))}")
        if service == MMI_UNLOAD:
            return self.unload(model)
        if service == MMI_RELOAD:
            replacing = sup.reload(model)
            log.info("reload model=%s: starting %d fresh replicas; the old ones retire as each is ready",
                     model, replacing)
            return {"model": model, "replacing": replacing}
        replicas = header.get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= MAX_REPLICAS:
            raise InvalidInput(f"mmi.scale: replicas must be an integer from 0 to {MAX_REPLICAS}, got "
                               f"{quote(str(replicas), 40)}")
        before = len(sup.live(model))
        for slot in sup.scale(model, replicas):
            self._retire(slot)
        self.state.set_expected(model, replicas)
        self._sync_starting()
        log.info("scale model=%s: %d -> %d replicas", model, before, replicas)
        return {"model": model, "replicas": replicas}

    # --- models and versions: load, unload, the repository ------------------------------------

    def load(self, name: str) -> dict:
        """Serve ``name`` from its [[models]] table or the model repository; for a model served
        already, read it again: new versions start, changed ones are replaced, dropped ones leave once
        the versions that replace them are ready."""
        if name in self.static:
            configs: tuple[ModelConfig, ...] = (self.static[name],)
        elif self.repo and (Path(self.repo) / name).is_dir():
            model = repository.read_model(self.repo, name)
            if model.error is not None:
                self.repo_errors[name] = model.error
                raise InvalidInput(f"cannot load model {quote(name)}: {model.error}")
            self.repo_errors.pop(name, None)
            configs = model.configs
            self.applied[name] = self._seen[name] = model.signature
        else:
            where = f" nor in the model repository {self.repo!r}" if self.repo else " (no model repository)"
            raise ModelNotFound(f"model {quote(name)} is neither a [[models]] table{where}")
        self.unloaded.discard(name)
        return self._apply(name, configs)

    def _apply(self, name: str, configs: tuple[ModelConfig, ...]) -> dict:
        sup = self.supervisor
        running = sup.versions_of(name)
        started, reloaded = [], []
        for config in configs:
            old = running.get(config.version)
            if old is None:
                sup.add_version(config)
                self._declare(config, expected=sup.replicas[name])
                started.append(config.version)
            elif old != config:  # config.toml changed: fresh processes with the new settings
                self._declare(config, expected=sup.replicas[name])
                sup.reload(name, config)
                reloaded.append(config.version)
        wanted = {c.version for c in configs}
        leaving = set(running) - wanted
        if leaving:
            self.unload_after[name] = (leaving, wanted)
        self._settle_versions()
        self._sync_starting()
        log.info("load model=%s versions=%s started=%s reloaded=%s leaving=%s", quote(name),
                 ",".join(sorted(wanted)), ",".join(started) or "-", ",".join(reloaded) or "-",
                 ",".join(sorted(leaving)) or "-")
        return {"model": name, "versions": sorted(wanted), "started": started, "reloaded": reloaded,
                "unloading": sorted(leaving)}

    def _settle_versions(self) -> None:
        """Versions replaced by newer ones leave once every version that replaces them is ready; a
        replacement that fails to load leaves the old one serving."""
        state = self.state
        for name, (leaving, wanted) in list(self.unload_after.items()):
            family = state.versions.get(name.encode(), {})
            if all(v in family and family[v].has_ready() for v in wanted):
                del self.unload_after[name]
                for version in leaving:
                    self._unload_version(name, version)

    def unload(self, name: str) -> dict:
        """Stop serving every version of ``name``: each serves what it has queued, then its replicas
        drain and exit. The poller does not load it again until it is loaded by name."""
        versions = sorted(self.supervisor.versions_of(name))
        if not versions:
            raise ModelNotFound(f"model {quote(name)} is not loaded; loaded: "
                                f"{', '.join(sorted(self.supervisor.replicas)) or 'none'}")
        self.unload_after.pop(name, None)
        for version in versions:
            self._unload_version(name, version)
        self.unloaded.add(name)
        self.applied.pop(name, None)
        log.info("unload model=%s versions=%s", quote(name), ",".join(versions))
        return {"model": name, "unloading": versions}

    def _unload_version(self, name: str, version: str) -> None:
        for slot in self.supervisor.remove_version(name, version):
            if slot.identity not in self.state.workers:  # still loading: nothing to drain
                self.supervisor.terminate(slot)
        self.state.unload(name, version)
        self._sync_starting()

    def repository_index(self) -> list[dict]:
        """Every model the pool can serve, in the V2 repository extension's form: one row per loaded
        version (name, version, state, reason), one row without a version per model not loaded."""
        rows = []
        for entry in self.state.entries():
            rows.append({"name": entry.name.decode(errors="replace"), "version": entry.version,
                         "state": entry.status, "reason": entry.load_error or ""})
        loaded = {row["name"] for row in rows}
        names = set(self.static)
        if self.repo:
            try:
                names.update(repository.model_names(self.repo))
            except ConfigError as exc:
                log.warning("model repository: %s", exc)
        for name in sorted(names - loaded):
            reason = self.repo_errors.get(name) or ("unloaded" if name in self.unloaded else "not loaded")
            rows.append({"name": name, "version": "", "state": "UNAVAILABLE", "reason": reason})
        return sorted(rows, key=lambda r: (r["name"], r["version"]))

    def _maybe_poll(self) -> None:
        now = time.monotonic()
        if now < self.next_poll:
            return
        self.next_poll = now + self.config.repository.poll_seconds
        try:
            self.poll()
        except Exception:  # a bug here must not stop the loop; the next poll tries again
            log.exception("model repository poll failed")

    def poll(self) -> None:
        """One look at the repository ("poll" mode): a model or version that appeared or changed, and
        has not changed since the last look, is loaded; a model whose directory is gone is unloaded."""
        try:
            names = repository.model_names(self.repo)
        except ConfigError as exc:
            self.state.limited.warning("repository unreadable", "model repository: %s", exc)
            return
        for name in names:
            if name in self.static or name in self.unloaded:
                continue
            model = repository.read_model(self.repo, name)
            if model.error is not None:
                if self.repo_errors.get(name) != model.error:
                    log.error("model repository: %s; what runs of it keeps running", model.error)
                self.repo_errors[name] = model.error
                self._seen.pop(name, None)
                continue
            self.repo_errors.pop(name, None)
            if self._seen.get(name) != model.signature:  # new or still changing: look again next time
                self._seen[name] = model.signature
                continue
            if self.applied.get(name) != model.signature:
                self.applied[name] = model.signature
                self._apply(name, model.configs)
        for name in [n for n in self.applied if n not in names]:
            log.info("model repository: directory of model=%s is gone; unloading it", quote(name))
            self.unload(name)
            self.unloaded.discard(name)  # it loads again if its directory comes back
            self._seen.pop(name, None)

    def _retire(self, slot: Slot) -> None:
        """Drain a leaving worker (registered) or stop it (still loading)."""
        if not self.state.retire(slot.identity):
            self.supervisor.terminate(slot)

    def _replace_and_retire(self) -> None:
        """Workers past their limits get successors; those whose successor is ready retire."""
        sup, state = self.supervisor, self.state
        while state.recycle:
            sup.replace(state.recycle.pop())
        while sup.to_retire:
            self._retire(sup.to_retire.pop())

    def _sync_starting(self) -> None:
        for (name, version), count in self.supervisor.starting_counts().items():
            self.state.set_starting(name, count, version)

    def _handle_lost(self) -> None:
        lost = self.state.lost_workers
        while lost:
            identity, reason = lost.pop()
            self.state.limited.warning("workers declared dead", "worker=%s declared dead: %s", quote(identity),
                                       reason, burst=50)
            if self.supervisor is not None:
                self.supervisor.kill(identity)
            self.state.outbox_workers.append([identity, *encode_disconnect()])

    def _check_start(self) -> bool:
        """Until every model is up: True when a model failed to load and exit_on_error says stop."""
        models = self.state.entries()
        failed = [e for e in models if e.load_error and e.ready == 0]
        if failed and self.config.exit_on_error:
            now = time.monotonic()
            if self._fail_by is None:
                self._fail_by = now + _LOAD_ERROR_GRACE
            if now < self._fail_by:
                return False
            for entry in failed:
                log.error("model=%s failed to load at start: %s; stopping the pool (set exit_on_error = false "
                          "in [pool] to serve the other models anyway)", quote(entry.name), quote(entry.load_error, 1000))
            self.exit_code = EXIT_LOAD_FAILED  # the launcher exits as its failed worker did
            return True
        self.started = all(e.ready >= e.expected or e.load_error for e in models)
        return False

    def _maybe_announce(self) -> None:
        if self.started and not self.announced and self.on_ready is not None:
            self.announced = True
            self.on_ready(self)

    def _handle_signals(self, stop_by: float | None) -> float | None:
        while self.signals:
            signum = self.signals.pop(0)
            if stop_by is not None:
                log.warning("second signal (%s): forcing stop", signal.Signals(signum).name)
                raise _ForcedStop()
            log.info("%s: no longer admitting; finishing in-flight requests (up to %.0fs)",
                     signal.Signals(signum).name, self.config.drain_timeout)
            self.state.stop_admitting()
            if self.supervisor is not None:
                self.supervisor.stopping = True
            if self.gateway is not None:
                self.gateway.stop_admitting()  # it finishes its requests in flight while the broker drains
            stop_by = time.monotonic() + self.config.drain_timeout
        return stop_by

    def _finish(self, *, forced: bool) -> int:
        if forced:
            if self.gateway is not None:
                self.gateway.kill()
            if self.supervisor is not None:
                self.supervisor.kill_all()
            self.exit_code = 1
        else:
            if self.gateway is not None:
                self.gateway.stop(timeout=5.0)
            self.state.disconnect_all()
            self._flush()
            if self.supervisor is not None:
                self.supervisor.stop(timeout=5.0)
        log.info("broker stopped (%s)", "forced" if forced else "graceful")
        return self.exit_code

    def close(self) -> None:
        """Close sockets, terminate the context, remove the private ipc directory."""
        if self.gateway is not None:
            self.gateway.kill()
        if self.supervisor is not None:
            self.supervisor.kill_all()
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        self.frontend.close(linger=0)
        self.backend.close(linger=0)
        self.ctx.term()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)


class _ForcedStop(Exception):
    pass


EXIT_GATEWAY_FAILED = 4  # serve: the KServe V2 gateway could not bind its ports at start


def _version() -> str:
    from modelpool import __version__

    return __version__


_TMP_PREFIX = "modelpool-"
_OWNER_FILE = "launcher.pid"  # "<pid> <start time>" of the launcher that owns the directory


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc), to tell a reused pid apart; "" if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _owner_alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return not started or not _start_time(pid) or _start_time(pid) == started


def remove_stale_dirs(tmp: str | None = None) -> list[str]:
    """Remove private ipc directories left by launchers that died (SIGKILL cannot clean up).

    Only directories of this user whose recorded launcher process is gone; a directory without the
    record (another program's, or one being created) is left alone.
    """
    tmp = tmp or tempfile.gettempdir()
    removed = []
    try:
        names = [n for n in os.listdir(tmp) if n.startswith(_TMP_PREFIX)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(tmp, name)
        try:
            if os.lstat(path).st_uid != os.getuid() or not os.path.isdir(path) or os.path.islink(path):
                continue
            with open(os.path.join(path, _OWNER_FILE)) as f:
                fields = f.read().split()
            pid, started = int(fields[0]), fields[1] if len(fields) > 1 else ""
        except (OSError, ValueError, IndexError):
            continue
        if pid != os.getpid() and not _owner_alive(pid, started):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d ipc directories left by launchers that are gone", len(removed))
    return removed


def _read_all(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
