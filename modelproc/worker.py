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
from typing import Any

import numpy as np
import zmq

from modelpool.client import protocol
from modelpool.client.errors import InvalidInput, ModelError, PoolError, ProtocolError
from modelpool.client.protocol import Command
from modelpool.client.transport import recv_frames, send_frames
from modelpool.modelproc.spec import WorkerSpec

log = logging.getLogger(__name__)

EXIT_LOAD_FAILED = 3
_FIRST_TENSOR = 8  # "" MDPW01 command client "" rid flags header | tensor...
_PR_SET_PDEATHSIG = 1


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
        reason = f"{type(exc).__name__}: {exc}"
        log.error("model=%s failed to load from %s: %s", spec.model, spec.path, reason)
        worker.report_load_failure(reason)
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
_FRAME_LINE = re.compile(r"^(Traceback|File |Detected at node|\[\[|\^)")
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


class Worker:
    """One model replica's connection to the broker and its serve loop."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.ctx = zmq.Context()
        self.socket: zmq.Socket | None = None
        self.model_b = spec.model.encode()
        self.pending: deque = deque()  # (client, rid, group key, inputs, rows) waiting for a batch
        self.pending_rows = 0
        self.replies: list[list] = []  # [client, rid, status, header, *tensors], sent together
        self.liveness = spec.heartbeat_liveness
        self.broker_expiry = 0.0
        self.last_sent = 0.0
        self.running = True
        self.metadata: dict = {}
        self.served = 0
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
        log.info("model=%s loaded from %s in %.1fs (threads intra=%d inter=%d)", self.spec.model, self.spec.path,
                 time.monotonic() - started, self.spec.intra_threads, self.spec.inter_threads)
        return runner

    def report_load_failure(self, reason: str) -> None:
        """Tell the broker why this replica cannot serve, then leave."""
        sock = self._connect()
        sock.send_multipart(protocol.encode_disconnect({"model": self.spec.model, "error": reason}))
        sock.close(linger=500)  # time for the message to leave; the socket was opened with linger 0
        self.ctx.term()

    def _ready(self) -> None:
        info = {"version": self.spec.version, "capacity": self.spec.max_batch_size,
                "max_batch_size": self.spec.max_batch_size, "pid": os.getpid(), "metadata": self.metadata,
                "batched": True}
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
        """Receive, batch, run, reply; heartbeat from this loop so a wedged call goes silent."""
        self.runner = runner
        self._ready()
        interval = self.spec.heartbeat_interval
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while self.running:
            timeout = 0 if self.pending else interval * 1000
            if poller.poll(timeout):
                self._drain()
                if self.spec.max_delay_ms and self.pending:
                    self._wait_for_more()
            if self.pending:
                self._run_pending()
            if self.replies:
                self._send_replies()
            self._housekeeping(poller)
        log.info("model=%s worker leaving after %d requests", self.spec.model, self.served)
        if self.socket is not None:
            self.socket.close(linger=1000)
        self.ctx.term()

    def _housekeeping(self, poller: zmq.Poller) -> None:
        now = time.monotonic()
        if self.spec.parent_pid and os.getppid() != self.spec.parent_pid:
            log.error("launcher pid=%d is gone; exiting", self.spec.parent_pid)
            self.running = False
            return
        if now - self.last_sent >= self.spec.heartbeat_interval:
            self.socket.send_multipart(protocol.encode_heartbeat())
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
            self.pending.clear()  # the broker that sent them is gone or has retried them
            self.pending_rows = 0
            self.replies.clear()
            self._ready()

    def _drain(self) -> None:
        rows = self.pending_rows
        sock = self.socket
        while rows < self.spec.max_batch_size:
            try:
                frames = recv_frames(sock, _FIRST_TENSOR)
            except zmq.Again:
                return
            rows += self._handle(frames)

    def _wait_for_more(self) -> None:
        deadline = time.monotonic() + self.spec.max_delay_ms / 1000.0
        while self.pending_rows < self.spec.max_batch_size:
            left = deadline - time.monotonic()
            if left <= 0 or not self.socket.poll(left * 1000, zmq.POLLIN):
                return
            self._drain()

    def _handle(self, frames: list) -> int:
        """Process one message from the broker; returns rows added to the pending batch."""
        self.broker_expiry = time.monotonic() + self.spec.heartbeat_interval * self.liveness
        self._broker_lost_since = None
        try:
            message = protocol.parse_worker_message(frames)
        except ProtocolError as exc:
            log.warning("dropped malformed message from broker: %s", exc)
            return 0
        command, fields = message
        if command is Command.REQUEST or command is Command.REQUESTS:
            return sum(self._accept(*group) for group in protocol.message_groups(message))
        if command is Command.DISCONNECT:
            info = fields[0] if fields and isinstance(fields[0], dict) else {}
            if info.get("reconnect"):
                log.info("broker does not know this worker (it restarted?); registering again")
                self._reregister = True
            elif isinstance(info.get("error"), str):
                log.error("broker refused this worker: %s", protocol.quote(info["error"], 200))
                self.running = False
            else:
                log.info("broker asked this worker to disconnect")
                self.running = False
        return 0

    def _accept(self, client: bytes, rid: bytes, flags: bytes, body: list) -> int:
        try:
            header = protocol.unpack_header(body[0])
            if header.get("op") == "metadata":
                self._reply(client, rid, protocol.OK, self.metadata)
                return 0
            if "op" in header:
                raise InvalidInput(f"unknown op {protocol.describe(header['op'])}; the only op is \"metadata\"")
            tensors = protocol.decode_tensors(header.get("inputs", []), body[1:])
            inputs = self.runner.check_inputs(tensors)
            key = self.runner.check_outputs(header.get("outputs"))
        except PoolError as exc:
            self._reply_error(client, rid, exc)
            return 0
        except Exception as exc:  # building a sub-model for a layer can fail in Keras
            log.warning("model=%s could not prepare request rid=%s: %s: %s", self.spec.model, protocol.quote(rid, 32),
                        type(exc).__name__, exc)
            self._reply_error(client, rid, ModelError(short_error(exc)))
            return 0
        rows = inputs[0].shape[0]
        group = (key, tuple((x.dtype.str, x.shape[1:]) for x in inputs), flags == protocol.FLAG_SOLO and rid)
        self.pending.append((client, rid, group, inputs, rows))
        self.pending_rows += rows
        return rows

    def _run_pending(self) -> None:
        """Run up to max_batch_size rows of compatible requests as one call."""
        limit = self.spec.max_batch_size
        first = self.pending.popleft()
        batch, rows, rest = [first], first[4], deque()
        while self.pending:
            item = self.pending.popleft()
            if item[2] == first[2] and rows + item[4] <= limit and not first[2][2]:
                batch.append(item)
                rows += item[4]
            else:
                rest.append(item)
        rest.extend(self.pending)
        self.pending = rest
        self.pending_rows -= rows
        self._run_batch(batch)

    def _run_batch(self, batch: list) -> None:
        key = batch[0][2][0]
        try:
            if len(batch) == 1:
                inputs = batch[0][3]
            else:
                inputs = [np.concatenate([item[3][i] for item in batch]) for i in range(len(batch[0][3]))]
            outputs = self._call(inputs, key)
        except Exception as exc:
            if len(batch) > 1:
                for item in batch:  # find the request that fails, answer the others
                    self._run_batch([item])
                return
            log.warning("model=%s raised on request rid=%s: %s: %s", self.spec.model, protocol.quote(batch[0][1], 32),
                        type(exc).__name__, exc)
            self._reply_error(batch[0][0], batch[0][1], ModelError(f"model raised {short_error(exc)}"))
            return
        start = 0
        for client, rid, _, _, rows in batch:
            metas, frames = [], []
            for spec, array in outputs:
                part = array[start:start + rows]
                meta, frame = protocol.encode_tensor(spec.name, part)
                metas.append(meta)
                frames.append(frame)
            start += rows
            header = {"model_name": self.spec.model, "model_version": self.spec.version, "outputs": metas}
            self._reply(client, rid, protocol.OK, header, frames)
            self.served += 1

    def _call(self, inputs: list, key: tuple) -> list:
        limit = self.spec.max_batch_size
        rows = inputs[0].shape[0]
        if rows <= limit:
            return self.runner.run(inputs, key)
        parts = [self.runner.run([x[i:i + limit] for x in inputs], key) for i in range(0, rows, limit)]
        return [(spec, np.concatenate([p[j][1] for p in parts])) for j, (spec, _) in enumerate(parts[0])]

    def _reply(self, client: bytes, rid: bytes, status: bytes, header: dict, tensors: list = ()) -> None:
        self.replies.append([client, rid, status, protocol.packb(header), *tensors])

    def _reply_error(self, client: bytes, rid: bytes, error: PoolError) -> None:
        self.replies.append([client, rid, error.status, protocol.error_header(error)])

    def _send_replies(self) -> None:
        """Everything answered since the last call: one REPLY, or one REPLIES for several."""
        replies = self.replies
        if len(replies) == 1:
            client, rid, status, header, *tensors = replies[0]
            frames = protocol.encode_worker_reply(client, rid, status, header, tensors)
        else:
            frames = protocol.encode_worker_replies(replies)
        send_frames(self.socket, frames)
        self.replies = []
        self.last_sent = time.monotonic()



def add_arguments(parser: Any) -> None:
    """The `modelpool worker` options (an argparse parser)."""
    parser.add_argument("--backend", required=True, help="broker backend endpoint, e.g. tcp://10.0.0.5:5556")
    parser.add_argument("--name", required=True, help="model name clients use (the pool's config must name it)")
    parser.add_argument("--path", required=True, help=".keras, .h5 or SavedModel directory")
    parser.add_argument("--version", default="1")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-delay-ms", type=float, default=0.0)
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
        max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms, intra_threads=threads,
        inter_threads=1 if threads <= 2 else 2, device=args.device, imports=tuple(args.imports),
        heartbeat_interval=args.heartbeat_interval, heartbeat_liveness=args.heartbeat_liveness,
        orphan_timeout=args.orphan_timeout, log_level=args.log_level,
    ))
    return 0
