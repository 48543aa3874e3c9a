"""Inputs as users pass them: the client-side conversions, and waiting for a pool to be ready."""
from __future__ import annotations

import numpy as np
import pytest

from modelpool.client.base import ModelSchema, pick_outputs, readiness, wanted_outputs
from modelpool.client.errors import InvalidInput, ModelNotFound, Unavailable


def _schema(*inputs: tuple[str, str]) -> ModelSchema:
    return ModelSchema("m", {"inputs": [{"name": n, "datatype": d, "shape": [-1, 3]} for n, d in inputs]})


def test_numpy_defaults_become_the_model_dtypes():
    schema = _schema(("x", "FP32"))
    got = schema.conform({"x": np.ones((2, 3))})["x"]  # float64, numpy's default
    assert got.dtype == np.float32 and got.shape == (2, 3)
    assert schema.conform([[1.5, 2, 3]])["x"].dtype == np.float32  # a Python list, one-input model
    ints = schema.conform({"x": np.arange(6).reshape(2, 3)})["x"]  # int64 pixels into a float model
    np.testing.assert_array_equal(ints, np.arange(6, dtype="float32").reshape(2, 3))

    tokens = _schema(("ids", "INT32"))
    got = tokens.conform(np.array([[1, 2, 3]], dtype="int64"))["ids"]
    assert got.dtype == np.int32 and got.tolist() == [[1, 2, 3]]
    assert tokens.conform({"ids": [[7, 8, 9]]})["ids"].dtype == np.int32


def test_arrays_of_the_right_dtype_are_passed_through_untouched():
    x = np.ones((2, 3), "float32")
    assert _schema(("x", "FP32")).conform(x)["x"] is x
    words = np.array([b"a", b"bc"], dtype=object)
    assert _schema(("s", "BYTES")).conform({"s": words})["s"] is words


def test_casts_that_would_change_a_value_are_refused_with_what_was_sent():
    tokens = _schema(("ids", "INT32"))
    with pytest.raises(InvalidInput) as info:
        tokens.conform(np.array([[1, 3_000_000_000]], dtype="int64"))
    message = str(info.value)
    assert "input 'ids' of model 'm' takes INT32; got INT64 [1, 2]" in message
    assert "values run from 1 to 3000000000" in message and "b'" not in message and "dtype(" not in message

    with pytest.raises(InvalidInput, match="got FP64 \\[1, 2\\].*floats are not turned into integers"):
        tokens.conform(np.array([[1.0, 2.5]]))
    with pytest.raises(InvalidInput, match="larger than FP32 holds exactly"):
        _schema(("x", "FP32")).conform(np.array([[2**40, 1, 2]], dtype="int64"))
    with pytest.raises(InvalidInput, match="only booleans"):
        _schema(("mask", "BOOL")).conform(np.array([[1, 0, 1]]))


def test_one_array_needs_a_one_input_model_and_dicts_keep_their_names():
    pair = _schema(("a", "FP32"), ("b", "INT32"))
    with pytest.raises(InvalidInput, match="model 'm' has 2 inputs \\(a, b\\); pass a dict"):
        pair.conform(np.ones((1, 3)))
    got = pair.conform({"a": np.ones((1, 3)), "b": np.ones((1, 3), "int64")})
    assert got["a"].dtype == np.float32 and got["b"].dtype == np.int32
    assert list(_schema(("x", "FP32")).conform({"": np.ones((1, 3))})) == ["x"]
    # a name the model does not have is left for the server to name in its error
    assert list(pair.conform({"zzz": np.ones((1, 3))})) == ["zzz"]
    with pytest.raises(InvalidInput, match="non-empty"):
        pair.conform({})


def test_predict_outputs_one_name_or_a_list():
    results = {"hidden": np.zeros(1), "y": np.ones(1)}
    assert wanted_outputs(None) is None and wanted_outputs("hidden") == ["hidden"]
    assert pick_outputs(results, "m", "y") is results["y"]
    assert pick_outputs(results, "m", ["y", "hidden"]) == [results["y"], results["hidden"]]
    with pytest.raises(InvalidInput, match="returned 2 outputs \\(hidden, y\\); name the ones you want"):
        pick_outputs(results, "m", None)


def _entry(name: str, ready: int, expected: int, error: str | None = None) -> dict:
    return {"name": name, "replicas_ready": ready, "replicas_expected": expected, "load_error": error}


def test_readiness_lists_what_is_missing_and_fails_fast_when_waiting_cannot_help():
    served = [_entry("a", 1, 2), _entry("b", 2, 2)]
    assert readiness(served, None, all_replicas=True) == ["model 'a': 1/2 replicas ready"]
    assert readiness(served, None, all_replicas=False) == []
    assert readiness(served, ["b"], all_replicas=True) == []
    with pytest.raises(ModelNotFound, match="model 'c' is not served here; models served: a, b"):
        readiness(served, ["c"], all_replicas=True)
    with pytest.raises(Unavailable, match="model 'x' failed to load: OSError: no file"):
        readiness([_entry("x", 0, 1, "OSError: no file")], None, all_replicas=True)
    # a remote-only model (no local replicas expected) is ready with one worker
    assert readiness([_entry("r", 1, 0)], None, all_replicas=True) == []
