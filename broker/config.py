"""Pool configuration: frozen dataclasses validated on construction, loaded from TOML."""
from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"
DEFAULT_METRICS_PORT = 8002  # Triton's metrics port
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the problem."""


def check_name(name: Any, where: str) -> None:
    """ConfigError unless ``name`` can name a model (clients send it; directories of a repository)."""
    if not isinstance(name, str) or not _NAME.match(name) or name.startswith("mmi."):
        raise ConfigError(f"{where}: model name {name!r}: use letters, digits, '_', '-', '.' (not 'mmi.*'), "
                          "up to 128")


@dataclass(frozen=True)
class ModelConfig:
    """One served model and how its replicas run."""

    name: str
    path: str
    replicas: int = 1  # 0: none started here (remote workers serve it, or `modelpool scale` later)
    version: str = "1"
    max_batch_size: int = 32
    max_delay_ms: float = 0.0  # the broker waits up to this long for a fuller batch for an idle worker
    prefetch: int = 1  # batches a worker holds besides the one it runs (formed only when full)
    max_queue: int = 1024
    max_queue_bytes: int = 256 * 1024 * 1024  # request payload bytes queued or in flight; past it 429
    pad_to_bucket: bool = False
    threads: int = 0  # TensorFlow intra-op threads per replica; 0 = cores / replicas on this host
    device: str = "cpu"  # "cpu", or "gpu" / "gpu:N" on a GPU host
    imports: tuple[str, ...] = ()  # modules the worker imports before loading (custom layers)
    max_requests: int = 0  # a replica that answered this many requests is replaced, successor warmed first (0: never)
    max_memory_mb: float = 0.0  # a replica whose resident memory passes this is replaced the same way (0: never)

    def __post_init__(self) -> None:
        where = f"models[{self.name!r}]"
        check_name(self.name, "models.name")
        if not isinstance(self.replicas, int) or isinstance(self.replicas, bool) or self.replicas < 0:
            raise ConfigError(f"{where}.replicas must be an integer >= 0 (0: remote workers only), got "
                              f"{self.replicas!r}")
        _positive_int(self.max_batch_size, f"{where}.max_batch_size")
        _positive_int(self.max_queue, f"{where}.max_queue")
        if not isinstance(self.prefetch, int) or isinstance(self.prefetch, bool) or not 0 <= self.prefetch <= 8:
            raise ConfigError(f"{where}.prefetch must be an integer from 0 to 8, got {self.prefetch!r}")
        _positive_int(self.max_queue_bytes, f"{where}.max_queue_bytes")
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 0:
            raise ConfigError(f"{where}.threads must be an integer >= 0 (0 = automatic), got {self.threads!r}")
        if (not isinstance(self.max_delay_ms, (int, float)) or isinstance(self.max_delay_ms, bool)
                or not math.isfinite(self.max_delay_ms) or self.max_delay_ms < 0):  # TOML allows nan and inf
            raise ConfigError(f"{where}.max_delay_ms must be a number >= 0, got {self.max_delay_ms!r}")
        if not isinstance(self.max_requests, int) or isinstance(self.max_requests, bool) or self.max_requests < 0:
            raise ConfigError(f"{where}.max_requests must be an integer >= 0 (0 = never recycle), got "
                              f"{self.max_requests!r}")
        if (not isinstance(self.max_memory_mb, (int, float)) or isinstance(self.max_memory_mb, bool)
                or not math.isfinite(self.max_memory_mb) or self.max_memory_mb < 0):
            raise ConfigError(f"{where}.max_memory_mb must be a number of MiB >= 0 (0 = never recycle), got "
                              f"{self.max_memory_mb!r}")
        if not isinstance(self.pad_to_bucket, bool):
            raise ConfigError(f"{where}.pad_to_bucket must be true or false, got {self.pad_to_bucket!r}")
        if not isinstance(self.version, str) or not self.version:
            raise ConfigError(f"{where}.version must be a non-empty string, got {self.version!r}")
        if not isinstance(self.device, str) or not re.match(r"^(cpu|gpu(:\d+)?)$", self.device):
            raise ConfigError(f"{where}.device must be 'cpu', 'gpu' or 'gpu:N', got {self.device!r}")
        if not isinstance(self.imports, tuple) or not all(isinstance(i, str) and i for i in self.imports):
            raise ConfigError(f"{where}.imports must be a list of module names, got {self.imports!r}")
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(f"{where}.path must be a path to a .keras, .h5 or SavedModel directory")
        if not Path(self.path).exists():
            raise ConfigError(f"{where}.path: model file {self.path!r} does not exist")


@dataclass(frozen=True)
class ListenConfig:
    """Where one HTTP door of the pool listens: ``[metrics]``, ``[http]`` or ``[grpc]``."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 0  # 0: the OS picks a free port (printed at start)

    table = ""  # the TOML table, for messages

    def __post_init__(self) -> None:
        where = f"[{self.table}]"
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"{where}.enabled must be true or false, got {self.enabled!r}")
        if not isinstance(self.host, str) or not self.host or any(c in self.host for c in " \t/[]"):
            raise ConfigError(f"{where}.host must be an IP address or host name like 127.0.0.1, got {self.host!r}")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ConfigError(f"{where}.port must be an integer from 0 to 65535 (0: any free port), got {self.port!r}")

    @property
    def local(self) -> bool:
        """True when only this host can reach it (a loopback address)."""
        return is_local_host(self.host)


