"""Session fixtures: small real Keras models saved in every format, and a shared pool serving them."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from poolutil import Pool  # noqa: E402


@dataclass
class Models:
    """Paths of the models made for this session, and the in-process Keras objects."""

    dir: Path
    a: Path
    b: Path
    multi: Path
    h5: Path
    saved: Path
    poison: Path
    sleepy: Path
    broken: Path
    keras: dict


def _tiny(seed: int, name: str):
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input(shape=(8,), name="x")
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inp)
    out = keras.layers.Dense(4, name="y")(hidden)
    return keras.Model(inp, out, name=name)


def _multi():
    import keras

    keras.utils.set_random_seed(3)
    in_a = keras.Input(shape=(4,), name="in_a")
    in_b = keras.Input(shape=(3,), name="in_b")
    joined = keras.layers.Concatenate(name="joined")([in_a, in_b])
    hidden = keras.layers.Dense(6, activation="tanh", name="bottleneck")(joined)
    out_sum = keras.layers.Dense(2, name="out_sum")(hidden)
    out_cls = keras.layers.Dense(3, activation="softmax", name="out_cls")(hidden)
    return keras.Model([in_a, in_b], [out_sum, out_cls], name="multi")


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Models:
    import custom_layers
    import keras

    d = tmp_path_factory.mktemp("models")
    a, b, multi = _tiny(1, "model_a"), _tiny(2, "model_b"), _multi()
    a.save(d / "a.keras")
    b.save(d / "b.keras")
    multi.save(d / "multi.keras")
    h5 = _tiny(4, "model_h5")
    h5.save(d / "legacy.h5")
    saved = _tiny(5, "model_saved")
    saved.export(str(d / "saved"), format="tf_saved_model", verbose=False)

    keras.utils.set_random_seed(6)
    inp = keras.Input(shape=(8,), name="x")
    poisoned = custom_layers.Poison(name="poison")(inp)
    poison = keras.Model(inp, keras.layers.Dense(4, name="y")(poisoned), name="poison")
    poison.save(d / "poison.keras")
    sleepy_in = keras.Input(shape=(8,), name="x")
    slept = custom_layers.Sleep(name="sleep")(sleepy_in)
    sleepy = keras.Model(sleepy_in, keras.layers.Dense(4, name="y")(slept), name="sleepy")
    sleepy.save(d / "sleepy.keras")
    (d / "broken.keras").write_bytes(b"this is not a keras file")
    return Models(d, d / "a.keras", d / "b.keras", d / "multi.keras", d / "legacy.h5", d / "saved",
                  d / "poison.keras", d / "sleepy.keras", d / "broken.keras",
                  {"a": a, "b": b, "multi": multi, "h5": h5, "saved": saved, "poison": poison, "sleepy": sleepy})


@pytest.fixture(scope="session")
def pool(models):
    """One pool for the functional tests: A and B with two replicas each, plus one of every format."""
    p = Pool([
        {"name": "a", "path": str(models.a), "replicas": 2, "max_batch_size": 16},
        {"name": "b", "path": str(models.b), "replicas": 2, "max_batch_size": 16, "version": "7"},
        {"name": "multi", "path": str(models.multi)},
        {"name": "h5", "path": str(models.h5)},
        {"name": "saved", "path": str(models.saved)},
    ])
    yield p
    code = p.stop()
    assert code == 0, p.read_log()


@pytest.fixture()
def rng():
    return np.random.default_rng(0)
