"""Starts, watches and restarts local worker processes (spawn, never fork)."""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Callable

from modelpool.broker.config import ModelConfig, PoolConfig, default_threads
from modelpool.modelproc.spec import WorkerSpec

log = logging.getLogger(__name__)

EXIT_LOAD_FAILED = 3  # mirrors modelproc.worker.EXIT_LOAD_FAILED without importing the worker
STABLE_AFTER = 10.0  # seconds READY after which a crash counts as the first of a new series


@dataclass(eq=False)
class Slot:
    """One replica position: the process filling it now and its restart history."""

    model: ModelConfig
    index: int
    generation: int = 0
    process: BaseProcess | None = None
    identity: bytes = b""
    failures: int = 0
    restart_at: float | None = 0.0
    ready_since: float | None = None
    started_at: float = 0.0
    retiring: bool = False  # leaves for good (scaled down, replaced): its exit is not restarted
    successor_of: Slot | None = None  # started to replace that slot, which retires once this one is ready
    replaced_by: Slot | None = None  # its successor, while that one warms up


class Supervisor:
    """Local replicas of every loaded model version, kept alive with capped exponential backoff."""

    def __init__(self, config: PoolConfig, backend: str, *, now: Callable[[], float] = time.monotonic,
                 models: tuple[ModelConfig, ...] | None = None) -> None:
        self.config = config
        self.backend = backend
        self.now = now
        self.ctx = multiprocessing.get_context("spawn")
        models = config.models if models is None else models
        self.versions: dict[tuple[str, str], ModelConfig] = {}  # (name, version) -> how it runs
        self.slots: list[Slot] = []
        self.replicas: dict[str, int] = {}  # per model name, replicas of each of its versions
        self._next_index: dict[str, int] = {}
        self.by_identity: dict[bytes, Slot] = {}
        self.to_retire: list[Slot] = []  # ready slots whose successor is ready: the broker drains them
        self.stopping = False
        self._auto_threads = default_threads(sum(m.replicas for m in models))
        for m in models:
            self.add_version(m)

    def add_version(self, model: ModelConfig) -> None:
        """Run a model version: its replicas start on the next ``start_due``."""
        self.versions[(model.name, model.version)] = model
        count = self.replicas.setdefault(model.name, model.replicas)
        for _ in range(count):
            self.slots.append(Slot(model, self._new_index(model.name)))

    def remove_version(self, name: str, version: str) -> list[Slot]:
        """Stop running a model version: its slots retire. Returns those whose process is registered
        or starting: the caller drains or stops them."""
        self.versions.pop((name, version), None)
        if not any(n == name for n, _ in self.versions):
            self.replicas.pop(name, None)
        slots = [s for s in self.slots if s.model.name == name and s.model.version == version and not s.retiring]
        return [slot for slot in slots if self._retire(slot)]

    def versions_of(self, name: str) -> dict[str, ModelConfig]:
        """The versions of ``name`` that run here, by version."""
        return {v: m for (n, v), m in self.versions.items() if n == name}

    def _spec(self, slot: Slot) -> WorkerSpec:
        m = slot.model
        threads = m.threads or self._auto_threads
        return WorkerSpec(
            model=m.name, path=m.path, backend=self.backend, identity=slot.identity, version=m.version,
            max_batch_size=m.max_batch_size, prefetch=m.prefetch, pad_to_bucket=m.pad_to_bucket,
            intra_threads=threads, inter_threads=1 if threads <= 2 else 2, device=m.device, imports=m.imports,
            heartbeat_interval=self.config.heartbeat_interval, heartbeat_liveness=self.config.heartbeat_liveness,
            parent_pid=os.getpid(), log_level=self.config.log_level,
        )

    def start_due(self) -> bool:
        """Start every empty slot whose restart time has come; True if any started."""
        if self.stopping:
            return False
        now = self.now()
        started = False
        for slot in self.slots:
            if slot.process is None and slot.restart_at is not None and slot.restart_at <= now:
                self._start(slot)
                started = True
        return started

    def starting_counts(self) -> dict[tuple[str, str], int]:
        """Per (model, version), replicas whose process runs but has not sent READY yet."""
        counts = dict.fromkeys(self.versions, 0)
        for slot in self.slots:
            if slot.process is not None and slot.ready_since is None:
                key = (slot.model.name, slot.model.version)
                counts[key] = counts.get(key, 0) + 1
        return counts

    def _start(self, slot: Slot) -> None:
        from modelpool.modelproc.worker import main as worker_main  # TensorFlow-free module

        slot.generation += 1
        slot.identity = f"{slot.model.name}/{slot.index}/{slot.generation}".encode()
        process = self.ctx.Process(target=worker_main, args=(self._spec(slot),),
                                   name=f"modelpool-{slot.model.name}-{slot.index}", daemon=True)
        process.start()
        slot.process, slot.restart_at, slot.ready_since, slot.started_at = process, None, None, self.now()
        self.by_identity[slot.identity] = slot
        log.info("started worker model=%s replica=%d pid=%d", slot.model.name, slot.index, process.pid)

    def next_restart(self) -> float | None:
        """When the next pending restart is due."""
        due = [s.restart_at for s in self.slots if s.process is None and s.restart_at is not None]
        return min(due) if due else None

    def sentinels(self) -> dict[int, Slot]:
        """Process sentinels (fds readable when the process ends) of running workers."""
        return {s.process.sentinel: s for s in self.slots if s.process is not None}

    def mark_ready(self, identity: bytes) -> bool:
        """A local worker is registered with the broker; True the first time. A successor being ready
        puts the slot it replaces on ``to_retire``."""
        slot = self.by_identity.get(identity)
        if slot is None or slot.ready_since is not None:
            return False
        slot.ready_since = self.now()
        log.info("worker ready model=%s replica=%d pid=%s after %.1fs", slot.model.name, slot.index,
                 slot.process.pid if slot.process else None, slot.ready_since - slot.started_at)
        old = slot.successor_of
        if old is not None:
            slot.successor_of = old.replaced_by = None
            old.retiring = True
            self.to_retire.append(old)
        return True

    # --- runtime changes: scale, replace (reload, recycling), retire ---------------------------

    def live(self, model: str, version: str | None = None) -> list[Slot]:
        """The model's replicas that stay (of one version, or of all): neither retiring nor about to
        be replaced."""
        return [s for s in self.slots if s.model.name == model and not s.retiring and s.replaced_by is None
                and (version is None or s.model.version == version)]

    def scale(self, model: str, replicas: int) -> list[Slot]:
        """Keep ``replicas`` local replicas of each version of ``model``: new slots start on the next
        ``start_due``; the slots past the count retire (those not ready first, then the newest).
        Returns the retired slots whose process is registered or starting: the caller drains or stops them."""
        self.replicas[model] = replicas
        retired = []
        for version, config in self.versions_of(model).items():
            live = self.live(model, version)
            for _ in range(replicas - len(live)):
                self.slots.append(Slot(config, self._new_index(model)))
            victims = sorted(live, key=lambda s: (s.ready_since is None, s.index), reverse=True)
            retired += [slot for slot in victims[:max(0, len(live) - replicas)] if self._retire(slot)]
        return retired

    def replace(self, identity: bytes, config: ModelConfig | None = None) -> bool:
        """Start a successor (running ``config``, by default the same) for a ready local worker; once
        it is ready, the old one retires. False for a worker that is not ours, not ready, retiring or
        already being replaced."""
        slot = self.by_identity.get(identity)
        if slot is None or slot.retiring or slot.replaced_by is not None or slot.ready_since is None or self.stopping:
            return False
        successor = Slot(config or slot.model, self._new_index(slot.model.name), successor_of=slot)
        slot.replaced_by = successor
        self.slots.append(successor)
        return True

    def reload(self, model: str, config: ModelConfig | None = None) -> int:
        """Replace every ready replica of ``model`` (of ``config``'s version, with ``config``, when
        given) by a fresh process; how many are being replaced."""
        version = None if config is None else config.version
        if config is not None:
            self.versions[(model, config.version)] = config
            for slot in self.live(model, version):
                if slot.process is None:  # not started yet (or waiting to restart): runs the new config
                    slot.model = config
        return sum(self.replace(s.identity, config) for s in self.live(model, version) if s.process is not None)

    def _new_index(self, model: str) -> int:
        index = self._next_index.get(model, 0)
        self._next_index[model] = index + 1
        return index

    def _retire(self, slot: Slot) -> bool:
        """Mark a slot as leaving; True when its process runs (the caller drains or stops it), False
        when it had none and is gone already."""
        slot.retiring = True
        if slot.successor_of is not None:  # a successor scaled away: the old one stays
            slot.successor_of.replaced_by = None
            slot.successor_of = None
        if slot.process is None:
            self.slots.remove(slot)
            return False
        return True

    def terminate(self, slot: Slot) -> None:
        """SIGTERM a retiring worker that is not registered (still loading); its exit is reaped as usual."""
        if slot.process is not None and slot.process.pid:
            try:
                os.kill(slot.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def reap(self, slot: Slot) -> str | None:
        """Collect an exited worker and schedule its restart; returns why it exited, or None if the
        process has not been reaped yet (its sentinel fires a moment before waitpid can collect it:
        ask again shortly, never block the broker's loop on it)."""
        process = slot.process
        process.join(0)
        code = process.exitcode
        if code is None:
            return None
        was_ready = slot.ready_since is not None
        now = self.now()
        if was_ready and now - slot.ready_since >= STABLE_AFTER:
            slot.failures = 0
        reason = _describe_exit(code)
        slot.process = None
        self.by_identity.pop(slot.identity, None)
        if self.stopping or slot.retiring:
            slot.restart_at = None
            if slot.retiring:
                self.slots.remove(slot)
                log.info("worker retired model=%s replica=%d pid=%d %s", slot.model.name, slot.index, process.pid,
                         reason)
            return reason
        if slot.successor_of is not None and code == EXIT_LOAD_FAILED:
            # The replacement cannot load: the old process keeps serving, and the error is reported.
            old, slot.successor_of = slot.successor_of, None
            old.replaced_by = None
            slot.retiring = True
            self.slots.remove(slot)
            log.warning("replacement worker model=%s replica=%d failed to load; replica %d keeps serving",
                        slot.model.name, slot.index, old.index)
            return reason
        delay = self._backoff(slot, code)
        slot.failures += 1
        slot.restart_at = now + delay
        log_fn = log.info if code == 0 else log.warning
        log_fn("worker exited model=%s replica=%d pid=%d %s; restart in %.1fs", slot.model.name, slot.index,
               process.pid, reason, delay)
        return reason

    def _backoff(self, slot: Slot, code: int | None) -> float:
        cap = self.config.restart_backoff_max
        if code == EXIT_LOAD_FAILED:
            return min(cap, 1.0 * 2 ** slot.failures)
        if slot.failures == 0:
            return 0.0
        return min(cap, 0.5 * 2 ** (slot.failures - 1))

    def kill(self, identity: bytes) -> None:
        """SIGKILL a local worker (hung or silent); its sentinel then reports the exit."""
        slot = self.by_identity.get(identity)
        if slot is not None and slot.process is not None and slot.process.pid:
            log.warning("killing worker model=%s replica=%d pid=%d", slot.model.name, slot.index, slot.process.pid)
            try:
                os.kill(slot.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float) -> None:
        """Wait for workers to leave (they were sent DISCONNECT), then terminate, then kill."""
        self.stopping = True
        deadline = self.now() + timeout
        for slot in self.slots:
            if slot.process is not None:
                slot.process.join(max(0.0, deadline - self.now()))
        for slot in self.slots:
            p = slot.process
            if p is not None and p.is_alive():
                p.terminate()
                p.join(2.0)
                if p.is_alive():
                    p.kill()
                    p.join(2.0)
            slot.process = None

    def kill_all(self) -> None:
        """Forced stop: SIGKILL every worker now."""
        self.stopping = True
        for slot in self.slots:
            if slot.process is not None:
                slot.process.kill()
                slot.process.join(2.0)
                slot.process = None



def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == EXIT_LOAD_FAILED:
        return "failed to load its model"
    return f"exit code {code}"
