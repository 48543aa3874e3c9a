"""The model side of a worker: load one model, compile its call, validate and run batches.

Imports TensorFlow at module level: import this only inside the spawned child, after
``modelproc.worker`` has set the environment (threads, devices, log level).

Tensor names, for every Keras form (``.keras`` and ``.h5``), come from the public API:

- inputs: the keys of ``model.input`` when the model was built with a dict of inputs, else the name
  of each ``model.inputs`` tensor, which is its ``keras.Input`` / ``InputLayer`` name. A Sequential
  model's one input is named after its InputLayer: the name given to ``keras.Input(..., name=...)``,
  else the name Keras saved (``input_layer``, ``input_layer_1``, ... in Keras 3);
- outputs: the keys of ``model.output`` when the model was built with a dict of outputs, else the name
  of the layer in ``model.layers`` (or the op in a functional model's ``operations``) that produces
  each ``model.outputs`` tensor, as Keras's own ``output_names`` (for Sequential: its last layer; for
  a nested model used last: the nested model's name), else ``output_<i>``;
- a subclassed model (no graph) is served when it is built and can be called on a ``keras.Input``:
  its input is ``input`` (``input_<i>`` for several) and its outputs ``output_<i>``, as
  ``model.export()`` names them, its input dtype is the model's ``input_dtype`` (float32 unless set),
  and it has no intermediate layers.

Any layer of the outer model (``model.layers``, nested models included as one layer) can be asked
for by name in ``outputs``; each distinct ``outputs`` list builds a sub-model, and the most recently
used ``OUTPUT_CACHE_SIZE`` of them are kept (the full-output function is never evicted).
"""
from __future__ import annotations

import importlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf

from modelpool.client.errors import InvalidInput
from modelpool.client.protocol import datatype_of, output_names, quote

log = logging.getLogger(__name__)

