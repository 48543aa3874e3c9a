"""The systems measured: in-process calls, a thread pool, modelpool (through its clients), Ray Serve."""
from __future__ import annotations

import argparse
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from modelpool.client import Client

from bench import REPO
from bench.loadgen import GENERATORS, coroutine_load, threadpool_load
from bench.measure import SEQ, Row, log, perf, sequential
from bench.pool import SERVING_SETTINGS, Pool
from bench.procs import ProcSampler, cpu_count, descendants, install_signal_handlers, kill_leftovers
from bench.workloads import build_model, compiled_call, polymorphic_call, sample_input

SYSTEMS = ("direct", "threadpool", "modelpool-1", "modelpool-2", "ray-serve-2")
THREADPOOL_WORKERS = 8
CEILING_BATCH = 128
SEQ_VIA = "Client.predict"
SYSTEM_TEXT = [
    "`direct tf.function` / `direct predict_on_batch`: in-process, sequential; the floor.",
    "`in-process batch-N`: one compiled call on N rows, samples/s; the compute ceiling at N in flight.",
    "`threadpool`: in-process ThreadPoolExecutor, one `predict_on_batch` per request (what users do today); "
    "`threadpool tf.function`: the same with the compiled concrete function.",
    "`modelpool-1`, `modelpool-2`: a pool with 1 or 2 replicas (one spawned process each), batches formed in "
    "the broker; the `via` column says which client drove it; notes give the mean rows per batch and the "
    "mean time a request waited in the broker's queue.",
    "`ray-serve-2`: Ray Serve, 2 replicas, `@serve.batch`, requests through a DeploymentHandle from the "
    "benchmark process (no HTTP proxy); each replica gets cores/2 TensorFlow threads, as modelpool's do.",
]


# --- in-process baselines --------------------------------------------------------------------


def bench_direct(wl: str, model: Any, fn: Callable, x1: np.ndarray, args: argparse.Namespace,
                 seed: int) -> list[Row]:
    """The floor: one compiled call per request, predict_on_batch, and batch-N per-sample rates."""
    rows = []
    poly = polymorphic_call(model)
    for _ in range(5):
        fn(x1).numpy()
        poly(x1).numpy()
        model.predict_on_batch(x1)
    for system, call in (("direct tf.function", lambda: poly(x1).numpy()),
                         ("direct concrete function", lambda: fn(x1).numpy()),
                         ("direct predict_on_batch", lambda: model.predict_on_batch(x1))):
        rows.append(sequential(call, args.warmup, args.seconds).row(wl, system, "in-process", SEQ))
    for n in sorted(set(args.concurrency) | {CEILING_BATCH}):
        xb = sample_input(model, n, seed + n)
        for _ in range(3):
            fn(xb).numpy()
        win = sequential(lambda: fn(xb).numpy(), min(args.warmup, 0.5), args.seconds)
        row = win.row(wl, "in-process batch-N", "in-process", n)
        row.rps *= n  # samples per second: each call carries n requests' worth of rows
        row.note = f"one call of batch {n}; latency is the call's"
        rows.append(row)
    return rows


