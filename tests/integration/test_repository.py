"""A model repository on a real pool: versions published while clients keep sending, a broken version,
unload and load, and Triton's own client on the V2 repository extension.

The repository holds what users save: a functional `.keras` model, a `keras.Sequential` one and a
TensorFlow SavedModel in TF Serving's layout (``<model>/<version>/saved_model.pb``). Every answer
is checked against the version that says it computed it.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from poolutil import Pool, wait_until

from modelpool.client import Client, ModelNotFound, Unavailable, protocol

pytestmark = pytest.mark.timeout(300)

TOL = dict(rtol=1e-5, atol=1e-5)
X = np.random.default_rng(7).standard_normal((3, 8)).astype(np.float32)


def publish(src: Path, version_dir: Path) -> None:
    """Publish a version the way the README says: copy under a name the pool ignores, then rename."""
    staging = version_dir.parent / f".{version_dir.name}.partial"
    staging.mkdir()
    if src.is_dir():
        shutil.copytree(src, staging / "model.savedmodel")
    else:
        shutil.copy(src, staging / ("model" + src.suffix))
    os.rename(staging, version_dir)


@pytest.fixture(scope="module")
def repo(models, tmp_path_factory):
    """m: v1 functional; its v2 (Sequential) is published by a test. other: a SavedModel."""
    import keras

    d = tmp_path_factory.mktemp("repo")
    (d / "m").mkdir()
    (d / "m" / "config.toml").write_text("replicas = 2\nmax_batch_size = 16\n")
    publish(models.a, d / "m" / "1")
    keras.utils.set_random_seed(11)
    seq = keras.Sequential([keras.Input(shape=(8,), name="x"), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(4)])
    seq.save(d / "sequential.keras")
    (d / "other").mkdir()
    shutil.copytree(models.saved, d / "other" / "1")  # TF Serving's layout: the version directory is the SavedModel
    expected = {"1": keras.saving.load_model(models.a).predict(X, verbose=0),
                "2": seq.predict(X, verbose=0)}
    return d, expected


@pytest.fixture(scope="module")
def pool(repo):
    d, _ = repo
    p = Pool([], gateway=True, repository={"path": str(d), "control_mode": "poll", "poll_seconds": 0.3})
    wait_until(lambda: {"m", "other"} <= {m["name"] for m in p.client.models() if m["replicas_ready"]}, 120,
               what="repository models ready")
    yield p
    code = p.stop()
    assert code == 0, p.read_log()


def versions(pool: Pool, model: str) -> dict[str, dict]:
    return {m["version"]: m for m in pool.client.models(timeout=5.0, detail=True) if m["name"] == model}


def waited(pool: Pool, predicate, timeout: float, what: str, load=None) -> None:
    """wait_until, failing with what the pool shows of `m` and the end of its log."""
    try:
        wait_until(predicate, timeout, what=what)
    except TimeoutError:
        failures = load.failures[:3] if load is not None else []
        raise AssertionError(f"{what}: not within {timeout}s; {failures} {versions(pool, 'm')}\n"
                             f"{pool.read_log()[-3000:]}") from None


class Load:
    """Threads sending `m` requests, each answer checked against the version that computed it."""

    def __init__(self, endpoint: str, expected: dict[str, np.ndarray], threads: int = 8) -> None:
        self.endpoint, self.expected = endpoint, expected
        self.sent = self.ok = 0
        self.by_version: dict[str, int] = {}
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(X.shape)}]}
        with Client(self.endpoint, timeout=30.0) as client:
            while not self.stop.is_set():
                with self.lock:
                    self.sent += 1
                reply = client.call("m", header, [X])
                error = protocol.reply_error(reply)
                with self.lock:
                    version = str(reply.header.get("model_version")) if error is None else ""
                    if error is not None:
                        self.failures.append(f"{type(error).__name__}: {error}")
                    elif version not in self.expected:
                        self.failures.append(f"answer from version {version!r}")
                    else:
                        y = np.frombuffer(reply.tensors[0], np.float32).reshape(self.expected[version].shape)
                        if not np.allclose(y, self.expected[version], **TOL):
                            self.failures.append(f"version {version} answered wrong numbers")
                        else:
                            self.ok += 1
                            self.by_version[version] = self.by_version.get(version, 0) + 1

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def _parents() -> dict[int, list[int]]:
    """Children of every process, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def children(pid: int) -> list[int]:
    return _parents().get(pid, [])


