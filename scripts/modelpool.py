"""The `modelpool` command: start a pool from a config file (and talk to one)."""
from __future__ import annotations

import argparse
import logging
import sys

from broker import config as pool_config
from broker.config import ConfigError, ModelConfig, PoolConfig

log = logging.getLogger("modelpool")


def demo_config(frontend: str | None) -> PoolConfig:
    """The bundled digits classifier, two replicas."""
    from modelproc.demo import MODEL_PATH

    model = ModelConfig(name="digits", path=str(MODEL_PATH), replicas=2, version="1", max_batch_size=64)
    return PoolConfig(models=(model,), frontend=frontend or pool_config.DEFAULT_FRONTEND)


def _announce(broker: object) -> None:
    state = broker.state  # type: ignore[attr-defined]
    endpoint = broker.frontend_endpoint  # type: ignore[attr-defined]
    lines = [f"modelpool listening on {endpoint}"]
    for entry in state.models.values():
        status = f"{entry.ready}/{entry.expected} replicas ready"
        if entry.load_error:
            status += f"; load failed: {entry.load_error}"
        lines.append(f"  model {entry.name.decode()!r} version {entry.version}: {status}")
    first = next(iter(state.models)).decode()
    if first == "digits":
        lines.append("example request (in another shell):")
        lines.append(f"  .venv/bin/python -c \"from client import Client; from modelproc.demo import load_samples; "
                     f"x, y = load_samples(); print(Client('{endpoint}').predict('digits', x).argmax(1), 'labels', y)\"")
    else:
        lines.append(f"example request: Client('{endpoint}').metadata('{first}') from `from client import Client`")
    lines.append("Ctrl-C stops the pool")
    print("\n".join(lines), flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the pool in the foreground until SIGINT/SIGTERM."""
    from broker.server import Broker

    try:
        if args.demo:
            cfg = demo_config(args.frontend)
        elif args.config:
            cfg = pool_config.load(args.config)
            cfg = cfg.with_overrides(frontend=args.frontend)
        else:
            raise ConfigError("give a config file with -c pool.toml, or --demo")
        if args.log_level:
            cfg = cfg.with_overrides(log_level=args.log_level)
    except ConfigError as exc:
        print(f"modelpool: config error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        broker = Broker(cfg, on_ready=_announce)
    except Exception as exc:  # zmq.ZMQError for an address in use, mostly
        print(f"modelpool: cannot start: {exc} (frontend {cfg.frontend})", file=sys.stderr)
        return 1
    broker.install_signal_handlers()
    try:
        return broker.run()
    finally:
        broker.close()


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
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `modelpool` command."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
