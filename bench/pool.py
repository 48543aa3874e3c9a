"""The one pool launcher of the source tree: `python -m modelpool serve -c <config>` in a subprocess.

Used by the integration tests (through ``tests/integration/poolutil.py``), ``scripts/bench.py`` and
``scripts/client_bench.py``. The launcher's ``PYTHONPATH`` holds ``tests/integration`` (the tests'
models need ``custom_layers``) and the repository root.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from modelpool.client import Client

from bench import REPO

TESTS = REPO / "tests" / "integration"
# What the integration tests run with: fast heartbeats so that dead workers are noticed within seconds,
# and pids in mmi.models so that a test can check every worker is gone.
TEST_SETTINGS: Mapping[str, Any] = {"heartbeat_interval": 0.25, "heartbeat_liveness": 8, "drain_timeout": 20.0,
                                    "mmi_detail": True}
# The pool's own defaults for heartbeats and draining (what a user runs), plus pids for process sampling.
SERVING_SETTINGS: Mapping[str, Any] = {"mmi_detail": True}


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the pool may not answer yet
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout}s (last error: {last_exc!r})")


def toml_value(value: Any) -> str:
    """A Python value as a TOML value (bool, number, string, list)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, models: list[dict], tables: Mapping[str, Mapping[str, Any]] | None = None,
                 **pool: Any) -> Path:
    """A pool.toml with a ``[pool]`` table, other tables (``[http]``, ``[grpc]``) and one ``[[models]]`` table
    per model."""
    lines = ["[pool]"] + [f"{k} = {toml_value(v)}" for k, v in pool.items()]
    for name, table in (tables or {}).items():
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    for model in models:
        lines.append("\n[[models]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in model.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port() -> int:
    """A loopback TCP port nothing listens on now (the launcher binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_alive(pid: int) -> bool:
    """True while a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# Where `modelpool serve` says the KServe V2 doors listen.
_DOOR_LINE = re.compile(r"KServe V2 (HTTP|gRPC) listening on (?:http://)?(\S+):(\d+)")


class Pool:
    """A launcher process serving some models on a private ipc:// frontend (unless ``frontend`` is given).

    ``settings`` are ``[pool]`` defaults under the keyword arguments: ``TEST_SETTINGS`` (fast heartbeats)
    for tests, ``SERVING_SETTINGS`` (the pool's own defaults) for measurements. ``metrics`` is the
    ``[metrics]`` table; by default the pool serves them on a free loopback port (``metrics_url``), so
    that pools side by side never race for the default port. The KServe V2 gateway is off unless
    ``gateway``: then HTTP and gRPC listen on ports the OS picks (no collisions between pools running at
    once), read back from the launcher's output by ``gateway_ports``.
    """

    def __init__(self, models: list[dict], *, ready_timeout: float = 180.0, wait_ready: bool = True,
                 settings: Mapping[str, Any] = TEST_SETTINGS, metrics: Mapping[str, Any] | None = None,
                 gateway: bool = False, http: Mapping[str, Any] | None = None,
                 grpc: Mapping[str, Any] | None = None, repository: Mapping[str, Any] | None = None,
                 **pool: Any) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mp-"))
        self.endpoint = pool.pop("frontend", f"ipc://{self.dir}/front.ipc")
        pool = {**settings, **pool}
        metrics = {"port": free_port(), **(metrics or {})}
        self.metrics_url = (f"http://{metrics.get('host', '127.0.0.1')}:{metrics['port']}/metrics"
                            if metrics.get("enabled", True) else None)
        door = {"enabled": True, "port": 0} if gateway else {"enabled": False}
        tables = {"metrics": metrics, "http": {**door, **(http or {})}, "grpc": {**door, **(grpc or {})},
                  **({"repository": repository} if repository else {})}
        self.config = write_config(self.dir / "pool.toml", models, tables, frontend=self.endpoint, **pool)
        self.log_path = self.dir / "launcher.log"
        self.log = open(self.log_path, "w")
        self._final_log: str | None = None  # kept by stop(), which removes the directory
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]), TF_CPP_MIN_LOG_LEVEL="2")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modelpool", "serve", "-c", str(self.config)],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.client = Client(self.endpoint, timeout=30.0)
        self.expected = {m["name"]: m.get("replicas", 1) for m in models}
        if wait_ready:
            self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Until every model has its replicas ready; RuntimeError with the log if the launcher exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                models = {m["name"]: m for m in self.client.models(timeout=2.0)}
            except Exception:  # not answering yet
                time.sleep(0.2)
                continue
            if all(models[n]["replicas_ready"] >= r for n, r in self.expected.items()):
                return
            time.sleep(0.2)
        raise TimeoutError(f"pool not ready in {timeout}s; launcher log:\n{self.read_log()}")

    def gateway_ports(self, timeout: float = 30.0) -> dict[str, tuple[str, int]]:
        """{"http": (host, port), "grpc": (host, port)} as the launcher printed them (for the open doors)."""
        def found() -> dict[str, tuple[str, int]]:
            if self.proc.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.proc.returncode}:\n{self.read_log()}")
            doors = {kind.lower(): (host, int(port)) for kind, host, port in _DOOR_LINE.findall(self.read_log())}
            return doors if doors else {}

        return wait_until(found, timeout, what="the gateway's ports in the launcher's output")

    def read_log(self) -> str:
        """The launcher's output so far (after ``stop``: all of it)."""
        if self._final_log is not None:
            return self._final_log
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def models(self, detail: bool = True) -> dict[str, dict]:
        """The pool's mmi.models answer by model name (with worker pids: the pool has ``mmi_detail``)."""
        return {m["name"]: m for m in self.client.models(timeout=5.0, detail=detail)}

    def worker_pids(self, model: str | None = None) -> list[int]:
        """Pids of the live workers (of one model, or of all)."""
        return [w["pid"] for m in self.client.models(timeout=5.0, detail=True) if model in (None, m["name"])
                for w in m["workers"] if w["pid"]]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Stop the launcher; every worker it started must be gone too (TimeoutError otherwise)."""
        pids = []
        if self.proc.poll() is None:
            try:
                pids = self.worker_pids()
            except Exception:  # the launcher may be past answering
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self.client.close()
        self.log.close()
        try:
            wait_until(lambda: not any(process_alive(p) for p in pids), 15.0, what="workers gone")
        except TimeoutError:
            for pid in pids:  # fail, but leave nothing running on a shared machine
                if process_alive(pid):
                    os.kill(pid, signal.SIGKILL)
            raise
        finally:
            self._final_log = self.log_path.read_text(errors="replace")
            shutil.rmtree(self.dir, ignore_errors=True)  # config, log and ipc sockets; the log stays readable
        return code
