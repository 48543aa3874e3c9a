"""Pool configuration (broker.config): TOML loading and validation, every error naming its key."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from modelpool.broker.config import DEFAULT_FRONTEND, ConfigError, ModelConfig, PoolConfig, default_threads, from_dict, load


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """A folder with two dummy model files (never loaded here) and a SavedModel-style directory."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "a.keras").write_bytes(b"not really a model")
    (tmp_path / "models" / "b.h5").write_bytes(b"not really a model")
    (tmp_path / "models" / "saved").mkdir()
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def model_table(name: str = "a", path: str = "models/a.keras", **extra) -> dict:
    return {"name": name, "path": path, **extra}


def build(base: Path, *models: dict, **pool) -> PoolConfig:
    data: dict = {"models": list(models) or [model_table()]}
    if pool:
        data["pool"] = pool
    return from_dict(data, base)


def raises(match: str):
    return pytest.raises(ConfigError, match=match)


# --- happy path ---------------------------------------------------------------------------------------------


def test_load_resolves_relative_model_paths_against_the_config_file(models_dir, tmp_path, monkeypatch):
    config_file = write(models_dir / "pool.toml", """
[pool]
frontend = "tcp://127.0.0.1:6000"
heartbeat_interval = 0.5
log_level = "debug"

[[models]]
name = "a"
path = "models/a.keras"
replicas = 2
max_batch_size = 8
imports = ["custom_layers"]

[[models]]
name = "b.v2"
path = "models/b.h5"
device = "gpu:1"
""")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths must not depend on the working directory
    config = load(config_file)
    assert config.frontend == "tcp://127.0.0.1:6000"
    assert config.heartbeat_interval == 0.5 and config.log_level == "debug"
    a, b = config.models
    assert a.name == "a" and a.replicas == 2 and a.max_batch_size == 8 and a.imports == ("custom_layers",)
    assert Path(a.path) == (models_dir / "models" / "a.keras").resolve()
    assert Path(a.path).is_absolute()
    assert b.name == "b.v2" and b.device == "gpu:1" and b.replicas == 1
    assert Path(b.path) == (models_dir / "models" / "b.h5").resolve()


def test_defaults(models_dir):
    config = build(models_dir)
    assert config.frontend == DEFAULT_FRONTEND == "tcp://127.0.0.1:5555"
    assert config.backend == "" and config.heartbeat_liveness == 3 and config.log_level == "INFO"
    (model,) = config.models
    assert model.replicas == 1 and model.version == "1" and model.device == "cpu" and model.imports == ()


def test_absolute_model_path_kept_and_directory_accepted(models_dir):
    saved = str(models_dir / "models" / "saved")
    config = from_dict({"models": [model_table(path=saved)]}, Path("/nonexistent-base"))
    assert config.models[0].path == saved


def test_with_overrides_validates_again(models_dir):
    config = build(models_dir)
    changed = config.with_overrides(frontend="tcp://127.0.0.1:7000", log_level=None)
    assert changed.frontend == "tcp://127.0.0.1:7000" and changed.log_level == "INFO"
    with raises(r"pool\.frontend"):
        config.with_overrides(frontend="localhost:7000")


# --- file-level errors --------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with raises(re.escape(str(missing)) + ".*does not exist"):
        load(missing)


def test_directory_is_not_a_config_file(tmp_path):
    with raises("does not exist"):
        load(tmp_path)


def test_invalid_toml(tmp_path):
    bad = write(tmp_path / "bad.toml", "[pool\nfrontend = ")
    with raises(re.escape(str(bad)) + ": not valid TOML"):
        load(bad)


def test_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[pool]\nlog_level = "caf\xe9"\n')
    with raises(re.escape(str(bad)) + ": not valid TOML"):
        load(bad)


def test_non_ascii_utf8_is_read_as_utf8(models_dir, monkeypatch):
    (models_dir / "models" / "mod\u00e8le.keras").write_bytes(b"x")
    config_file = models_dir / "pool.toml"
    config_file.write_bytes('[[models]]\nname = "a"\npath = "models/mod\u00e8le.keras"\n'.encode())
    assert load(config_file).models[0].path.endswith("mod\u00e8le.keras")


