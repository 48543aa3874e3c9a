"""The model side of a worker: load one model, compile its call, validate and run batches.

Imports TensorFlow at module level: import this only inside the spawned child, after
``modelproc.worker`` has set the environment (threads, devices, log level).
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf

from client.errors import InvalidInput
from client.protocol import datatype_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSpec:
    """Name, numpy dtype and shape (None for variable dims) of one model input or output."""

    name: str
    dtype: np.dtype
    shape: tuple

    def wire(self) -> dict:
        return {"name": self.name, "datatype": datatype_of(self.dtype),
                "shape": [-1 if d is None else int(d) for d in self.shape]}


def _spec(name: str, dtype: Any, shape: Any) -> TensorSpec:
    dims = tuple(None if d is None else int(d) for d in shape)
    return TensorSpec(name, np.dtype(tf.as_dtype(dtype).as_numpy_dtype), dims)


class Runner:
    """One loaded model and its compiled functions (one per requested output set)."""

    def __init__(self, path: str, *, max_batch_size: int, pad_to_bucket: bool = False,
                 imports: Sequence[str] = ()) -> None:
        for module in imports:
            importlib.import_module(module)
        self.path = path
        self.max_batch_size = max_batch_size
        self.pad_to_bucket = pad_to_bucket
        self.buckets = _buckets(max_batch_size)
        self._functions: dict[tuple, tuple[Callable, list[TensorSpec]]] = {}
        if os.path.isdir(path):
            self._load_savedmodel(path)
        else:
            self._load_keras(path)

    # --- loading -------------------------------------------------------------------------

    def _load_keras(self, path: str) -> None:
        import keras

        self.platform = "keras_h5" if path.endswith((".h5", ".hdf5")) else "keras"
        self.model = keras.models.load_model(path, compile=False)
        self.inputs = [_spec(_input_name(t), t.dtype, t.shape) for t in self.model.inputs]
        self.outputs = [_spec(n, t.dtype, t.shape) for n, t in zip(self.model.output_names, self.model.outputs)]
        self._functions[()] = (self._compile(self.model, self.outputs), self.outputs)

    def _compile(self, model: Any, outputs: list[TensorSpec]) -> Callable:
        signature = [tf.TensorSpec((None, *s.shape[1:]), tf.as_dtype(s.dtype), name=s.name) for s in self.inputs]
        names = [o.name for o in outputs]
        single = len(self.inputs) == 1

        @tf.autograph.experimental.do_not_convert
        def call(*xs: tf.Tensor) -> dict:
            ys = model(xs[0] if single else list(xs), training=False)
            ys = ys if isinstance(ys, (list, tuple)) else [ys]
            return dict(zip(names, ys))

        concrete = tf.function(call, input_signature=signature).get_concrete_function()
        return _fast_call(concrete, [(s.shape, s.dtype) for s in self.inputs]) or concrete

    def _load_savedmodel(self, path: str) -> None:
        self.platform = "tensorflow_savedmodel"
        self.model = tf.saved_model.load(path)
        if "serving_default" not in self.model.signatures:
            raise ValueError(f"SavedModel at {path} has no 'serving_default' signature")
        fn = self.model.signatures["serving_default"]
        _, kwargs = fn.structured_input_signature
        self.inputs = [_spec(name, spec.dtype, spec.shape) for name, spec in sorted(kwargs.items())]
        self.outputs = [_spec(name, spec.dtype, spec.shape) for name, spec in sorted(fn.structured_outputs.items())]
        names = [s.name for s in self.inputs]

        def call(*xs: Any) -> dict:
            return fn(**dict(zip(names, xs)))

        self._functions[()] = (call, self.outputs)

    def warm_up(self) -> None:
        """Run every bucket once so that no request pays a first-call cost."""
        sizes = self.buckets if self.pad_to_bucket else sorted({1, self.max_batch_size})
        for size in sizes:
            self.run([np.zeros((size, *[d or 1 for d in s.shape[1:]]), s.dtype) for s in self.inputs], ())

    # --- metadata and validation -----------------------------------------------------------

    def metadata(self, name: str, version: str) -> dict:
        """Open Inference Protocol model metadata."""
        return {"name": name, "versions": [version], "platform": self.platform,
                "inputs": [s.wire() for s in self.inputs], "outputs": [s.wire() for s in self.outputs],
                "max_batch_size": self.max_batch_size}

    def check_inputs(self, tensors: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Inputs in model order, or InvalidInput naming what is expected and what came."""
        if len(self.inputs) == 1 and list(tensors) == [""]:
            tensors = {self.inputs[0].name: tensors[""]}
        expected = [s.name for s in self.inputs]
        if sorted(tensors) != sorted(expected):
            raise InvalidInput(f"model expects inputs {expected}, got {sorted(tensors)}")
        arrays = []
        batch = None
        for spec in self.inputs:
            array = tensors[spec.name]
            if array.dtype != spec.dtype:
                want = _shape_text(spec.shape)
                raise InvalidInput(
                    f"input {spec.name!r}: expected {datatype_of(spec.dtype)} {want}, got "
                    f"{datatype_of(array.dtype)} {list(array.shape)}; convert with .astype('{spec.dtype.name}')")
            if array.ndim != len(spec.shape) or any(w is not None and w != g for w, g in zip(spec.shape[1:], array.shape[1:])):
                want = _shape_text(spec.shape)
                raise InvalidInput(
                    f"input {spec.name!r}: expected shape {want} ({datatype_of(spec.dtype)}), got "
                    f"{list(array.shape)}; the first dimension is the batch")
            if array.shape[0] == 0:
                raise InvalidInput(f"input {spec.name!r}: batch is empty (shape {list(array.shape)})")
            if batch is not None and array.shape[0] != batch:
                raise InvalidInput(f"inputs disagree on the batch size: {batch} and {array.shape[0]} rows")
            batch = array.shape[0]
            arrays.append(array)
        return arrays

    def check_outputs(self, outputs: Any) -> tuple:
        """Requested output names as a key; layer names are allowed for Keras models."""
        if outputs is None:
            return ()
        if not isinstance(outputs, (list, tuple)):
            raise InvalidInput(f"outputs must be a list of {{'name': ...}} maps, got {type(outputs).__name__}")
        names = []
        for item in outputs:
            name = item.get("name") if isinstance(item, dict) else item
            if not isinstance(name, str):
                raise InvalidInput(f"outputs entries must be {{'name': str}}, got {item!r}")
            names.append(name)
        key = tuple(names)
        if key and key not in self._functions:
            self._build_outputs(key)
        return key

    def _build_outputs(self, names: tuple) -> None:
        known = {o.name: o for o in self.outputs}
        if all(n in known for n in names):
            fn, _ = self._functions[()]
            self._functions[names] = (fn, [known[n] for n in names])
            return
        if self.platform == "tensorflow_savedmodel":
            raise InvalidInput(f"unknown outputs {[n for n in names if n not in known]}; SavedModel outputs are "
                               f"{list(known)} (intermediate layers need a Keras model)")
        import keras

        tensors, specs = [], []
        for name in names:
            if name in known:
                tensor = self.model.outputs[list(known).index(name)]
            else:
                try:
                    tensor = self.model.get_layer(name).output
                except ValueError:
                    layers = [layer.name for layer in self.model.layers]
                    raise InvalidInput(f"unknown output {name!r}; model outputs are {list(known)}, "
                                       f"layers are {layers}") from None
            tensors.append(tensor)
            specs.append(_spec(name, tensor.dtype, tensor.shape))
        sub = keras.Model(self.model.inputs, tensors)
        fn = self._compile(sub, specs)
        log.info("built sub-model for outputs %s", list(names))
        self._functions[names] = (fn, specs)
        self.run([np.zeros((1, *[d or 1 for d in s.shape[1:]]), s.dtype) for s in self.inputs], names)

    # --- running -------------------------------------------------------------------------

    def run(self, inputs: list[np.ndarray], key: tuple) -> list[tuple[TensorSpec, np.ndarray]]:
        """Run one batch (already validated) and return (spec, array) per output, unpadded."""
        fn, specs = self._functions[key]
        rows = inputs[0].shape[0]
        if self.pad_to_bucket:
            size = next((b for b in self.buckets if b >= rows), rows)
            if size != rows:
                inputs = [np.concatenate([x, np.zeros((size - rows, *x.shape[1:]), x.dtype)]) for x in inputs]
        result = fn(*inputs)
        return [(spec, result[spec.name].numpy()[:rows]) for spec in specs]