@dataclass(frozen=True)
class MetricsConfig(ListenConfig):
    """The Prometheus endpoint: http://host:port/metrics, served by the broker process."""

    port: int = DEFAULT_METRICS_PORT
    table = "metrics"


@dataclass(frozen=True)
class DoorConfig(ListenConfig):
    """One KServe V2 door of the gateway process."""

    default_timeout: float = 30.0  # seconds a request may take when it sets no deadline of its own

    def __post_init__(self) -> None:
        super().__post_init__()
        value = self.default_timeout
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"[{self.table}].default_timeout must be a positive number of seconds, got {value!r}")


@dataclass(frozen=True)
class HttpConfig(DoorConfig):
    """The KServe V2 HTTP/REST door; Triton's default port."""

    port: int = 8000
    table = "http"


@dataclass(frozen=True)
class GrpcConfig(DoorConfig):
    """The KServe V2 gRPC door; Triton's default port."""

    port: int = 8001
    table = "grpc"


_DOORS = {"metrics": MetricsConfig, "http": HttpConfig, "grpc": GrpcConfig}  # TOML table -> its config
CONTROL_MODES = ("none", "poll", "explicit")  # Triton's --model-control-mode


@dataclass(frozen=True)
class RepositoryConfig:
    """A model repository (``[repository]``, ``--model-repository``): models as directories of versions."""

    path: str = ""  # "" = none: only the [[models]] tables
    control_mode: str = "none"  # none: load all at start; poll: follow the directory; explicit: load on request
    poll_seconds: float = 5.0  # how often "poll" looks at the directory
    load: tuple[str, ...] = ()  # "explicit": models loaded at start ("*": all of them)

    def __post_init__(self) -> None:
        if not isinstance(self.path, str):
            raise ConfigError(f"[repository].path must be a directory path, got {self.path!r}")
        if self.path and not Path(self.path).is_dir():
            raise ConfigError(f"[repository].path: model repository {self.path!r} is not a directory")
        if self.control_mode not in CONTROL_MODES:
            raise ConfigError(f"[repository].control_mode must be one of {', '.join(CONTROL_MODES)}, got "
                              f"{self.control_mode!r}")
        value = self.poll_seconds
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0.1:
            raise ConfigError(f"[repository].poll_seconds must be a number of seconds >= 0.1, got {value!r}")
        if not isinstance(self.load, tuple) or not all(isinstance(n, str) and n for n in self.load):
            raise ConfigError(f"[repository].load must be a list of model names (or [\"*\"]), got {self.load!r}")
        if self.load and self.control_mode != "explicit":
            raise ConfigError("[repository].load names the models loaded at start in control_mode \"explicit\"; "
                              f"in {self.control_mode!r} mode every model of the repository is loaded")


