"""The model zoo: every common way of saving a Keras model is served and answers as Keras does in-process.

One session fixture builds each form (Sequential, functional, nested, multi-input/multi-output, dict
inputs/outputs, Embedding+LSTM text, a custom layer, a keras.applications net, a subclassed model), saves
it as ``.keras`` and legacy ``.h5`` (plus one ``model.export()`` SavedModel), and one pool serves them all.
The two ``.h5`` files Keras 3 writes but cannot read back itself stay out of the pool; the runner's start-up
error for them is checked in-process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
from poolutil import Pool, wait_until

from modelpool.client.errors import InvalidInput

pytestmark = pytest.mark.timeout(420)

ATOL = 1e-5


@dataclass
class Form:
    """One model form: the in-process model, how to make a batch, and a layer to ask for by name."""

    model: Any
    make: Callable[[np.random.Generator, int], list]  # (rng, rows) -> arrays in the model's input order
    layer: str | None  # an intermediate layer (None: the form has no layers to ask for)
    formats: tuple = ("keras", "h5")
    imports: tuple = ()
    paths: dict = field(default_factory=dict)


def _sequential(keras):
    return keras.Sequential([keras.Input((8,), name="pixels"), keras.layers.Dense(16, activation="relu", name="hidden"),
                             keras.layers.Dense(4, name="out")], name="seq")


def _sequential_built(keras):
    model = keras.Sequential([keras.layers.Dense(5, activation="tanh", name="first"),
                              keras.layers.Dense(3, name="last")])
    model.build((None, 6))  # no keras.Input: Keras adds and names the InputLayer itself
    return model


def _functional(keras):
    inp = keras.Input((8,))  # unnamed
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inp)
    return keras.Model(inp, keras.layers.Dense(4)(hidden), name="functional")


def _nested(keras):
    inner = keras.Sequential([keras.Input((8,)), keras.layers.Dense(5, activation="relu", name="inner_dense")],
                             name="inner")
    inp = keras.Input((8,), name="x")
    return keras.Model(inp, keras.layers.Dense(2, name="head")(inner(inp)), name="nested")


def _multi(keras):
    in_a = keras.Input((4,), name="in_a")
    in_b = keras.Input((3,))  # unnamed
    joined = keras.layers.Concatenate(name="joined")([in_a, in_b])
    hidden = keras.layers.Dense(6, activation="tanh", name="bottleneck")(joined)
    return keras.Model([in_a, in_b], [keras.layers.Dense(2, name="out_sum")(hidden),
                                      keras.layers.Dense(3, activation="softmax")(hidden)], name="multi")


def _dict(keras):
    in_a = keras.Input((4,), name="a")
    in_b = keras.Input((3,))  # key "b", tensor name chosen by Keras
    joined = keras.layers.Concatenate(name="joined")([in_a, in_b])
    return keras.Model({"a": in_a, "b": in_b}, {"score": keras.layers.Dense(1, name="score_dense")(joined),
                                                "probs": keras.layers.Dense(3, activation="softmax")(joined)})


def _text(keras):
    tokens = keras.Input((12,), dtype="int32", name="tokens")
    embedded = keras.layers.Embedding(50, 8, mask_zero=True, name="embedding")(tokens)
    encoded = keras.layers.LSTM(6, name="lstm")(embedded)
    return keras.Model(tokens, keras.layers.Dense(3, activation="softmax", name="label")(encoded), name="text")


def _text_sequential(keras):
    # variable-length token ids, no name for the input
    return keras.Sequential([keras.Input((None,), dtype="int32"), keras.layers.Embedding(40, 4, name="embedding"),
                             keras.layers.GlobalAveragePooling1D(name="pool"), keras.layers.Dense(2, name="logits")])


def _custom(keras):
    import custom_layers

    inp = keras.Input((8,), name="x")
    scaled = custom_layers.Scale(offset=0.25, name="scale")(inp)
    return keras.Model(inp, keras.layers.Dense(4, name="y")(scaled), name="custom")


def _application(keras):
    return keras.applications.MobileNet(input_shape=(32, 32, 3), alpha=0.25, weights=None, classes=10)


def _subclassed(keras):
    import custom_layers

    model = custom_layers.TinySubclassed(units=4)
    model(np.zeros((2, 8), "float32"))  # built, so that Keras saves its input shape
    return model


def _floats(*shapes):
    return lambda rng, rows: [rng.standard_normal((rows, *s)).astype("float32") for s in shapes]


def _tokens(length, vocab, pad):
    def make(rng, rows):
        ids = rng.integers(1, vocab, (rows, length)).astype("int32")
        if pad:
            ids[:, length - rng.integers(0, length // 2):] = 0  # trailing padding, masked by mask_zero
        return [ids]
    return make


FORMS = {  # name -> (builder, batch maker, intermediate layer, formats, imports)
    "seq": (_sequential, _floats((8,)), "hidden", ("keras", "h5"), ()),
    "seqbuilt": (_sequential_built, _floats((6,)), "first", ("keras", "h5"), ()),
    "functional": (_functional, _floats((8,)), "hidden", ("keras", "h5"), ()),
    "nested": (_nested, _floats((8,)), "inner", ("keras", "h5"), ()),
    "multi": (_multi, _floats((4,), (3,)), "bottleneck", ("keras", "h5"), ()),
    "dict": (_dict, _floats((4,), (3,)), "joined", ("keras", "h5"), ()),
    "text": (_text, _tokens(12, 50, pad=True), "lstm", ("keras",), ()),
    "textseq": (_text_sequential, _tokens(10, 40, pad=False), "pool", ("keras", "h5"), ()),
    "custom": (_custom, _floats((8,)), "scale", ("keras", "h5"), ("custom_layers",)),
    "app": (_application, _floats((32, 32, 3)), "conv_pw_1_relu", ("keras", "h5"), ()),
    "subclassed": (_subclassed, _floats((8,)), None, ("keras",), ("custom_layers",)),
}
# Saved by Keras 3 but not loadable by Keras itself, registered or not: not served, the runner says what to do.
KERAS_CANNOT_LOAD = [("text", "h5", "NotEqual"), ("subclassed", "h5", "TinySubclassed")]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """Every form saved in every format it supports, and one pool serving all of them."""
    import keras

    d = tmp_path_factory.mktemp("zoo")
    forms: dict[str, Form] = {}
    unloadable = {(name, fmt) for name, fmt, _ in KERAS_CANNOT_LOAD}
    for i, (name, (build, make, layer, formats, imports)) in enumerate(FORMS.items()):
        keras.utils.set_random_seed(100 + i)
        form = Form(build(keras), make, layer, formats, imports)
        for fmt in (*formats, *(f for n, f in unloadable if n == name)):
            form.paths[fmt] = d / f"{name}.{fmt}"
            form.model.save(form.paths[fmt])
        forms[name] = form
    keras.utils.set_random_seed(99)
    exported = Form(_sequential(keras), _floats((8,)), None, ("savedmodel",))
    exported.paths["savedmodel"] = d / "exported"
    exported.model.export(str(exported.paths["savedmodel"]), format="tf_saved_model", verbose=False)
    forms["exported"] = exported
    config = [{"name": f"{name}_{fmt}", "path": str(path), "max_batch_size": 4, **({"imports": list(form.imports)}
              if form.imports else {})} for name, form in forms.items() for fmt, path in form.paths.items()
              if (name, fmt) not in unloadable]
    pool = Pool(config, wait_ready=False)
    try:
        states = wait_until(lambda: _settled(pool), 400.0, interval=0.5, what="every zoo model ready or failed")
        yield forms, pool, states
    finally:
        code = pool.stop()
    assert code == 0, pool.read_log()


def _settled(pool: Pool) -> dict | None:
    """{model: load error or None} once every model is ready or has failed to load, else None."""
    models = {m["name"]: m for m in pool.client.models(timeout=2.0)}
    if set(models) != set(pool.expected) or not all(m["replicas_ready"] or m["load_error"] for m in models.values()):
        return None
    return {name: None if m["replicas_ready"] else m["load_error"] for name, m in models.items()}


def _served(zoo: tuple, *models: str) -> Pool:
    """The pool, after checking that these models loaded (their load errors otherwise)."""
    _, pool, states = zoo
    failed = {m: states[m] for m in models if states[m] is not None}
    if failed:
        pytest.fail(f"did not load: {failed}")
    return pool


def _in_process(model: Any, xs: list, in_names: list[str], out_names: list[str]) -> dict:
    """What Keras itself answers, keyed by the served output names (in metadata order)."""
    if isinstance(getattr(model, "input", None), dict):  # built with a dict of inputs: called with one
        ys = model(dict(zip(in_names, xs)), training=False)
    else:
        ys = model(xs[0] if len(xs) == 1 else xs, training=False)
    if isinstance(ys, dict):
        return {k: np.asarray(v) for k, v in ys.items()}
    ys = ys if isinstance(ys, (list, tuple)) else [ys]
    return dict(zip(out_names, (np.asarray(y) for y in ys)))


def _layer_in_process(model: Any, layer: str, xs: list) -> np.ndarray:
    import keras

    sub = keras.Model(model.inputs, model.get_layer(layer).output)
    return np.asarray(sub(xs, training=False))


CASES = [(name, fmt) for name, (_, _, _, formats, _) in FORMS.items() for fmt in formats] + [("exported", "savedmodel")]


@pytest.mark.parametrize("name,fmt", CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_served_model_answers_as_keras_does_in_process(zoo, name, fmt):
    forms = zoo[0]
    form = forms[name]
    served = f"{name}_{fmt}"
    pool = _served(zoo, served)
    meta = pool.client.metadata(served)
    in_names = [t["name"] for t in meta["inputs"]]
    out_names = [t["name"] for t in meta["outputs"]]
    rng = np.random.default_rng(len(served))
    xs = form.make(rng, 3)
    assert [t["datatype"] for t in meta["inputs"]] == ["INT32" if x.dtype == np.int32 else "FP32" for x in xs]
    got = pool.client.infer(served, dict(zip(in_names, xs)))
    want = _in_process(form.model, xs, in_names, out_names)
    assert sorted(got) == sorted(want) == sorted(out_names)
    for key in out_names:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=ATOL, err_msg=f"{served} output {key}")
    if form.layer:
        got = pool.client.infer(served, dict(zip(in_names, xs)), outputs=[form.layer, out_names[0]])
        np.testing.assert_allclose(got[form.layer], _layer_in_process(form.model, form.layer, xs), rtol=0, atol=ATOL)
        np.testing.assert_allclose(got[out_names[0]], want[out_names[0]], rtol=0, atol=ATOL)


@pytest.mark.parametrize("fmt", ["keras", "h5"])
def test_sequential_names_are_the_input_layer_and_the_last_layer(zoo, fmt):
    import keras

    forms = zoo[0]
    pool = _served(zoo, f"seq_{fmt}", f"seqbuilt_{fmt}")
    meta = pool.client.metadata(f"seq_{fmt}")
    assert [t["name"] for t in meta["inputs"]] == ["pixels"]  # the name given to keras.Input
    assert [t["name"] for t in meta["outputs"]] == ["out"]  # the last layer
    assert meta["inputs"][0]["shape"] == [-1, 8] and meta["outputs"][0]["shape"] == [-1, 4]
    built = pool.client.metadata(f"seqbuilt_{fmt}")
    saved_name = keras.models.load_model(forms["seqbuilt"].paths[fmt], compile=False).inputs[0].name
    assert saved_name.startswith("input_layer")
    assert [t["name"] for t in built["inputs"]] == [saved_name]  # the InputLayer name Keras saved
    assert [t["name"] for t in built["outputs"]] == ["last"]


def test_dict_models_use_their_keys_and_others_the_input_and_layer_names(zoo):
    models = ("dict_keras", "dict_h5", "multi_keras", "nested_h5", "subclassed_keras", "text_keras", "textseq_h5")
    pool = _served(zoo, *models)
    names = {m: ([t["name"] for t in meta["inputs"]], [t["name"] for t in meta["outputs"]])
             for m in models for meta in [pool.client.metadata(m)]}
    assert names["dict_keras"] == names["dict_h5"] == (["a", "b"], ["probs", "score"])
    multi_in, multi_out = names["multi_keras"]
    assert multi_in[0] == "in_a" and multi_in[1].startswith("input_layer")
    assert multi_out[0] == "out_sum" and multi_out[1].startswith("dense")
    assert names["nested_h5"] == (["x"], ["head"])
    assert names["subclassed_keras"] == (["input"], ["output_0"])
    assert names["text_keras"] == (["tokens"], ["label"])
    assert names["textseq_h5"][1] == ["logits"]


@pytest.mark.parametrize("name", ["functional", "nested", "multi", "text", "custom", "app"])
def test_functional_output_names_are_the_ones_keras_gives(zoo, name):
    import keras

    form = zoo[0][name]
    for fmt in form.formats:
        meta = _served(zoo, f"{name}_{fmt}").client.metadata(f"{name}_{fmt}")
        loaded = keras.models.load_model(form.paths[fmt], compile=False)
        assert [t["name"] for t in meta["outputs"]] == loaded.output_names
        assert [t["name"] for t in meta["inputs"]] == [t.name for t in loaded.inputs]


def test_outputs_naming_one_tensor_twice_is_invalid_input(zoo):
    pool = _served(zoo, "seq_keras", "dict_keras")
    x = {"pixels": np.ones((1, 8), "float32")}
    with pytest.raises(InvalidInput, match="more than once"):
        pool.client.infer("seq_keras", x, outputs=["hidden", "hidden"])
    with pytest.raises(InvalidInput, match="same tensor"):  # the output "score" is the layer "score_dense"
        pool.client.infer("dict_keras", {"a": np.ones((1, 4), "float32"), "b": np.ones((1, 3), "float32")},
                          outputs=["score", "score_dense"])


def test_subclassed_model_has_no_intermediate_layers(zoo):
    pool = _served(zoo, "subclassed_keras")
    with pytest.raises(InvalidInput, match="subclassed"):
        pool.client.infer("subclassed_keras", {"input": np.ones((1, 8), "float32")}, outputs=["hidden"])


def test_unregistered_subclassed_model_fails_at_start_saying_what_to_do(tmp_path):
    import keras

    from modelpool.modelproc.runner import Runner

    class Unregistered(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Unregistered()
    model(np.zeros((1, 3), "float32"))
    model.save(tmp_path / "unregistered.keras")
    with pytest.raises(ValueError) as err:
        Runner(str(tmp_path / "unregistered.keras"), max_batch_size=2)
    message = str(err.value)
    assert "register_keras_serializable" in message and "`imports`" in message and "Unregistered" in message


@pytest.mark.parametrize("name,fmt,unknown", KERAS_CANNOT_LOAD, ids=[f"{n}-{f}" for n, f, _ in KERAS_CANNOT_LOAD])
def test_a_file_keras_cannot_load_back_fails_at_start_saying_what_to_do(zoo, name, fmt, unknown):
    import keras

    from modelpool.modelproc.runner import Runner

    path = zoo[0][name].paths[fmt]
    with pytest.raises(Exception, match=unknown):  # if Keras learns to, serve this form in the pool instead
        keras.models.load_model(path, compile=False)
    with pytest.raises(ValueError, match=unknown) as err:
        Runner(str(path), max_batch_size=2, imports=("custom_layers",))
    assert "save the model as .keras" in str(err.value)


def test_variable_length_token_ids_answer_at_every_length(zoo):
    pool = _served(zoo, "textseq_keras")
    meta = pool.client.metadata("textseq_keras")
    assert meta["inputs"][0]["shape"] == [-1, -1] and meta["inputs"][0]["datatype"] == "INT32"
    model = zoo[0]["textseq"].model
    for length in (3, 17):
        ids = np.random.default_rng(length).integers(0, 40, (2, length)).astype("int32")
        got = pool.client.infer("textseq_keras", {meta["inputs"][0]["name"]: ids})["logits"]
        np.testing.assert_allclose(got, np.asarray(model(ids)), rtol=0, atol=ATOL)
