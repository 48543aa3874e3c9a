"""Models that change while the pool runs: scale, reload and recycling under load, on a real pool.

Every change goes through the public client (``Client.scale``/``reload``, the CLI's commands) while
threads keep sending requests; the tests count what was sent, what came back and from which process.
"""
from __future__ import annotations

import shutil
import threading

import custom_layers
import numpy as np
import pytest
from poolutil import Pool, wait_until

from modelpool.client import Client, InvalidInput, ModelNotFound, Unavailable

pytestmark = pytest.mark.timeout(300)

TOL = dict(rtol=1e-5, atol=1e-6)
LEAK_MB = 192  # the leaky model keeps this much more per call ...
MAX_MEMORY_MB = 2400  # ... and is replaced past this: after 8 to 12 calls from its size at start


@pytest.fixture(scope="module")
def paths(models, tmp_path_factory):
    """Copies of the model files the tests may overwrite, and the leaking model."""
    import keras

    d = tmp_path_factory.mktemp("runtime")
    shutil.copy(models.a, d / "a.keras")
    shutil.copy(models.b, d / "b.keras")
    keras.utils.set_random_seed(9)
    inp = keras.Input(shape=(8,), name="x")
    leaky = keras.Model(inp, keras.layers.Dense(4, name="y")(custom_layers.Leak(mb=LEAK_MB, name="leak")(inp)))
    leaky.save(d / "leaky.keras")
    return d


@pytest.fixture(scope="module")
def live(paths):
    p = Pool([
        {"name": "a", "path": str(paths / "a.keras"), "replicas": 2, "max_batch_size": 16},
        {"name": "b", "path": str(paths / "b.keras")},
        {"name": "counted", "path": str(paths / "b.keras"), "max_requests": 40},
        {"name": "leaky", "path": str(paths / "leaky.keras"), "imports": ["custom_layers"],
         "max_memory_mb": MAX_MEMORY_MB},
    ])
    yield p
    code = p.stop()
    assert code == 0, p.read_log()


def settled(pool: Pool, model: str, replicas: int) -> bool:
    entry = pool.models()[model]
    return (entry["replicas_ready"] == replicas and entry["replicas_starting"] == 0
            and all(w["state"] == "ready" for w in entry["workers"]) and len(entry["workers"]) == replicas)


class Load:
    """Threads sending requests to one model until stopped; every answer is checked against Keras."""

    def __init__(self, endpoint: str, model: str, keras_model, threads: int = 8) -> None:
        self.endpoint, self.model, self.keras_model = endpoint, model, keras_model
        self.sent = self.answered = 0
        self.failures: list[str] = []
        self.wrong = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        xs = rng.normal(size=(16, 8)).astype(np.float32)
        want = self.keras_model.predict(xs, verbose=0) if self.keras_model is not None else None
        with Client(self.endpoint, timeout=60.0) as client:
            i = 0
            while not self.stopping.is_set():
                row = i % len(xs)
                with self.lock:
                    self.sent += 1
                try:
                    got = client.predict(self.model, xs[row:row + 1])
                except Exception as exc:  # counted, and the test shows them
                    with self.lock:
                        self.failures.append(f"{type(exc).__name__}: {exc}")
                else:
                    with self.lock:
                        self.answered += 1
                        if want is not None and not np.allclose(got, want[row:row + 1], **TOL):
                            self.wrong += 1
                i += 1

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(90)


def test_reload_and_scale_under_load_lose_nothing(live, models):
    a_before = set(live.worker_pids("a"))
    load = Load(live.endpoint, "a", models.keras["a"])
    try:
        wait_until(lambda: load.answered > 50, 30, what="load running")
        with Client(live.endpoint) as control:
            assert control.reload("a") == {"model": "a", "replacing": 2}
            wait_until(lambda: settled(live, "a", 2) and not set(live.worker_pids("a")) & a_before, 120,
                       interval=0.2, what="a reloaded")
            after_reload = set(live.worker_pids("a"))
            assert control.scale("a", 3) == {"model": "a", "replicas": 3}
            wait_until(lambda: settled(live, "a", 3), 120, interval=0.2, what="a at 3 replicas")
            assert set(live.worker_pids("a")) > after_reload  # the two stay, one joins
            assert control.scale("a", 1) == {"model": "a", "replicas": 1}
            wait_until(lambda: settled(live, "a", 1), 60, interval=0.2, what="a at 1 replica")
            served_during = load.answered
            wait_until(lambda: load.answered > served_during + 50, 30, what="a still serving")
    finally:
        load.stop()
    assert load.failures == [] and load.wrong == 0
    assert load.answered == load.sent > 200
    entry = live.models()["a"]
    assert entry["replicas_expected"] == 1 and entry["worker_restarts"] == 0  # retired, not restarted
    assert entry["failed"] == 0 and entry["success"] >= load.answered


