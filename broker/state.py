"""The broker's bookkeeping as plain data: models, workers, queues, batches, expiry.

No sockets here. Every event method appends the messages it wants sent to ``outbox_clients`` and
``outbox_workers`` (identity first); the socket loop in ``broker.server`` calls ``dispatch()`` and
drains them. The clock is injected so that unit tests drive time by hand.

The broker is the only queue. Workers pull: each announces how many rows a batch may hold and how
many batches it takes ahead (prefetch); the broker keeps every other request in the model's queue
and forms each batch there (``broker.batcher``), so queue depth, queue time, 429 and deadlines are
decided in one place.
"""
from __future__ import annotations

import enum
import functools
import heapq
import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from modelpool.broker.batcher import DONE, INFLIGHT, QUEUED, Batch, Batcher, Pending
from modelpool.broker.logutil import LogLimiter
from modelpool.broker.metrics import (
    REASONS,
    TIMEOUT,
    WORKER_CRASHED,
    ModelMetrics,
    ModelSnapshot,
    reason_of_error,
    reason_of_status,
)
from modelpool.client import protocol
from modelpool.client.errors import (
    Forbidden,
    InvalidInput,
    ModelNotFound,
    NotSupported,
    Overloaded,
    PoolError,
    RequestTimeout,
    Unavailable,
    WorkerCrashed,
)
from modelpool.client.protocol import BatchItem, ReplyItem, describe, quote

log = logging.getLogger(__name__)


class WorkerState(enum.Enum):
    """Lifecycle of one registered worker."""

    READY = "ready"
    DRAINING = "draining"  # retiring (scaled down, replaced): finishes what it holds, takes nothing new
    GONE = "gone"


_MOVES = {
    WorkerState.READY: {WorkerState.DRAINING, WorkerState.GONE},
    WorkerState.DRAINING: {WorkerState.GONE},
    WorkerState.GONE: set(),
}


class IllegalTransition(RuntimeError):
    """A worker was asked to move between states that have no edge."""


DEFAULT_MAX_QUEUE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_HELD_BYTES = 512 * 1024 * 1024
MAX_BATCH_ROWS = 1 << 16  # whatever a worker's READY claims
MAX_PREFETCH = 8  # batches a worker may take ahead of the one it runs
_HEADER_CACHE_SIZE = 1024  # distinct inference headers remembered (the cache starts over when full) ...
_HEADER_CACHE_BYTES = 4096  # ... of at most this size each: a peer cannot make it hold much
MAX_WORKERS_PER_MODEL = 256  # registrations past this are refused: peers cannot pile them up
MAX_VERSIONS = 64  # versions of one model the broker tracks (remote workers can announce new ones)
_METADATA = {"op": "metadata"}


@dataclass(eq=False)
class Worker:
    """A registered worker process serving one model."""

    identity: bytes
    model: bytes
    version: str
    max_rows: int  # rows one batch may hold
    slots: int  # batches it may hold unanswered: the one it runs and those prefetched
    pid: int | None
    expiry: float
    state: WorkerState = WorkerState.READY
    inflight: dict = field(default_factory=dict)  # (client, rid) -> Pending
    batches: int = 0  # batches sent and not answered in full
    last_heard: float = 0.0
    last_sent: float = 0.0  # when it last got a batch: idle workers take turns
    solo: bool = False  # runs a request that was in flight on a worker that died: nothing else meanwhile
    batches_sent: int = 0
    rows_sent: int = 0
    load_seconds: float | None = None  # from READY: how long the model took to load and warm up
    rss_bytes: int | None = None  # resident memory, from READY and the stats of REPLIES and HEARTBEAT
    answered: int = 0  # requests it answered
    recycling: bool = False  # past max_requests or max_memory: asked to be replaced
    entry: Any = None  # the ModelEntry (model version) it serves

    def move(self, new: WorkerState) -> None:
        """Change state along a legal edge."""
        if new not in _MOVES[self.state]:
            raise IllegalTransition(f"worker {quote(self.identity)}: {self.state.value} -> {new.value}")
        self.state = new

    @property
    def usable(self) -> bool:
        return self.state is WorkerState.READY and not self.solo