class _FlatCall:
    """A concrete function's graph run with flat tensors, without the per-call Python around it.

    ``ConcreteFunction.__call__`` binds its arguments to the signature, casts, enters gradient-tape
    and control-dependency scopes and re-packs the outputs on every call. A worker never records
    gradients and only runs eagerly, so this goes straight to ``Context.call_function`` (on a small
    model: 85 us instead of 280 us). That reaches below TensorFlow's public API, so ``_fast_call``
    checks it against the public call before it is used.
    """

    def __init__(self, concrete: Any) -> None:
        from tensorflow.python.eager import context
        from tensorflow.python.framework import ops

        atomic = concrete._inference_function
        self._concrete = concrete  # the function stays registered with the context while this lives
        self._context = context.context()
        self._function = atomic.name
        self._outputs = len(atomic.function_type.flat_outputs)
        self._captures = list(concrete.captured_inputs)
        self._names = sorted(concrete.structured_outputs)  # a dict flattens in sorted key order
        self._device = self._context.device_name
        self._tensor = ops.EagerTensor
        self._enums = [tf.as_dtype(spec.dtype).as_datatype_enum for spec in concrete.structured_input_signature[0]]

    def __call__(self, *xs: np.ndarray) -> dict:
        device, make = self._device, self._tensor
        # An array over a ZeroMQ frame takes TensorFlow about twice as long to convert as a copy of
        # it does, copy included (measured from 128 bytes to 600 KB).
        args = [make(x if x.flags.owndata else x.copy(), device, enum) for x, enum in zip(xs, self._enums)]
        args.extend(self._captures)
        flat = self._context.call_function(self._function, args, self._outputs)
        return dict(zip(self._names, flat))


def _fast_call(concrete: Any, inputs: list[tuple[tuple, np.dtype]]) -> _FlatCall | None:
    """A ``_FlatCall`` if this TensorFlow supports it and it answers exactly as the public call."""
    try:
        fast = _FlatCall(concrete)
        rng = np.random.default_rng(0)
        for rows in (1, 3):
            xs = [np.abs(rng.standard_normal((rows, *[d or 2 for d in shape[1:]]))).astype(dtype) for shape, dtype in inputs]
            want, got = concrete(*xs), fast(*xs)
            if sorted(want) != sorted(got) or not all(
                    np.array_equal(want[k].numpy(), got[k].numpy(), equal_nan=True) for k in want):
                raise ValueError("outputs differ from the public call")
        return fast
    except Exception as exc:  # internals moved, or an input the check cannot build: use the public path
        log.info("using ConcreteFunction.__call__ (flat call unavailable: %s: %s)", type(exc).__name__, exc)
        return None


def _input_name(tensor: Any) -> str:
    name = tensor.name
    return name.split(":")[0]


def _shape_text(shape: tuple) -> list:
    return ["batch" if i == 0 else ("any" if d is None else d) for i, d in enumerate(shape)]


def _buckets(max_batch_size: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch_size)
    return sizes

