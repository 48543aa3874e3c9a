"""Side-by-side benchmark: in-process calls, a thread pool, modelpool (1 and 2 replicas), Ray Serve.

Builds two seeded Keras workloads (``tiny``: Dense(64) -> Dense(10) on 32 floats; ``cnn``: a small
32x32x3 convnet), saves them as ``.keras`` files in a temporary directory, and measures, one sample
per request:

- ``direct``: the in-process floor (the model in a ``tf.function``, and its concrete function,
  called once per request; ``predict_on_batch`` for reference) and the in-process batch-N
  per-sample rate (the compute ceiling);
- ``threadpool``: one process, the model loaded once, ``ThreadPoolExecutor(8)``, each request one
  ``predict_on_batch`` call (what users do today); ``threadpool tf.function`` does the same with
  the compiled concrete function (a stronger baseline);
- ``modelpool-1`` / ``modelpool-2``: real pools started with ``python -m scripts.modelpool serve``;
- ``ray-serve-2``: Ray Serve, 2 replicas with ``@serve.batch`` (only when ``ray[serve]`` is installed).

For each system: sequential latency (p50/p99), then throughput and p50/p99 latency with N requests
kept in flight (closed loop). Writes ``docs/BENCHMARKS.md`` and ``docs/bench_<workload>.png`` unless
``--no-write``.

    .venv/bin/python scripts/bench.py                      # full run, writes docs/
    .venv/bin/python scripts/bench.py --quick --no-write --workloads tiny   # smoke test
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/bench.py` puts scripts/ first, not the repo
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from modelpool.client import Client  # noqa: E402
from modelpool.client import protocol  # noqa: E402
from modelpool.client.transport import REPLY_TENSORS, recv_frames, send_frames  # noqa: E402

SYSTEMS = ("direct", "threadpool", "modelpool-1", "modelpool-2", "ray-serve-2")
WORKLOADS = ("tiny", "cnn")
SEQ = "seq"  # the `inflight` value of sequential rows
THREADPOOL_WORKERS = 8
CEILING_BATCH = 128
STALL_SECONDS = 30.0
perf = time.perf_counter


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- results ---------------------------------------------------------------------------------


@dataclass
class Row:
    """One measured point: a system at one concurrency (or sequential)."""

    workload: str
    system: str
    inflight: int | str
    rps: float
    p50_ms: float
    p99_ms: float
    count: int
    errors: dict = field(default_factory=dict)
    note: str = ""
    launcher_rss_mb: float | None = None
    workers_rss_mb: float | None = None


class Window:
    """Latencies of requests that complete inside [start, end] (after the warm-up)."""

    def __init__(self, warmup: float, seconds: float) -> None:
        self.begin = perf()
        self.start = self.begin + warmup
        self.end = self.start + seconds
        self.seconds = seconds
        self.latencies: list[float] = []
        self.errors: collections.Counter = collections.Counter()
        self.note = ""

    def record(self, sent: float, done: float) -> None:
        if self.start <= done <= self.end:
            self.latencies.append(done - sent)

    def error(self, status: str, done: float) -> None:
        if self.start <= done <= self.end:
            self.errors[status] += 1

    def open(self) -> bool:
        return perf() < self.end

    def row(self, workload: str, system: str, inflight: int | str) -> Row:
        lat = np.asarray(self.latencies) * 1000.0
        p50, p99 = (float(np.percentile(lat, 50)), float(np.percentile(lat, 99))) if len(lat) else (float("nan"),) * 2
        return Row(workload, system, inflight, len(lat) / self.seconds, p50, p99, len(lat),
                   dict(self.errors), self.note)


def sequential(call: Callable[[], Any], warmup: float, seconds: float) -> Window:
    """Call one at a time until the window closes."""
    win = Window(warmup, seconds)
    while win.open():
        t0 = perf()
        call()
        win.record(t0, perf())
    return win


# --- workloads -------------------------------------------------------------------------------


def build_model(name: str, seed: int) -> Any:
    """The seeded Keras model of a workload."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    if name == "tiny":
        inputs = keras.Input((32,), name="x")
        h = layers.Dense(64, activation="relu")(inputs)
        outputs = layers.Dense(10, activation="softmax")(h)
    elif name == "cnn":
        inputs = keras.Input((32, 32, 3), name="x")
        h = layers.Conv2D(32, 3, activation="relu")(inputs)
        h = layers.Conv2D(64, 3, activation="relu")(h)
        h = layers.MaxPooling2D()(h)
        h = layers.Conv2D(64, 3, activation="relu")(h)
        h = layers.GlobalAveragePooling2D()(h)
        outputs = layers.Dense(10, activation="softmax")(h)
    else:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    return keras.Model(inputs, outputs, name=name)


