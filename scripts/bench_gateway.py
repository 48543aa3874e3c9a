"""What the KServe V2 gateway costs: tritonclient over HTTP and gRPC next to the ZeroMQ client, one pool.

    .venv/bin/python scripts/bench_gateway.py                  # tiny model, 2 replicas, 32 in flight, 10 s each
    .venv/bin/python scripts/bench_gateway.py --seconds 2 --warmup 0.5   # a smoke check

One pool (bench/pool.py, the launcher the tests use, the pool's own default settings) serves the
benchmark's `tiny` workload with 2 replicas and its gateway on ports the OS picks. Each point keeps
`--inflight` one-row requests in flight for `--seconds` after `--warmup`:

1. tritonclient.http.aio, binary tensor data (tritonclient's default);
2. tritonclient.grpc.aio;
3. the ZeroMQ `Client` (`submit` futures), alone;
4. the ZeroMQ `Client` again while another process keeps the same HTTP load on the gateway: how much
   the HTTP door takes from the native one on this machine.

The table gives requests/s, p50/p99 latency and ratios to the ZeroMQ client alone. Every load generator
runs on the same machine as the pool; run it on a quiet one.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if sys.path[0] != str(REPO):
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.loadgen import coroutine_load, submit_load  # noqa: E402
from bench.measure import Row, Window, log  # noqa: E402
from bench.pool import SERVING_SETTINGS, Pool  # noqa: E402
from bench.workloads import build_model, sample_input  # noqa: E402

MODEL = "tiny"


def http_load(url: str, x1: np.ndarray, n: int, warmup: float, seconds: float) -> Window:
    """``n`` coroutines of tritonclient.http.aio binary infer calls."""
    import tritonclient.http.aio as httpaio

    async def open_call() -> tuple:
        client = httpaio.InferenceServerClient(url, conn_limit=n)
        tensor = httpaio.InferInput("x", list(x1.shape), "FP32")
        tensor.set_data_from_numpy(x1, binary_data=True)
        outputs = [httpaio.InferRequestedOutput(_output_name(), binary_data=True)]

        async def call() -> Any:
            return (await client.infer(MODEL, [tensor], outputs=outputs)).as_numpy(_output_name())

        return call, client.close

    return coroutine_load(open_call, n, warmup, seconds)


def grpc_load(url: str, x1: np.ndarray, n: int, warmup: float, seconds: float) -> Window:
    """``n`` coroutines of tritonclient.grpc.aio infer calls (raw tensor contents)."""
    import tritonclient.grpc.aio as grpcaio

    async def open_call() -> tuple:
        client = grpcaio.InferenceServerClient(url)
        tensor = grpcaio.InferInput("x", list(x1.shape), "FP32")
        tensor.set_data_from_numpy(x1)

        async def call() -> Any:
            return (await client.infer(MODEL, [tensor])).as_numpy(_output_name())

        return call, client.close

    return coroutine_load(open_call, n, warmup, seconds)


_OUTPUT = {"name": ""}


def _output_name() -> str:
    return _OUTPUT["name"]


def _background_http(url: str, x1: np.ndarray, n: int, seconds: float, output: str) -> None:
    _OUTPUT["name"] = output
    http_load(url, x1, n, 0.0, seconds)


def measure(pool: Pool, x1: np.ndarray, args: argparse.Namespace) -> list[tuple[str, Window]]:
    ports = pool.gateway_ports()
    http_url, grpc_url = "%s:%d" % ports["http"], "%s:%d" % ports["grpc"]
    n, warmup, seconds = args.inflight, args.warmup, args.seconds
    results = []
    log("tritonclient HTTP (binary)")
    results.append(("tritonclient.http, binary", http_load(http_url, x1, n, warmup, seconds)))
    log("tritonclient gRPC")
    results.append(("tritonclient.grpc", grpc_load(grpc_url, x1, n, warmup, seconds)))
    log("ZeroMQ Client alone")
    results.append(("ZeroMQ Client", submit_load(pool.endpoint, MODEL, x1, n, warmup, seconds)))
    log("ZeroMQ Client with HTTP load beside it")
    ctx = multiprocessing.get_context("spawn")
    loader = ctx.Process(target=_background_http, args=(http_url, x1, n, warmup * 2 + seconds + 1.0, _output_name()),
                         daemon=True)
    loader.start()
    try:
        results.append((f"ZeroMQ Client + {n} HTTP in flight", submit_load(pool.endpoint, MODEL, x1, n,
                                                                           warmup * 2, seconds)))
    finally:
        loader.join(warmup * 2 + seconds + 30)
        if loader.is_alive():
            loader.kill()
            loader.join(5)
    return results


def table(results: list[tuple[str, Window]], n: int) -> str:
    rows: list[tuple[str, Row]] = [(name, win.row(MODEL, "modelpool-2", name, n)) for name, win in results]
    base = next(r.rps for name, r in rows if name == "ZeroMQ Client") or float("nan")
    lines = [f"{'client':<36} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'vs ZeroMQ':>10}  errors / notes",
             "-" * 90]
    for name, row in rows:
        extra = " ".join(x for x in (str(row.errors) if row.errors else "", row.note) if x)
        lines.append(f"{name:<36} {row.rps:>10,.0f} {row.p50_ms:>8.2f} {row.p99_ms:>8.2f} {row.rps / base:>9.2f}x  {extra}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per point (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each measurement (default 2)")
    parser.add_argument("--inflight", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--replicas", type=int, default=2, help="replicas of the model (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-gw-") as tmp:
        model = build_model(MODEL, args.seed)
        path = str(Path(tmp) / f"{MODEL}.keras")
        model.save(path)
        _OUTPUT["name"] = model.output_names[0] if hasattr(model, "output_names") else model.outputs[0].name
        x1 = sample_input(model, 1, args.seed)
        pool = Pool([{"name": MODEL, "path": path, "replicas": args.replicas, "max_batch_size": 32}],
                    settings=SERVING_SETTINGS, gateway=True, log_level="WARNING")
        try:
            meta = pool.client.metadata(MODEL)
            _OUTPUT["name"] = meta["outputs"][0]["name"]
            results = measure(pool, x1, args)
        finally:
            code = pool.stop()
        if code != 0:
            log(f"launcher exited with {code}:\n{pool.read_log()[-3000:]}")
    print(f"\n{MODEL} model, {args.replicas} replicas, {args.inflight} in flight, {args.seconds:g} s per point")
    print(table(results, args.inflight))
    return 0


if __name__ == "__main__":
    sys.exit(main())
