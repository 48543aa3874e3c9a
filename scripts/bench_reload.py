"""Reload and scale under load: what a running pool's changes cost the requests in flight.

    .venv/bin/python scripts/bench_reload.py                   # tiny model, 2 replicas, 8 threads, 5 reloads
    .venv/bin/python scripts/bench_reload.py --reloads 2 --steady 3   # a smoke check

One pool (bench/pool.py, the pool's own default settings) serves the benchmark's `tiny` workload.
`--threads` threads call ``Client.predict`` with one row each, back to back, for the whole run and
record when each request started, how long it took and whether it failed. Meanwhile the script waits
`--steady` seconds, then for each of `--reloads` rounds calls ``Client.reload`` and waits until every
replica is new and the old ones are gone, then waits `--steady` seconds again; finally it scales
2 -> 4 -> 1 the same way. Requests that started while a change was in progress count as "during";
the rest as "outside". Also reported: seconds from each reload call to the last new replica ready.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if sys.path[0] != str(REPO):
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.pool import SERVING_SETTINGS, Pool, wait_until  # noqa: E402
from bench.workloads import build_model, sample_input  # noqa: E402
from modelpool.client import Client  # noqa: E402

MODEL = "tiny"


class Recorder:
    """Threads sending one-row requests; (start, seconds, ok) per request."""

    def __init__(self, endpoint: str, x1: np.ndarray, threads: int) -> None:
        self.records: list[list[tuple[float, float, bool]]] = [[] for _ in range(threads)]
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(endpoint, x1, self.records[i]), daemon=True)
                        for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, endpoint: str, x1: np.ndarray, out: list) -> None:
        clock = time.perf_counter
        with Client(endpoint, timeout=60.0) as client:
            while not self.stop.is_set():
                start = clock()
                try:
                    client.predict(MODEL, x1)
                    ok = True
                except Exception as exc:  # counted and shown
                    ok = False
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                out.append((start, clock() - start, ok))

    def finish(self) -> list[tuple[float, float, bool]]:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        return [r for rs in self.records for r in rs]


def settled(pool: Pool, replicas: int, old: set[int]) -> bool:
    entry = pool.models()[MODEL]
    pids = {w["pid"] for w in entry["workers"]}
    return (entry["replicas_ready"] == replicas and entry["replicas_starting"] == 0 and len(pids) == replicas
            and not pids & old and all(w["state"] == "ready" for w in entry["workers"]))


def run(pool: Pool, x1: np.ndarray, args: argparse.Namespace) -> dict:
    recorder = Recorder(pool.endpoint, x1, args.threads)
    windows: list[tuple[float, float]] = []
    reload_seconds = []
    clock = time.perf_counter
    try:
        time.sleep(args.steady)
        with Client(pool.endpoint, timeout=30.0) as control:
            for _ in range(args.reloads):
                old = set(pool.worker_pids(MODEL))
                start = clock()
                control.reload(MODEL)
                wait_until(lambda: settled(pool, args.replicas, old), 300, interval=0.05, what="reloaded")
                windows.append((start, clock()))
                reload_seconds.append(clock() - start)
                time.sleep(args.steady)
            for replicas in (4, 1):
                start = clock()
                control.scale(MODEL, replicas)
                wait_until(lambda: settled(pool, replicas, set()), 300, interval=0.05, what=f"{replicas} replicas")
                windows.append((start, clock()))
                time.sleep(args.steady)
    finally:
        records = recorder.finish()
    during = [r for r in records if any(a <= r[0] <= b for a, b in windows)]
    outside = [r for r in records if not any(a <= r[0] <= b for a, b in windows)]
    return {"during": during, "outside": outside, "reload_seconds": reload_seconds, "errors": recorder.errors}


def describe(name: str, records: list[tuple[float, float, bool]]) -> str:
    seconds = np.array([r[1] for r in records if r[2]]) * 1000
    failed = sum(1 for r in records if not r[2])
    if not len(seconds):
        return f"| {name} | {len(records)} | {failed} | - | - | - |"
    p50, p99, top = np.percentile(seconds, [50, 99, 100])
    return f"| {name} | {len(records)} | {failed} | {p50:.2f} | {p99:.2f} | {top:.1f} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=8, help="threads sending requests (default 8)")
    parser.add_argument("--replicas", type=int, default=2, help="replicas at start and after each reload (default 2)")
    parser.add_argument("--reloads", type=int, default=5, help="reloads in a row (default 5)")
    parser.add_argument("--steady", type=float, default=5.0, help="seconds between changes (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-reload-") as tmp:
        model = build_model(MODEL, args.seed)
        path = str(Path(tmp) / f"{MODEL}.keras")
        model.save(path)
        x1 = sample_input(model, 1, args.seed)
        pool = Pool([{"name": MODEL, "path": path, "replicas": args.replicas, "max_batch_size": 32}],
                    settings=SERVING_SETTINGS, log_level="WARNING")
        try:
            result = run(pool, x1, args)
        finally:
            code = pool.stop()
    print(f"\n{MODEL} model, {args.threads} threads of Client.predict (1 row), {args.reloads} reloads of "
          f"{args.replicas} replicas, then scale 2 -> 4 -> 1; {args.steady:g} s steady between changes; "
          f"launcher exit {code}")
    print("\n| requests started | requests | failed | p50 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|---:|")
    print(describe("outside changes", result["outside"]))
    print(describe("during reload/scale", result["during"]))
    times = result["reload_seconds"]
    if times:
        print(f"\nreload call -> every replica new and ready: median {np.median(times):.1f} s "
              f"(min {min(times):.1f}, max {max(times):.1f})")
    for error in result["errors"][:5]:
        print(f"error: {error}")
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