def sample_input(model: Any, rows: int, seed: int) -> np.ndarray:
    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    return np.random.default_rng(seed).standard_normal((rows, *shape)).astype(np.float32)


def compiled_call(model: Any) -> Callable[[np.ndarray], Any]:
    """The model as a concrete tf.function with a variable batch dimension (no retracing)."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32)
    return tf.function(lambda x: model(x, training=False), input_signature=[spec]).get_concrete_function()


# --- in-process baselines --------------------------------------------------------------------


def polymorphic_call(model: Any) -> Callable[[np.ndarray], Any]:
    """The model wrapped in a plain ``tf.function`` (traced on first call, checked on every call)."""
    import tensorflow as tf

    return tf.function(lambda x: model(x, training=False))


def bench_direct(wl: str, model: Any, fn: Callable, x1: np.ndarray, args: argparse.Namespace,
                 seed: int) -> list[Row]:
    """The floor: one compiled call per request, predict_on_batch, and batch-N per-sample rates."""
    rows = []
    poly = polymorphic_call(model)
    for _ in range(5):
        fn(x1).numpy()
        poly(x1).numpy()
        model.predict_on_batch(x1)
    win = sequential(lambda: poly(x1).numpy(), args.warmup, args.seconds)
    rows.append(win.row(wl, "direct tf.function", SEQ))
    win = sequential(lambda: fn(x1).numpy(), args.warmup, args.seconds)
    rows.append(win.row(wl, "direct concrete function", SEQ))
    win = sequential(lambda: model.predict_on_batch(x1), args.warmup, args.seconds)
    rows.append(win.row(wl, "direct predict_on_batch", SEQ))
    for n in sorted(set(args.concurrency) | {CEILING_BATCH}):
        xb = sample_input(model, n, seed + n)
        for _ in range(3):
            fn(xb).numpy()
        win = sequential(lambda: fn(xb).numpy(), min(args.warmup, 0.5), args.seconds)
        row = win.row(wl, "in-process batch-N", n)
        row.rps *= n  # samples per second: each call carries n requests' worth of rows
        row.note = f"one call of batch {n}; latency is the call's"
        rows.append(row)
    return rows


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


class _Eager:
    """predict_on_batch with a ``.numpy()`` result, so it plugs into the same load loops."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, x: np.ndarray) -> Any:
        out = self.model.predict_on_batch(x)
        return type("R", (), {"numpy": lambda self_: out})()


def bench_threadpool(wl: str, fn: Callable, x1: np.ndarray, args: argparse.Namespace, model: Any = None) -> list[Row]:
    """What users do today: one process, model loaded once, a pool of threads calling it.

    ``threadpool`` calls ``model.predict_on_batch`` (the Keras API a web handler calls);
    ``threadpool tf.function`` calls the compiled concrete function (a stronger baseline).
    """
    rows = []
    variants = [("threadpool tf.function", fn)]
    if model is not None:
        variants.insert(0, ("threadpool", _Eager(model)))
    for name, call in variants:
        with ThreadPoolExecutor(args.threadpool_workers) as ex:
            for _ in range(5):
                ex.submit(lambda: call(x1).numpy()).result()
            win = sequential(lambda: ex.submit(lambda: call(x1).numpy()).result(), args.warmup, args.seconds)
        rows.append(win.row(wl, name, SEQ))
        for n in args.concurrency:
            win = threadpool_load(call, x1, n, args.threadpool_workers, args.warmup, args.seconds)
            rows.append(win.row(wl, name, n))
    return rows


# --- load generators for out-of-process systems ----------------------------------------------


