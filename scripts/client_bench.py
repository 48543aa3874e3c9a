"""Requests/s of one Python client against the demo pool: one at a time, pipelined, submit(), asyncio.

    .venv/bin/python -m scripts.client_bench                   # starts and stops its own demo pool
    .venv/bin/python -m scripts.client_bench --write           # ... and puts its table into docs/BENCHMARKS.md
    .venv/bin/python -m scripts.client_bench --endpoint tcp://127.0.0.1:5555   # an already running pool

Every request carries one sample (one row) of ``modelproc.demo.load_samples()``; every answer is checked
against the answer for that sample. Each mode runs for ``--seconds``. The demo pool (the model and settings
of ``modelpool serve --demo``) is started with ``bench/pool.py``, the launcher the tests use.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if sys.path[0] != str(REPO):  # `python scripts/client_bench.py` puts scripts/ first, where bench.py is
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from modelpool.cli import demo_config  # noqa: E402
from modelpool.client import AsyncClient, Client  # noqa: E402
from modelpool.modelproc.demo import load_samples  # noqa: E402

from bench.pool import SERVING_SETTINGS, Pool  # noqa: E402
from bench.report import CLIENT_SECTION_END, CLIENT_SECTION_START, with_section  # noqa: E402

MODEL = "digits"


def demo_pool(frontend: str | None, ready_timeout: float = 180.0) -> Pool:
    """The demo pool (``modelpool serve --demo``'s model and settings) started with the shared launcher."""
    config = demo_config(frontend)
    models = [dataclasses.asdict(m) for m in config.models]
    return Pool(models, ready_timeout=ready_timeout, settings=SERVING_SETTINGS,
                **({"frontend": frontend} if frontend else {}))


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


def section(text: str, command: str) -> str:
    """The table as the client_bench section of docs/BENCHMARKS.md."""
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    return "\n".join([CLIENT_SECTION_START, "## One Python client against the demo pool (`scripts/client_bench.py`)", "",
                      f"- Date: {when}; command: `{command}`", "",
                      "```", text, "```", CLIENT_SECTION_END])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--endpoint", help="a running pool serving 'digits' (default: start the demo pool)")
    parser.add_argument("--frontend", help="where the started demo pool listens (default: a private ipc:// path)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per mode (default 3)")
    parser.add_argument("--window", type=int, default=64, help="predict_many window (default 64)")
    parser.add_argument("--batch", type=int, default=1000, help="requests per predict_many/submit/gather round")
    parser.add_argument("--write", action="store_true", help="put the table into docs/BENCHMARKS.md as well")
    args = parser.parse_args(argv)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    pool = None if args.endpoint else demo_pool(args.frontend)
    endpoint = args.endpoint or pool.endpoint
    try:
        results = bench(endpoint, args.seconds, args.window, args.batch)
    finally:
        if pool is not None:
            pool.stop()
    where = "the demo pool (2 replicas)" if pool is not None else endpoint
    text = f"one sample per request, model {MODEL!r} at {where}, {os.cpu_count()} CPUs\n{table(results)}"
    print(text)
    if args.write:
        page = REPO / "docs" / "BENCHMARKS.md"
        command = shlex.join([".venv/bin/python", "-m", "scripts.client_bench", *(sys.argv[1:] if argv is None else argv)])
        page.write_text(with_section(page.read_text(), section(text, command)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