@dataclass(frozen=True)
class PoolConfig:
    """The whole pool: endpoints, timings and models."""

    models: tuple[ModelConfig, ...] = ()
    frontend: str = DEFAULT_FRONTEND
    backend: str = ""  # "" = a private ipc:// path chosen at start
    max_message_bytes: int = 64 * 1024 * 1024
    # Request payload bytes the broker holds over all models (queued and in flight); past it 503.
    max_queued_bytes: int = 512 * 1024 * 1024
    heartbeat_interval: float = 1.0
    heartbeat_liveness: int = 3
    hang_timeout: float = 60.0
    drain_timeout: float = 30.0
    restart_backoff_max: float = 30.0
    log_level: str = "INFO"
    insecure_network: bool = False  # allow non-loopback tcp binds (no CurveZMQ yet: unencrypted)
    exit_on_error: bool = True  # a model that fails to load at start stops the pool (Triton's --exit-on-error)
    mmi_detail: bool = False  # mmi.models answers {"detail": true} with worker ids and pids (operators)
    metrics: MetricsConfig = MetricsConfig()
    http: HttpConfig = HttpConfig()
    grpc: GrpcConfig = GrpcConfig()
    repository: RepositoryConfig = RepositoryConfig()

    def __post_init__(self) -> None:
        if not self.models and not self.repository.path:
            raise ConfigError("models: at least one [[models]] table, or a model repository ([repository] path, "
                              "--model-repository), is needed")
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"models.name: duplicate model name(s) {', '.join(dupes)}")
        for key in ("frontend",) + (("backend",) if self.backend else ()):
            value = getattr(self, key)
            if not isinstance(value, str) or not re.match(r"^(tcp|ipc|inproc)://.+", value):
                raise ConfigError(f"pool.{key} must be a ZeroMQ endpoint like tcp://127.0.0.1:5555, got {value!r}")
        for key in ("insecure_network", "exit_on_error", "mmi_detail"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"pool.{key} must be true or false, got {getattr(self, key)!r}")
        for key in ("frontend", "backend"):
            value = getattr(self, key)
            if value and not self.insecure_network and not is_local_endpoint(value):
                raise ConfigError(
                    f"pool.{key} {value!r} is not a loopback address: modelpool has no CurveZMQ encryption yet, "
                    "so bind to 127.0.0.1, [::1] or ipc://, or set pool.insecure_network = true on a trusted network")
        if self.backend.startswith("tcp://") and not self.insecure_network:
            # Any process that reaches a tcp backend, on this host too, can register as a worker and
            # read every request routed to it; an ipc:// path is guarded by file permissions.
            raise ConfigError(
                f"pool.backend {self.backend!r} is a tcp:// endpoint: with no CurveZMQ yet, anything that can "
                "connect to it can register as a worker and receive requests; set pool.insecure_network = true "
                "to accept that (remote workers on a trusted network), or leave backend unset for a private ipc://")
        self._check_doors()
        _positive_int(self.max_message_bytes, "pool.max_message_bytes")
        _positive_int(self.max_queued_bytes, "pool.max_queued_bytes")
        if self.max_queued_bytes < self.max_message_bytes:
            raise ConfigError(f"pool.max_queued_bytes ({self.max_queued_bytes}) must be at least "
                              f"pool.max_message_bytes ({self.max_message_bytes}), or no large request fits")
        for m in self.models:
            if m.max_queue_bytes < self.max_message_bytes:
                raise ConfigError(f"models[{m.name!r}].max_queue_bytes ({m.max_queue_bytes}) must be at least "
                                  f"pool.max_message_bytes ({self.max_message_bytes}), or no large request fits")
        _positive_int(self.heartbeat_liveness, "pool.heartbeat_liveness")
        for key in ("heartbeat_interval", "hang_timeout", "drain_timeout", "restart_backoff_max"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"pool.{key} must be a positive number of seconds, got {value!r}")
        if not isinstance(self.log_level, str) or self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"pool.log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")

    def _check_doors(self) -> None:
        for table, kind in _DOORS.items():
            door = getattr(self, table)
            if not isinstance(door, kind):
                raise ConfigError(f"{table} must be a table: [{table}]")
            if door.enabled and not self.insecure_network and not door.local:
                what = ("the metrics endpoint has no authentication, and its figures (models, request rates) are "
                        "for the operator" if table == "metrics" else "the KServe V2 doors have no TLS or authentication")
                raise ConfigError(
                    f"[{table}].host {door.host!r} is not a loopback address: {what}; bind to 127.0.0.1 or ::1, or "
                    "set pool.insecure_network = true on a trusted network (or behind a proxy that adds them)")

    def with_overrides(self, **changes: Any) -> PoolConfig:
        """A copy with some pool keys replaced (CLI flags), validated again."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def is_local_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// endpoints on a loopback address."""
    if not endpoint.startswith("tcp://"):
        return True
    return is_local_host(endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]"))


