"""Requests/s of one Python client against the demo pool: one at a time, pipelined, submit(), asyncio.

    .venv/bin/python -m scripts.client_bench                   # starts and stops its own demo pool
    .venv/bin/python -m scripts.client_bench --endpoint tcp://127.0.0.1:5555   # an already running pool

Every request carries one sample (one row) of ``modelproc.demo.load_samples()``; every answer is checked
against the answer for that sample. Each mode runs for ``--seconds``.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from modelpool.client import AsyncClient, Client
from modelpool.modelproc.demo import load_samples

REPO = Path(__file__).resolve().parents[1]
MODEL = "digits"


class DemoPool:
    """`modelpool serve --demo` in a subprocess, stopped with SIGTERM."""

    def __init__(self, frontend: str, ready_timeout: float = 180.0) -> None:
        self.frontend = frontend
        self.log = tempfile.NamedTemporaryFile("w+", prefix="client-bench-", suffix=".log", delete=False)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "-1"))
        self.proc = subprocess.Popen([sys.executable, "-m", "modelpool", "serve", "--demo", "--frontend", frontend],
                                     cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with Client(self.frontend, timeout=2.0, retries=0) as probe:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the demo pool exited with {self.proc.returncode}; log: {self.log.name}")
                try:
                    if probe.health()["ready"]:
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"the demo pool was not ready within {timeout:.0f}s; log: {self.log.name}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        if self.proc.returncode == 0:  # kept for reading otherwise
            os.unlink(self.log.name)
        return self.proc.returncode


def _run_for(seconds: float, round_: Callable[[], int]) -> tuple[int, float]:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        done += round_()
    return done, time.perf_counter() - started


def bench(endpoint: str, seconds: float, window: int, batch: int) -> list[tuple[str, int, float]]:
    x, _ = load_samples()
    rows = [x[i:i + 1] for i in range(len(x))]
    work = [rows[i % len(rows)] for i in range(batch)]
    results = []
    with Client(endpoint, timeout=60) as client:
        want = client.predict(MODEL, x)
        expected = [want[i % len(rows)] for i in range(batch)]

        def check(got: list) -> int:
            for g, w in zip(got, expected):
                if not np.allclose(g[0], w, rtol=1e-5, atol=1e-5):
                    raise AssertionError("an answer does not match its input")
            return len(got)

        count = 0

        def one() -> int:
            nonlocal count
            i = count % len(rows)
            count += 1
            if not np.allclose(client.predict(MODEL, rows[i])[0], want[i], rtol=1e-5, atol=1e-5):
                raise AssertionError("an answer does not match its input")
            return 1

        for _ in range(50):  # warm the socket and the workers' batch sizes
            one()
        results.append(("Client.predict, one at a time", *_run_for(seconds, one)))
        results.append((f"Client.predict_many (window={window})",
                        *_run_for(seconds, lambda: check(client.predict_many(MODEL, work, window=window)))))
        results.append(("Client.submit futures",
                        *_run_for(seconds, lambda: check([f.result() for f in [client.submit(MODEL, r) for r in work]]))))

    async def gather_rounds() -> tuple[int, float]:
        async with AsyncClient(endpoint, timeout=60) as aclient:
            await aclient.predict(MODEL, rows[0])
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                done += check(await asyncio.gather(*(aclient.predict(MODEL, r) for r in work)))
            return done, time.perf_counter() - started

    results.append((f"AsyncClient gather ({batch} at a time)", *asyncio.run(gather_rounds())))
    return results


def table(results: list[tuple[str, int, float]]) -> str:
    base = results[0][1] / results[0][2]
    lines = [f"{'mode':40} {'requests':>9} {'seconds':>8} {'req/s':>8} {'vs one-at-a-time':>17}"]
    for name, n, secs in results:
        rate = n / secs
        lines.append(f"{name:40} {n:9d} {secs:8.2f} {rate:8.0f} {rate / base:16.1f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--endpoint", help="a running pool serving 'digits' (default: start the demo pool)")
    parser.add_argument("--frontend", default="tcp://127.0.0.1:5577", help="where the started demo pool listens")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per mode (default 3)")
    parser.add_argument("--window", type=int, default=64, help="predict_many window (default 64)")
    parser.add_argument("--batch", type=int, default=1000, help="requests per predict_many/submit/gather round")
    args = parser.parse_args(argv)
    pool = None if args.endpoint else DemoPool(args.frontend)
    endpoint = args.endpoint or args.frontend
    try:
        results = bench(endpoint, args.seconds, args.window, args.batch)
    finally:
        if pool is not None:
            pool.stop()
    print(f"one sample per request, model {MODEL!r} at {endpoint}, {os.cpu_count()} CPUs")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