@dataclass(eq=False)
class ModelEntry:
    """Everything the broker knows about one served version of a model (most models have one)."""

    name: bytes
    max_queue: int
    max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES
    batcher: Batcher = field(default_factory=Batcher)
    held_bytes: int = 0  # payload bytes of this model's requests, queued and in flight
    # Requests that were in flight on a worker that died: each runs alone on an idle worker, so
    # that a poison input takes no innocent request with it.
    suspects: deque = field(default_factory=deque)
    suspects_queued: int = 0
    reserved: Worker | None = None  # left to drain for the next suspect; gets no new batches
    workers: dict = field(default_factory=dict)
    expected: int = 0  # local replicas the supervisor keeps alive
    starting: int = 0
    failed: int = 0
    load_error: str | None = None
    metadata: dict | None = None
    version: str = ""
    wake_at: float | None = None  # a batch waits for more rows (max_delay) until then
    max_requests: int = 0  # a worker that answered this many is replaced (0: never)
    max_memory_bytes: int = 0  # a worker whose resident memory passes this is replaced (0: never)
    # Outcomes, request/queue/compute time and batch sizes (broker.metrics): what `served`, `errors`,
    # `client_errors`, `dispatched` and `queue_seconds` read.
    metrics: ModelMetrics = field(default_factory=ModelMetrics)
    retried: int = 0
    crashed: int = 0
    expired: int = 0  # answered 504 by the broker before they reached a worker
    recycled: int = 0  # workers replaced for max_requests or max_memory_mb
    batches: int = 0  # BATCH messages sent, and their rows
    batch_rows: int = 0
    load_seconds: float | None = None  # the last READY's load time
    unloading: bool = False  # takes no new requests; serves its queue, then its workers drain and leave

    @property
    def served(self) -> int:
        """Requests answered 200."""
        return self.metrics.success

    @property
    def errors(self) -> int:
        """Requests answered 5xx: the model raised, crashed, timed out or was unavailable."""
        return self.metrics.errors

    @property
    def client_errors(self) -> int:
        """Requests answered 4xx: bad requests and 429s are not the model's failures."""
        return self.metrics.client_errors

    @property
    def dispatched(self) -> int:
        """Requests sent to workers (retries included)."""
        return self.metrics.queue.count

    @property
    def queue_seconds(self) -> float:
        """Summed over dispatched requests: admission (or requeue) to dispatch."""
        return self.metrics.queue.sum

    @property
    def queued(self) -> int:
        """Requests waiting in the broker (the queue and retries), not yet sent to a worker."""
        return self.batcher.queue.requests + self.suspects_queued

    @property
    def ready(self) -> int:
        return sum(1 for w in self.workers.values() if w.state is WorkerState.READY)

    def has_ready(self) -> bool:
        """Whether a replica is ready (``ready > 0`` without counting them all)."""
        return any(w.state is WorkerState.READY for w in self.workers.values())

    @property
    def in_flight(self) -> int:
        return sum(len(w.inflight) for w in self.workers.values())

    @property
    def memory_bytes(self) -> int | None:
        """Resident memory of the registered workers, summed; None while none has said."""
        sizes = [w.rss_bytes for w in list(self.workers.values()) if w.rss_bytes is not None]
        return sum(sizes) if sizes else None

    @property
    def status(self) -> str:
        """READY, LOADING, UNLOADING or UNAVAILABLE (the V2 repository extension's states)."""
        if self.unloading:
            return "UNLOADING"
        if self.has_ready():
            return "READY"
        return "LOADING" if (self.starting or self.expected) and not self.load_error else "UNAVAILABLE"

    def summary(self, detail: bool = False, default: bool = True) -> dict:
        """The version's mmi.models entry; ``detail`` adds worker ids and pids (operators only)."""
        return {
            "name": self.name.decode(errors="replace"),
            "version": self.version,
            "default": default,
            "state": self.status,
            "replicas_ready": self.ready,
            "replicas_starting": self.starting,
            "replicas_failed": self.failed,
            "replicas_expected": self.expected,
            "queue_depth": self.queued,
            "queue_rows": self.batcher.queue.rows + sum(p.rows for p in self.suspects if p.where is QUEUED),
            "max_queue": self.max_queue,
            "queue_bytes": self.held_bytes,
            "max_queue_bytes": self.max_queue_bytes,
            "in_flight": self.in_flight,
            "served": self.served,
            "errors": self.errors,
            "client_errors": self.client_errors,
            "expired": self.expired,
            "recycled": self.recycled,
            "retried": self.retried,
            "crashed_requests": self.crashed,
            "dispatched": self.dispatched,
            "queue_seconds": round(self.queue_seconds, 6),
            "batches": self.batches,
            "batch_rows": self.batch_rows,
            "load_error": self.load_error,
            **self._metrics_summary(),
            "workers": [
                {**({"id": w.identity.decode(errors="replace"), "pid": w.pid} if detail else {}),
                 "state": w.state.value, "max_batch_size": w.max_rows, "prefetch": w.slots - 1,
                 "in_flight": len(w.inflight), "batches": w.batches_sent, "rows": w.rows_sent,
                 "load_seconds": w.load_seconds, "rss_bytes": w.rss_bytes}
                for w in self.workers.values()
            ],
        }

    def _metrics_summary(self) -> dict:
        """The summed numbers of broker.metrics (Triton's statistics extension is built from these)."""
        m = self.metrics
        return {
            "success": m.success,
            "failed": m.failed_total,
            "failures": dict(zip(REASONS, m.failures)),
            "request_seconds": round(m.request_ok.sum, 6),
            "failed_request_seconds": round(m.request_failed.sum, 6),
            "executions": m.compute.count,
            "inferences": int(m.batch.sum),
            "compute_seconds": round(m.compute.sum, 6),
            "last_call_ms": m.last_call_ms,
            "worker_restarts": m.restarts,
            "load_seconds": self.load_seconds,
            "memory_bytes": self.memory_bytes,
        }

    def snapshot(self) -> ModelSnapshot:
        """A copy of the model's metrics; safe to take from another thread (the scrape's) while the
        broker's loop counts, as every container is copied in one step under the GIL."""
        m = self.metrics
        workers = list(self.workers.values())
        return ModelSnapshot(
            name=self.name.decode(errors="replace"), version=self.version, success=m.success,
            failures=dict(zip(REASONS, list(m.failures))), histograms=m.histograms(),
            pending=self.queued, in_flight=sum(len(w.inflight) for w in workers), queue_bytes=self.held_bytes,
            replicas_ready=sum(1 for w in workers if w.state is WorkerState.READY),
            replicas_starting=self.starting, replicas_expected=self.expected, load_failures=self.failed,
            restarts=m.restarts, retried=self.retried, load_seconds=self.load_seconds,
            memory_bytes=self.memory_bytes,
        )