def rss_tree(pid: int) -> int:
    """Resident bytes of a process and every descendant (the launcher, its workers and its gateway)."""
    tree = _parents()
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += tree.get(p, [])
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def test_versions_published_reloaded_scaled_and_another_model_unloaded_under_load(pool, repo, models):
    d, expected = repo
    load = Load(pool.endpoint, expected)
    try:
        wait_until(lambda: load.ok >= 50, 30, what="load running")
        published = time.monotonic()
        publish(d / "sequential.keras", d / "m" / "2")
        waited(pool, lambda: load.by_version.get("2", 0) > 0, 120, "first answer from version 2", load)
        first_answer = time.monotonic() - published
        waited(pool, lambda: set(versions(pool, "m")) == {"2"}, 120, "version 1 unloaded", load)
        answers_from_1 = load.by_version.get("1", 0)
        for _ in range(5):
            old = {w["pid"] for w in versions(pool, "m")["2"]["workers"]}
            pool.client.reload("m")
            wait_until(lambda: {w["pid"] for w in versions(pool, "m")["2"]["workers"]}.isdisjoint(old)
                       and versions(pool, "m")["2"]["replicas_ready"] == 2, 120, what="reloaded")
        before_scale_down = set()
        for replicas in (4, 1):
            before_scale_down = set(pool.worker_pids("m"))
            pool.client.scale("m", replicas)
            wait_until(lambda: versions(pool, "m")["2"]["replicas_ready"] == replicas
                       and len(versions(pool, "m")["2"]["workers"]) == replicas, 120, what=f"scaled to {replicas}")
        other_pids = pool.worker_pids("other")
        # retired replicas may still be exiting: measure once they are gone
        retired = before_scale_down - set(pool.worker_pids("m"))
        wait_until(lambda: not retired & set(children(pool.proc.pid)), 30, what="retired replicas gone")
        before = rss_tree(pool.proc.pid)
        other_rss = sum(rss_tree(p) for p in other_pids)
        pool.client.unload("other")
        wait_until(lambda: "other" not in {m["name"] for m in pool.client.models()}, 60, what="other unloaded")
        wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in other_pids), 30, what="its processes gone")
        dropped = before - rss_tree(pool.proc.pid)
        with pytest.raises(ModelNotFound, match='model "other" is not served here'):
            pool.client.predict("other", X)
        pool.client.load("other")
        wait_until(lambda: versions(pool, "other").get("1", {}).get("replicas_ready") == 1, 120, what="other back")
        name = pool.client.metadata("other")["inputs"][0]["name"]
        assert pool.client.infer("other", {name: X})  # a SavedModel answers again
    finally:
        load.finish()
    assert load.failures == [], load.failures[:5]
    assert load.sent == load.ok == sum(load.by_version.values())  # every request sent was answered right
    assert answers_from_1 > 0 and load.by_version["2"] > 0
    assert load.by_version["1"] == answers_from_1  # none from version 1 once it was unloaded
    assert first_answer < 60
    assert other_rss > 50 * 2**20 and dropped > 0.8 * other_rss, (before, dropped, other_rss)
    print(f"\nrepository: {load.sent} requests, 0 failed; version 2 answered {first_answer:.1f}s after it was "
          f"published; unloading 'other' freed {dropped / 2**20:.0f} MiB (its workers held {other_rss / 2**20:.0f})")


def test_a_broken_version_leaves_the_last_good_one_serving(pool, repo):
    d, expected = repo
    newest = max(int(v) for v in versions(pool, "m"))
    broken = d / "m" / str(newest + 1)
    staging = d / "m" / ".broken"
    staging.mkdir()
    (staging / "model.keras").write_bytes(b"PK\x03\x04 not really a zip")
    os.rename(staging, broken)
    try:
        entry = wait_until(lambda: versions(pool, "m").get(broken.name, {}).get("load_error") and
                           versions(pool, "m")[broken.name], 120, what="the broken version's load error")
        assert entry["state"] in ("LOADING", "UNAVAILABLE") and entry["replicas_ready"] == 0
        y = pool.client.predict("m", X)  # the newest ready version answers
        np.testing.assert_allclose(y, expected[str(newest)], **TOL)
        index = {(r["name"], r["version"]): r for r in pool.client.repository()}
        assert index[("m", str(newest))]["state"] == "READY"
        assert index[("m", broken.name)]["reason"] == entry["load_error"]
        with pytest.raises(Unavailable, match=f'model "m" version "{broken.name}" failed to load: '):
            pool.client.predict("m", X, version=broken.name, timeout=5)
    finally:
        shutil.rmtree(broken)
    wait_until(lambda: set(versions(pool, "m")) == {str(newest)}, 60, what="the broken version dropped")