def is_local_host(host: str) -> bool:
    """True for localhost, ::1 and 127.x.y.z (an IPv4-mapped ::ffff:127.x.y.z too)."""
    host = host.removeprefix("::ffff:")
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _positive_int(value: Any, key: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


_POOL_KEYS = {f.name for f in fields(PoolConfig)} - {"models", "repository", *_DOORS}
_MODEL_KEYS = {f.name for f in fields(ModelConfig)}


def _door(data: dict, kind: type[ListenConfig]) -> ListenConfig:
    table = data.get(kind.table, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{kind.table} must be a table: [{kind.table}]")
    _check_keys(table, {f.name for f in fields(kind)}, f"[{kind.table}]")
    return kind(**table)


def _repository(data: dict, base_dir: Path | None) -> RepositoryConfig:
    table = data.get("repository", {})
    if not isinstance(table, dict):
        raise ConfigError("repository must be a table: [repository]")
    _check_keys(table, {f.name for f in fields(RepositoryConfig)}, "[repository]")
    table = dict(table)
    if isinstance(table.get("path"), str) and table["path"]:
        path = Path(os.path.expanduser(table["path"]))
        table["path"] = str(base_dir / path if base_dir is not None and not path.is_absolute() else path)
    if isinstance(table.get("load"), list):
        table["load"] = tuple(table["load"])
    return RepositoryConfig(**table)


def from_dict(data: dict, base_dir: Path | None = None) -> PoolConfig:
    """Build a PoolConfig from parsed TOML; model paths are relative to ``base_dir``."""
    _check_keys(data, {"pool", "models", "repository", *_DOORS}, "top level")
    pool = data.get("pool", {})
    if not isinstance(pool, dict):
        raise ConfigError("pool must be a table: [pool]")
    _check_keys(pool, _POOL_KEYS, "[pool]")
    tables = data.get("models", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("models must be an array of tables: [[models]]")
    models = []
    for i, table in enumerate(tables):
        _check_keys(table, _MODEL_KEYS, f"[[models]] #{i + 1}")
        for key in ("name", "path"):
            if key not in table:
                raise ConfigError(f"[[models]] #{i + 1}: missing key {key!r}")
        path = Path(os.path.expanduser(str(table["path"])))
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        imports = table.get("imports", ())
        imports = tuple(imports) if isinstance(imports, list) else imports
        models.append(ModelConfig(**{**table, "path": str(path), "imports": imports}))
    try:
        return PoolConfig(models=tuple(models), **{table: _door(data, kind) for table, kind in _DOORS.items()},
                          repository=_repository(data, base_dir), **pool)
    except TypeError as exc:  # wrong value types reaching dataclass defaults
        raise ConfigError(str(exc)) from None


def load(path: str | os.PathLike) -> PoolConfig:
    """Read and validate a TOML pool config."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = tomllib.loads(p.read_bytes().decode("utf-8"))  # TOML is UTF-8 whatever the locale
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return from_dict(data, p.parent.resolve())


def default_threads(replicas_on_host: int, cores: int | None = None) -> int:
    """TensorFlow intra-op threads for one replica: its share of the host's cores, at least 1.

    Measured on 2 cores with one replica (see docs/PERFORMANCE.md): a compute-bound convnet
    serves 29 to 47% more with 2 threads than with 1, while a tiny model loses about 8%, because
    TensorFlow's idle threads spin and take CPU from the broker. Since requests travel to the
    worker in batches (REQUESTS/REPLIES), that loss is small, so every core goes to the models.
    ``threads`` in the config overrides this per model.
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, replicas_on_host))
