"""The benchmark's two seeded Keras models, their inputs, and their compiled calls."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

WORKLOADS = ("tiny", "cnn")
WORKLOAD_TEXT = {
    "tiny": "Dense(64, relu) -> Dense(10, softmax) on 32 float inputs.",
    "cnn": "32x32x3 input, Conv(32,3) -> Conv(64,3) -> MaxPool -> Conv(64,3) -> GlobalAvgPool -> Dense(10, softmax).",
}


def build_model(name: str, seed: int) -> Any:
    """The seeded Keras model of a workload."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    if name == "tiny":
        inputs = keras.Input((32,), name="x")
        h = layers.Dense(64, activation="relu")(inputs)
        outputs = layers.Dense(10, activation="softmax")(h)
    elif name == "cnn":
        inputs = keras.Input((32, 32, 3), name="x")
        h = layers.Conv2D(32, 3, activation="relu")(inputs)
        h = layers.Conv2D(64, 3, activation="relu")(h)
        h = layers.MaxPooling2D()(h)
        h = layers.Conv2D(64, 3, activation="relu")(h)
        h = layers.GlobalAveragePooling2D()(h)
        outputs = layers.Dense(10, activation="softmax")(h)
    else:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    return keras.Model(inputs, outputs, name=name)


def sample_input(model: Any, rows: int, seed: int) -> np.ndarray:
    """Seeded float32 input of ``rows`` samples for the model."""
    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    return np.random.default_rng(seed).standard_normal((rows, *shape)).astype(np.float32)


def compiled_call(model: Any) -> Callable[[np.ndarray], Any]:
    """The model as a concrete tf.function with a variable batch dimension (no retracing)."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32)
    return tf.function(lambda x: model(x, training=False), input_signature=[spec]).get_concrete_function()


def polymorphic_call(model: Any) -> Callable[[np.ndarray], Any]:
    """The model wrapped in a plain ``tf.function`` (traced on first call, checked on every call)."""
    import tensorflow as tf

    return tf.function(lambda x: model(x, training=False))