def test_nan_and_inf_from_toml_are_rejected(models_dir):
    config_file = write(models_dir / "pool.toml", """
[pool]
heartbeat_interval = nan

[[models]]
name = "a"
path = "models/a.keras"
""")
    with raises(r"pool\.heartbeat_interval must be a positive number of seconds, got nan"):
        load(config_file)
    write(config_file, config_file.read_text().replace("nan", "inf"))
    with raises(r"pool\.heartbeat_interval must be a positive number of seconds, got inf"):
        load(config_file)


def test_no_models(tmp_path):
    with raises(r"models: at least one \[\[models\]\]"):
        from_dict({}, tmp_path)


# --- unknown keys --------------------------------------------------------------------------------------------


def test_unknown_top_level_key(models_dir):
    with raises("top level: unknown key.*servers"):
        from_dict({"models": [model_table()], "servers": {}}, models_dir)


def test_unknown_pool_key(models_dir):
    with raises(r"\[pool\]: unknown key.*heartbeat_intervall.*allowed: .*heartbeat_interval"):
        build(models_dir, heartbeat_intervall=1.0)


def test_models_key_inside_pool_is_unknown(models_dir):
    with raises(r"\[pool\]: unknown key.*models"):
        build(models_dir, models=[])


def test_unknown_model_key_names_the_table(models_dir):
    with raises(r"\[\[models\]\] #2: unknown key.*replica\b"):
        build(models_dir, model_table("a"), model_table("b", "models/b.h5", replica=2))


def test_pool_and_models_must_be_tables(models_dir):
    with raises(r"pool must be a table"):
        from_dict({"pool": "x", "models": [model_table()]}, models_dir)
    with raises(r"models must be an array of tables"):
        from_dict({"models": model_table()}, models_dir)


# --- [[models]] entries -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["name", "path"])
def test_missing_name_or_path(models_dir, key):
    table = model_table()
    del table[key]
    with raises(rf"\[\[models\]\] #1: missing key '{key}'"):
        build(models_dir, table)


@pytest.mark.parametrize("replicas", [-1, "2", 1.5, True])
def test_replicas_must_be_an_integer_of_at_least_zero(models_dir, replicas):
    with raises(rf"models\['a'\]\.replicas must be an integer >= 0 \(0: remote workers only\), got "
                rf"{re.escape(repr(replicas))}"):
        build(models_dir, model_table(replicas=replicas))


def test_replicas_zero_declares_a_model_served_by_remote_workers_only(models_dir):
    assert build(models_dir, model_table(replicas=0)).models[0].replicas == 0


@pytest.mark.parametrize("key", ["max_batch_size", "max_queue"])
def test_other_positive_ints(models_dir, key):
    with raises(rf"models\['a'\]\.{key} must be an integer >= 1"):
        build(models_dir, model_table(**{key: 0}))


def test_duplicate_model_name(models_dir):
    with raises("duplicate model name.*twin"):
        build(models_dir, model_table("twin", "models/a.keras"), model_table("twin", "models/b.h5"))


def test_model_file_that_does_not_exist(models_dir):
    with raises(r"models\['a'\]\.path: model file .*missing\.keras.* does not exist"):
        build(models_dir, model_table(path="models/missing.keras"))


def test_empty_model_path(models_dir):
    with raises(r"models\['a'\]\.path"):
        ModelConfig(name="a", path="")


@pytest.mark.parametrize("name", ["mmi.models", "mmi.x", "", "-lead", "has space", "x" * 129, "a/b"])
def test_bad_model_name(models_dir, name):
    with raises(r"models\.name"):
        build(models_dir, model_table(name=name))


@pytest.mark.parametrize("device", ["tpu", "GPU", "gpu:", "gpu:x", "cuda:0", ""])
def test_bad_device(models_dir, device):
    with raises(rf"models\['a'\]\.device must be 'cpu', 'gpu' or 'gpu:N', got {re.escape(repr(device))}"):
        build(models_dir, model_table(device=device))


