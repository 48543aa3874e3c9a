"""Keras layers for fault-injection models; workers import this module through the `imports` key."""
from __future__ import annotations

import ctypes
import functools
import os
import time

import keras
import numpy as np
import tensorflow as tf

POISON_EXIT = -999.0  # first feature of a row that makes the worker process vanish (os._exit)
POISON_SEGV = -777.0  # first feature of a row that makes the worker segfault inside native code
RAISE_VALUE = -555.0  # first feature of a row that makes the layer raise


def _check(x: np.ndarray) -> np.ndarray:
    first = x[:, 0]
    if np.any(first == POISON_EXIT):
        os._exit(17)
    if np.any(first == POISON_SEGV):
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if np.any(first == RAISE_VALUE):
        raise ValueError("this model refuses rows starting with -555")
    return x


def _sleep(x: np.ndarray) -> np.ndarray:
    # Second feature of the first row = seconds to sleep (bounded); simulates slow or hung models.
    seconds = float(x[0, 1]) if x.shape[1] > 1 else 0.0
    if 0 < seconds <= 60:
        time.sleep(seconds)
    return x


def _count_and_sleep(x: np.ndarray, seconds: float, counter: str) -> np.ndarray:
    # One line per row (its first feature) each time the model runs, written before the sleep so that a
    # run cut short (its worker killed) is counted too.
    with open(counter, "a") as f:
        f.write("".join(f"{value:g}\n" for value in x[:, 0]))
    time.sleep(seconds)
    return x


def counted_runs(counter: str, marker: float) -> int:
    """How many times the model logging to ``counter`` has run a row whose first feature is ``marker``."""
    try:
        with open(counter) as f:
            return sum(1 for line in f if line.strip() == f"{marker:g}")
    except FileNotFoundError:
        return 0


@keras.saving.register_keras_serializable(package="modelpool_tests")
class Poison(keras.layers.Layer):
    """Identity, except for the magic rows above."""

    def call(self, x):
        y = tf.numpy_function(_check, [x], x.dtype, stateful=True)
        y.set_shape(x.shape)
        return y


@keras.saving.register_keras_serializable(package="modelpool_tests")
class Sleep(keras.layers.Layer):
    """Identity that sleeps x[0, 1] seconds per batch."""

    def call(self, x):
        y = tf.numpy_function(_sleep, [x], x.dtype, stateful=True)
        y.set_shape(x.shape)
        return y


@keras.saving.register_keras_serializable(package="modelpool_tests")
class SlowCounted(keras.layers.Layer):
    """Identity that takes ``seconds`` per call and logs each row's first feature to the file ``counter``."""

    def __init__(self, seconds: float = 1.5, counter: str = "", **kwargs):
        super().__init__(**kwargs)
        self.seconds = seconds
        self.counter = counter

    def call(self, x):
        run = functools.partial(_count_and_sleep, seconds=self.seconds, counter=self.counter)
        y = tf.numpy_function(run, [x], x.dtype, stateful=True)
        y.set_shape(x.shape)
        return y

    def get_config(self):
        return {**super().get_config(), "seconds": self.seconds, "counter": self.counter}


@keras.saving.register_keras_serializable(package="modelpool_tests")
class Scale(keras.layers.Layer):
    """Learned per-feature scale plus a constant offset: a custom layer with weights and a config."""

    def __init__(self, offset: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.offset = offset

    def build(self, input_shape):
        self.gamma = self.add_weight(shape=(input_shape[-1],), initializer="random_normal", name="gamma")

    def call(self, x):
        return x * self.gamma + self.offset

    def get_config(self):
        return {**super().get_config(), "offset": self.offset}


@keras.saving.register_keras_serializable(package="modelpool_tests")
class TinySubclassed(keras.Model):
    """A subclassed model (no functional graph), registered so that a worker importing this loads it."""

    def __init__(self, units: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = keras.layers.Dense(6, activation="relu", name="hidden")
        self.head = keras.layers.Dense(units, name="head")

    def call(self, x):
        return self.head(self.hidden(x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


_LEAKED: list = []  # what Leak keeps: it is never freed while the process lives


@keras.saving.register_keras_serializable(package="modelpool_tests")
class Leak(keras.layers.Layer):
    """Identity that keeps ``mb`` MiB more resident memory after every call (a slow leak, on demand)."""

    def __init__(self, mb: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.mb = mb

    def _leak(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] and np.any(x != 0):  # warm-up calls run on zeros
            _LEAKED.append(np.ones(self.mb * 2**18, np.float32))  # written: resident, not just reserved
        return x

    def call(self, x):
        y = tf.numpy_function(self._leak, [x], x.dtype, stateful=True)
        y.set_shape(x.shape)
        return y

    def get_config(self):
        return {**super().get_config(), "mb": self.mb}