class PoolState:
    """Routing state of the broker."""

    def __init__(
        self,
        *,
        now: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        heartbeat_interval: float = protocol.HEARTBEAT_INTERVAL,
        heartbeat_liveness: int = protocol.HEARTBEAT_LIVENESS,
        hang_timeout: float = 60.0,
        default_max_queue: int = 1024,
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
        mmi_detail: bool = False,
    ) -> None:
        self.mmi_detail = mmi_detail
        self.now = now
        self.started_at = now()
        self.wall = wall  # Unix time, sent with each batch so that a worker can age what it reads late
        self.max_held_bytes = max_held_bytes
        self.limited = LogLimiter(log, now=now)  # for every line a peer can cause at will
        self.held_bytes = 0  # payload bytes of every request held, queued or in flight
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_liveness = heartbeat_liveness
        self.hang_timeout = hang_timeout
        self.default_max_queue = default_max_queue
        # Every served version by model name, and per name the version a request that names none goes
        # to: the newest ready one (or, while none is ready, the newest loading one).
        self.versions: dict[bytes, dict[str, ModelEntry]] = {}
        self.models: dict[bytes, ModelEntry] = {}
        self.workers: dict[bytes, Worker] = {}
        self.held: dict[tuple[bytes, bytes], Pending] = {}  # (client, rid) of every request not answered
        self.duplicates = 0  # requests dropped because their id was pending from the same client
        self.admitting = True
        self.outbox_clients: list[list] = []
        self.outbox_workers: list[list] = []
        self.lost_workers: list[tuple[bytes, str]] = []  # (identity, reason) for the supervisor
        self.recycle: list[bytes] = []  # workers past their model's max_requests/max_memory, for the supervisor
        # Runtime control (mmi.scale, reload, load, unload, repository): set by the launcher that owns the workers; called
        # with (service, header), returns the answer's header or raises PoolError.
        self.control: Callable[[bytes, dict], dict] | None = None
        self.peer_local = True  # the client of the message being handled is on this host (control allowed)
        self._dirty: set[ModelEntry] = set()  # models whose queue or workers changed since dispatch()
        self._deadlines: list[tuple[float, int, Pending]] = []
        self._seq = itertools.count()
        # Inference headers seen lately, as received -> (header, batch key, rows, tensor frames): a
        # client sends the same header again and again, and this skips decoding and checking it.
        self._headers: dict[bytes, tuple[dict, Any, int, int]] = {}
        self._mmi = {
            protocol.MMI_SERVICE: self._mmi_service,
            protocol.MMI_MODELS: self._mmi_models,
            protocol.MMI_HEALTH: self._mmi_health,
            protocol.MMI_METRICS: self._mmi_metrics,
            **{service: functools.partial(self._mmi_control, service=service) for service in protocol.MMI_CONTROL},
            protocol.MMI_REPOSITORY: functools.partial(self._mmi_control, service=protocol.MMI_REPOSITORY),
        }

    # --- configuration -------------------------------------------------------------------

    def add_model(self, name: str, *, max_queue: int | None = None, expected: int = 0, version: str = "",
                  max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES, max_delay_ms: float = 0.0, max_requests: int = 0,
                  max_memory_mb: float = 0) -> None:
        """Declare a served model version; workers may register only for declared models."""
        key = name.encode()
        family = self.versions.setdefault(key, {})
        entry = family.get(version)
        if entry is None or entry.unloading:
            if entry is not None:  # loaded again while its old workers drain: they keep draining apart
                self._drop(entry)
                family = self.versions.setdefault(key, {})
            entry = family[version] = ModelEntry(key, max_queue or self.default_max_queue, max_queue_bytes)
        entry.max_queue = max_queue or self.default_max_queue
        entry.max_queue_bytes = max_queue_bytes
        entry.expected = expected
        entry.version = version
        entry.batcher.max_delay = max_delay_ms / 1000.0
        entry.max_requests = max_requests
        entry.max_memory_bytes = int(max_memory_mb * 1024 * 1024)
        self._reroute(key)

    def entries(self) -> list[ModelEntry]:
        """Every served model version."""
        return [entry for family in self.versions.values() for entry in family.values()]

    def _select(self, model: str, version: str | None) -> list[ModelEntry]:
        """The model's entry for ``version``, or all of its versions when None."""
        family = self.versions.get(model.encode(), {})
        if version is None:
            return list(family.values())
        return [family[version]] if version in family else []

    def _reroute(self, name: bytes) -> None:
        """Point requests that name no version at the newest ready version (or the newest that loads)."""
        live = [e for e in self.versions.get(name, {}).values() if not e.unloading]
        if not live:
            self.models.pop(name, None)
            return
        ready = [e for e in live if e.has_ready()]
        loading = [e for e in live if e.expected or e.starting]
        self.models[name] = max(ready or loading or live, key=_newest)

    def unload(self, model: str, version: str | None = None) -> int:
        """Stop routing to a version (every version when None): it serves the requests it has queued,
        then its workers drain and leave, and it is forgotten. How many versions that concerns."""
        entries = [e for e in self._select(model, version) if not e.unloading]
        for entry in entries:
            entry.unloading = True
            entry.expected = 0
            self._dirty.add(entry)
        self._reroute(model.encode())
        return len(entries)

    def _settle_unload(self, entry: ModelEntry) -> None:
        """An unloading version whose queue is empty lets its workers go; with none left it is dropped."""
        if entry.queued and not entry.has_ready():
            self._fail_queue(entry, Unavailable(f"version {quote(entry.version)} of model {quote(entry.name)} "
                                                "was unloaded before it could serve this request"))
        if entry.queued:
            return
        for worker in list(entry.workers.values()):
            if worker.state is WorkerState.READY:
                self.retire(worker.identity)
        if not entry.workers:
            self._drop(entry)

    def _drop(self, entry: ModelEntry) -> None:
        family = self.versions.get(entry.name, {})
        if family.get(entry.version) is entry:
            del family[entry.version]
        if not family:
            self.versions.pop(entry.name, None)
        self._dirty.discard(entry)
        self._reroute(entry.name)

    def set_expected(self, model: str, count: int, version: str | None = None) -> None:
        """How many local replicas of the model version (every version: None) the supervisor keeps."""
        for entry in self._select(model, version):
            if entry.unloading:
                continue
            entry.expected = count
            self._dirty.add(entry)
            if count == 0 and entry.ready == 0:
                self._fail_queue(entry, Unavailable(f"model {quote(entry.name)} was scaled to 0 replicas"))
        self._reroute(model.encode())

    def retire(self, identity: bytes) -> bool:
        """A worker leaves for good: it finishes what it holds and takes nothing new, then is sent
        DISCONNECT (and exits). False for a worker that is not registered."""
        worker = self.workers.get(identity)
        if worker is None:
            return False
        entry = worker.entry
        if worker.state is WorkerState.READY:
            worker.move(WorkerState.DRAINING)
            if entry.reserved is worker:
                entry.reserved = None
            self._dirty.add(entry)
        if not worker.inflight:
            self._release(worker)
        return True

    def _release(self, worker: Worker) -> None:
        """A drained worker is sent away."""
        self.outbox_workers.append([worker.identity, *protocol.encode_disconnect()])
        self._forget(worker)

    def set_starting(self, model: str, count: int, version: str | None = None) -> None:
        """How many local replicas of the model version are starting (process up, not READY yet)."""
        for entry in self._select(model, version):
            entry.starting = count

    def load_failed(self, model: str, reason: str, version: str | None = None) -> None:
        """A local replica failed to load; clients get 503 with the reason while none is ready.
        ``version`` None: the version requests go to."""
        if version is None or version not in self.versions.get(model.encode(), {}):
            entry = self.models.get(model.encode())
        else:
            entry = self.versions[model.encode()][version]
        if entry is None:
            return
        self.limited.log(logging.ERROR, f"load failures of model {model}", "model=%s version=%s failed to load: %s",
                         quote(model), quote(entry.version), quote(reason, 500))
        entry.load_error = reason
        entry.failed += 1
        if entry.ready == 0:
            self._fail_queue(entry, Unavailable(f"model {quote(entry.name)}{_version_words(entry)} failed to load: "
                                                f"{reason}"))
        self._reroute(entry.name)

    # --- client side ---------------------------------------------------------------------

    def client_message(self, client: bytes, frames: Sequence[Any]) -> None:
        """A message from a client (identity stripped); malformed ones are answered 400 or dropped.

        No exception escapes: one message must never stop the broker's loop.
        """
        try:
            self._client_message(client, frames)
        except Exception:
            self.limited.log(logging.ERROR, "internal error on a client message",
                             "internal error on a client message client=%s", client.hex()[:64], exc_info=True)
            self._answer_unhandled(client, frames)

    def _answer_unhandled(self, client: bytes, frames: Sequence[Any]) -> None:
        try:
            model, rid = protocol.frame_bytes(frames[2]), protocol.frame_bytes(frames[3])
        except Exception:
            return
        if 0 < len(rid) <= protocol.MAX_ID_BYTES:
            self._reply_error(client, model, rid, InvalidInput("the broker could not handle this request"))

    def _client_message(self, client: bytes, frames: Sequence[Any]) -> None:
        if len(frames) > 5:
            known = self._headers.get(frames[4])
            if known is not None and self._known_request(client, frames, known):
                return
        if protocol.is_group(frames):
            self._client_group(client, frames)
            return
        try:
            request = protocol.parse_request(frames)
        except PoolError as exc:
            self._malformed(client, frames, exc)
            return
        model, rid, header = request.model, request.rid, request.header
        if model.startswith(protocol.MMI_PREFIX):
            handler = self._mmi.get(model)
            if handler is None:
                self._reply_error(client, model, rid, NotSupported(f"unknown management service {quote(model)}"))
            else:
                handler(client, rid, header)
            return
        try:
            entry = self._version_entry(model, header)
        except PoolError as exc:
            self._reply_error(client, model, rid, exc)
            return
        if self._duplicate(client, rid):
            return
        try:
            _check_options(header)
            key, rows = self._route(entry, header, len(request.tensors))
        except PoolError as exc:
            entry.metrics.failed(reason_of_error(exc))
            self._reply_error(client, model, rid, exc)
            return
        if key is None:  # metadata, answered from the READY cache
            self._reply(client, model, rid, protocol.OK, entry.metadata)
            return
        if "op" not in header and len(frames[4]) <= _HEADER_CACHE_BYTES:
            if len(self._headers) >= _HEADER_CACHE_SIZE:
                self._headers.clear()
            self._headers[frames[4]] = (header, key, rows, len(request.tensors), _version_of(header))
        self._admit(entry, client, rid, [frames[4], *request.tensors], key, rows, self.now(),
                    header.get("timeout_ms"), False)

    def _known_request(self, client: bytes, frames: Sequence[Any], known: tuple[dict, Any, int, int, Any]) -> bool:
        """Admit a plain inference request whose header was decoded and checked before; False when
        it is not one (the full path then parses it)."""
        header, key, rows, tensors, version = known
        rid = frames[3]
        if (len(frames) != 5 + tensors or frames[0] != b"" or frames[1] != protocol.CLIENT
                or not 0 < len(rid) <= protocol.MAX_ID_BYTES):
            return False
        if version is None:
            entry = self.models.get(frames[2])
        else:
            entry = self.versions.get(frames[2], {}).get(version)
            if entry is not None and entry.unloading:
                return False
        if entry is None:
            return False
        if not self._duplicate(client, rid):
            self._admit(entry, client, rid, list(frames[4:]), key, rows, self.now(), header.get("timeout_ms"), False)
        return True

    def _duplicate(self, client: bytes, rid: bytes) -> bool:
        """A copy of a request still pending (a client resending after its connection dropped) is
        dropped: running it twice would answer it twice."""
        if (client, rid) not in self.held:
            return False
        self.duplicates += 1
        self.limited.info("duplicate requests", "dropped a second copy of pending request client=%s rid=%s",
                          client.hex()[:64], quote(rid, 32))
        return True

    def _admit(self, entry: ModelEntry, client: bytes, rid: bytes, body: list, key: Any, rows: int, now: float,
               timeout_ms: float | None, grouped: bool) -> None:
        """Queue a valid request, or answer 429/503 when the model or the broker holds too much."""
        deadline = None if timeout_ms is None else now + timeout_ms / 1000.0
        size = sum(len(f) for f in body)
        error = self._admission_error(entry, size)
        if error is not None:
            entry.metrics.failed(reason_of_error(error))
            self._reply_error(client, entry.name, rid, error)
            return
        pending = Pending(client, rid, entry.name, body, deadline=deadline, size=size, rows=rows, key=key,
                          arrived=now, seq=next(self._seq), grouped=grouped)
        pending.owner = entry
        self.held[(client, rid)] = pending
        entry.held_bytes += size
        self.held_bytes += size
        entry.batcher.queue.push(pending)
        self._dirty.add(entry)
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, next(self._seq), pending))

    def _client_group(self, client: bytes, frames: Sequence[Any]) -> None:
        """Requests that share one model and header, in one message (the "group" extension)."""
        try:
            group = protocol.parse_request_group(frames)
        except PoolError as exc:
            self._malformed_group(client, frames, exc)
            return
        model, header = group.model, group.header
        entry = None
        error: PoolError | None = None
        if model.startswith(protocol.MMI_PREFIX) or "op" in header:
            error = InvalidInput("a group carries inference requests only; send management and metadata "
                                 "requests one at a time")
        else:
            try:
                entry = self._version_entry(model, header)
                _check_options(header)
                key, rows = protocol.batch_key(header, len(group.tensors[0]))
            except PoolError as exc:
                error = exc
        if error is not None:
            for rid in group.rids:
                if entry is not None:
                    entry.metrics.failed(reason_of_error(error))
                self._reply_error(client, model, rid, error)
            return
        now, timeout_ms = self.now(), header.get("timeout_ms")
        for rid, tensors in zip(group.rids, group.tensors):
            if not self._duplicate(client, rid):
                self._admit(entry, client, rid, [group.header_frame, *tensors], key, rows, now, timeout_ms, True)

    def _malformed_group(self, client: bytes, frames: Sequence[Any], exc: PoolError) -> None:
        # Each request is answered when the ids frame can be read; otherwise the group is dropped (and logged).
        try:
            model = protocol.frame_bytes(frames[2])
            ids = protocol.unpack_any(frames[5], "group ids")
        except (IndexError, PoolError):
            ids = None
        valid = (isinstance(ids, list) and 0 < len(ids) <= protocol.MAX_GROUP
                 and all(isinstance(r, bytes) and 0 < len(r) <= protocol.MAX_ID_BYTES for r in ids))
        if not valid or protocol.frame_bytes(frames[0]) != b"":
            self.limited.warning("malformed client messages", "dropped malformed group client=%s: %s",
                                 client.hex()[:64], exc)
            return
        self.limited.warning("malformed client messages", "malformed group client=%s model=%s: %s",
                             client.hex()[:64], quote(model), exc)
        for rid in dict.fromkeys(ids):
            self._reply_error(client, model, rid, exc)

    def _version_entry(self, model: bytes, header: dict) -> ModelEntry:
        """The version a request goes to: the one its header's ``model_version`` names, or the newest
        ready one. ModelNotFound (or InvalidInput) when there is none."""
        family = self.versions.get(model)
        if family is None:
            served = ", ".join(sorted(m.decode(errors="replace") for m in self.models)) or "none"
            raise ModelNotFound(f"model {quote(model)} is not served here; models served: {served}")
        version = _version_of(header)
        entry = self.models.get(model) if version is None else family.get(version)
        if entry is None or entry.unloading:
            live = sorted((v for v, e in family.items() if not e.unloading), key=_version_order, reverse=True)
            if not live:
                raise ModelNotFound(f"model {quote(model)} is being unloaded")
            raise ModelNotFound(f"model {quote(model)} has no version {quote(version or '')} loaded; versions "
                                f"served: {', '.join(live)} (leave model_version out for the newest ready one)")
        return entry

    def _route(self, entry: ModelEntry, header: dict, tensors: int) -> tuple[Any, int]:
        """(batch key, rows) of a request; key None for a metadata request the broker answers itself."""
        if "op" in header:
            if header["op"] != "metadata":
                raise InvalidInput(f"unknown op {describe(header['op'])}; the only op is \"metadata\"")
            if entry.metadata is not None:
                return None, 0
            return object(), 0  # no worker has registered yet: the first one answers, alone
        return protocol.batch_key(header, tensors)

    def _admission_error(self, entry: ModelEntry, size: int) -> PoolError | None:
        if (self.admitting and entry.queued < entry.max_queue and entry.held_bytes + size <= entry.max_queue_bytes
                and self.held_bytes + size <= self.max_held_bytes and entry.has_ready()):
            return None  # the common case, checked without building any message
        name = quote(entry.name)
        if not self.admitting:
            return Unavailable("the pool is shutting down and admits no new requests")
        if entry.ready == 0:
            if entry.load_error is not None:
                return Unavailable(f"model {name}{_version_words(entry)} failed to load: {entry.load_error}")
            if entry.starting == 0 and entry.expected == 0:
                return Unavailable(f"model {name} has no live worker")
        if entry.queued >= entry.max_queue:
            return Overloaded(f"model {name} queue is full ({entry.max_queue} requests waiting); retry later")
        if entry.held_bytes + size > entry.max_queue_bytes:
            return Overloaded(f"model {name} holds {entry.held_bytes} bytes of requests; this one ({size} bytes) "
                              f"would pass its max_queue_bytes ({entry.max_queue_bytes}); retry later")
        if self.held_bytes + size > self.max_held_bytes:
            return Unavailable(f"the broker holds {self.held_bytes} bytes of requests; this one ({size} bytes) "
                               f"would pass max_queued_bytes ({self.max_held_bytes}); retry later")
        return None

    def _done(self, entry: ModelEntry, pending: Pending) -> None:
        """The request is answered: let go of its payload (the deadline heap may keep the object)."""
        pending.where, pending.body, pending.batch = DONE, [], None
        self.held.pop((pending.client, pending.rid), None)
        entry.held_bytes -= pending.size
        self.held_bytes -= pending.size
        pending.size = 0

    def _malformed(self, client: bytes, frames: Sequence[Any], exc: PoolError) -> None:
        # Answered whenever a reply can be addressed: the delimiter and a request-id of 1 to 255
        # bytes; the model frame is echoed as sent. Anything less is dropped (and logged).
        try:
            model = protocol.frame_bytes(frames[2])
            rid = protocol.frame_bytes(frames[3])
        except IndexError:
            self.limited.warning("malformed client messages",
                                 "dropped malformed client message client=%s frames=%d: %s",
                                 client.hex()[:64], len(frames), exc)
            return
        if protocol.frame_bytes(frames[0]) != b"" or not 0 < len(rid) <= protocol.MAX_ID_BYTES:
            self.limited.warning("malformed client messages", "dropped malformed client message client=%s: %s",
                                 client.hex()[:64], exc)
            return
        self.limited.warning("malformed client messages", "malformed request client=%s model=%s: %s",
                             client.hex()[:64], quote(model), exc)
        self._reply_error(client, model, rid, exc)

    def _reply_error(self, client: bytes, model: bytes, rid: bytes, error: PoolError) -> None:
        self.outbox_clients.append([client, b"", *protocol.encode_error(model, rid, error)])

    def _reply(self, client: bytes, model: bytes, rid: bytes, status: bytes, header: Any, tensors: Sequence = ()) -> None:
        self.outbox_clients.append([client, b"", *protocol.encode_reply(model, rid, status, header, tensors)])

    # --- management (mmi.*) --------------------------------------------------------------

    def _mmi_service(self, client: bytes, rid: bytes, header: dict) -> None:
        name = header.get("name", "")
        if not isinstance(name, str):
            self._reply_error(client, protocol.MMI_SERVICE, rid, InvalidInput(
                f"mmi.service: name must be a string, got {protocol.wire_type(name)}"))
        elif name.encode() in self.versions:
            self._reply(client, protocol.MMI_SERVICE, rid, protocol.OK, {"name": name})
        else:
            self._reply_error(client, protocol.MMI_SERVICE, rid,
                              ModelNotFound(f"model {quote(name)} is not served here"))

    def _mmi_models(self, client: bytes, rid: bytes, header: dict) -> None:
        detail = self.mmi_detail and header.get("detail") is True
        entries = sorted(self.entries(), key=lambda e: (e.name, _version_order(e.version)), reverse=True)
        entries.sort(key=lambda e: e.name)  # by name, each model's newest version first
        body = {"models": [entry.summary(detail, self.models.get(entry.name) is entry) for entry in entries]}
        self._reply(client, protocol.MMI_MODELS, rid, protocol.OK, body)

    def _mmi_health(self, client: bytes, rid: bytes, header: dict) -> None:
        self._reply(client, protocol.MMI_HEALTH, rid, protocol.OK, self.health())

    def _mmi_metrics(self, client: bytes, rid: bytes, header: dict) -> None:
        body = {"uptime_seconds": round(self.now() - self.started_at, 3), "models": [
            {"name": e.name.decode(errors="replace"), "version": e.version,
             "histograms": {k: h.to_wire() for k, h in e.metrics.histograms().items()}}
            for e in self.entries()]}
        self._reply(client, protocol.MMI_METRICS, rid, protocol.OK, body)

    def _mmi_control(self, client: bytes, rid: bytes, header: dict, *, service: bytes) -> None:
        try:
            if self.control is None:
                raise NotSupported(f"{service.decode()}: this broker starts no workers of its own (remote workers "
                                   "only); scale and reload them where they run")
            if not self.peer_local and service in protocol.MMI_CONTROL:  # the index only reads
                raise Forbidden(f"{service.decode()} is taken from clients on the pool's own host only (loopback or "
                                "ipc://); run it there")
            body = self.control(service, header)
        except PoolError as exc:
            self._reply_error(client, service, rid, exc)
            return
        self._reply(client, service, rid, protocol.OK, body)

    def metrics_snapshot(self) -> list[ModelSnapshot]:
        """Every model's metrics, copied (the Prometheus collector calls this from its own thread)."""
        return [entry.snapshot() for entry in self.entries()]

    def count_restart(self, model: str, version: str | None = None) -> None:
        """The launcher restarts a local worker of the model (it exited, crashed or failed to load)."""
        for entry in self._select(model, version)[:1]:
            entry.metrics.restarts += 1

    def health(self) -> dict:
        """Liveness and readiness: ready when every model has a live replica."""
        models = {m.decode(errors="replace"): e.ready > 0 for m, e in self.models.items()}
        return {"live": True, "ready": self.admitting and bool(models) and all(models.values()),
                "admitting": self.admitting, "models": models, "extensions": list(protocol.EXTENSIONS)}

    # --- worker side ---------------------------------------------------------------------

    def worker_message(self, identity: bytes, frames: Sequence[Any]) -> None:
        """A message from a worker (ROUTER identity stripped); malformed ones are logged and dropped.

        No exception escapes: one message must never stop the broker's loop.
        """
        try:
            self._worker_message(identity, frames)
        except Exception:
            self.limited.log(logging.ERROR, "internal error on a worker message",
                             "internal error on a worker message worker=%s", quote(identity), exc_info=True)

    def _worker_message(self, identity: bytes, frames: Sequence[Any]) -> None:
        try:
            message = protocol.parse_worker_message(frames)
        except PoolError as exc:
            self.limited.warning("malformed worker messages", "dropped malformed worker message worker=%s: %s",
                                 quote(identity), exc)
            return
        command, fields, stats = message
        worker = self.workers.get(identity)
        if worker is not None:
            worker.last_heard = self.now()
            worker.expiry = worker.last_heard + self.heartbeat_interval * self.heartbeat_liveness
            if stats is not None:  # the model calls behind these replies, the worker's memory
                if stats.calls:
                    worker.entry.metrics.executed(stats.calls)
                if stats.rss_bytes is not None:
                    worker.rss_bytes = stats.rss_bytes
        if command is protocol.Command.REPLIES:
            if worker is None:
                self.limited.warning("replies from unknown workers", "reply from unknown worker=%s dropped",
                                     quote(identity))
                return
            grouped: dict[bytes, list] = {}
            for item in fields:
                self._worker_reply(worker, item, grouped)
            worker.answered += len(fields)
            if worker.state is WorkerState.DRAINING:
                if not worker.inflight:
                    self._release(worker)
            elif not worker.recycling:
                self._check_recycling(worker)
            for client, replies in grouped.items():
                if len(replies) == 1:
                    self._reply(client, worker.model, *replies[0][:2], replies[0][2][0], replies[0][2][1:])
                else:
                    self.outbox_clients.append([client, b"", *protocol.encode_reply_group(worker.model, replies)])
        elif command is protocol.Command.READY:
            self._worker_ready(identity, worker, fields[0], fields[1])
        elif command is protocol.Command.HEARTBEAT:
            if worker is None:
                # A worker we do not know (this broker restarted): ask it to register again.
                self.outbox_workers.append([identity, *protocol.encode_disconnect({"reconnect": True})])
        elif command is protocol.Command.DISCONNECT:
            self._worker_disconnect(identity, worker, fields[0] if fields else {})
        else:
            self.limited.warning("worker messages only the broker sends",
                                 "worker=%s sent %s, which only the broker sends; dropped", quote(identity),
                                 command.name)

    def _worker_ready(self, identity: bytes, worker: Worker | None, model: bytes, info: dict) -> None:
        pid = info.get("pid") if _is_int(info.get("pid")) else None
        if worker is not None:
            if pid == worker.pid and model == worker.model:
                # The same process (it lost touch with a paused broker): nothing crashed. Its
                # in-flight requests go back to the queue as they were.
                self.limited.info("re-registrations", "worker=%s pid=%s registered again; %d in-flight requests "
                                  "re-queued", quote(identity), pid, len(worker.inflight), burst=50)
                self.worker_lost(identity, "re-registered", crashed=False)
            else:
                self.limited.warning("replaced registrations", "worker=%s sent READY as another process; "
                                     "treating it as a new registration", quote(identity), burst=50)
                self.worker_lost(identity, "replaced by a new registration")
        version = info.get("version", "")
        version = version[:128] if isinstance(version, str) else ""
        entry, refusal = self._registration(model, version)
        if refusal is not None:
            self.limited.warning("registrations refused", "refused READY from worker=%s: %s", quote(identity), refusal)
            self.outbox_workers.append([identity, *protocol.encode_disconnect({"error": refusal})])
            return
        rows = info.get("max_batch_size")
        prefetch = info.get("prefetch", 1)
        now = self.now()
        worker = Worker(
            identity=identity,
            model=model,
            version=version,
            max_rows=min(MAX_BATCH_ROWS, max(1, rows)) if _is_int(rows) else 1,
            slots=1 + (min(MAX_PREFETCH, max(0, prefetch)) if _is_int(prefetch) else 1),
            pid=pid,
            expiry=now + self.heartbeat_interval * self.heartbeat_liveness,
            last_heard=now,
            entry=entry,
        )
        _read_ready_figures(worker, info)
        if worker.load_seconds is not None:
            entry.load_seconds = worker.load_seconds
        self.workers[identity] = worker
        entry.workers[identity] = worker
        entry.load_error = None
        if isinstance(info.get("metadata"), dict):
            entry.metadata = info["metadata"]
        self.limited.info("registrations", "worker ready model=%s version=%s worker=%s pid=%s max_batch_size=%d "
                          "prefetch=%d", quote(model), quote(version), quote(identity), worker.pid, worker.max_rows,
                          worker.slots - 1, burst=50)
        self._dirty.add(entry)
        self._reroute(model)

    def _registration(self, model: bytes, version: str) -> tuple[ModelEntry | None, str | None]:
        """(entry, None) for a worker announcing ``version`` of ``model``, or (None, why it is refused).

        A declared model takes a version it does not know yet (a remote worker of a newer version) as
        a new version with the same limits; a model declared without a version adopts the first one.
        """
        family = self.versions.get(model)
        if not family:
            return None, f"model {quote(model)} is not served by this pool"
        entry = family.get(version)
        if entry is None and "" in family and len(family) == 1:
            entry = family.pop("")
            entry.version = version
            family[version] = entry
        elif entry is None:
            if len(family) >= MAX_VERSIONS:
                return None, f"model {quote(model)} has {MAX_VERSIONS} versions already"
            like = self.models.get(model) or next(iter(family.values()))
            entry = family[version] = ModelEntry(model, like.max_queue, like.max_queue_bytes, version=version)
            entry.batcher.max_delay = like.batcher.max_delay
            entry.max_requests, entry.max_memory_bytes = like.max_requests, like.max_memory_bytes
        if entry.unloading:
            return None, f"version {quote(version)} of model {quote(model)} is being unloaded"
        if len(entry.workers) >= MAX_WORKERS_PER_MODEL:
            return None, f"model {quote(model)} has {MAX_WORKERS_PER_MODEL} workers registered already"
        return entry, None

    def _check_recycling(self, worker: Worker) -> None:
        """A worker past its model's max_requests or max_memory_mb is put on ``recycle``: the
        launcher starts its successor, and it retires once that one is ready."""
        entry = worker.entry
        why = None
        if entry.max_requests and worker.answered >= entry.max_requests:
            why = f"answered {worker.answered} requests (max_requests {entry.max_requests})"
        elif entry.max_memory_bytes and worker.rss_bytes and worker.rss_bytes > entry.max_memory_bytes:
            why = (f"resident memory {worker.rss_bytes / 2**20:.0f} MiB (max_memory_mb "
                   f"{entry.max_memory_bytes / 2**20:.0f})")
        if why is not None:
            worker.recycling = True
            entry.recycled += 1
            self.recycle.append(worker.identity)
            self.limited.info("workers recycled", "recycling worker model=%s worker=%s pid=%s: %s", quote(entry.name),
                              quote(worker.identity), worker.pid, why)

    def _worker_reply(self, worker: Worker, item: ReplyItem, grouped: dict[bytes, list]) -> None:
        """Settle one answered request; its reply is queued, or kept in ``grouped`` (by client) when
        it came in a group."""
        pending = worker.inflight.pop((item.client, item.rid), None)
        if pending is None:
            self.limited.warning("replies for unknown requests", "reply for unknown request worker=%s rid=%s dropped",
                                 quote(worker.identity), quote(item.rid, 32))
            return
        entry = worker.entry
        self._settle_batch(worker, pending, entry)
        self._done(entry, pending)
        took = worker.last_heard - pending.admitted  # last_heard: this message's arrival
        if item.status == protocol.OK:
            entry.metrics.succeeded(took)
        else:
            entry.metrics.failed(reason_of_status(item.status), took)
        if pending.grouped:
            grouped.setdefault(item.client, []).append((item.rid, item.status, item.body))
        else:
            self._reply(item.client, worker.model, item.rid, item.status, item.body[0], item.body[1:])

    def _settle_batch(self, worker: Worker, pending: Pending, entry: ModelEntry) -> None:
        """One request of a batch is answered; the last one returns the worker's credit."""
        batch = pending.batch
        if batch is None:
            return
        batch.left -= 1
        if batch.left == 0 and batch.worker is worker:
            worker.batches -= 1
            if pending.crashes:
                worker.solo = False
            self._dirty.add(entry)

    def _worker_disconnect(self, identity: bytes, worker: Worker | None, info: dict) -> None:
        error = info.get("error")
        if error and isinstance(error, str) and isinstance(info.get("model"), str):
            version = info.get("version")
            self.load_failed(info["model"], error[:2000], version if isinstance(version, str) else None)
        if worker is not None:
            self.worker_lost(identity, "disconnected")

    def worker_lost(self, identity: bytes, reason: str, *, crashed: bool = True) -> Worker | None:
        """A worker died, hung or left: its in-flight requests are re-queued to run alone, and one that
        was already running alone after an earlier crash is answered 500 (it is the poison).

        ``crashed=False`` (the same process registered again): every request is re-queued as it was.
        """
        worker = self.workers.get(identity)
        if worker is None:
            return None
        entry = worker.entry
        self._forget(worker)
        if entry.reserved is worker:
            entry.reserved = None
        suspects = []
        for pending in sorted(worker.inflight.values(), key=_by_seq, reverse=True):
            pending.batch = None
            if not crashed and not pending.crashes:
                entry.batcher.queue.push(pending, front=True)
                self._watch(pending)
            elif not crashed:
                suspects.append(pending)
            elif pending.crashes >= 1:
                entry.crashed += 1
                entry.metrics.failed(WORKER_CRASHED, self.now() - pending.admitted)
                self._done(entry, pending)
                self._reply_error(pending.client, pending.model, pending.rid, WorkerCrashed(
                    f"request crashed a worker of model {quote(entry.name)} ({reason}) while it ran alone, "
                    "after it was in flight on another that died; it is not retried again"))
            else:
                pending.crashes += 1
                entry.retried += 1
                suspects.append(pending)
        for pending in suspects:
            pending.where = QUEUED
            entry.suspects.appendleft(pending)
            entry.suspects_queued += 1
            self._watch(pending)
        if crashed and worker.inflight:
            self.limited.warning("workers lost", "worker lost model=%s worker=%s pid=%s reason=%s retried=%d",
                                 quote(entry.name), quote(identity), worker.pid, reason, len(suspects), burst=50)
        worker.inflight.clear()
        worker.batches = 0
        if crashed and entry.ready == 0 and entry.expected == 0 and entry.starting == 0:
            self._fail_queue(entry, Unavailable(f"model {quote(entry.name)} has no live worker"))
        self._dirty.add(entry)
        return worker

    def _watch(self, pending: Pending) -> None:
        """Put a request that is waiting again under the deadline watch."""
        pending.arrived = self.now()
        if pending.deadline is not None:
            heapq.heappush(self._deadlines, (pending.deadline, next(self._seq), pending))

    def _forget(self, worker: Worker) -> None:
        if worker.state is not WorkerState.GONE:
            worker.move(WorkerState.GONE)
        self.workers.pop(worker.identity, None)
        entry = worker.entry
        entry.workers.pop(worker.identity, None)
        if entry.unloading:
            self._dirty.add(entry)  # dispatch drops it once nothing is left
        else:
            self._reroute(entry.name)

    # --- dispatch, time ------------------------------------------------------------------

    def dispatch(self) -> None:
        """Form and send batches for every model whose queue or workers changed since the last call.

        Called by the socket loop after it has read what arrived together, so that a burst of
        requests becomes one batch rather than a batch of one followed by the rest.
        """
        while self._dirty:
            entry = self._dirty.pop()
            try:
                self._dispatch(entry)
                if entry.unloading:
                    self._settle_unload(entry)
            except Exception:  # a bug must not stop the loop; the requests wait for the next dispatch
                self.limited.log(logging.ERROR, "internal errors in dispatch", "internal error dispatching model=%s",
                                 quote(entry.name), exc_info=True)

    def _dispatch(self, entry: ModelEntry) -> None:
        if entry.suspects:
            self._dispatch_suspects(entry)
        batcher = entry.batcher
        if not batcher.queue.requests:
            return
        reserved = entry.reserved
        workers = [w for w in entry.workers.values() if w.usable and w is not reserved]
        now = self.now()
        entry.wake_at = None
        while batcher.queue.requests:
            idle = [w for w in workers if w.batches == 0]
            if idle:
                worker = min(idle, key=_by_last_sent)
            else:
                open_ = [w for w in workers if w.batches < w.slots]
                if not open_:
                    return
                worker = min(open_, key=_by_load)
            decision = batcher.next_batch(limit=worker.max_rows, idle=worker.batches == 0, share=len(idle), now=now)
            for pending in decision.expired:
                self._expire(entry, pending)
            if decision.batch:
                self._send(entry, worker, decision.batch, now)
            elif decision.wait_until is not None:
                entry.wake_at = decision.wait_until
                return
            elif not decision.expired:
                return

    def _dispatch_suspects(self, entry: ModelEntry) -> None:
        """Each suspect runs alone on an idle worker, and never on the last live one while others wait."""
        suspects = entry.suspects
        entry.reserved = None
        now = self.now()
        while suspects:
            pending = suspects[0]
            if pending.where is not QUEUED:
                suspects.popleft()
                continue
            live = [w for w in entry.workers.values() if w.state is WorkerState.READY]
            others_wait = entry.queued > entry.suspects_queued
            single = entry.expected <= 1 and entry.starting == 0 and len(live) <= 1  # waiting brings no other
            if len(live) < 2 and others_wait and not single:
                return
            idle = [w for w in live if not w.solo and w.batches == 0]
            if not idle:
                candidates = [w for w in live if not w.solo]
                if candidates and (len(live) >= 2 or not others_wait):
                    entry.reserved = min(candidates, key=_by_load)  # let it drain
                return
            suspects.popleft()
            entry.suspects_queued -= 1
            if pending.deadline is not None and pending.deadline <= now:
                self._expire(entry, pending)
                continue
            worker = min(idle, key=_by_last_sent)
            worker.solo = True
            self._send(entry, worker, [pending], now)

    def _send(self, entry: ModelEntry, worker: Worker, requests: list[Pending], now: float) -> None:
        """Send requests taken from a queue to a worker as one BATCH."""
        batch = Batch(worker, len(requests), sum(p.rows for p in requests))
        queue_time = entry.metrics.queue.observe
        items = []
        for pending in requests:
            pending.where = INFLIGHT
            pending.batch = batch
            worker.inflight[(pending.client, pending.rid)] = pending
            queue_time(now - pending.arrived)
            budget = None if pending.deadline is None else max(1, math.ceil((pending.deadline - now) * 1000))
            items.append(BatchItem(pending.client, pending.rid, budget, pending.body))
        worker.batches += 1
        worker.batches_sent += 1
        worker.rows_sent += batch.rows
        worker.last_sent = now
        entry.batches += 1
        entry.batch_rows += batch.rows
        self.outbox_workers.append([worker.identity, *protocol.encode_batch(items, int(self.wall() * 1000))])

    def _expire(self, entry: ModelEntry, pending: Pending) -> None:
        self._done(entry, pending)
        entry.metrics.failed(TIMEOUT, self.now() - pending.admitted)
        entry.expired += 1
        self._reply_error(pending.client, pending.model, pending.rid, RequestTimeout(
            f"deadline passed after waiting in the queue of model {quote(entry.name)}; "
            "the request never reached the model"))

    def _fail_queue(self, entry: ModelEntry, error: PoolError) -> None:
        entry.suspects_queued = 0
        entry.reserved = None
        suspects, entry.suspects = entry.suspects, deque()
        reason, now = reason_of_error(error), self.now()
        for pending in [*suspects, *entry.batcher.queue.drain()]:
            if pending.where is QUEUED:
                self._done(entry, pending)
                entry.metrics.failed(reason, now - pending.admitted)
                self._reply_error(pending.client, pending.model, pending.rid, error)

    def tick(self) -> None:
        """Expire queued requests past their deadline and workers past their liveness; wake delayed batches."""
        now = self.now()
        self.limited.flush()
        heap = self._deadlines
        entries = self.entries()
        if len(heap) > 4096 and len(heap) > 4 * sum(e.queued for e in entries):
            # Entries of requests dispatched since are dropped lazily; compact so that memory
            # stays bounded by the queues, not by request rate x timeout.
            heap[:] = [item for item in heap if item[2].where is QUEUED]
            heapq.heapify(heap)
        while heap and heap[0][0] <= now:
            _, _, pending = heapq.heappop(heap)
            if pending.where is QUEUED:  # left in its lane; the lane skips it
                entry = pending.owner
                if pending.crashes:
                    entry.suspects_queued -= 1
                else:
                    entry.batcher.queue.discard(pending)
                self._expire(entry, pending)
        for entry in entries:
            if entry.wake_at is not None and entry.wake_at <= now:
                self._dirty.add(entry)
        for worker in list(self.workers.values()):
            silent = now - worker.last_heard
            if worker.inflight and silent > self.hang_timeout:
                self.lost_workers.append((worker.identity, f"hung: no message for {silent:.1f}s with requests in flight"))
                self.worker_lost(worker.identity, "hung")
            elif not worker.inflight and now > worker.expiry:
                self.lost_workers.append((worker.identity, f"missed heartbeats for {silent:.1f}s"))
                self.worker_lost(worker.identity, "heartbeat expired")
        self.dispatch()

    def next_deadline(self) -> float | None:
        """The earliest queued deadline or delayed batch, for the poll timeout."""
        times = [e.wake_at for e in self.entries() if e.wake_at is not None]
        if self._deadlines:
            times.append(self._deadlines[0][0])
        return min(times) if times else None

    def heartbeat_all(self) -> None:
        """Queue a HEARTBEAT to every registered worker."""
        for identity in self.workers:
            self.outbox_workers.append([identity, *protocol.encode_heartbeat()])

    def stop_admitting(self) -> None:
        """Refuse new requests with 503; queued and in-flight ones still finish."""
        self.admitting = False

    def drained(self) -> bool:
        """True when nothing is queued or in flight."""
        return all(e.queued == 0 and e.in_flight == 0 for e in self.entries())

    def disconnect_all(self) -> None:
        """Tell every worker to leave."""
        for identity in list(self.workers):
            self.outbox_workers.append([identity, *protocol.encode_disconnect()])