@pytest.mark.parametrize("device", ["cpu", "gpu", "gpu:0", "gpu:12"])
def test_good_device(models_dir, device):
    assert build(models_dir, model_table(device=device)).models[0].device == device


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("threads", -1, "threads must be an integer >= 0"),
        ("max_delay_ms", -0.5, "max_delay_ms must be a number >= 0"),
        ("max_delay_ms", math.nan, "max_delay_ms must be a number >= 0"),
        ("max_delay_ms", math.inf, "max_delay_ms must be a number >= 0"),
        ("pad_to_bucket", "yes", "pad_to_bucket must be true or false"),
        ("version", "", "version must be a non-empty string"),
        ("imports", [""], "imports must be a list of module names"),
        ("imports", "custom_layers", "imports must be a list of module names"),
    ],
)
def test_other_model_values(models_dir, key, value, fragment):
    with raises(rf"models\['a'\]\.{fragment}"):
        build(models_dir, model_table(**{key: value}))


# --- [pool] values --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["localhost:5555", "http://127.0.0.1:5555", "tcp://", "", 5555])
def test_bad_frontend(models_dir, endpoint):
    with raises(rf"pool\.frontend must be a ZeroMQ endpoint.*got {re.escape(repr(endpoint))}"):
        build(models_dir, frontend=endpoint)


def test_bad_backend(models_dir):
    with raises(r"pool\.backend must be a ZeroMQ endpoint"):
        build(models_dir, backend="somewhere")


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5555", "ipc:///tmp/pool.sock", "inproc://pool"])
def test_good_endpoints(models_dir, endpoint):
    insecure = {"insecure_network": True} if endpoint.startswith("tcp://") else {}  # a tcp backend needs it
    config = build(models_dir, frontend=endpoint, backend=endpoint, **insecure)
    assert config.frontend == config.backend == endpoint


@pytest.mark.parametrize("level", ["TRACE", "verbose", ""])
def test_bad_log_level(models_dir, level):
    with raises(rf"pool\.log_level must be DEBUG, INFO, WARNING or ERROR, got {re.escape(repr(level))}"):
        build(models_dir, log_level=level)


def test_log_level_not_a_string(models_dir):
    with raises(r"pool\.log_level"):
        build(models_dir, log_level=10)


@pytest.mark.parametrize("key", ["heartbeat_interval", "hang_timeout", "drain_timeout", "restart_backoff_max"])
@pytest.mark.parametrize("value", [0, -1, "5", False, math.nan, math.inf])
def test_bad_durations(models_dir, key, value):
    with raises(rf"pool\.{key} must be a positive number of seconds"):
        build(models_dir, **{key: value})


@pytest.mark.parametrize("key", ["heartbeat_liveness", "max_message_bytes"])
def test_bad_pool_ints(models_dir, key):
    with raises(rf"pool\.{key} must be an integer >= 1"):
        build(models_dir, **{key: 0})


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:5555"])
def test_non_loopback_bind_needs_an_explicit_opt_in(tmp_path, endpoint):
    from modelpool.broker.config import ConfigError, ModelConfig, PoolConfig

    model_file = tmp_path / "m.keras"
    model_file.write_bytes(b"x")
    model = ModelConfig(name="m", path=str(model_file))
    with pytest.raises(ConfigError, match="not a loopback address.*insecure_network"):
        PoolConfig(models=(model,), frontend=endpoint)
    assert PoolConfig(models=(model,), frontend=endpoint, insecure_network=True).frontend == endpoint
    for local in ("tcp://127.0.0.1:5555", "tcp://[::1]:5555", "tcp://localhost:5555", f"ipc://{tmp_path}/f"):
        assert PoolConfig(models=(model,), frontend=local).frontend == local


@pytest.mark.parametrize("replicas, cores, threads", [(1, 2, 2), (2, 2, 1), (3, 2, 1), (4, 16, 4), (3, 16, 5), (0, 8, 8)])
def test_default_threads_share_the_cores_between_replicas(replicas, cores, threads):
    assert default_threads(replicas, cores) == threads
