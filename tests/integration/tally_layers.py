"""A Keras layer that records every row the model runs, for tests that must prove what never ran.

Workers import this module through the pool's `imports` key. ``Tally(path)`` appends one line per
call to ``path``: the first feature of every row in the batch. The second feature of the first row
is how many seconds the call sleeps (a slow model on demand).
"""
from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf


def read_tally(path) -> list[list[float]]:
    """The rows' first features, one list per model call, in call order."""
    try:
        with open(path) as f:
            return [[float(v) for v in line.split()] for line in f if line.strip()]
    except FileNotFoundError:
        return []


@keras.saving.register_keras_serializable(package="modelpool_tests")
class Tally(keras.layers.Layer):
    """Identity that appends the batch's row tags to a file, and sleeps x[0, 1] seconds."""

    def __init__(self, path: str = "", **kwargs):
        super().__init__(**kwargs)
        self.tally_path = path

    def _record(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] and x.shape[1] > 1 and 0 < float(x[0, 1]) <= 60:
            time.sleep(float(x[0, 1]))
        if x.shape[0] and np.any(x[:, 0] != 0):  # warm-up calls run on zeros: not requests
            with open(self.tally_path, "a") as f:
                f.write(" ".join(f"{v:g}" for v in x[:, 0]) + "\n")
        return x

    def call(self, x):
        y = tf.numpy_function(self._record, [x], x.dtype, stateful=True)
        y.set_shape(x.shape)
        return y

    def get_config(self):
        return {**super().get_config(), "path": self.tally_path}