def dealer_load(endpoint: str, model: str, x1: np.ndarray, n: int, warmup: float, seconds: float) -> Window:
    """One DEALER socket keeping N requests in flight, replies matched by request-id."""
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
    """N threads, each a blocking Client.predict loop on one shared Client."""
    win = Window(warmup, seconds)
    lock = threading.Lock()
    with Client(endpoint) as client:
        def loop() -> None:
            while win.open():
                t0 = perf()
                try:
                    client.predict(model, x1)
                except Exception as exc:  # typed pool errors; counted, not fatal
                    with lock:
                        win.error(type(exc).__name__, perf())
                    continue
                t = perf()
                with lock:
                    win.record(t0, t)

        threads = [threading.Thread(target=loop, daemon=True) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(win.end - perf() + STALL_SECONDS)
        if any(t.is_alive() for t in threads):
            win.note = "stalled"
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


async def _nothing() -> None:
    return None


def async_client_class() -> Any:
    """client.aio.AsyncClient when this checkout has it, else None."""
    try:
        from modelpool.client.aio import AsyncClient
    except ImportError:
        return None
    return AsyncClient


def asyncclient_load(endpoint: str, model: str, x1: np.ndarray, n: int, warmup: float, seconds: float) -> Window:
    """N coroutines sharing one client.aio.AsyncClient."""
    cls = async_client_class()

    async def open_call() -> tuple:
        client = cls(endpoint)

        async def close() -> None:
            await client.close()

        return (lambda: client.predict(model, x1)), close

    return coroutine_load(open_call, n, warmup, seconds)


GENERATORS = {"dealer": dealer_load, "threads": threads_load, "async": asyncclient_load}


# --- modelpool -------------------------------------------------------------------------------


def read_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def read_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return 0.0


class RssSampler:
    """Peak RSS of the launcher and the sum over its workers (sampled every 100 ms), and CPU use per point."""

    def __init__(self, launcher: int, workers: list[int]) -> None:
        self.launcher, self.workers = launcher, workers
        self.peak_launcher = self.peak_workers = 0.0
        self._cpu0: tuple[float, float, float, float] = self._cpu()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak_launcher = max(self.peak_launcher, read_rss_mb(self.launcher))
            self.peak_workers = max(self.peak_workers, sum(read_rss_mb(p) for p in self.workers))

    def _cpu(self) -> tuple[float, float, float, float]:
        return (perf(), time.process_time(), read_cpu_s(self.launcher), sum(read_cpu_s(p) for p in self.workers))

    def reset(self) -> None:
        self.peak_launcher = read_rss_mb(self.launcher)
        self.peak_workers = sum(read_rss_mb(p) for p in self.workers)
        self._cpu0 = self._cpu()

    def cpu_text(self) -> str:
        """CPU used since reset, in % of one core: load generator (this process), broker, workers."""
        now = self._cpu()
        wall = max(now[0] - self._cpu0[0], 1e-9)
        gen, broker, workers = ((b - a) / wall * 100 for a, b in zip(self._cpu0[1:], now[1:]))
        return f"cpu% gen {gen:.0f} / broker {broker:.0f} / workers {workers:.0f}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class PoolProcess:
    """A `modelpool serve` launcher in its own process group, serving one model."""

    def __init__(self, tmp: Path, model: dict) -> None:
        self.name, self.replicas = model["name"], model["replicas"]
        tag = f"{self.name}-r{self.replicas}"
        self.endpoint = f"ipc://{tmp}/{tag}.ipc"
        cfg = tmp / f"{tag}.toml"
        lines = ["[pool]", f"frontend = {toml_value(self.endpoint)}", 'log_level = "WARNING"', "", "[[models]]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in model.items()]
        cfg.write_text("\n".join(lines) + "\n")
        self.log_path = tmp / f"{tag}.log"
        self._log = open(self.log_path, "w")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", "modelpool", "serve", "-c", str(cfg)],
                                     cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.client = Client(self.endpoint, timeout=10.0)

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                (entry,) = [m for m in self.client.models(timeout=1.0) if m["name"] == self.name]
                if entry["replicas_ready"] == self.replicas:
                    return entry
            except Exception:  # not listening yet
                pass
            time.sleep(0.2)
        raise TimeoutError(f"pool not ready in {timeout:.0f}s:\n{self.log_tail()}")

    def stats(self) -> dict:
        (entry,) = [m for m in self.client.models(timeout=5.0) if m["name"] == self.name]
        return entry

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait, then SIGKILL whatever is left of the process group."""
        try:
            self.client.close()
        except Exception:
            pass
        code = None
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"launcher pid={self.proc.pid} ignored SIGTERM for {timeout:.0f}s; killing its group")
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # workers share the launcher's group
            except (ProcessLookupError, PermissionError):
                pass
            if self.proc.poll() is None:
                self.proc.wait(10)
            self._log.close()
        return code


def bench_modelpool(wl: str, path: str, x1: np.ndarray, replicas: int, tmp: Path,
                    args: argparse.Namespace, rows: list[Row]) -> None:
    """Start a pool with the real launcher, measure it into ``rows``, stop it."""
    system = f"modelpool-{replicas}"
    model = {"name": wl, "path": path, "replicas": replicas, "max_batch_size": args.max_batch[wl],
             "pad_to_bucket": args.pad_to_bucket}
    if args.max_delay_ms:
        model["max_delay_ms"] = args.max_delay_ms
    started = perf()
    pool = PoolProcess(tmp, model)
    sampler = None
    try:
        entry = pool.wait_ready(args.ready_timeout)
        pids = [w["pid"] for w in entry["workers"] if w.get("pid")]
        log(f"{system}: {replicas} replica(s) ready in {perf() - started:.1f}s (launcher pid={pool.proc.pid}, "
            f"workers {pids})")
        sampler = RssSampler(pool.proc.pid, pids)
        generator = GENERATORS[args.generator]
        with Client(pool.endpoint) as client:
            for _ in range(5):
                client.predict(wl, x1)
            sampler.reset()
            win = sequential(lambda: client.predict(wl, x1), args.warmup, args.seconds)
        row = win.row(wl, system, SEQ)
        row.note = "blocking Client.predict"
        rows.append(_with_rss(row, sampler))
        for n in args.concurrency:
            sampler.reset()
            win = generator(pool.endpoint, wl, x1, n, args.warmup, args.seconds)
            rows.append(_with_rss(win.row(wl, system, n), sampler))
            if win.note or win.errors:
                log(f"{system} at {n} in flight: {win.note} errors={dict(win.errors)}")
        after = pool.stats()
        pids_after = [w["pid"] for w in after["workers"] if w.get("pid")]
        problems = {k: after[k] for k in ("errors", "retried", "crashed_requests", "replicas_failed") if after.get(k)}
        if problems or sorted(pids_after) != sorted(pids):
            note = f"pool counters {problems}; workers {pids} -> {pids_after}"
            log(f"{system}: {note}")
            rows[-1].note = (rows[-1].note + "; " if rows[-1].note else "") + note
    finally:
        if sampler is not None:
            sampler.stop()
        code = pool.stop()
        if code not in (0, None):
            log(f"{system}: launcher exited with {code}; log tail:\n{pool.log_tail()}")


def _with_rss(row: Row, sampler: RssSampler) -> Row:
    row.launcher_rss_mb = sampler.peak_launcher
    row.workers_rss_mb = sampler.peak_workers
    row.note = (row.note + "; " if row.note else "") + sampler.cpu_text()
    return row


def _proc_start(pid: int) -> int | None:
    """The start time of a process (clock ticks since boot), to tell it from a later one with the same pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live process below ``root``."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children[ppid].append(int(entry))
    out, todo = {}, [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            start = _proc_start(pid)
            if start is not None:
                out[pid] = start
                todo.append(pid)
    return out


def kill_leftovers(snapshot: dict[int, int], grace: float) -> list[int]:
    """SIGKILL the processes of ``snapshot`` still alive after ``grace`` seconds; returns their pids."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p, s) for p, s in snapshot.items()):
        time.sleep(0.2)
    left = [p for p, s in snapshot.items() if _alive(p, s)]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _alive(pid: int, start: int) -> bool:
    if _proc_start(pid) != start:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- Ray Serve -------------------------------------------------------------------------------


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        return False
    return True


def bench_ray(wl: str, path: str, x1: np.ndarray, args: argparse.Namespace, rows: list[Row],
              replicas: int = 2) -> None:
    """Ray Serve, N replicas with @serve.batch, driven through a DeploymentHandle from this process."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's workers inherit this: they may need to import this module and `client` by name
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    import logging

    import ray
    from ray import serve

    cores = cpu_count()
    threads = max(1, cores // replicas)  # the same share of the cores modelpool gives each replica
    max_batch = args.max_batch[wl]
    system = f"ray-serve-{replicas}"
    ray_procs: dict[int, int] = {}
    started = perf()
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.serve").setLevel(logging.ERROR)
    try:
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 configure_logging=True)
        install_signal_handlers()  # Ray's core replaced SIGTERM with a handler that dies without cleanup
        serve.start(proxy_location="Disabled", logging_config={"log_level": "ERROR"})
        deployment = serve.deployment(
            _ray_model_class(), name=wl, num_replicas=replicas, max_ongoing_requests=max_batch,
            ray_actor_options={"num_cpus": cores / replicas},
        )
        handle = serve.run(deployment.bind(path, threads, max_batch, args.ray_batch_wait_ms / 1000.0),
                           name=f"bench-{wl}", route_prefix=None)
        log(f"{system}: ready in {perf() - started:.1f}s")
        ray_procs.update(descendants(os.getpid()))
        for _ in range(5):
            handle.remote(x1).result()
        win = sequential(lambda: handle.remote(x1).result(), args.warmup, args.seconds)
        rows.append(win.row(wl, system, SEQ))
        rows[-1].note = "DeploymentHandle .result()"
        for n in args.concurrency:
            wall0, cpu0 = perf(), time.process_time()
            async def open_call() -> tuple:
                return (lambda: handle.remote(x1)), _nothing

            win = coroutine_load(open_call, n, args.warmup, args.seconds)
            rows.append(win.row(wl, system, n))
            gen = (time.process_time() - cpu0) / (perf() - wall0) * 100
            rows[-1].note = (rows[-1].note + "; " if rows[-1].note else "") + f"cpu% gen {gen:.0f}"
            if win.note or win.errors:
                log(f"{system} at {n} in flight: {win.note} errors={dict(win.errors)}")
    finally:
        ray_procs.update(descendants(os.getpid()))
        try:
            serve.shutdown()
        except Exception as exc:  # Ray may already be half down after an interrupt
            log(f"serve.shutdown: {exc}")
        ray.shutdown()
        left = kill_leftovers(ray_procs, 10.0)
        if left:
            log(f"killed Ray processes left after ray.shutdown(): {left}")


def _ray_model_class() -> type:
    """The Ray Serve replica class (built after `ray` is imported, so the module imports without it)."""
    from ray import serve

    class RayModel:
        """A Ray Serve replica: the model as a compiled call, requests batched by @serve.batch."""

        def __init__(self, path: str, threads: int, max_batch: int, wait_s: float) -> None:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
            os.environ["TF_NUM_INTRAOP_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(threads)
            os.environ["TF_NUM_INTEROP_THREADS"] = "1"
            import keras
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
            model = keras.models.load_model(path, compile=False)
            self.fn = compiled_call(model)
            for rows in (1, max_batch):
                self.fn(np.zeros((rows, *model.inputs[0].shape[1:]), np.float32)).numpy()
            self.run.set_max_batch_size(max_batch)
            self.run.set_batch_wait_timeout_s(wait_s)

        @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
        async def run(self, xs: list[np.ndarray]) -> list[np.ndarray]:
            y = self.fn(np.concatenate(xs)).numpy()
            out, start = [], 0
            for x in xs:
                out.append(y[start:start + len(x)])
                start += len(x)
            return out

        async def __call__(self, x: np.ndarray) -> np.ndarray:
            return await self.run(x)

    return RayModel


# --- reporting -------------------------------------------------------------------------------


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_info() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
            mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": cpu_count(), "memory": mem, "os": platform.platform(),
            "load": " ".join(f"{v:.2f}" for v in os.getloadavg())}


def versions(with_ray: bool) -> dict:
    import keras
    import msgpack
    import tensorflow as tf

    out = {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
           "numpy": np.__version__, "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
           "msgpack": ".".join(map(str, msgpack.version))}
    if with_ray:
        import ray

        out["ray"] = ray.__version__
    return out


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"


def ratio_to_threadpool(row: Row, rows: list[Row]) -> str:
    base = next((r for r in rows if r.workload == row.workload and r.system == "threadpool"
                 and r.inflight == row.inflight), None)
    if base is None or not base.rps:
        return "-"
    return f"{row.rps / base.rps:.2f}x"


def table(rows: list[Row]) -> str:
    lines = ["| system | in flight | req/s | p50 ms | p99 ms | vs threadpool | launcher RSS MB | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        notes = r.note
        if r.errors:
            notes = (notes + "; " if notes else "") + "errors " + ", ".join(f"{k}: {v}" for k, v in r.errors.items())
        lines.append(f"| {r.system} | {r.inflight} | {fmt(r.rps, 0)} | {fmt(r.p50_ms, 3)} | {fmt(r.p99_ms, 3)} | "
                     f"{ratio_to_threadpool(r, rows)} | {fmt(r.launcher_rss_mb, 1)} | {notes} |")
    return "\n".join(lines)


def find(rows: list[Row], workload: str, system: str, inflight: int | str) -> Row | None:
    return next((r for r in rows if r.workload == workload and r.system == system and r.inflight == inflight), None)


def targets(rows: list[Row]) -> list[tuple[str, str, str, str]]:
    """(target, system, measured, verdict) for the issue's ratios."""
    out = []
    pools = sorted({r.system for r in rows if r.system.startswith("modelpool-")})

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "MISS")

    for base in ("threadpool", "threadpool tf.function"):
        tp = find(rows, "tiny", base, 128)
        for system in pools:
            mp = find(rows, "tiny", system, 128)
            ok = None if not (tp and mp and tp.rps) else mp.rps >= 8 * tp.rps
            got = f"{mp.rps / tp.rps:.2f}x ({fmt(mp.rps, 0)} vs {fmt(tp.rps, 0)} req/s)" if ok is not None else "-"
            out.append((f"tiny, 128 in flight: throughput >= 8x {base}", system, got, verdict(ok)))
    ceiling = find(rows, "cnn", "in-process batch-N", CEILING_BATCH)
    tp = find(rows, "cnn", "threadpool", 32)
    for system in pools:
        mp = find(rows, "cnn", system, 32)
        ok = None if not (ceiling and mp and ceiling.rps) else mp.rps >= 0.85 * ceiling.rps
        got = "-"
        if ok is not None:
            got = f"{mp.rps / ceiling.rps:.0%} of {fmt(ceiling.rps, 0)} samples/s"
            if tp and tp.rps:
                got += f"; {mp.rps / tp.rps:.2f}x threadpool"
        out.append((f"cnn, 32 in flight: throughput >= 85% of in-process batch-{CEILING_BATCH} rate", system, got,
                    verdict(ok)))
    direct = find(rows, "tiny", "direct tf.function", SEQ)
    for system in pools:
        mp = find(rows, "tiny", system, SEQ)
        ok = None if not (direct and mp) else mp.p50_ms <= 1.3 * direct.p50_ms
        got = f"{mp.p50_ms / direct.p50_ms:.2f}x ({fmt(mp.p50_ms, 3)} vs {fmt(direct.p50_ms, 3)} ms)" if ok is not None else "-"
        out.append(("tiny, sequential: p50 <= 1.3x in-process tf.function p50", system, got, verdict(ok)))
    for system in pools:
        peaks = [r.launcher_rss_mb for r in rows if r.system == system and r.launcher_rss_mb]
        ok = None if not peaks else max(peaks) < 100
        out.append(("launcher RSS < 100 MB under load", system, f"{max(peaks):.1f} MB peak" if peaks else "-",
                    verdict(ok)))
    return out


def markdown(rows: list[Row], args: argparse.Namespace, info: dict, vers: dict, command: str, notes: list[str],
             plots: dict[str, str]) -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    out = ["# Benchmarks", "",
           "Generated by `scripts/bench.py`; rerun it to refresh this page (numbers depend on the machine and on "
           "whatever else runs on it).", ""]
    if args.quick:
        out += ["> **Quick smoke-test run (`--quick`)**: points of "
                f"{args.seconds:g} s; these numbers only show that the benchmark works. Do not quote them.", ""]
    out += [

           f"- Date: {now}",
           f"- Command: `{command}`",
           f"- Machine: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM, {info['os']}; "
           f"load average (1/5/15 min) at start {info['load']}, at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
           "- Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
           f"- Each point: {args.warmup:g} s warm-up, then {args.seconds:g} s measured; latency is from send to "
           "reply; one sample per request.",
           f"- modelpool: launched with `python -m modelpool serve -c pool.toml`, ipc:// frontend, "
           f"max_batch_size {' / '.join(f'{k} {v}' for k, v in args.max_batch.items() if k in args.workloads)}, "
           f"max_delay_ms {args.max_delay_ms:g}, pad_to_bucket "
           f"{str(args.pad_to_bucket).lower()}; sequential rows use a blocking `Client.predict`, in-flight rows "
           f"the `{args.generator}` load generator ({GENERATOR_TEXT[args.generator]}).",
           f"- threadpool: one process, model loaded once, `ThreadPoolExecutor({args.threadpool_workers})`, each "
           "request one `predict_on_batch` call (`threadpool tf.function`: one call of the compiled concrete "
           "function); TensorFlow's default thread settings.",
           "- direct: `direct tf.function` is the model wrapped in `tf.function` and `direct concrete function` its "
           "concrete function, called in-process one request at a time (the floor); `in-process batch-N` is one "
           "call on N rows, reported as samples/s (the compute ceiling).",
           "- `launcher RSS MB`: peak VmRSS of the `modelpool serve` process during the point. `cpu%` notes: CPU "
           "time used during the point (warm-up included) in % of one core, for the benchmark process (`gen`, the "
           "load generator), the launcher (`broker`) and the sum over the replicas (`workers`).",
           "", "## Systems", ""]
    out += [f"- {line}" for line in SYSTEM_TEXT]
    for wl in [w for w in WORKLOADS if any(r.workload == w for r in rows)]:
        out += ["", f"## Workload `{wl}`", "", WORKLOAD_TEXT[wl], "", table([r for r in rows if r.workload == wl])]
        if wl in plots:
            out += ["", f"![throughput vs requests in flight, {wl}]({plots[wl]})"]
    out += ["", "## Targets", "", "| target | system | measured | verdict |", "|---|---|---|---|"]
    out += [f"| {t} | {s} | {m} | {v} |" for t, s, m, v in targets(rows)]
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


GENERATOR_TEXT = {
    "dealer": "one DEALER socket pipelining N requests built with client.protocol and sent with client.transport, matched by request-id",
    "threads": "N threads, each a blocking Client.predict loop on one shared Client",
    "async": "N coroutines on one client.aio.AsyncClient",
}
SYSTEM_TEXT = [
    "`direct tf.function` / `direct predict_on_batch`: in-process, sequential; the floor.",
    "`in-process batch-N`: one compiled call on N rows, samples/s; the compute ceiling at N in flight.",
    "`threadpool`: in-process ThreadPoolExecutor, one `predict_on_batch` per request (what users do today); "
    "`threadpool tf.function`: the same with the compiled concrete function.",
    "`modelpool-1`, `modelpool-2`: a pool with 1 or 2 replicas (one spawned process each), batching in the worker.",
    "`ray-serve-2`: Ray Serve, 2 replicas, `@serve.batch`, requests through a DeploymentHandle from the "
    "benchmark process (no HTTP proxy); each replica gets cores/2 TensorFlow threads, as modelpool's do.",
]
WORKLOAD_TEXT = {
    "tiny": "Dense(64, relu) -> Dense(10, softmax) on 32 float inputs.",
    "cnn": "32x32x3 input, Conv(32,3) -> Conv(64,3) -> MaxPool -> Conv(64,3) -> GlobalAvgPool -> Dense(10, softmax).",
}


def plot(rows: list[Row], wl: str, path: Path) -> None:
    """Throughput vs requests in flight, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    mine = [r for r in rows if r.workload == wl and r.inflight != SEQ]
    for system in dict.fromkeys(r.system for r in mine):
        pts = sorted((r.inflight, r.rps) for r in mine if r.system == system)
        style = {"linestyle": "--", "color": "gray"} if system == "in-process batch-N" else {}
        label = "in-process batch-N (ceiling)" if system == "in-process batch-N" else system
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, **style)
    direct = find(rows, wl, "direct tf.function", SEQ)
    if direct and direct.rps:
        ax.axhline(direct.rps, color="black", linestyle=":", linewidth=1, label="direct tf.function, sequential")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted({r.inflight for r in mine})
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel("requests in flight")
    ax.set_ylabel("throughput (requests/s)")
    ax.set_title(f"{wl}: throughput vs concurrency (one sample per request)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- driver ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated: " + ", ".join(SYSTEMS))
    p.add_argument("--concurrency", default="1,8,32,128", help="requests in flight, comma-separated")
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each point")
    p.add_argument("--quick", action="store_true", help="short points (0.5 s + 0.25 s warm-up) for smoke tests")
    p.add_argument("--tiny-max-batch", type=int, default=128, help="max_batch_size of the tiny model")
    p.add_argument("--cnn-max-batch", type=int, default=64, help="max_batch_size of the cnn model")
    p.add_argument("--max-delay-ms", type=float, default=0.0, help="modelpool max_delay_ms")
    p.add_argument("--pad-to-bucket", action="store_true", help="modelpool pad_to_bucket")
    p.add_argument("--generator", choices=sorted(GENERATORS), default="dealer",
                   help="load generator for modelpool at N in flight ('async' needs client.aio.AsyncClient)")
    p.add_argument("--threadpool-workers", type=int, default=THREADPOOL_WORKERS, help="threads of the threadpool")
    p.add_argument("--ray-batch-wait-ms", type=float, default=0.0, help="@serve.batch batch_wait_timeout_s, in ms")
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for a pool to be ready")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default="docs/BENCHMARKS.md", help="markdown file; plots go beside it")
    p.add_argument("--no-write", action="store_true", help="print the markdown, write nothing")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup = min(args.seconds, 0.5), min(args.warmup, 0.25)
    args.workloads = _choices(args.workloads, WORKLOADS, p, "--workloads")
    args.systems = _choices(args.systems, SYSTEMS, p, "--systems")
    try:
        args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        p.error(f"--concurrency must be integers, got {args.concurrency!r}")
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency needs integers >= 1")
    args.max_batch = {"tiny": args.tiny_max_batch, "cnn": args.cnn_max_batch}
    if args.generator == "async" and async_client_class() is None:
        p.error("--generator async needs client.aio.AsyncClient, which this checkout does not have")
    return args


def _choices(text: str, known: tuple, p: argparse.ArgumentParser, flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in known]
    if bad or not items:
        p.error(f"{flag}: unknown {bad or text!r}; choose from {', '.join(known)}")
    return [k for k in known if k in items]


def command_line(argv: list[str] | None) -> str:
    exe = Path(sys.executable)
    try:
        exe_text = str(exe.relative_to(REPO))
    except ValueError:
        exe_text = "python"
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO))
    except ValueError:
        script_text = str(script)
    return shlex.join([exe_text, script_text, *(sys.argv[1:] if argv is None else argv)])


def run_workload(wl: str, args: argparse.Namespace, tmp: Path, notes: list[str]) -> list[Row]:
    import keras

    seed = args.seed
    model = build_model(wl, seed)
    path = str(tmp / f"{wl}.keras")
    model.save(path)
    loaded = keras.models.load_model(path, compile=False)
    x1 = sample_input(loaded, 1, seed)
    fn = compiled_call(loaded)
    rows: list[Row] = []
    if "direct" in args.systems:
        log(f"{wl}: direct")
        rows += bench_direct(wl, loaded, fn, x1, args, seed)
    if "threadpool" in args.systems:
        log(f"{wl}: threadpool")
        rows += bench_threadpool(wl, fn, x1, args, loaded)
    runs = [(f"modelpool-{r}", lambda r=r: bench_modelpool(wl, path, x1, r, tmp, args, rows)) for r in (1, 2)]
    runs.append(("ray-serve-2", lambda: bench_ray(wl, path, x1, args, rows)))
    for system, run in runs:
        if system not in args.systems or (system == "ray-serve-2" and not ray_available()):
            continue
        log(f"{wl}: {system}")
        try:
            run()
        except Exception as exc:  # keep what was measured, say what failed, go on with the next system
            log(f"{system} on {wl} failed: {type(exc).__name__}: {exc}")
            notes.append(f"{system} on `{wl}` failed: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}")
    if "ray-serve-2" in args.systems and not ray_available():
        if "ray-serve-2 skipped" not in " ".join(notes):
            notes.append("ray-serve-2 skipped: `ray[serve]` is not installed (`pip install -e .[ray]`).")
    for r in rows:
        log(f"  {r.system:<24} {str(r.inflight):>4}  {r.rps:>10,.0f} req/s  p50 {r.p50_ms:8.3f} ms  "
            f"p99 {r.p99_ms:8.3f} ms" + (f"  {r.note}" if r.note else "") + (f"  errors {r.errors}" if r.errors else ""))
    return rows


def install_signal_handlers() -> None:
    """Ctrl-C, SIGTERM and SIGHUP unwind through the finally blocks that stop pools and Ray."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_handlers()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    command = command_line(argv)
    info = machine_info()
    with_ray = "ray-serve-2" in args.systems and ray_available()
    vers = versions(with_ray)
    log(f"{info['cpu']}, {info['cores']} cores, load {info['load']}; " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    notes: list[str] = []
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="mp-bench-") as tmp:
        for wl in args.workloads:
            rows += run_workload(wl, args, Path(tmp), notes)
    bad = [r for r in rows if r.errors or r.note.startswith("stalled")]
    for r in bad:
        notes.append(f"{r.system} on `{r.workload}` at {r.inflight} in flight: {r.note or ''} errors {r.errors}")
    out = Path(args.out)
    if not out.is_absolute():
        out = REPO / out
    plots: dict[str, str] = {}
    if not args.no_write:
        out.parent.mkdir(parents=True, exist_ok=True)
        for wl in args.workloads:
            png = out.parent / f"bench_{wl}.png"
            plot(rows, wl, png)
            plots[wl] = png.name
    text = markdown(rows, args, info, vers, command, notes, plots)
    if args.no_write:
        print(text)
    else:
        out.write_text(text)
        print(text)
        log(f"wrote {out} and {', '.join(plots.values())}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; every pool this run started has been stopped")
        sys.exit(130)
