"""Side-by-side benchmark: in-process calls, a thread pool, modelpool (1 and 2 replicas), Ray Serve.

Builds two seeded Keras workloads (``tiny``: Dense(64) -> Dense(10) on 32 floats; ``cnn``: a small
32x32x3 convnet) and measures, one sample per request, sequential latency and then throughput with N
requests kept in flight. modelpool is driven through its public clients (``Client.predict``,
``Client.submit``, ``AsyncClient``), with a raw DEALER generator beside them to show what the clients
cost. Writes ``docs/BENCHMARKS.md`` and ``docs/bench_<workload>.png`` (under the repository root) unless
``--no-write``. The code is in ``bench/``.

    .venv/bin/python scripts/bench.py                      # full run, writes docs/
    .venv/bin/python scripts/bench.py --quick --no-write --workloads tiny   # smoke test
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if sys.path[0] != str(REPO):  # `python scripts/bench.py` puts scripts/ first, where `bench` is this file
    sys.path.insert(0, str(REPO))

from bench.driver import run  # noqa: E402
from bench.loadgen import GENERATORS  # noqa: E402
from bench.measure import log  # noqa: E402
from bench.systems import SYSTEMS, THREADPOOL_WORKERS  # noqa: E402
from bench.workloads import WORKLOADS  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated: " + ", ".join(SYSTEMS))
    p.add_argument("--generators", default="submit,async,dealer",
                   help="modelpool load generators at N in flight, comma-separated: submit (Client.submit), "
                        "async (AsyncClient), dealer (raw DEALER socket, not a user API), many (Client.predict_many), "
                        "threads (Client.predict from N threads)")
    p.add_argument("--concurrency", default="1,8,32,128", help="requests in flight, comma-separated")
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each point")
    p.add_argument("--quick", action="store_true", help="short points (0.5 s + 0.25 s warm-up) for smoke tests")
    p.add_argument("--tiny-max-batch", type=int, default=128, help="max_batch_size of the tiny model")
    p.add_argument("--cnn-max-batch", type=int, default=64, help="max_batch_size of the cnn model")
    p.add_argument("--max-delay-ms", type=float, default=0.0, help="modelpool max_delay_ms")
    p.add_argument("--pad-to-bucket", action="store_true", help="modelpool pad_to_bucket")
    p.add_argument("--threadpool-workers", type=int, default=THREADPOOL_WORKERS, help="threads of the threadpool")
    p.add_argument("--ray-batch-wait-ms", type=float, default=0.0, help="@serve.batch batch_wait_timeout_s, in ms")
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for a pool to be ready")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--note", action="append", default=[], dest="extra_notes",
                   help="a line for the page's notes (repeatable), e.g. what was left out of this run")
    p.add_argument("--out", default="docs/BENCHMARKS.md",
                   help="markdown file, relative to the repository root; plots go beside it")
    p.add_argument("--no-write", action="store_true", help="print the markdown, write nothing")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup = min(args.seconds, 0.5), min(args.warmup, 0.25)
    args.workloads = _choices(args.workloads, WORKLOADS, p, "--workloads")
    args.systems = _choices(args.systems, SYSTEMS, p, "--systems")
    args.generators = _choices(args.generators, tuple(GENERATORS), p, "--generators")
    try:
        args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        p.error(f"--concurrency must be integers, got {args.concurrency!r}")
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency needs integers >= 1")
    args.max_batch = {"tiny": args.tiny_max_batch, "cnn": args.cnn_max_batch}
    return args


def _choices(text: str, known: tuple, p: argparse.ArgumentParser, flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in known]
    if bad or not items:
        p.error(f"{flag}: unknown {bad or text!r}; choose from {', '.join(known)}")
    return [k for k in known if k in items]


def command_line(argv: list[str] | None) -> str:
    """This run's command, with paths relative to the repository where they can be."""
    exe = Path(sys.executable)
    exe_text = str(exe.relative_to(REPO)) if exe.is_relative_to(REPO) else "python"
    script = Path(sys.argv[0]).resolve()
    script_text = str(script.relative_to(REPO)) if script.is_relative_to(REPO) else str(script)
    return shlex.join([exe_text, script_text, *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv), command_line(argv))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; every pool this run started has been stopped")
        sys.exit(130)
