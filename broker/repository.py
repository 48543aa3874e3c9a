"""A model repository on disk, in the layout Triton and TF Serving share.

    <repository>/
        <model>/
            config.toml        optional: the per-model keys of a [[models]] table, and version_policy
            1/model.keras      a version: model.keras, model.h5, model.savedmodel/ (a SavedModel
            2/saved_model.pb   directory), or the version directory itself holding a SavedModel

Version directories are named by a number; anything else (``3.partial``, ``.tmp``) is ignored, so
a version is published atomically by copying it under another name and renaming it into place.
The poller also waits until a version's files stop changing between two looks before it loads it.

Plain data and file system reads: the launcher (``broker.server``) decides what runs.
"""
from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from modelpool.broker.config import ConfigError, ModelConfig, check_name

log = logging.getLogger(__name__)

CONFIG_FILE = "config.toml"
MODEL_FILES = ("model.keras", "model.h5", "model.savedmodel")  # looked for in this order
_MAX_FILES = 10_000  # files looked at per version for its signature
# config.toml keys: those of a [[models]] table that a repository decides itself are left out
_CONFIG_KEYS = {f.name for f in fields(ModelConfig)} - {"name", "path", "version"}


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model are served: the newest ``latest``, all of them, or ``specific`` ones."""

    latest: int = 1
    all: bool = False
    specific: tuple[int, ...] = ()

    def select(self, versions: list[int]) -> list[int]:
        """The versions to serve out of those present, newest first."""
        ordered = sorted(versions, reverse=True)
        if self.all:
            return ordered
        if self.specific:
            return [v for v in ordered if v in self.specific]
        return ordered[:self.latest]

    def describe(self) -> str:
        if self.all:
            return "all versions"
        if self.specific:
            return "versions " + ", ".join(map(str, self.specific))
        return f"the latest {self.latest}"


def parse_policy(value: Any, where: str) -> VersionPolicy:
    """A ``version_policy`` table: ``{latest = N}``, ``{all = true}`` or ``{specific = [1, 3]}``."""
    hint = "use version_policy = { latest = 1 }, { all = true } or { specific = [1, 3] }"
    if not isinstance(value, dict) or len(value) != 1:
        raise ConfigError(f"{where}.version_policy: {hint}")
    (kind, arg), = value.items()
    if kind == "latest" and isinstance(arg, int) and not isinstance(arg, bool) and arg >= 1:
        return VersionPolicy(latest=arg)
    if kind == "all" and arg is True:
        return VersionPolicy(all=True)
    if (kind == "specific" and isinstance(arg, list) and arg
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in arg)):
        return VersionPolicy(specific=tuple(arg))
    raise ConfigError(f"{where}.version_policy: {hint}, got {{{kind} = {arg!r}}}")


@dataclass(frozen=True)
class RepoModel:
    """One model directory as read now: the versions to serve and how, or why it cannot be served."""

    name: str
    configs: tuple[ModelConfig, ...] = ()  # one per version to serve, newest first
    policy: VersionPolicy = VersionPolicy()
    present: tuple[int, ...] = ()  # every version directory with a model in it
    signature: tuple = ()  # changes when a served version's files or config.toml change
    error: str | None = None


def model_names(root: str | os.PathLike) -> list[str]:
    """The model directories of a repository (names a pool can serve), sorted."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise ConfigError(f"model repository {str(root)!r} cannot be read: {exc.strerror}") from None
    names = []
    for entry in entries:
        if entry.is_dir() and not entry.name.startswith("."):
            try:
                check_name(entry.name, "model repository")
            except ConfigError as exc:
                log.warning("model repository: skipping directory %r: %s", entry.name, exc)
                continue
            names.append(entry.name)
    return names


def read_model(root: str | os.PathLike, name: str) -> RepoModel:
    """Read ``<root>/<name>``: its config.toml, its versions, the ones to serve and their signature."""
    folder = Path(root) / name
    if not folder.is_dir():
        return RepoModel(name, error=f"model {name!r} is not in the model repository {str(root)!r}")
    try:
        overrides, policy, config_sig = _read_config(folder, name)
        present = _versions(folder)
        chosen = policy.select(list(present))
        if not chosen:
            what = "no version directory (1/, 2/, ...) with a model file" if not present else \
                f"no version matching its version_policy ({policy.describe()})"
            raise ConfigError(f"model {name!r} in the repository has {what}; a version directory holds one of "
                              f"{', '.join(MODEL_FILES)} or a SavedModel (saved_model.pb)")
        configs = tuple(ModelConfig(name=name, path=str(present[v]), version=str(v), **overrides) for v in chosen)
    except ConfigError as exc:
        return RepoModel(name, error=str(exc))
    signature = (config_sig, tuple((v, _files_signature(present[v])) for v in chosen))
    return RepoModel(name, configs, policy, tuple(sorted(present)), signature)


def _read_config(folder: Path, name: str) -> tuple[dict, VersionPolicy, tuple]:
    path = folder / CONFIG_FILE
    where = f"{name}/{CONFIG_FILE}"
    try:
        stat = path.stat()
    except FileNotFoundError:
        return {}, VersionPolicy(), ()
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    policy = parse_policy(data.pop("version_policy"), where) if "version_policy" in data else VersionPolicy()
    unknown = sorted(set(data) - _CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: version_policy, "
                          f"{', '.join(sorted(_CONFIG_KEYS))}")
    if isinstance(data.get("imports"), list):
        data["imports"] = tuple(data["imports"])
    try:
        ModelConfig(name=name, path=str(folder), **data)  # checks the values now, with the file's name in the message
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return data, policy, (stat.st_size, stat.st_mtime_ns)


def _versions(folder: Path) -> dict[int, Path]:
    """Numbered version directories holding a model, and the path each one is loaded from."""
    found = {}
    for entry in os.scandir(folder):
        if not entry.is_dir() or not entry.name.isdigit():
            continue
        version_dir = Path(entry.path)
        for candidate in MODEL_FILES:
            if (version_dir / candidate).exists():
                found[int(entry.name)] = version_dir / candidate
                break
        else:
            if (version_dir / "saved_model.pb").is_file():
                found[int(entry.name)] = version_dir
    return found


def _files_signature(path: Path) -> tuple:
    """Names, sizes and modification times of a version's files: equal twice running = copied in full."""
    base = path.parent if path.is_file() else path
    items = []
    for directory, _, files in os.walk(base):
        for file in files:
            full = os.path.join(directory, file)
            try:
                stat = os.stat(full)
            except OSError:
                continue
            items.append((os.path.relpath(full, base), stat.st_size, stat.st_mtime_ns))
            if len(items) >= _MAX_FILES:
                return tuple(sorted(items))
    return tuple(sorted(items))