def test_tritonclient_repository_extension_and_version_paths(pool, repo):
    import tritonclient.http as httpclient

    _, expected = repo
    host, port = pool.gateway_ports()["http"]
    triton = httpclient.InferenceServerClient(f"{host}:{port}")
    try:
        index = {r["name"]: r for r in triton.get_model_repository_index()}
        assert index["m"]["state"] == "READY" and index["other"]["state"] == "READY"
        version = max(versions(pool, "m"))
        inp = httpclient.InferInput("x", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        result = triton.infer("m", [inp], model_version=version)
        assert result.get_response()["model_version"] == version
        out = result.get_response()["outputs"][0]["name"]
        np.testing.assert_allclose(result.as_numpy(out), expected[version], **TOL)
        assert triton.is_model_ready("m", version)
        with pytest.raises(Exception, match="has no version"):
            triton.infer("m", [inp], model_version="99")
        triton.unload_model("other")
        wait_until(lambda: not triton.is_model_ready("other"), 60, what="other unloaded over HTTP")
        assert {r["name"]: r for r in triton.get_model_repository_index()}["other"]["state"] == "UNAVAILABLE"
        triton.load_model("other")  # returns once it is ready, as Triton's does
        assert triton.is_model_ready("other")
        with pytest.raises(Exception, match="neither a"):
            triton.load_model("no-such-model")
    finally:
        triton.close()


def test_explicit_mode_from_the_command_line(models, tmp_path, capsys):
    """`modelpool serve --model-repository DIR --model-control-mode explicit --load-model m`, then
    `modelpool load` / `status` / `unload` as a user types them."""
    import signal
    import subprocess
    import sys

    from poolutil import REPO, process_alive

    from modelpool import cli

    (tmp_path / "repo" / "m").mkdir(parents=True)
    publish(models.a, tmp_path / "repo" / "m" / "1")
    (tmp_path / "repo" / "other").mkdir()
    publish(models.b, tmp_path / "repo" / "other" / "4")
    endpoint = f"ipc://{tmp_path}/front.ipc"
    log = open(tmp_path / "log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "modelpool", "serve", "--model-repository", str(tmp_path / "repo"),
                             "--model-control-mode", "explicit", "--load-model", "m", "--frontend", endpoint,
                             "--metrics-port", "off", "--http-port", "off", "--grpc-port", "off"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    pids = []
    try:
        with Client(endpoint, timeout=10) as client:
            wait_until(lambda: [m for m in client.models() if m["replicas_ready"]], 120, what="m ready")
            assert [m["name"] for m in client.models()] == ["m"]  # only what --load-model named
            index = {r["name"]: r for r in client.repository()}
            assert index["other"] == {"name": "other", "version": "", "state": "UNAVAILABLE", "reason": "not loaded"}
            capsys.readouterr()
            assert cli.main(["load", "other", "--endpoint", endpoint, "--wait", "120"]) == 0
            out = capsys.readouterr().out
            assert "model other: versions 4; started 4" in out and "1 ready, 0 starting, 0 draining" in out
            assert cli.main(["status", "--endpoint", endpoint]) == 0
            rows = [line.split()[:3] for line in capsys.readouterr().out.splitlines()[2:]]
            assert ["m", "1", "1/1"] in rows and ["other", "4", "1/1"] in rows
            pids = children(proc.pid)  # the workers (and multiprocessing's resource tracker)
            assert cli.main(["unload", "other", "--endpoint", endpoint, "--wait", "60"]) == 0
            assert "model other: unloaded" in capsys.readouterr().out
            assert cli.main(["load", "nothing", "--endpoint", endpoint]) == 1
            assert "ModelNotFound: model \"nothing\" is neither a [[models]] table nor in the model repository" \
                in capsys.readouterr().err
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "log").read_text()
        log.close()
    wait_until(lambda: not any(process_alive(p) for p in pids), 15, what="workers gone")
