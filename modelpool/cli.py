"""The `modelpool` command: start a pool from a config file (and talk to one)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from typing import Callable, NamedTuple, TextIO

import numpy as np

from modelpool.broker import config as pool_config
from modelpool.broker.config import ConfigError, ModelConfig, PoolConfig
from modelpool.broker.metrics import HistogramSnapshot
from modelpool.client import Client, PoolError, protocol
from modelpool.client.base import DEFAULT_ENDPOINT
from modelpool.modelproc.worker import add_arguments as add_worker_arguments
from modelpool.modelproc.worker import run_standalone

log = logging.getLogger("modelpool")

EXIT_OK = 0
EXIT_POOL_ERROR = 1  # the pool answered with an error, or did not answer
EXIT_USAGE = 2  # bad arguments or an unreadable input file (argparse exits 2 as well)
EXIT_LOAD_FAILED = 3  # serve: a model failed to load at start (see pool.exit_on_error)
EXIT_GATEWAY_FAILED = 4  # serve: the KServe V2 gateway could not bind its ports at start


def demo_config(frontend: str | None) -> PoolConfig:
    """The bundled digits classifier, two replicas."""
    from modelpool.modelproc.demo import MODEL_PATH

    model = ModelConfig(name="digits", path=str(MODEL_PATH), replicas=2, version="1", max_batch_size=64)
    return PoolConfig(models=(model,), frontend=frontend or pool_config.DEFAULT_FRONTEND)


def _announce(broker: object) -> None:
    state = broker.state  # type: ignore[attr-defined]
    endpoint = broker.frontend_endpoint  # type: ignore[attr-defined]
    lines = [f"modelpool listening on {endpoint}"]
    metrics = broker.metrics_server  # type: ignore[attr-defined]
    lines.append(f"metrics on {metrics.url}" if metrics is not None else "metrics off")
    for entry in state.entries():
        status = f"{entry.ready}/{entry.expected} replicas ready"
        if entry.load_error:
            status += f"; load failed: {entry.load_error}"
        lines.append(f"  model {entry.name.decode()!r} version {entry.version}: {status}")
    repo = broker.config.repository  # type: ignore[attr-defined]
    if repo.path:
        lines.append(f"model repository {repo.path} (control mode {repo.control_mode}"
                     + (f", polled every {repo.poll_seconds:g}s)" if repo.control_mode == "poll" else ")"))
    first = next(iter(state.models), b"").decode()
    if not first:
        lines.append("no model loaded yet: modelpool load NAME")
    elif first == "digits":
        lines.append("example request (in another shell):")
        lines.append(f"  .venv/bin/python -c \"from modelpool import Client; from modelpool.modelproc.demo import load_samples; "
                     f"x, y = load_samples(); print(Client('{endpoint}').predict('digits', x).argmax(1), 'labels', y)\"")
    else:
        lines.append(f"example request: Client('{endpoint}').metadata('{first}') from `from modelpool import Client`")
    lines.append("Ctrl-C stops the pool")
    print("\n".join(lines), flush=True)


def gateway_lines(config: PoolConfig, ports: dict[str, int]) -> list[str]:
    """Where the KServe V2 doors listen, as `modelpool serve` prints it."""
    lines = []
    if "http" in ports:
        host = _url_host(config.http.host)
        lines.append(f"KServe V2 HTTP listening on http://{host}:{ports['http']} "
                     f"(e.g. curl http://{host}:{ports['http']}/v2/health/ready)")
    if "grpc" in ports:
        lines.append(f"KServe V2 gRPC listening on {_url_host(config.grpc.host)}:{ports['grpc']}")
    return lines


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _announce_gateway(broker: object, ports: dict[str, int]) -> None:
    print("\n".join(gateway_lines(broker.config, ports)), flush=True)  # type: ignore[attr-defined]


def door_port(text: str) -> int | None:
    """A --metrics-port/--http-port/--grpc-port value: a port number (0: any free port) or "off" (None)."""
    if text.strip().lower() == "off":
        return None
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number or 'off', got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535 (0: any free port) or 'off', got {text}")
    return port


_UNSET = -1  # a --metrics-port/--http-port/--grpc-port flag not given


def apply_door_flags(cfg: PoolConfig, ports: dict[str, int | None]) -> PoolConfig:
    """The config with the --metrics-port/--http-port/--grpc-port flags applied: ``ports`` maps
    "metrics", "http" and "grpc" to a port (0: any free port), None (off) or _UNSET (as configured)."""
    changes = {}
    for key, port in ports.items():
        if port != _UNSET:
            door = getattr(cfg, key)
            changes[key] = replace(door, enabled=False) if port is None else replace(door, enabled=True, port=port)
    return cfg.with_overrides(**changes) if changes else cfg


def apply_repository_flags(cfg: PoolConfig, args: argparse.Namespace) -> PoolConfig:
    """The config with --model-repository, --model-control-mode, --repository-poll-secs and --load-model."""
    changes = {}
    if args.model_repository:
        changes["path"] = args.model_repository
    if args.model_control_mode:
        changes["control_mode"] = args.model_control_mode
    if args.repository_poll_secs is not None:
        changes["poll_seconds"] = args.repository_poll_secs
    if args.load_model:
        changes["load"] = tuple(args.load_model)
    if not changes:
        return cfg
    repo = replace(cfg.repository, **changes)
    if not repo.path:
        raise ConfigError("--model-control-mode, --repository-poll-secs and --load-model need a model repository "
                          "(--model-repository DIR or [repository] path)")
    return cfg.with_overrides(repository=repo)


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the pool in the foreground until SIGINT/SIGTERM."""
    from modelpool.broker.exporter import MetricsError
    from modelpool.broker.server import Broker

    try:
        if args.demo:
            cfg = demo_config(args.frontend)
        elif args.config:
            cfg = pool_config.load(args.config)
            cfg = cfg.with_overrides(frontend=args.frontend)
        elif args.model_repository:
            cfg = PoolConfig(repository=pool_config.RepositoryConfig(path=args.model_repository),
                             frontend=args.frontend or pool_config.DEFAULT_FRONTEND)
        else:
            raise ConfigError("give a config file with -c pool.toml, a model repository with --model-repository DIR, "
                              "or --demo")
        cfg = apply_repository_flags(cfg, args)
        if args.log_level:
            cfg = cfg.with_overrides(log_level=args.log_level)
        cfg = apply_door_flags(cfg, {"metrics": args.metrics_port, "http": args.http_port, "grpc": args.grpc_port})
    except ConfigError as exc:
        print(f"modelpool: config error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        broker = Broker(cfg, on_ready=_announce, on_gateway=_announce_gateway)
    except ConfigError as exc:  # a repository model that cannot be read at start
        print(f"modelpool: config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # zmq.ZMQError for an address in use, mostly
        print(f"modelpool: cannot start: {exc} (frontend {cfg.frontend})", file=sys.stderr)
        return 1
    try:
        broker.start_metrics()
    except MetricsError as exc:
        broker.close()
        print(f"modelpool: cannot start: {exc}", file=sys.stderr)
        return 1
    broker.install_signal_handlers()
    try:
        code = broker.run()
    finally:
        broker.close()
    if code == EXIT_GATEWAY_FAILED:
        _fail(f"cannot start the KServe V2 gateway: {broker.gateway.error}; choose other ports with --http-port/"
              "--grpc-port (or [http]/[grpc] port in the config), or turn a door off with 'off'", code)
    if code == EXIT_LOAD_FAILED:
        for entry in broker.state.entries():
            if entry.load_error and entry.ready == 0:
                _fail(f"model '{entry.name.decode()}' failed to load: {entry.load_error}", code)
        _fail("stopped: a model failed to load at start (set exit_on_error = false in [pool] to serve the "
              "other models anyway)", code)
    return code


class InputFileError(Exception):
    """An input file that cannot be read, or an output file that cannot be written."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(message: str, code: int) -> int:
    print(f"modelpool: {_one_line(message)}", file=sys.stderr)
    return code


def _talks_to_pool(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Exit codes of the client commands: 1 with the error's type for what the pool said, 2 for files."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except PoolError as exc:
            return _fail(f"{type(exc).__name__}: {exc}", EXIT_POOL_ERROR)
        except InputFileError as exc:
            return _fail(str(exc), EXIT_USAGE)

    run.__doc__ = command.__doc__
    return run


# --- status ----------------------------------------------------------------------------------

# 4XX: requests the pool refused (bad input, queue full); 5XX: the model raised, crashed, timed out or
# could not be reached. A client sending bad requests does not make the model look broken.
STATUS_COLUMNS = ("MODEL", "VERSION", "READY", "STARTING", "FAILED", "QUEUE", "IN FLIGHT", "BATCH", "REQ/S",
                  "QUEUE P50", "SERVED", "4XX", "5XX")


class Sample(NamedTuple):
    """One look at the pool: mmi.models, mmi.metrics (None from a pool without it) and when it was taken."""

    models: list
    metrics: dict | None
    at: float


def _count(entry: dict, key: str) -> str:
    value = entry.get(key)
    return "-" if value is None else str(value)


def _int(entry: dict | None, key: str) -> int | None:
    value = entry.get(key) if isinstance(entry, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _mean_batch(entry: dict, before: dict | None = None) -> str:
    batches, rows = _int(entry, "batches"), _int(entry, "batch_rows")
    if batches is None or rows is None:
        return "-"
    if before is not None and _int(before, "batches") is not None and _int(before, "batch_rows") is not None:
        batches, rows = batches - before["batches"], rows - before["batch_rows"]
    return f"{rows / batches:.1f}" if batches > 0 else "-"


def _answered(entry: dict | None) -> int | None:
    counts = [_int(entry, key) for key in ("served", "client_errors", "errors")]
    return None if None in counts else sum(counts)


def _rate(entry: dict, before: dict | None, seconds: float | None) -> str:
    answered = _answered(entry)
    if answered is None or not seconds or seconds <= 0:
        return "-"
    if before is not None:
        answered -= _answered(before) or 0
    rate = answered / seconds
    return f"{rate:.1f}" if rate < 100 else f"{rate:.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g}ms"
    return f"{seconds:.2f}s"


def _histograms(metrics: dict | None) -> dict[str, dict[str, HistogramSnapshot]]:
    """Model name -> histogram name -> snapshot, from an mmi.metrics answer; what cannot be read is left out."""
    out: dict[str, dict[str, HistogramSnapshot]] = {}
    for model in (metrics or {}).get("models") or []:
        if not isinstance(model, dict) or not isinstance(model.get("histograms"), dict):
            continue
        parsed = {}
        for name, value in model["histograms"].items():
            try:
                parsed[name] = HistogramSnapshot.from_wire(value)
            except ValueError:
                continue
        out[_key(model)] = parsed
    return out


def _key(model: dict | None) -> str:
    """A row of the status table: a model version (a model may serve several side by side)."""
    model = model or {}
    return f"{model.get('name')}:{model.get('version') or ''}"


def _queue_p50(name: str, now: dict, before: dict | None) -> str:
    current = now.get(name, {}).get("queue_seconds")
    if current is None:
        return "-"
    earlier = (before or {}).get(name, {}).get("queue_seconds")
    return _duration((current.minus(earlier) if earlier is not None else current).quantile(0.5))


def _window(sample: Sample, previous: Sample | None) -> tuple[Sample | None, float | None, str]:
    """(sample to subtract, seconds, words): the last interval in --watch, else since the broker started."""
    if previous is not None and previous.models and sample.at > previous.at:
        before = {_key(m): m for m in previous.models}
        restarted = any((_answered(m) or 0) < (_answered(before.get(_key(m))) or 0) for m in sample.models)
        if not restarted:
            seconds = sample.at - previous.at
            return previous, seconds, f"rates over the last {seconds:.1f}s"
    uptime = (sample.metrics or {}).get("uptime_seconds")
    if isinstance(uptime, (int, float)) and not isinstance(uptime, bool) and uptime > 0:
        return None, float(uptime), f"rates since the broker started {uptime:.0f}s ago"
    return None, None, ""


def format_status(models: list[dict] | Sample, endpoint: str = "", previous: Sample | None = None) -> str:
    """The `modelpool status` table: one row per model, then the load errors underneath.

    Given a Sample (mmi.models with mmi.metrics), REQ/S (requests answered per second, every outcome),
    QUEUE P50 and BATCH cover the time since ``previous`` (--watch), or since the broker started.
    """
    sample = models if isinstance(models, Sample) else Sample(models, None, 0.0)
    base, seconds, words = _window(sample, previous)
    head = [f"pool at {endpoint}" + (f"; {words}" if words else "")] if endpoint else []
    if not sample.models:
        return "\n".join(head + ["no models served"])
    hists = _histograms(sample.metrics)
    hists_before = _histograms(base.metrics) if base is not None else None
    before = {_key(m): m for m in base.models} if base is not None else {}
    ordered = sorted(sample.models, key=lambda m: str(m.get("name", "")))  # stable: newest version first
    rows = []
    for m in ordered:
        name, earlier = str(m.get("name", "?")), before.get(_key(m))
        ready = _count(m, "replicas_ready")
        if m.get("replicas_expected"):
            ready += f"/{m['replicas_expected']}"
        version = str(m.get("version") or "-") + ("*" if m.get("default") and len(
            [o for o in ordered if o.get("name") == m.get("name")]) > 1 else "")
        rows.append((name, version, ready, _count(m, "replicas_starting"),
                     _count(m, "replicas_failed"), _count(m, "queue_depth"), _count(m, "in_flight"),
                     _mean_batch(m, earlier), _rate(m, earlier, seconds), _queue_p50(_key(m), hists, hists_before),
                     _count(m, "served"), _count(m, "client_errors"), _count(m, "errors")))
    widths = [max(len(col), *(len(r[i]) for r in rows)) for i, col in enumerate(STATUS_COLUMNS)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = head + [line(STATUS_COLUMNS)] + [line(r) for r in rows]
    for m in ordered:
        if m.get("load_error"):
            lines.append(f"model {m.get('name')!r} version {m.get('version')!r} failed to load: "
                         f"{_one_line(m['load_error'])}")
    if any("*" in r[1] for r in rows):
        lines.append("* the version a request that names none goes to")
    return "\n".join(lines)


def fetch_metrics(client: Client) -> dict | None:
    """The pool's mmi.metrics answer (histograms, uptime), or None from a pool that has no such service."""
    reply = client.call(protocol.MMI_METRICS.decode(), {})
    return reply.header if reply.status == protocol.OK else None


def _sample(client: Client, wait: bool, timeout: float) -> Sample:
    models = client.wait_ready(timeout=timeout) if wait else client.models()
    return Sample(models, fetch_metrics(client), time.monotonic())


CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen


def watch_status(fetch: Callable[[], Sample], endpoint: str, interval: float, out: TextIO, *,
                 sleep: Callable[[float], None] = time.sleep, frames: int | None = None) -> int:
    """Redraw the table every ``interval`` seconds (in place on a terminal) until Ctrl-C, or ``frames``.

    An error (the pool restarting) is shown in place of the table and the watch goes on.
    """
    previous: Sample | None = None
    drawn = 0
    clear = CLEAR if out.isatty() else ""
    try:
        while frames is None or drawn < frames:
            try:
                sample = fetch()
                text = format_status(sample, endpoint, previous)
                previous = sample
            except PoolError as exc:
                text = f"pool at {endpoint}\nmodelpool: {type(exc).__name__}: {_one_line(str(exc))}"
            stamp = time.strftime("%H:%M:%S")
            out.write(f"{clear}{text}\nrefreshed {stamp}, every {interval:g}s; Ctrl-C stops\n" + ("" if clear else "\n"))
            out.flush()
            drawn += 1
            if frames is None or drawn < frames:
                sleep(interval)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


@_talks_to_pool
def cmd_status(args: argparse.Namespace) -> int:
    """Print the models a running pool serves, their replicas, queues and counters."""
    if args.watch and args.json:
        return _fail("--watch draws the table; leave out --json (or --watch)", EXIT_USAGE)
    with Client(args.endpoint, timeout=args.timeout) as client:
        sample = _sample(client, args.wait, args.timeout)
        if args.watch:
            return watch_status(lambda: _sample(client, False, args.timeout), args.endpoint, args.watch,
                                sys.stdout, frames=None)
    if args.json:
        print(json.dumps({"endpoint": args.endpoint, "models": sample.models, "metrics": sample.metrics},
                         indent=2, sort_keys=True))
    else:
        print(format_status(sample, args.endpoint))
    return EXIT_OK


# --- predict ---------------------------------------------------------------------------------


def load_input(path: str) -> np.ndarray | dict[str, np.ndarray]:
    """The array of a .npy file, or the named arrays of a .npz file (never unpickles)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputFileError(f"input file {path!r} does not exist") from None
    except (OSError, ValueError, EOFError) as exc:
        raise InputFileError(f"cannot read input file {path!r} as .npy or .npz: {exc}") from None
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        arrays = {name: loaded[name] for name in loaded.files}
    if not arrays:
        raise InputFileError(f"input file {path!r} holds no arrays")
    return arrays


def save_output(path: str, outputs: dict[str, np.ndarray]) -> None:
    """One output as .npy; several (or a path ending in .npz) as .npz keyed by output name."""
    try:
        with open(path, "wb") as f:
            if len(outputs) == 1 and not path.endswith(".npz"):
                np.save(f, next(iter(outputs.values())))
            else:
                np.savez(f, **outputs)
    except OSError as exc:
        raise InputFileError(f"cannot write output file {path!r}: {exc.strerror or exc}") from None


def looks_like_probabilities(value: np.ndarray) -> bool:
    """Rows of a 2-D float array that lie in [0, 1] and sum to 1: a classifier's softmax."""
    if value.ndim != 2 or value.shape[1] < 2 or value.shape[0] == 0 or value.dtype.kind != "f":
        return False
    return bool(np.all((value >= 0) & (value <= 1)) and np.allclose(value.sum(axis=1), 1.0, atol=1e-3))


def format_outputs(outputs: dict[str, np.ndarray], values: bool = False) -> str:
    """Shape, dtype and the values of each output; argmax and its probability for a classifier."""
    lines = []
    for name, value in outputs.items():
        lines.append(f"output {name!r}: shape {list(value.shape)} dtype {value.dtype}")
        if looks_like_probabilities(value) and not values:
            top = value.argmax(axis=1)
            lines.append(f"argmax per row: {np.array2string(top, threshold=200, max_line_width=100)}")
            confidence = value[np.arange(len(top)), top]
            lines.append(f"probability:    {np.array2string(confidence, precision=3, threshold=200, max_line_width=100)}")
        else:
            lines.append(np.array2string(value, precision=5, threshold=200, suppress_small=True, max_line_width=100))
    return "\n".join(lines)


@_talks_to_pool
def cmd_predict(args: argparse.Namespace) -> int:
    """Send one request from the shell and print the result."""
    inputs = load_input(args.input)  # one array for a one-input model, or named arrays; converted as infer() does
    with Client(args.endpoint, timeout=args.timeout) as client:
        outputs = client.infer(args.model, inputs, outputs=args.fetch or None)
    print(format_outputs(outputs, values=args.values))
    if args.output:
        save_output(args.output, outputs)
        print(f"saved to {args.output}")
    return EXIT_OK


@_talks_to_pool
def cmd_scale(args: argparse.Namespace) -> int:
    """Set a model's local replica count (mmi.scale)."""
    with Client(args.endpoint, timeout=args.timeout) as client:
        answer = client.scale(args.model, args.replicas)
        print(f"model {answer['model']}: scaling to {answer['replicas']} replicas")
        return _wait_settled(client, args.model, args.wait)


@_talks_to_pool
def cmd_reload(args: argparse.Namespace) -> int:
    """Replace a model's replicas by fresh processes, each warmed before the old one leaves (mmi.reload)."""
    with Client(args.endpoint, timeout=args.timeout) as client:
        answer = client.reload(args.model)
        print(f"model {answer['model']}: replacing {answer['replacing']} replicas")
        return _wait_settled(client, args.model, args.wait)


@_talks_to_pool
def cmd_load(args: argparse.Namespace) -> int:
    """Serve a model from the config or the model repository, or read it again (mmi.load)."""
    with Client(args.endpoint, timeout=args.timeout) as client:
        answer = client.load(args.model)
        done = [f"versions {', '.join(answer['versions'])}"]
        for key in ("started", "reloaded", "unloading"):
            if answer.get(key):
                done.append(f"{key} {', '.join(answer[key])}")
        print(f"model {answer['model']}: {'; '.join(done)}")
        return _wait_settled(client, args.model, args.wait)


@_talks_to_pool
def cmd_unload(args: argparse.Namespace) -> int:
    """Stop serving a model; its replicas finish what they hold and exit (mmi.unload)."""
    with Client(args.endpoint, timeout=args.timeout) as client:
        answer = client.unload(args.model)
        print(f"model {answer['model']}: unloading versions {', '.join(answer['unloading'])}")
        if not args.wait:
            return EXIT_OK
        deadline = time.monotonic() + args.wait
        while any(m.get("name") == args.model for m in client.models()):
            if time.monotonic() >= deadline:
                print(f"model {args.model}: still draining after {args.wait:g}s")
                return EXIT_POOL_ERROR
            time.sleep(0.2)
        print(f"model {args.model}: unloaded")
        return EXIT_OK


def _wait_settled(client: Client, model: str, wait: float) -> int:
    """With --wait: until the model has its replicas ready and none starting or draining."""
    if not wait:
        return EXIT_OK
    deadline = time.monotonic() + wait
    while True:
        versions = [m for m in client.models() if m.get("name") == model]
        entry = next((m for m in versions if m.get("default")), versions[0] if versions else {})
        draining = sum(1 for m in versions for w in m.get("workers") or [] if w.get("state") == "draining")
        settled = bool(versions) and not draining and all(
            v.get("state") in ("READY", None) and v.get("replicas_ready") == v.get("replicas_expected")
            and not v.get("replicas_starting") for v in versions)
        if settled or time.monotonic() >= deadline:
            print(f"model {model}: {entry.get('replicas_ready')} ready, {entry.get('replicas_starting')} starting, "
                  f"{draining} draining" + (f"; last load error: {entry['load_error']}" if entry.get("load_error")
                                            else ""))
            return EXIT_OK if settled else EXIT_POOL_ERROR
        time.sleep(0.2)


def _add_client_options(parser: argparse.ArgumentParser, timeout: float) -> None:
    parser.add_argument("--endpoint", default=DEFAULT_ENDPOINT,
                        help=f"the pool's client endpoint (default: {DEFAULT_ENDPOINT})")
    parser.add_argument("--timeout", type=_positive_float, default=timeout,
                        help=f"seconds to wait for the answer, one resend included (default: {timeout:g})")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


EXIT_CODES = """exit codes:
  0  ok
  1  the pool answered with an error or did not answer (one line on stderr: modelpool: <ErrorType>: <message>)
  2  bad arguments, or an input/output file that cannot be read or written"""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for every sub-command."""
    parser = argparse.ArgumentParser(prog="modelpool", description="Serve Keras/TensorFlow models from a pool "
                                     "of spawned worker processes behind a ZeroMQ broker.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start a pool in the foreground",
                           description="Start the broker and one spawned worker per model replica. "
                           "SIGINT/SIGTERM stop it gracefully; a second signal forces the stop.")
    serve.add_argument("-c", "--config", help="pool config file (TOML)")
    serve.add_argument("--demo", action="store_true", help="serve the bundled digits classifier")
    serve.add_argument("--frontend", help="client endpoint, e.g. tcp://127.0.0.1:5555 (overrides the config)")
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")
    serve.add_argument("--metrics-port", type=door_port, default=_UNSET, metavar="PORT|off",
                       help="Prometheus metrics on http://HOST:PORT/metrics (default "
                       f"{pool_config.DEFAULT_METRICS_PORT}, or [metrics] port; 0: any free port; off: no metrics)")
    serve.add_argument("--http-port", type=door_port, default=_UNSET, metavar="PORT|off",
                       help="KServe V2 HTTP port (default 8000, or [http] port; 0: any free port; off: no HTTP)")
    serve.add_argument("--grpc-port", type=door_port, default=_UNSET, metavar="PORT|off",
                       help="KServe V2 gRPC port (default 8001, or [grpc] port; 0: any free port; off: no gRPC)")
    serve.add_argument("--model-repository", metavar="DIR",
                       help="serve the models of a repository: DIR/<model>/<version>/model.keras (or .h5, or a "
                       "SavedModel), with an optional DIR/<model>/config.toml")
    serve.add_argument("--model-control-mode", choices=pool_config.CONTROL_MODES,
                       help="none: load every repository model at start (default); poll: follow the repository "
                       "as it changes; explicit: load only what --load-model or `modelpool load` names")
    serve.add_argument("--repository-poll-secs", type=_positive_float, metavar="SECONDS",
                       help="how often poll mode looks at the repository (default 5)")
    serve.add_argument("--load-model", action="append", metavar="NAME",
                       help="explicit mode: a model to load at start (repeatable; '*' loads all)")
    serve.set_defaults(func=cmd_serve)

    fmt = argparse.RawDescriptionHelpFormatter
    status = sub.add_parser("status", help="show the models of a running pool", formatter_class=fmt,
                            description="Ask a running pool (mmi.models, mmi.metrics) for its models, versions,\n"
                            "replicas ready/starting/failed, queue depths, mean batch size, requests answered per\n"
                            "second, median queue time and requests served, and print them as a table (figures\n"
                            "since the broker started; with --watch, over the last interval).",
                            epilog="example:\n  modelpool status --endpoint tcp://127.0.0.1:5555\n\n" + EXIT_CODES)
    _add_client_options(status, timeout=5.0)
    status.add_argument("--json", action="store_true", help="print the raw mmi.models answer as JSON")
    status.add_argument("--wait", action="store_true",
                        help="first wait (up to --timeout) until every model has all its replicas ready; "
                        "exit 1 if they are not, or if a model failed to load")
    status.add_argument("--watch", type=_positive_float, nargs="?", const=2.0, metavar="SECONDS",
                        help="redraw the table every SECONDS (default 2) until Ctrl-C, with REQ/S, QUEUE P50 "
                        "and BATCH over the last interval")
    status.set_defaults(func=cmd_status)

    predict = sub.add_parser("predict", help="send one request from the shell", formatter_class=fmt,
                             description="Run MODEL on the array in a .npy file (its first axis is the batch) or on\n"
                             "the named arrays of a .npz file, and print each output's shape and dtype with its\n"
                             "values, or with its argmax per row when it looks like class probabilities.",
                             epilog="example:\n  modelpool predict digits --input x.npy --output probs.npy\n\n"
                             + EXIT_CODES)
    predict.add_argument("model", help="name of the model to run")
    predict.add_argument("-i", "--input", required=True, metavar="FILE",
                         help=".npy file (single-input model) or .npz file of named inputs")
    predict.add_argument("-o", "--output", metavar="FILE",
                         help="also save the result: .npy for one output, .npz (keyed by name) for several")
    predict.add_argument("--fetch", action="append", metavar="NAME",
                         help="output or layer name to return, repeatable (default: the model's outputs)")
    predict.add_argument("--values", action="store_true", help="print the values even for class probabilities")
    _add_client_options(predict, timeout=30.0)
    predict.set_defaults(func=cmd_predict)

    scale = sub.add_parser("scale", help="set how many replicas of a model run", formatter_class=fmt,
                           description="Set how many local replicas of MODEL the pool runs (from the pool's host).\n"
                           "New replicas take requests once loaded and warmed up; removed ones finish what\n"
                           "they hold first. 0 stops the model (its queued requests get 503).",
                           epilog="example:\n  modelpool scale digits 4 --wait 120\n\n" + EXIT_CODES)
    scale.add_argument("model", help="name of the model")
    scale.add_argument("replicas", type=int, help="replicas to run, 0 to 64")
    scale.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                       help="wait until the replicas are ready and the removed ones gone (exit 1 if not in time)")
    _add_client_options(scale, timeout=10.0)
    scale.set_defaults(func=cmd_scale)

    reload = sub.add_parser("reload", help="replace a model's replicas with fresh processes, no downtime",
                            formatter_class=fmt,
                            description="Start a fresh process for every replica of MODEL (it reads the model file\n"
                            "again); each old replica finishes what it holds and leaves once its successor is\n"
                            "ready. A successor that fails to load leaves the old one serving (see status).",
                            epilog="example:\n  modelpool reload digits --wait 120\n\n" + EXIT_CODES)
    reload.add_argument("model", help="name of the model")
    reload.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait until the new replicas serve and the old ones are gone (exit 1 if not in time)")
    _add_client_options(reload, timeout=10.0)
    reload.set_defaults(func=cmd_reload)

    load = sub.add_parser("load", help="serve a model of the config or the repository, or re-read it",
                          formatter_class=fmt,
                          description="Serve MODEL (a [[models]] table or a model repository directory). For a\n"
                          "model served already, read it again: new versions start and are warmed up, changed\n"
                          "ones are replaced, versions its policy drops leave once the new ones are ready.",
                          epilog="example:\n  modelpool load digits --wait 120")
    load.add_argument("model")
    load.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                      help="wait until the model's replicas are ready (exit 1 if not in time)")
    _add_client_options(load, timeout=10.0)
    load.set_defaults(func=cmd_load)

    unload = sub.add_parser("unload", help="stop serving a model; its replicas drain and exit", formatter_class=fmt,
                            description="Stop serving MODEL: requests it has queued are answered, then its\n"
                            "processes exit and their memory goes back to the host.",
                            epilog="example:\n  modelpool unload digits --wait 30")
    unload.add_argument("model")
    unload.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait until its processes are gone (exit 1 if not in time)")
    _add_client_options(unload, timeout=10.0)
    unload.set_defaults(func=cmd_unload)

    worker = sub.add_parser("worker", help="serve one model replica for a broker on another host",
                            formatter_class=fmt,
                            description="Start one worker process that connects to a pool's backend (a tcp://\n"
                            "endpoint: the pool needs backend = \"tcp://...\" and insecure_network = true), loads\n"
                            "the model and registers for it. The pool's config must name the model. It exits\n"
                            "after --orphan-timeout seconds without a broker and re-registers when one comes back.",
                            epilog="example:\n  modelpool worker --backend tcp://10.0.0.5:5556 --name digits "
                            "--path digits.keras")
    add_worker_arguments(worker)
    worker.set_defaults(func=run_standalone)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `modelpool` command."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