def _check_options(header: dict) -> None:
    """Raise InvalidInput for a request option the broker cannot honour."""
    if "timeout_ms" in header:
        timeout_ms = header["timeout_ms"]
        if (isinstance(timeout_ms, bool) or not isinstance(timeout_ms, (int, float))
                or not math.isfinite(timeout_ms) or timeout_ms < 0):
            # NaN would sit on the deadline heap forever and stop tick() from expiring anything behind it.
            raise InvalidInput(f"timeout_ms must be a non-negative number of milliseconds, got "
                               f"{describe(timeout_ms)}; leave it out for no deadline")
    if "parameters" in header and not isinstance(header["parameters"], dict):
        raise InvalidInput(f"parameters must be a map, got {describe(header['parameters'])}")


def _version_of(header: dict) -> str | None:
    """The version a request names (``model_version``, a string or an integer), or None for the newest."""
    version = header.get("model_version")
    if version is None or version == "":
        return None
    if _is_int(version) and version >= 0:
        return str(version)
    if not isinstance(version, str) or len(version) > 128:
        raise InvalidInput(f"model_version must be a version string like \"2\", got {describe(version)}")
    return version


def _version_words(entry: ModelEntry) -> str:
    return f" version {quote(entry.version)}" if entry.version else ""


def _version_order(version: str) -> tuple[int, int, str]:
    """Numeric versions by value, after any other name."""
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


def _newest(entry: ModelEntry) -> tuple[int, int, str]:
    return _version_order(entry.version)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_ready_figures(worker: Worker, info: dict) -> None:
    """load_seconds and rss_bytes of a READY; an invalid value is ignored, as READY's other keys are."""
    load = info.get("load_seconds")
    if isinstance(load, (int, float)) and not isinstance(load, bool) and math.isfinite(load) and 0 <= load < 1e7:
        worker.load_seconds = float(load)
    rss = info.get("rss_bytes")
    if _is_int(rss) and 0 <= rss <= protocol.MAX_RSS_BYTES:
        worker.rss_bytes = rss


def _by_seq(pending: Pending) -> int:
    return pending.seq


def _by_last_sent(worker: Worker) -> float:
    return worker.last_sent


def _by_load(worker: Worker) -> tuple[int, float]:
    return worker.batches, worker.last_sent