class _Eager:
    """predict_on_batch with a ``.numpy()`` result, so it plugs into the same load loops."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, x: np.ndarray) -> Any:
        out = self.model.predict_on_batch(x)
        return type("R", (), {"numpy": lambda self_: out})()


def bench_threadpool(wl: str, fn: Callable, x1: np.ndarray, args: argparse.Namespace, model: Any) -> list[Row]:
    """What users do today: one process, model loaded once, a pool of threads calling it.

    ``threadpool`` calls ``model.predict_on_batch`` (the Keras API a web handler calls);
    ``threadpool tf.function`` calls the compiled concrete function (a stronger baseline).
    """
    rows = []
    via = f"ThreadPoolExecutor({args.threadpool_workers})"
    for name, call in (("threadpool", _Eager(model)), ("threadpool tf.function", fn)):
        with ThreadPoolExecutor(args.threadpool_workers) as ex:
            for _ in range(5):
                ex.submit(lambda: call(x1).numpy()).result()
            win = sequential(lambda: ex.submit(lambda: call(x1).numpy()).result(), args.warmup, args.seconds)
        rows.append(win.row(wl, name, via, SEQ))
        for n in args.concurrency:
            win = threadpool_load(call, x1, n, args.threadpool_workers, args.warmup, args.seconds)
            rows.append(win.row(wl, name, via, n))
    return rows


# --- modelpool -------------------------------------------------------------------------------


def bench_modelpool(wl: str, path: str, x1: np.ndarray, replicas: int, args: argparse.Namespace,
                    rows: list[Row]) -> None:
    """Start a pool with the shared launcher, measure it into ``rows`` through each generator, stop it."""
    system = f"modelpool-{replicas}"
    model = {"name": wl, "path": path, "replicas": replicas, "max_batch_size": args.max_batch[wl],
             "pad_to_bucket": args.pad_to_bucket}
    if args.max_delay_ms:
        model["max_delay_ms"] = args.max_delay_ms
    started = perf()
    pool = Pool([model], wait_ready=False, settings=SERVING_SETTINGS, log_level="WARNING")
    sampler = None
    try:
        pool.wait_ready(args.ready_timeout)
        pids = pool.worker_pids(wl)
        log(f"{system}: {replicas} replica(s) ready in {perf() - started:.1f}s (launcher pid={pool.proc.pid}, "
            f"workers {pids})")
        sampler = ProcSampler(pool.proc.pid, pids)
        with Client(pool.endpoint) as client:
            for _ in range(5):
                client.predict(wl, x1)
            sampler.reset()
            win = sequential(lambda: client.predict(wl, x1), args.warmup, args.seconds)
        mine = {SEQ_VIA: [_with_procs(win.row(wl, system, SEQ_VIA, SEQ), sampler)]}
        for n in args.concurrency:  # generators interleaved per point, so drifting load hits them alike
            for name in args.generators:
                generator, via = GENERATORS[name]
                sampler.reset()
                before = pool.models()[wl]
                win = generator(pool.endpoint, wl, x1, n, args.warmup, args.seconds)
                row = _with_procs(win.row(wl, system, via, n), sampler)
                row.add_note(batching_text(before, pool.models()[wl]))
                mine.setdefault(via, []).append(row)
                if win.note or win.errors:
                    log(f"{system} via {via} at {n} in flight: {win.note} errors={dict(win.errors)}")
        rows += [row for group in mine.values() for row in group]
        after = pool.models()[wl]
        pids_after = pool.worker_pids(wl)
        problems = {k: after[k] for k in ("errors", "retried", "crashed_requests", "replicas_failed") if after.get(k)}
        if problems or sorted(pids_after) != sorted(pids):
            note = f"pool counters {problems}; workers {pids} -> {pids_after}"
            log(f"{system}: {note}")
            rows[-1].add_note(note)
    finally:
        if sampler is not None:
            sampler.stop()
        code = pool.stop()
        if code != 0:
            log(f"{system}: launcher exited with {code}; log tail:\n{pool.read_log()[-3000:]}")


def batching_text(before: dict, after: dict) -> str:
    """Mean rows per batch and queue time between two mmi.models answers, overall and per worker."""
    batches = after["batches"] - before["batches"]
    if batches <= 0:
        return "no batches"
    rows = after["batch_rows"] - before["batch_rows"]
    waited = after["queue_seconds"] - before["queue_seconds"]
    sent = max(1, after["dispatched"] - before["dispatched"])
    was = {w["id"]: w for w in before["workers"]}
    per_worker = []
    for w in after["workers"]:
        old = was.get(w["id"], {"batches": 0, "rows": 0})
        if w["batches"] > old["batches"]:
            per_worker.append(f"{(w['rows'] - old['rows']) / (w['batches'] - old['batches']):.1f}")
    return (f"mean batch {rows / batches:.1f} rows (per worker {', '.join(per_worker)}); "
            f"mean queue time {waited / sent * 1000:.2f} ms")


def _with_procs(row: Row, sampler: ProcSampler) -> Row:
    row.launcher_rss_mb = sampler.peak_launcher
    row.workers_rss_mb = sampler.peak_workers
    row.add_note(sampler.cpu_text())
    return row


# --- Ray Serve -------------------------------------------------------------------------------


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        return False
    return True


async def _nothing() -> None:
    return None


def bench_ray(wl: str, path: str, x1: np.ndarray, args: argparse.Namespace, rows: list[Row],
              replicas: int = 2) -> None:
    """Ray Serve, N replicas with @serve.batch, driven through a DeploymentHandle from this process."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's workers inherit this: they import `bench` (the replica class) by name
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    import ray
    from ray import serve

    cores = cpu_count()
    threads = max(1, cores // replicas)  # the same share of the cores modelpool gives each replica
    max_batch = args.max_batch[wl]
    system = f"ray-serve-{replicas}"
    via = "DeploymentHandle"
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
        rows.append(win.row(wl, system, via, SEQ))
        rows[-1].note = "DeploymentHandle .result()"

        async def open_call() -> tuple:
            return (lambda: handle.remote(x1)), _nothing

        for n in args.concurrency:
            wall0, cpu0 = perf(), time.process_time()
            win = coroutine_load(open_call, n, args.warmup, args.seconds)
            rows.append(win.row(wl, system, via, n))
            rows[-1].add_note(f"cpu% gen {(time.process_time() - cpu0) / (perf() - wall0) * 100:.0f}")
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


# --- one workload ----------------------------------------------------------------------------


def run_workload(wl: str, args: argparse.Namespace, tmp: Path, notes: list[str]) -> list[Row]:
    """Every selected system on one workload; a system that fails is noted and the rest go on."""
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
    runs = [(f"modelpool-{r}", lambda r=r: bench_modelpool(wl, path, x1, r, args, rows)) for r in (1, 2)]
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
        log(f"  {r.system:<24} {r.via:<28} {str(r.inflight):>4}  {r.rps:>10,.0f} req/s  p50 {r.p50_ms:8.3f} ms  "
            f"p99 {r.p99_ms:8.3f} ms" + (f"  {r.note}" if r.note else "") + (f"  errors {r.errors}" if r.errors else ""))
    return rows
