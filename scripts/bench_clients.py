"""The public Python clients next to the raw socket and the in-process baselines (issue 13's table).

    .venv/bin/python scripts/bench_clients.py                  # 3 runs of 5 s windows, prints markdown
    .venv/bin/python scripts/bench_clients.py --write          # ... and puts it into docs/BENCHMARKS.md
    .venv/bin/python scripts/bench_clients.py --runs 1 --seconds 1 --skip-cnn   # smoke test

One run: a pool of the ``tiny`` workload (2 replicas, max_batch_size 128) is driven at 128 requests in
flight by each generator in turn (raw DEALER, ``Client.submit``, ``Client.predict_many``,
``AsyncClient``, ``Client.predict`` from 128 threads); the one-process thread pool (``tf.function``)
at 128 in flight; sequential ``Client.predict`` against in-process ``tf.function`` calls; then ``cnn``
(2 replicas, max_batch_size 64) at 32 in flight against one in-process batch-32 call. CPU seconds
per request come from ``/proc`` for this process (the client; its threads included), the launcher
(the broker) and the workers. Each row gives the median over the runs and the spread (min-max).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if sys.path[0] != str(REPO):
    sys.path.insert(0, str(REPO))

from bench.loadgen import GENERATORS, threadpool_load  # noqa: E402
from bench.measure import log, perf, sequential  # noqa: E402
from bench.pool import SERVING_SETTINGS, Pool  # noqa: E402
from bench.procs import read_cpu_s  # noqa: E402
from bench.report import CLIENTS_SECTION_END, CLIENTS_SECTION_START, with_section  # noqa: E402
from bench.workloads import build_model, compiled_call, polymorphic_call, sample_input  # noqa: E402

ORDER = ("dealer", "submit", "many", "async", "threads")


def _cpu_self() -> float:
    return time.process_time()


def measure_pool(path: str, wl: str, x1, n: int, replicas: int, max_batch: int, gens: tuple[str, ...],
                 args: argparse.Namespace) -> dict[str, dict]:
    """Requests/s and CPU ms per request (client, broker, workers) per generator, one pool."""
    pool = Pool([{"name": wl, "path": path, "replicas": replicas, "max_batch_size": max_batch}],
                settings=SERVING_SETTINGS, log_level="WARNING")
    out = {}
    try:
        workers = pool.worker_pids(wl)
        for name in gens:
            generator = GENERATORS[name][0]
            c0, b0, w0, t0 = _cpu_self(), read_cpu_s(pool.proc.pid), sum(read_cpu_s(p) for p in workers), perf()
            win = generator(pool.endpoint, wl, x1, n, args.warmup, args.seconds)
            wall = perf() - t0
            done = len(win.latencies)
            # every request completed over the whole call (warm-up included) for the CPU figures
            total = max(1, done * wall / args.seconds)
            out[name] = {
                "rps": done / args.seconds,
                "client_ms": (_cpu_self() - c0) / total * 1000,
                "broker_ms": (read_cpu_s(pool.proc.pid) - b0) / total * 1000,
                "workers_ms": (sum(read_cpu_s(p) for p in workers) - w0) / total * 1000,
                "errors": sum(win.errors.values()),
            }
            log(f"{wl} {name:8s} {out[name]['rps']:9,.0f} req/s  client {out[name]['client_ms']:.4f} ms/req  "
                f"broker {out[name]['broker_ms']:.4f}  workers {out[name]['workers_ms']:.4f}  errors {out[name]['errors']}")
        with pool.client as client:
            for _ in range(20):
                client.predict(wl, x1)
            if wl == "tiny":
                win = sequential(lambda: client.predict(wl, x1), args.warmup, args.seconds)
                out["sequential"] = {"p50_ms": statistics.median(win.latencies) * 1000}
    finally:
        pool.stop()
    return out


def one_run(args: argparse.Namespace, tmp: Path, models: dict) -> dict[str, float]:
    """Every figure of one run, by row name."""
    row: dict[str, float] = {}
    tiny, tpath, tx = models["tiny"]
    fn = compiled_call(tiny)
    poly = polymorphic_call(tiny)
    for _ in range(20):
        poly(tx).numpy()
    seq = sequential(lambda: poly(tx).numpy(), args.warmup, args.seconds)
    row["tf.function p50 ms"] = statistics.median(seq.latencies) * 1000
    tp = threadpool_load(fn, tx, 128, 8, args.warmup, args.seconds)
    row["threadpool tf.function req/s"] = len(tp.latencies) / args.seconds
    got = measure_pool(tpath, "tiny", tx, 128, 2, 128, ORDER, args)
    for name in ORDER:
        row[f"{name} req/s"] = got[name]["rps"]
        for part in ("client_ms", "broker_ms", "workers_ms"):
            row[f"{name} {part}"] = got[name][part]
        row[f"{name} errors"] = got[name]["errors"]
    row["Client.predict p50 ms"] = got["sequential"]["p50_ms"]
    if not args.skip_cnn:
        cnn, cpath, cx = models["cnn"]
        cfn = compiled_call(cnn)
        xb = sample_input(cnn, 32, 7)
        for _ in range(3):
            cfn(xb).numpy()
        b32 = sequential(lambda: cfn(xb).numpy(), args.warmup, args.seconds)
        row["cnn batch-32 samples/s"] = len(b32.latencies) * 32 / args.seconds
        got = measure_pool(cpath, "cnn", cx, 32, 2, 64, ("dealer", "submit", "async"), args)
        for name in ("dealer", "submit", "async"):
            row[f"cnn {name} req/s"] = got[name]["rps"]
    return row


def summarize(runs: list[dict[str, float]], skip_cnn: bool) -> str:
    """The markdown table: figures (median and spread over runs) and the issue's ratios."""
    def med(key):
        return statistics.median(r[key] for r in runs)

    def spread(key, fmt="{:,.0f}"):
        values = [r[key] for r in runs]
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"

    def ratio(a, b, fmt="{:.2f}x"):
        values = [r[a] / r[b] for r in runs]
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"

    labels = {"dealer": "raw DEALER (not a user API)", "submit": "`Client.submit`", "many": "`Client.predict_many`",
              "async": "`AsyncClient`", "threads": "`Client.predict`, 128 threads"}
    lines = [f"tiny, 2 replicas, 128 in flight; {len(runs)} runs, median (min–max)", "",
             "| via | req/s | vs raw DEALER | client CPU ms/req | broker CPU ms/req | workers CPU ms/req |",
             "|---|---|---|---|---|---|"]
    for name in ORDER:
        lines.append(f"| {labels[name]} | {spread(f'{name} req/s')} | {ratio(f'{name} req/s', 'dealer req/s')} | "
                     f"{spread(f'{name} client_ms', '{:.3f}')} | {spread(f'{name} broker_ms', '{:.3f}')} | "
                     f"{spread(f'{name} workers_ms', '{:.3f}')} |")
    lines.append(f"| one process, ThreadPoolExecutor(8), `tf.function` | {spread('threadpool tf.function req/s')} | "
                 f"{ratio('threadpool tf.function req/s', 'dealer req/s')} | | | |")
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]

    def verdict(name, values_key, target):
        values = [values_key(r) for r in runs]
        return statistics.median(values), min(values)

    checks = [
        ("`submit` >= 0.9x raw DEALER", lambda r: r["submit req/s"] / r["dealer req/s"], 0.9, "{:.2f}x", True),
        ("`predict_many` >= 0.9x raw DEALER", lambda r: r["many req/s"] / r["dealer req/s"], 0.9, "{:.2f}x", True),
        ("`AsyncClient` >= 0.9x raw DEALER", lambda r: r["async req/s"] / r["dealer req/s"], 0.9, "{:.2f}x", True),
        ("`Client.predict`, 128 threads >= 0.6x raw DEALER", lambda r: r["threads req/s"] / r["dealer req/s"], 0.6,
         "{:.2f}x", True),
        ("`submit` >= 8x one-process thread pool", lambda r: r["submit req/s"] / r["threadpool tf.function req/s"], 8,
         "{:.1f}x", True),
        ("`submit` client CPU <= 0.05 ms/req", lambda r: r["submit client_ms"], 0.05, "{:.3f} ms", False),
        ("`AsyncClient` client CPU <= 0.05 ms/req", lambda r: r["async client_ms"], 0.05, "{:.3f} ms", False),
        ("threads client CPU <= 0.12 ms/req", lambda r: r["threads client_ms"], 0.12, "{:.3f} ms", False),
        ("sequential `Client.predict` p50 <= 1.3x in-process `tf.function` p50",
         lambda r: r["Client.predict p50 ms"] / r["tf.function p50 ms"], 1.3, "{:.2f}x", False),
    ]
    if not skip_cnn:
        checks += [(f"cnn, 32 in flight, `{n}` >= 0.9x in-process batch-32",
                    lambda r, n=n: r[f"cnn {n} req/s"] / r["cnn batch-32 samples/s"], 0.9, "{:.2f}x", True)
                   for n in ("submit", "async")]
    for text, get, target, fmt, higher in checks:
        values = [get(r) for r in runs]
        m = statistics.median(values)
        ok = m >= target if higher else m <= target
        lines.append(f"| {text} | {fmt.format(m)} ({fmt.format(min(values))}–{fmt.format(max(values))}) | "
                     f"{'met' if ok else 'MISS'} |")
    seq = [f"sequential p50: `Client.predict` {spread('Client.predict p50 ms', '{:.3f}')} ms, in-process "
           f"`tf.function` {spread('tf.function p50 ms', '{:.3f}')} ms"]
    if not skip_cnn:
        seq.append(f"cnn, 32 in flight: in-process batch-32 {spread('cnn batch-32 samples/s')} samples/s; raw DEALER "
                   f"{spread('cnn dealer req/s')}, `submit` {spread('cnn submit req/s')}, `AsyncClient` "
                   f"{spread('cnn async req/s')} req/s")
    errors = sum(r[f"{n} errors"] for r in runs for n in ORDER)
    seq.append(f"errors over all runs: {errors:.0f}")
    return "\n".join(lines + [""] + [f"- {s}" for s in seq])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--skip-cnn", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help="put the table into docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    import keras

    tmp = Path(tempfile.mkdtemp(prefix="bench-clients-"))
    models = {}
    for wl in ("tiny",) + (() if args.skip_cnn else ("cnn",)):
        model = build_model(wl, args.seed)
        path = str(tmp / f"{wl}.keras")
        model.save(path)
        loaded = keras.models.load_model(path, compile=False)
        models[wl] = (loaded, path, sample_input(loaded, 1, args.seed))
    runs = []
    for i in range(args.runs):
        log(f"run {i + 1} of {args.runs}")
        runs.append(one_run(args, tmp, models))
    command = (f".venv/bin/python scripts/bench_clients.py --runs {args.runs} --seconds {args.seconds:g}"
               + (" --skip-cnn" if args.skip_cnn else ""))
    text = summarize(runs, args.skip_cnn)
    print(text + f"\n\ncommand: `{command}`")
    if args.write:
        page = REPO / "docs" / "BENCHMARKS.md"
        section = "\n".join([CLIENTS_SECTION_START, "## The public clients next to the raw socket "
                              "(`scripts/bench_clients.py`)", "", f"Command: `{command} --write` (this machine: "
                              f"{os.cpu_count()} cores, shared).", "", text, CLIENTS_SECTION_END])
        page.write_text(with_section(page.read_text(), section, CLIENTS_SECTION_START, CLIENTS_SECTION_END))
        log(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
