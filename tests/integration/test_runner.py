"""The worker's model side in-process: the flat graph call must answer exactly as Keras does."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def runner_module():
    from modelpool.modelproc import runner

    return runner


def _inputs(rng, rows: int, *shapes: tuple) -> list:
    return [rng.standard_normal((rows, *shape)).astype("float32") for shape in shapes]


def test_flat_call_is_used_and_matches_keras_on_a_multi_input_multi_output_model(models, runner_module, rng):
    r = runner_module.Runner(str(models.multi), max_batch_size=8)
    fn, specs = r._functions[()]
    assert isinstance(fn, runner_module._FlatCall)
    for rows in (1, 5, 8):
        xs = _inputs(rng, rows, (4,), (3,))
        got = dict((s.name, y) for s, y in r.run(xs, ()))
        want = models.keras["multi"].predict_on_batch(xs)
        np.testing.assert_allclose(got["out_sum"], want[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got["out_cls"], want[1], rtol=1e-6, atol=1e-6)


def test_flat_call_takes_read_only_views_over_frames(models, runner_module, rng):
    r = runner_module.Runner(str(models.a), max_batch_size=8)
    x = _inputs(rng, 3, (8,))[0]
    view = np.frombuffer(x.tobytes(), dtype="<f4").reshape(3, 8)  # as decoded from a ZeroMQ frame
    assert not view.flags.writeable and not view.flags.owndata
    (spec, y), = r.run([view], ())
    np.testing.assert_allclose(y, models.keras["a"].predict_on_batch(x), rtol=1e-6, atol=1e-6)


def test_intermediate_layer_sub_model_uses_the_flat_call_too(models, runner_module, rng):
    r = runner_module.Runner(str(models.a), max_batch_size=8)
    key = r.check_outputs([{"name": "hidden"}])
    fn, _ = r._functions[key]
    assert isinstance(fn, runner_module._FlatCall)
    x = _inputs(rng, 2, (8,))[0]
    (spec, hidden), = r.run([x], key)
    assert spec.name == "hidden" and hidden.shape == (2, 16)
    np.testing.assert_array_less(-1e-9, hidden)  # relu


def test_public_call_is_kept_when_the_flat_call_disagrees(models, runner_module, monkeypatch):
    def wrong(self, *xs):
        return {name: y * 2 for name, y in original(self, *xs).items()}

    original = runner_module._FlatCall.__call__
    monkeypatch.setattr(runner_module._FlatCall, "__call__", wrong)
    r = runner_module.Runner(str(models.a), max_batch_size=4)
    fn, _ = r._functions[()]
    assert not isinstance(fn, runner_module._FlatCall)
    x = np.ones((2, 8), "float32")
    (_, y), = r.run([x], ())
    np.testing.assert_allclose(y, models.keras["a"].predict_on_batch(x), rtol=1e-6, atol=1e-6)


def test_sub_model_cache_keeps_the_most_recently_used_and_always_the_full_output(models, runner_module, rng):
    r = runner_module.Runner(str(models.a), max_batch_size=4, output_cache_size=2)
    x = _inputs(rng, 2, (8,))[0]
    first = r.check_outputs(["hidden"])
    r.check_outputs(["y", "hidden"])
    assert r.check_outputs(["hidden"]) == first  # used again: now the most recent
    r.check_outputs(["hidden", "y"])  # a third list: evicts ("y", "hidden"), the least recently used
    assert list(r._functions) == [(), ("hidden",), ("hidden", "y")]
    (_, y), (_, hidden) = r.run([x], ("y", "hidden"))  # evicted since its check: built again
    assert hidden.shape == (2, 16) and len(r._functions) == 3 and () in r._functions
    np.testing.assert_allclose(y, models.keras["a"].predict_on_batch(x), rtol=1e-6, atol=1e-6)


def test_outputs_naming_a_tensor_twice_are_invalid_input(models, runner_module):
    from modelpool.client.errors import InvalidInput

    r = runner_module.Runner(str(models.a), max_batch_size=4)
    for outputs in (["hidden", "hidden"], ["y", "y"]):
        with pytest.raises(InvalidInput, match="more than once"):
            r.check_outputs(outputs)
    assert list(r._functions) == [()]


def test_sequential_input_is_its_input_layer_and_output_its_last_layer(tmp_path, runner_module):
    import keras

    keras.Sequential([keras.Input((5,), name="features"), keras.layers.Dense(3, name="hidden"),
                      keras.layers.Dense(2, name="scores")]).save(tmp_path / "named.keras")
    unnamed = keras.Sequential([keras.layers.Dense(3), keras.layers.Dense(2, name="scores")])
    unnamed.build((None, 5))
    unnamed.save(tmp_path / "unnamed.h5")
    meta = runner_module.Runner(str(tmp_path / "named.keras"), max_batch_size=2).metadata("m", "1")
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 5]}]
    assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 2]}]
    meta = runner_module.Runner(str(tmp_path / "unnamed.h5"), max_batch_size=2).metadata("m", "1")
    assert meta["inputs"][0]["name"].startswith("input_layer") and meta["outputs"][0]["name"] == "scores"


def test_functional_output_names_are_keras_output_names_even_for_ops(tmp_path, runner_module, rng):
    import keras

    inp = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(3, name="d")(inp)
    model = keras.Model(inp, [keras.ops.softmax(hidden * 2.0), hidden + 1.0])  # outputs made by ops, not layers
    model.save(tmp_path / "ops.keras")
    r = runner_module.Runner(str(tmp_path / "ops.keras"), max_batch_size=4)
    assert [s.name for s in r.outputs] == keras.models.load_model(tmp_path / "ops.keras").output_names
    assert [s.name for s in r.outputs] == ["softmax", "add"]
    x = _inputs(rng, 3, (4,))[0]
    for (_, got), want in zip(r.run([x], ()), model(x)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