OUTPUT_CACHE_SIZE = 16  # sub-models kept for distinct `outputs` lists, besides the full output


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
                 imports: Sequence[str] = (), output_cache_size: int = OUTPUT_CACHE_SIZE) -> None:
        for module in imports:
            importlib.import_module(module)
        self.path = path
        self.imports = tuple(imports)
        self.max_batch_size = max_batch_size
        self.pad_to_bucket = pad_to_bucket
        self.buckets = _buckets(max_batch_size)
        self.output_cache_size = output_cache_size
        # () -> the full output; other keys are LRU-ordered, the most recently used last
        self._functions: OrderedDict[tuple, tuple[Callable, list[TensorSpec]]] = OrderedDict()
        if os.path.isdir(path):
            self._load_savedmodel(path)
        else:
            self._load_keras(path)

    # --- loading -------------------------------------------------------------------------

    def _load_keras(self, path: str) -> None:
        import keras

        self.platform = "keras_h5" if path.endswith((".h5", ".hdf5")) else "keras"
        try:
            self.model = keras.models.load_model(path, compile=False)
        except (TypeError, ValueError) as exc:
            raise _load_error(exc, self.platform, self.imports) from None
        self._graph_inputs, self._graph_outputs = _graph(self.model, path)
        self.inputs = [_spec(n, t.dtype, t.shape) for n, t in zip(_input_names(self.model, self._graph_inputs),
                                                                  self._graph_inputs)]
        names = _output_names(self.model, self._graph_outputs)
        self.outputs = [_spec(n, t.dtype, t.shape) for n, t in zip(names, self._graph_outputs)]
        full = keras.Model(self._graph_inputs, self._graph_outputs)
        self._functions[()] = (self._compile(full, self.outputs), self.outputs)

    def _compile(self, model: Any, outputs: list[TensorSpec]) -> Callable:
        signature = [tf.TensorSpec((None, *s.shape[1:]), tf.as_dtype(s.dtype), name=s.name) for s in self.inputs]
        names = [o.name for o in outputs]

        @tf.autograph.experimental.do_not_convert
        def call(*xs: tf.Tensor) -> dict:
            ys = model(list(xs), training=False)  # every model compiled here takes a flat list
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
        signature = [tf.TensorSpec(s.shape, tf.as_dtype(s.dtype), name=s.name) for s in self.inputs]

        @tf.autograph.experimental.do_not_convert
        def call(*xs: tf.Tensor) -> dict:
            return fn(**dict(zip(names, xs)))

        # positional, so that the flat call (and its check against this one) applies as for Keras models
        concrete = tf.function(call, input_signature=signature).get_concrete_function()
        self._functions[()] = (_fast_call(concrete, [(s.shape, s.dtype) for s in self.inputs]) or concrete,
                               self.outputs)

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
                "layers": self.layers(), "max_batch_size": self.max_batch_size}

    def layers(self) -> list[str]:
        """Names of the layers whose output a request may ask for besides the model's outputs."""
        if self.platform == "tensorflow_savedmodel" or not hasattr(self.model, "inputs"):
            return []
        outputs = {o.name for o in self.outputs}
        names = []
        for layer in self.model.layers:
            try:
                tensor = layer.output
            except (AttributeError, ValueError):
                continue
            if not isinstance(tensor, (list, tuple, dict)) and layer.name not in outputs \
                    and type(layer).__name__ != "InputLayer":
                names.append(layer.name)
        return names

    def check_inputs(self, tensors: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Inputs in model order, or InvalidInput naming what is expected and what came."""
        if len(self.inputs) == 1 and list(tensors) == [""]:
            tensors = {self.inputs[0].name: tensors[""]}
        expected = [s.name for s in self.inputs]
        if sorted(tensors) != sorted(expected):
            raise InvalidInput(f"model expects inputs {_names(expected)}, got {_names(sorted(tensors))}")
        arrays = []
        batch = None
        for spec in self.inputs:
            array = tensors[spec.name]
            if array.dtype != spec.dtype:
                want = _shape_text(spec.shape)
                raise InvalidInput(
                    f"input {quote(spec.name)}: expected {datatype_of(spec.dtype)} {want}, got "
                    f"{datatype_of(array.dtype)} {_dims(array.shape)}; send {datatype_of(spec.dtype)} data")
            if array.ndim != len(spec.shape) or any(w is not None and w != g for w, g in zip(spec.shape[1:], array.shape[1:])):
                want = _shape_text(spec.shape)
                raise InvalidInput(
                    f"input {quote(spec.name)}: expected shape {want} ({datatype_of(spec.dtype)}), got "
                    f"{_dims(array.shape)}; the first dimension is the batch")
            if array.shape[0] == 0:
                raise InvalidInput(f"input {quote(spec.name)}: batch is empty (shape {_dims(array.shape)})")
            if batch is not None and array.shape[0] != batch:
                raise InvalidInput(f"inputs disagree on the batch size: {batch} and {array.shape[0]} rows")
            batch = array.shape[0]
            arrays.append(array)
        return arrays

    def check_outputs(self, outputs: Any) -> tuple:
        """Requested output names as a key; layer names are allowed for Keras models."""
        key = output_names(outputs)
        if key:
            self._function(key)
        return key

    def _function(self, key: tuple) -> tuple[Callable, list[TensorSpec]]:
        """The compiled function for an output key: cached (LRU, () always kept) or built now."""
        entry = self._functions.get(key)
        if entry is None:
            entry = self._build_outputs(key)
            self._functions[key] = entry
            extra = [k for k in self._functions if k != ()]
            for old in extra[:max(0, len(extra) - self.output_cache_size)]:
                del self._functions[old]
                log.info("dropped the sub-model for outputs %s (cache holds %d)", list(old), self.output_cache_size)
        elif key:
            self._functions.move_to_end(key)
        return entry

    def _build_outputs(self, names: tuple) -> tuple[Callable, list[TensorSpec]]:
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise InvalidInput(f"outputs names {', '.join(quote(n) for n in repeated)} more than once; "
                               "ask for each tensor once")
        known = {o.name: o for o in self.outputs}
        if all(n in known for n in names):
            fn, _ = self._functions[()]
            return fn, [known[n] for n in names]
        if self.platform == "tensorflow_savedmodel":
            unknown = ", ".join(quote(n) for n in names if n not in known)
            raise InvalidInput(f"unknown outputs {unknown}; SavedModel outputs are {', '.join(known)} "
                               "(intermediate layers need a Keras model)")
        import keras

        tensors = [self._graph_outputs[list(known).index(n)] if n in known else self._layer_output(n)
                   for n in names]
        for i, tensor in enumerate(tensors):
            first = next(j for j, other in enumerate(tensors) if other is tensor)
            if first != i:
                raise InvalidInput(f"outputs {quote(names[first])} and {quote(names[i])} are the same tensor; "
                                   "ask for it once")
        specs = [_spec(n, t.dtype, t.shape) for n, t in zip(names, tensors)]
        fn = self._compile(keras.Model(self._graph_inputs, tensors), specs)
        log.info("built sub-model for outputs %s", list(names))
        self._warm(fn, specs)
        return fn, specs

    def _layer_output(self, name: str) -> Any:
        """The tensor a layer of the (outer) model produces in the model's graph, by layer name."""
        known = [o.name for o in self.outputs]
        if not hasattr(self.model, "inputs"):
            raise InvalidInput(f"unknown output {quote(name)}; a subclassed model has no intermediate outputs, "
                               f"its outputs are {_names(known)}")
        try:
            layer = self.model.get_layer(name)
        except ValueError:
            layers = [layer.name for layer in self.model.layers]
            raise InvalidInput(f"unknown output {quote(name)}; model outputs are {_names(known)}, layers are "
                               f"{_names(layers)}") from None
        try:
            tensor = layer.output
        except (AttributeError, ValueError):  # never called on symbolic inputs
            raise InvalidInput(f"layer {quote(name)} has no output in this model's graph; "
                               f"model outputs are {_names(known)}") from None
        if isinstance(tensor, (list, tuple, dict)):
            raise InvalidInput(f"layer {quote(name)} has several outputs; only single-output layers can be asked "
                               f"for by name (model outputs are {_names(known)})")
        return tensor

    def _warm(self, fn: Callable, specs: list[TensorSpec]) -> None:
        result = fn(*[np.zeros((1, *[d or 1 for d in s.shape[1:]]), s.dtype) for s in self.inputs])
        for spec in specs:
            result[spec.name].numpy()

    # --- running -------------------------------------------------------------------------

    def run(self, inputs: list[np.ndarray], key: tuple) -> list[tuple[TensorSpec, np.ndarray]]:
        """Run one batch (already validated) and return (spec, array) per output, unpadded."""
        fn, specs = self._function(key)  # built again if evicted since check_outputs
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


def _load_error(exc: Exception, platform: str, imports: tuple) -> Exception:
    """Keras's own loading error, with what to do when it is about classes Keras could not find."""
    message = str(exc)
    if "register_keras_serializable" not in message and "Unknown layer" not in message:
        return exc
    advice = (f"To serve a model with custom classes (custom layers, subclassed models), decorate each class with "
              f"@keras.saving.register_keras_serializable() and list the module that defines it in this model's "
              f"`imports` (imported now: {_names(imports)}); or serve a SavedModel made with model.export(path).")
    if platform == "keras_h5":  # Keras 3 writes these to .h5 but cannot read them back, registered or not
        advice += (" Keras cannot read a subclassed model, or a functional model with a mask op such as NotEqual "
                   "(from Embedding(mask_zero=True)), back from a legacy .h5 file: save the model as .keras instead.")
    return ValueError(f"{message} {advice}")


def _graph(model: Any, path: str) -> tuple[list, list]:
    """Flat lists of the model's symbolic inputs and outputs; a subclassed model is traced on keras.Input."""
    import keras

    try:
        return list(model.inputs), list(model.outputs)
    except AttributeError:  # a subclassed model (or an unbuilt Sequential): no graph of its own
        pass
    hint = ("register the class with @keras.saving.register_keras_serializable(), list its module in `imports`, "
            "or serve a SavedModel made with model.export(path) instead")
    build = model.get_build_config() if model.built else None
    shape = (build or {}).get("input_shape")
    if not shape or not all(isinstance(d, (int, type(None))) for d in shape):
        raise ValueError(f"{path}: {type(model).__name__} has no graph of its own (a subclassed model, or a Sequential "
                         f"never built) and was saved without one known input shape (build config {build}); call it "
                         f"once on a batch before saving, or {hint}")
    inp = keras.Input(batch_shape=(None, *shape[1:]), dtype=model.input_dtype, name="input")
    try:
        out = model(inp)
    except Exception as exc:
        raise ValueError(f"{path}: the subclassed model {type(model).__name__} cannot be called on a symbolic "
                         f"input ({type(exc).__name__}: {exc}); {hint}") from None
    return [inp], list(keras.tree.flatten(out))


def _struct_keys(struct: Any, flat: list) -> list[str] | None:
    """The dict keys of a model's input/output structure in the order of the flat tensor list."""
    if not isinstance(struct, dict) or len(struct) != len(flat):
        return None
    by_id = {id(t): str(k) for k, t in struct.items()}
    keys = [by_id.get(id(t)) for t in flat]
    return keys if None not in keys else None


def _public(model: Any, attr: str) -> Any:
    try:
        return getattr(model, attr)
    except (AttributeError, ValueError):  # Sequential and subclassed models have no `input`/`output`
        return None


def _input_names(model: Any, inputs: list) -> list[str]:
    keys = _struct_keys(_public(model, "input"), inputs)
    if keys:
        return keys
    if not hasattr(model, "inputs"):  # a subclassed model traced by _graph
        return ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    return _unique([_input_name(t) for t in inputs])


def _output_names(model: Any, outputs: list) -> list[str]:
    keys = _struct_keys(_public(model, "output"), outputs)
    if keys:
        return keys
    producers: dict[int, str] = {}
    if hasattr(model, "inputs"):  # a subclassed model's layers have no symbolic outputs
        # a functional model's `operations` also holds ops (x * 2, keras.ops.softmax) that end a model
        for op in getattr(model, "operations", None) or model.layers:
            try:
                produced = op.output
            except (AttributeError, ValueError):
                continue
            for tensor in (produced if isinstance(produced, (list, tuple)) else [produced]):
                producers.setdefault(id(tensor), op.name)
    return _unique([producers.get(id(t), f"output_{i}") for i, t in enumerate(outputs)])


def _unique(names: list[str]) -> list[str]:
    """Names made distinct (a layer with two outputs): the second ``name`` becomes ``name_1``."""
    seen: set[str] = set()
    result = []
    for name in names:
        candidate, i = name, 0
        while candidate in seen:
            i += 1
            candidate = f"{name}_{i}"
        seen.add(candidate)
        result.append(candidate)
    return result


def _input_name(tensor: Any) -> str:
    name = tensor.name
    return name.split(":")[0]


def _shape_text(shape: tuple) -> str:
    return "[" + ", ".join("batch" if i == 0 else ("any" if d is None else str(d)) for i, d in enumerate(shape)) + "]"


def _dims(shape: tuple) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _names(names: Sequence[str]) -> str:
    """Names as a JSON-style list, quoted and escaped, for messages read in any language."""
    return "[" + ", ".join(quote(n) for n in names) + "]"


def _buckets(max_batch_size: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch_size)
    return sizes

