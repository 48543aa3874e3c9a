"""Versions side by side and the model repository, without processes: routing in PoolState (fake
clock) and the repository reader on a temporary directory."""
from __future__ import annotations

import os

import pytest
from test_state import ALICE, W1, W2, Clock, client_out, dispatched, infer, make_state, only_error, ready, reply, worker_out

from modelpool.broker import repository
from modelpool.broker.config import ConfigError, RepositoryConfig
from modelpool.client import protocol
from modelpool.client.errors import InvalidInput, ModelNotFound
from modelpool.client.protocol import Command


@pytest.fixture()
def clock() -> Clock:
    return Clock()


def two_versions(clock: Clock):
    state = make_state(clock)
    state.add_model("m", expected=1, version="1")
    state.add_model("m", expected=1, version="2")
    return state


def test_requests_go_to_the_newest_ready_version_or_the_one_they_name(clock):
    state = two_versions(clock)
    ready(state, W1, "m", capacity=4, version="1")
    infer(state, ALICE, "m", b"a")
    assert dispatched(state) == [(W1, ALICE, b"a")]  # version 2 is not ready: 1 serves
    ready(state, W2, "m", capacity=4, version="2")
    infer(state, ALICE, "m", b"b")
    infer(state, ALICE, "m", b"c", model_version="1")
    infer(state, ALICE, "m", b"d", model_version=2)  # an integer names a version too
    assert sorted(dispatched(state)) == [(W1, ALICE, b"c"), (W2, ALICE, b"b"), (W2, ALICE, b"d")]
    summary = {m["version"]: m for m in _models(state)}
    assert summary["2"]["default"] and not summary["1"]["default"] and summary["2"]["state"] == "READY"


def _models(state) -> list[dict]:
    state._mmi_models(ALICE, b"q", {})
    ((_, rep),) = client_out(state)
    return rep.header["models"]


def test_an_unknown_version_is_404_naming_the_versions_served_and_a_bad_one_400(clock):
    state = two_versions(clock)
    infer(state, ALICE, "m", b"a", model_version="7")
    message = only_error(state, ALICE, b"a", b"404", ModelNotFound)
    assert message == 'model "m" has no version "7" loaded; versions served: 2, 1 (leave model_version out for ' \
                      'the newest ready one)'
    infer(state, ALICE, "m", b"b", model_version=["1"])
    assert "model_version must be a version string" in only_error(state, ALICE, b"b", b"400", InvalidInput)


def test_an_unloaded_version_serves_its_queue_then_its_workers_leave_and_it_is_forgotten(clock):
    state = two_versions(clock)
    ready(state, W1, "m", version="1", prefetch=0)
    infer(state, ALICE, "m", b"a")
    infer(state, ALICE, "m", b"b")  # waits in version 1's queue: W1 holds one batch
    assert dispatched(state) == [(W1, ALICE, b"a")]
    ready(state, W2, "m", version="2")
    assert state.unload("m", "1") == 1
    infer(state, ALICE, "m", b"c")  # a new request goes to version 2
    assert dispatched(state) == [(W2, ALICE, b"c")]
    reply(state, W1, ALICE, b"a")
    assert dispatched(state) == [(W1, ALICE, b"b")]  # what version 1 had queued, it still serves
    assert worker_out(state) == []
    reply(state, W1, ALICE, b"b")
    assert [(w, m.command) for w, m in worker_out(state)] == [(W1, Command.DISCONNECT)]
    assert set(state.versions[b"m"]) == {"2"} and [r.status for _, r in client_out(state)] == [protocol.OK] * 2
    infer(state, ALICE, "m", b"d", model_version="1")
    assert "has no version" in only_error(state, ALICE, b"d", b"404", ModelNotFound)


def test_unloading_every_version_forgets_the_model_and_a_worker_of_a_new_version_adds_one(clock):
    state = make_state(clock, "m")
    ready(state, W1, "m", version="1")
    ready(state, W2, "m", version="3")  # a remote worker of a newer version: served beside 1
    assert set(state.versions[b"m"]) == {"1", "3"} and state.models[b"m"].version == "3"
    state.unload("m")
    assert sorted((w, m.command) for w, m in worker_out(state)) == [(W1, Command.DISCONNECT),
                                                                     (W2, Command.DISCONNECT)]
    assert b"m" not in state.versions and b"m" not in state.models
    infer(state, ALICE, "m", b"a")
    assert "is not served here" in only_error(state, ALICE, b"a", b"404", ModelNotFound)