def test_scale_to_zero_answers_503_and_back_serves_again(live, models):
    x = np.ones((1, 8), np.float32)
    with Client(live.endpoint, timeout=30) as client:
        client.scale("b", 0)
        wait_until(lambda: not live.worker_pids("b"), 60, interval=0.2, what="b's process gone")
        with pytest.raises(Unavailable, match='"b" has no live worker'):
            client.predict("b", x)
        client.scale("b", 1)
        wait_until(lambda: settled(live, "b", 1), 120, interval=0.2, what="b back")
        np.testing.assert_allclose(client.predict("b", x), models.keras["b"].predict(x, verbose=0), **TOL)


def test_a_reload_that_cannot_load_leaves_the_old_replica_serving(live, paths, models):
    x = np.ones((1, 8), np.float32)
    with Client(live.endpoint, timeout=30) as client:
        client.scale("b", 1)
        wait_until(lambda: settled(live, "b", 1), 120, interval=0.2, what="b up")
        before = live.worker_pids("b")
        good = (paths / "b.keras").read_bytes()
        (paths / "b.keras").write_bytes(b"not a keras file any more")
        try:
            assert client.reload("b")["replacing"] == 1
            wait_until(lambda: live.models()["b"]["load_error"], 120, interval=0.2, what="the loader's error")
            wait_until(lambda: live.models()["b"]["replicas_starting"] == 0, 60, interval=0.2, what="no retry")
        finally:
            (paths / "b.keras").write_bytes(good)
        entry = live.models()["b"]
        assert ".keras" in entry["load_error"] and live.worker_pids("b") == before
        np.testing.assert_allclose(client.predict("b", x), models.keras["b"].predict(x, verbose=0), **TOL)


def test_a_replica_past_max_requests_is_replaced_with_no_failed_request(live, models):
    before = live.models()["counted"]["recycled"]
    load = Load(live.endpoint, "counted", models.keras["b"], threads=4)
    try:
        wait_until(lambda: live.models()["counted"]["recycled"] >= before + 2, 120, interval=0.1,
                   what="two recycles")
        wait_until(lambda: settled(live, "counted", 1), 120, interval=0.2, what="one replica again")
    finally:
        load.stop()
    assert load.failures == [] and load.wrong == 0 and load.answered == load.sent
    assert live.models()["counted"]["worker_restarts"] == 0


def test_a_leaking_replica_is_replaced_past_max_memory_mb(live):
    first = live.worker_pids("leaky")
    x = np.ones((1, 8), np.float32)
    sent = 0
    with Client(live.endpoint, timeout=60) as client:
        while live.models()["leaky"]["recycled"] == 0:
            assert sent < 40, "never recycled"
            client.predict("leaky", x)
            sent += 1
        wait_until(lambda: settled(live, "leaky", 1) and live.worker_pids("leaky") != first, 120, interval=0.2,
                   what="the successor alone")
        for _ in range(3):
            client.predict("leaky", x)  # the successor serves
    entry = live.models()["leaky"]
    assert entry["failed"] == 0 and entry["worker_restarts"] == 0
    assert entry["workers"][0]["rss_bytes"] < MAX_MEMORY_MB * 2**20
    assert sent >= (MAX_MEMORY_MB - entry["workers"][0]["rss_bytes"] / 2**20) // LEAK_MB  # it did grow first


def test_control_errors_say_what_to_fix(live):
    with Client(live.endpoint, timeout=10) as client:
        with pytest.raises(ModelNotFound, match="models served: a, b, counted, leaky"):
            client.scale("nope", 1)
        with pytest.raises(InvalidInput, match="replicas must be an integer from 0 to 64"):
            client.scale("a", 65)
        with pytest.raises(InvalidInput, match="model must be a string"):
            client._manage(b"mmi.scale", {"model": 3, "replicas": 1}, None)
