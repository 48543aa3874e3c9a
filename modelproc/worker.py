"""The worker process: spawn target, environment set-up, and the batching serve loop.

Nothing here imports TensorFlow at module level; ``main`` sets the environment first and only then
imports ``modelproc.runner``.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import sys
import time
from collections import deque
from typing import Any, NamedTuple

import numpy as np
import zmq

from modelpool.client import protocol
from modelpool.client.errors import InvalidInput, ModelError, PoolError, ProtocolError, RequestTimeout
from modelpool.client.protocol import BatchItem, Command, ReplyItem
from modelpool.client.transport import recv_frames, send_frames
from modelpool.modelproc.spec import WorkerSpec

log = logging.getLogger(__name__)

EXIT_LOAD_FAILED = 3
_PR_SET_PDEATHSIG = 1
# Model calls are reported to the broker (REPLIES stats) at most this often, gathered in between:
# a stats frame costs the broker a few microseconds to read, which at one request per REPLIES would
# be a tenth of its cost per request; a worker with nothing to run sends what it holds in a HEARTBEAT.
STATS_EVERY = 0.01
_MAX_HELD_CALLS = 4096  # sent sooner when this many calls are held


def main(spec: WorkerSpec) -> None:
    """Spawn target: set the environment, load the model, serve until told to stop."""
    if spec.parent_pid:
        _die_with_parent(spec.parent_pid)
    configure_environment(spec)
    logging.basicConfig(level=spec.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s worker[{spec.model}/{os.getpid()}] %(message)s")
    worker = Worker(spec)
    if spec.parent_pid:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when local workers stop
    else:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a remote worker stops on its own signals
            signal.signal(sig, lambda signum, frame: worker.stop())
    try:
        runner = worker.load()
    except Exception as exc:  # any loader error is reported, with its own message
        log.error("model=%s failed to load from %s: %s: %s", spec.model, spec.path, type(exc).__name__, exc)
        worker.report_load_failure(short_error(exc))  # clients see it: no paths, no tracebacks
        sys.exit(EXIT_LOAD_FAILED)
    worker.serve(runner)


def configure_environment(spec: WorkerSpec) -> None:
    """Thread counts, devices and log level, before TensorFlow is imported."""
    threads = str(spec.intra_threads)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["OMP_NUM_THREADS"] = threads
    os.environ["TF_NUM_INTRAOP_THREADS"] = threads
    os.environ["TF_NUM_INTEROP_THREADS"] = str(spec.inter_threads)
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if spec.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    else:
        _, _, index = spec.device.partition(":")
        if index:
            os.environ["CUDA_VISIBLE_DEVICES"] = index
        os.environ["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when the launcher dies; the serve loop checks too."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if parent_pid and os.getppid() != parent_pid:
        os._exit(1)  # the launcher died before prctl took effect


_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][\w.\-]+){2,}")
_FRAME_LINE = re.compile(r'^(Traceback|File "|Detected at node|\[\[|\^)')
_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Warning)\b[^:]*: ")
_SHORT_ERROR = 200


def short_error(exc: BaseException) -> str:
    """What a client is told about an exception: its type and a short message without tracebacks or
    file paths; the full text (TensorFlow's embeds tracebacks) goes to the worker's log only.

    TensorFlow's "Graph execution error:" is followed by the inner error (``ValueError: ...``)
    among stack frames: that line is kept.
    """
    text = str(exc)
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line[:1].isspace() and not _FRAME_LINE.match(line.strip())]
    first = lines[0] if lines else ""
    if first.endswith(":"):
        inner = next((line for line in lines[1:] if _ERROR_LINE.match(line)), None)
        if inner is not None:
            first = f"{first} {inner}"
    first = _PATH.sub("<path>", first)
    if len(first) > _SHORT_ERROR:
        first = first[:_SHORT_ERROR] + "..."
    more = " (details in the worker log)" if len(text.strip().splitlines()) > 1 or len(text) > _SHORT_ERROR else ""
    return f"{type(exc).__name__}: {first}{more}" if first else f"{type(exc).__name__}{more}"


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """This process's resident memory in bytes (Linux /proc), or its peak (getrusage) elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


class Prepared(NamedTuple):
    """A request of a batch, checked and decoded, ready to be stacked with others."""

    client: bytes
    rid: bytes
    inputs: list
    rows: int


class Worker:
    """One model replica's connection to the broker and its serve loop."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.ctx = zmq.Context()
        self.socket: zmq.Socket | None = None
        self.model_b = spec.model.encode()
        self.batches: deque = deque()  # (received at, [BatchItem]) in arrival order: at most 1 + prefetch
        self.replies: list[ReplyItem] = []  # sent together after each batch
        self.liveness = spec.heartbeat_liveness
        self.broker_expiry = 0.0
        self.last_sent = 0.0
        self.running = True
        self.metadata: dict = {}
        self.served = 0
        self.expired = 0
        self.load_seconds: float | None = None
        self.calls: list[list[int]] = []  # [rows, microseconds] per model call not reported yet
        self._calls_at = 0.0  # when held calls may next go out with a REPLIES
        self._memory_at = 0.0  # when resident memory is next reported
        self._reregister = False
        self._broker_lost_since: float | None = None

    def stop(self) -> None:
        """Leave the serve loop after the current batch (signal-handler safe)."""
        self.running = False

    def _connect(self) -> zmq.Socket:
        if self.socket is not None:
            self.socket.close(linger=0)
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.spec.identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.spec.backend)
        self.socket = sock
        return sock

    def load(self) -> Any:
        """Import TensorFlow (environment already set), load and warm up the model."""
        started = time.monotonic()
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(self.spec.intra_threads)
        tf.config.threading.set_inter_op_parallelism_threads(self.spec.inter_threads)
        from modelpool.modelproc.runner import Runner

        runner = Runner(self.spec.path, max_batch_size=self.spec.max_batch_size,
                        pad_to_bucket=self.spec.pad_to_bucket, imports=self.spec.imports)
        runner.warm_up()
        self.metadata = runner.metadata(self.spec.model, self.spec.version)
        self.load_seconds = time.monotonic() - started
        log.info("model=%s loaded from %s in %.1fs (threads intra=%d inter=%d)", self.spec.model, self.spec.path,
                 self.load_seconds, self.spec.intra_threads, self.spec.inter_threads)
        return runner

    def report_load_failure(self, reason: str) -> None:
        """Tell the broker why this replica cannot serve, then leave."""
        sock = self._connect()
        sock.send_multipart(protocol.encode_disconnect({"model": self.spec.model, "version": self.spec.version,
                                                     "error": reason}))
        sock.close(linger=500)  # time for the message to leave; the socket was opened with linger 0
        self.ctx.term()

    def _ready(self) -> None:
        info = {"version": self.spec.version, "max_batch_size": self.spec.max_batch_size,
                "prefetch": self.spec.prefetch, "pid": os.getpid(), "metadata": self.metadata}
        if self.load_seconds is not None:
            info["load_seconds"] = round(self.load_seconds, 3)
        rss = rss_bytes()
        if rss is not None:
            info["rss_bytes"] = rss
        # Re-registration uses the same connection: the broker's ROUTER refuses a second connection
        # with an identity it still has (no handover), and ZeroMQ reconnects this one by itself
        # when a broker restarts.
        sock = self.socket if self.socket is not None else self._connect()
        sock.send_multipart(protocol.encode_ready(self.model_b, info))
        now = time.monotonic()
        self.last_sent = now
        self.broker_expiry = now + self.spec.heartbeat_interval * self.liveness

    # --- the loop ------------------------------------------------------------------------

    def serve(self, runner: Any) -> None:
        """Receive batches, run them in order, reply; heartbeat from this loop so a wedged call goes silent."""
        self.runner = runner
        self._ready()
        interval = self.spec.heartbeat_interval
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while self.running:
            if self.batches or poller.poll(self._poll_ms(interval)):
                self._drain()
            if self.batches:
                self._run_batch(*self.batches.popleft())
            if self.replies:
                self._send_replies()
            self._housekeeping()
        log.info("model=%s worker leaving after %d requests (%d expired before they ran)", self.spec.model,
                 self.served, self.expired)
        if self.socket is not None:
            self.socket.close(linger=1000)
        self.ctx.term()

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if self.spec.parent_pid and os.getppid() != self.spec.parent_pid:
            log.error("launcher pid=%d is gone; exiting", self.spec.parent_pid)
            self.running = False
            return
        idle_with_calls = self.calls and not self.batches and now >= self._calls_at
        if idle_with_calls or now - self.last_sent >= self.spec.heartbeat_interval:
            self.socket.send_multipart(protocol.encode_heartbeat(self._stats(now, calls=True)))
            self.last_sent = now
        if now > self.broker_expiry and self.socket.poll(0, zmq.POLLIN):
            return  # messages wait after a long call: the broker is alive, the next drain reads them
        if now > self.broker_expiry and self.spec.orphan_timeout:
            self._broker_lost_since = self._broker_lost_since or now
            if now - self._broker_lost_since > self.spec.orphan_timeout:
                log.error("no broker for %.0fs; exiting", now - self._broker_lost_since)
                self.running = False
                return
        if now > self.broker_expiry or self._reregister:
            if not self._reregister:
                log.warning("broker silent for %.1fs; reconnecting", now - self.broker_expiry
                            + self.spec.heartbeat_interval * self.liveness)
            self._reregister = False
            self.batches.clear()  # the broker that sent them is gone or has re-queued them
            self.replies.clear()
            self.calls.clear()
            self._ready()

    def _drain(self) -> None:
        """Read every message waiting from the broker."""
        sock = self.socket
        while True:
            try:
                frames = recv_frames(sock, protocol.WORKER_CONTROL)
            except zmq.Again:
                return
            self._handle(frames)

    def _handle(self, frames: list) -> None:
        """Process one message from the broker."""
        now = time.monotonic()
        self.broker_expiry = now + self.spec.heartbeat_interval * self.liveness
        self._broker_lost_since = None
        try:
            command, fields, _ = protocol.parse_worker_message(frames)
        except ProtocolError as exc:
            log.warning("dropped malformed message from broker: %s", exc)
            return
        if command is Command.BATCH:
            self.batches.append((now, fields))
        elif command is Command.DISCONNECT:
            info = fields[0] if fields else {}
            if info.get("reconnect"):
                log.info("broker does not know this worker (it restarted?); registering again")
                self._reregister = True
            elif isinstance(info.get("error"), str):
                log.error("broker refused this worker: %s", protocol.quote(info["error"], 200))
                self.running = False
            else:
                log.info("broker asked this worker to disconnect")
                self.running = False

    def _run_batch(self, received: float, items: list[BatchItem]) -> None:
        """Answer a batch: expired requests 504 without running them, the rest in as few calls as
        their shapes allow (one, when the broker formed the batch)."""
        now = time.monotonic()
        # Read only now if it waited in the socket behind a running batch: age it by the broker's
        # send time too (never less than since it was read, whatever the clocks say).
        sent_ms = items[0].sent_ms if items else None
        waited = now - received
        if sent_ms is not None:
            waited = max(waited, time.time() - sent_ms / 1000.0)
        groups: dict[tuple, list[Prepared]] = {}
        for item in items:
            if item.budget_ms is not None and item.budget_ms / 1000.0 <= waited:
                self.expired += 1
                self._reply_error(item.client, item.rid, RequestTimeout(
                    f"deadline passed while the request waited in a worker of model {protocol.quote(self.spec.model)} "
                    f"behind another batch ({waited * 1000:.0f} ms); the model did not run it"))
                continue
            prepared = self._prepare(item)
            if prepared is not None:
                key, request = prepared
                groups.setdefault(key, []).append(request)
        for key, group in groups.items():
            self._run_group(group, key[0])

    def _prepare(self, item: BatchItem) -> tuple[tuple, Prepared] | None:
        """(group key, request) ready to run, or None when it was answered here (metadata, errors)."""
        try:
            header = protocol.unpack_header(item.body[0])
            if header.get("op") == "metadata":
                self._reply(item.client, item.rid, protocol.OK, self.metadata)
                return None
            if "op" in header:
                raise InvalidInput(f"unknown op {protocol.describe(header['op'])}; the only op is \"metadata\"")
            tensors = protocol.decode_tensors(header.get("inputs", []), item.body[1:])
            inputs = self.runner.check_inputs(tensors)
            outputs = self.runner.check_outputs(header.get("outputs"))
        except PoolError as exc:
            self._reply_error(item.client, item.rid, exc)
            return None
        except Exception as exc:  # building a sub-model for a layer can fail in Keras
            log.warning("model=%s could not prepare request rid=%s: %s: %s", self.spec.model,
                        protocol.quote(item.rid, 32), type(exc).__name__, exc)
            self._reply_error(item.client, item.rid, ModelError(short_error(exc)))
            return None
        key = (outputs, tuple((x.dtype.str, x.shape[1:]) for x in inputs))
        return key, Prepared(item.client, item.rid, inputs, inputs[0].shape[0])

    def _run_group(self, group: list[Prepared], outputs: tuple) -> None:
        """Run compatible requests as one call; if it raises, halve the group until the requests that
        fail are found, so the others are still answered."""
        try:
            if len(group) == 1:
                inputs = group[0].inputs
            else:
                inputs = [np.concatenate([request.inputs[i] for request in group])
                          for i in range(len(group[0].inputs))]
            results = self._call(inputs, outputs)
        except Exception as exc:
            if len(group) > 1:
                half = len(group) // 2
                self._run_group(group[:half], outputs)
                self._run_group(group[half:], outputs)
                return
            log.warning("model=%s raised on request rid=%s: %s: %s", self.spec.model,
                        protocol.quote(group[0].rid, 32), type(exc).__name__, exc)
            self._reply_error(group[0].client, group[0].rid, ModelError(f"model raised {short_error(exc)}"))
            return
        start = 0
        for request in group:
            metas, frames = [], []
            for spec, array in results:
                meta, frame = protocol.encode_tensor(spec.name, array[start:start + request.rows])
                metas.append(meta)
                frames.append(frame)
            start += request.rows
            header = {"model_name": self.spec.model, "model_version": self.spec.version, "outputs": metas}
            self._reply(request.client, request.rid, protocol.OK, header, frames)
            self.served += 1

    def _call(self, inputs: list, key: tuple) -> list:
        limit = self.spec.max_batch_size
        rows = inputs[0].shape[0]
        if rows <= limit:
            return self._timed_run(inputs, key)
        # one request larger than a batch: run it in slices of max_batch_size rows
        parts = [self._timed_run([x[i:i + limit] for x in inputs], key) for i in range(0, rows, limit)]
        return [(spec, np.concatenate([p[j][1] for p in parts])) for j, (spec, _) in enumerate(parts[0])]

    def _timed_run(self, inputs: list, key: tuple) -> list:
        """One model call, timed for the broker's metrics (a call that raises is not counted)."""
        started = time.perf_counter()
        results = self.runner.run(inputs, key)
        self.calls.append([int(inputs[0].shape[0]), int((time.perf_counter() - started) * 1e6)])
        return results

    def _poll_ms(self, interval: float) -> float:
        """How long the idle loop waits for a message: a heartbeat interval, or until held calls are due."""
        if not self.calls:
            return interval * 1000
        return min(interval, max(0.0, self._calls_at - time.monotonic())) * 1000

    def _stats(self, now: float, calls: bool) -> dict | None:
        """The stats frame's map: the held model calls when ``calls`` says so, the resident memory once
        per heartbeat interval (reading it costs a few syscalls); None when there is nothing to say."""
        stats = {}
        if now >= self._memory_at:
            self._memory_at = now + self.spec.heartbeat_interval
            rss = rss_bytes()
            if rss is not None:
                stats["rss_bytes"] = rss
        if calls and self.calls:
            stats["calls"] = self.calls
            self.calls = []
            self._calls_at = now + STATS_EVERY
        return stats or None

    def _reply(self, client: bytes, rid: bytes, status: bytes, header: dict, tensors: list = ()) -> None:
        self.replies.append(ReplyItem(client, rid, status, [protocol.packb(header), *tensors]))

    def _reply_error(self, client: bytes, rid: bytes, error: PoolError) -> None:
        self.replies.append(ReplyItem(client, rid, error.status, [protocol.error_header(error)]))

    def _send_replies(self) -> None:
        """Everything answered since the last call, in one REPLIES message, with the model calls run
        since the last report when STATS_EVERY has passed (and now and then the worker's memory)."""
        now = time.monotonic()
        due = now >= self._calls_at or len(self.calls) >= _MAX_HELD_CALLS
        send_frames(self.socket, protocol.encode_replies(self.replies, self._stats(now, calls=due)))
        self.replies = []
        self.last_sent = now


def add_arguments(parser: Any) -> None:
    """The `modelpool worker` options (an argparse parser)."""
    parser.add_argument("--backend", required=True, help="broker backend endpoint, e.g. tcp://10.0.0.5:5556")
    parser.add_argument("--name", required=True, help="model name clients use (the pool's config must name it)")
    parser.add_argument("--path", required=True, help=".keras, .h5 or SavedModel directory")
    parser.add_argument("--version", default="1")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--prefetch", type=int, default=1, help="batches taken ahead of the one running (0-8)")
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow intra-op threads (0 = all cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--imports", nargs="*", default=[], help="modules to import first (custom layers)")
    parser.add_argument("--heartbeat-interval", type=float, default=protocol.HEARTBEAT_INTERVAL)
    parser.add_argument("--heartbeat-liveness", type=int, default=protocol.HEARTBEAT_LIVENESS)
    parser.add_argument("--orphan-timeout", type=float, default=300.0,
                        help="exit after this many seconds without a broker (0 = never)")
    parser.add_argument("--log-level", default="INFO")


def run_standalone(args: Any) -> int:
    """A worker started by hand (or an orchestrator) that registers with a broker's backend over TCP."""
    import socket

    threads = args.threads or len(os.sched_getaffinity(0))
    identity = f"{args.name}/remote-{socket.gethostname()}-{os.getpid()}".encode()[: protocol.MAX_ID_BYTES]
    main(WorkerSpec(
        model=args.name, path=args.path, backend=args.backend, identity=identity, version=args.version,
        max_batch_size=args.max_batch_size, prefetch=args.prefetch, intra_threads=threads,
        inter_threads=1 if threads <= 2 else 2, device=args.device, imports=tuple(args.imports),
        heartbeat_interval=args.heartbeat_interval, heartbeat_liveness=args.heartbeat_liveness,
        orphan_timeout=args.orphan_timeout, log_level=args.log_level,
    ))
    return 0