# --- the repository reader ---------------------------------------------------------------------


def version(root, model: str, v: str, file: str = "model.keras", data: bytes = b"zip") -> None:
    d = root / model / v
    d.mkdir(parents=True)
    (d / file).write_bytes(data)


def test_versions_policies_and_what_is_not_a_version(tmp_path):
    for v in ("1", "2", "10"):
        version(tmp_path, "m", v)
    version(tmp_path, "m", "11.partial")  # being copied: not a version
    (tmp_path / "m" / "12").mkdir()  # no model in it yet
    (tmp_path / "m" / "3").mkdir()
    (tmp_path / "m" / "3" / "saved_model.pb").write_bytes(b"pb")  # TF Serving's layout
    model = repository.read_model(tmp_path, "m")
    assert model.error is None and model.present == (1, 2, 3, 10)
    assert [c.version for c in model.configs] == ["10"] and model.configs[0].path.endswith("10/model.keras")
    (tmp_path / "m" / "config.toml").write_text('replicas = 3\nversion_policy = { specific = [3, 1] }\n')
    model = repository.read_model(tmp_path, "m")
    assert [(c.version, c.replicas) for c in model.configs] == [("3", 3), ("1", 3)]
    assert model.configs[0].path == str(tmp_path / "m" / "3")
    (tmp_path / "m" / "config.toml").write_text('version_policy = { all = true }\n')
    assert [c.version for c in repository.read_model(tmp_path, "m").configs] == ["10", "3", "2", "1"]
    (tmp_path / "m" / "config.toml").write_text('version_policy = { latest = 2 }\n')
    assert [c.version for c in repository.read_model(tmp_path, "m").configs] == ["10", "3"]


@pytest.mark.parametrize("toml,needle", [
    ("colour = 1\n", "m/config.toml: unknown key(s) colour"),
    ("version_policy = { newest = 1 }\n", "use version_policy = { latest = 1 }"),
    ("version_policy = { latest = 0 }\n", "use version_policy"),
    ("replicas = -1\n", "m/config.toml: models['m'].replicas must be an integer >= 0"),
    ("name = 'x'\n", "unknown key(s) name"),
    ("replicas = \n", "m/config.toml: not valid TOML"),
    ("version_policy = { specific = [7] }\n", "no version matching its version_policy (versions 7)"),
])
def test_a_bad_config_toml_is_an_error_that_names_the_file(tmp_path, toml, needle):
    version(tmp_path, "m", "1")
    (tmp_path / "m" / "config.toml").write_text(toml)
    model = repository.read_model(tmp_path, "m")
    assert model.configs == () and needle in model.error


def test_the_signature_changes_while_a_version_is_copied_and_names_are_checked(tmp_path):
    version(tmp_path, "m", "1")
    first = repository.read_model(tmp_path, "m").signature
    assert repository.read_model(tmp_path, "m").signature == first
    with open(tmp_path / "m" / "1" / "model.keras", "ab") as f:
        f.write(b"more")
    assert repository.read_model(tmp_path, "m").signature != first
    (tmp_path / "mmi.bad").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "empty").mkdir()
    assert repository.model_names(tmp_path) == ["empty", "m"]
    assert "no version directory" in repository.read_model(tmp_path, "empty").error
    assert "is not in the model repository" in repository.read_model(tmp_path, "nothere").error


def test_repository_config_is_checked(tmp_path):
    assert RepositoryConfig(path=str(tmp_path), control_mode="poll").poll_seconds == 5.0
    with pytest.raises(ConfigError, match="control_mode must be one of none, poll, explicit"):
        RepositoryConfig(path=str(tmp_path), control_mode="watch")
    with pytest.raises(ConfigError, match="is not a directory"):
        RepositoryConfig(path=os.path.join(tmp_path, "nope"))
    with pytest.raises(ConfigError, match="names the models loaded at start in control_mode \"explicit\""):
        RepositoryConfig(path=str(tmp_path), load=("m",))
