"""The error hierarchy and its rebuilding from (status, type, message) off the wire."""
from __future__ import annotations

import inspect

import pytest

from modelpool.client import errors
from modelpool.client.errors import ERROR_TYPES, STATUS_TYPES, PoolError, error_from_wire

DEFINED = [
    obj
    for _, obj in inspect.getmembers(errors, inspect.isclass)
    if obj.__module__ == errors.__name__ and issubclass(obj, Exception)
]


def by_name(value):
    return value.decode() if isinstance(value, bytes) else value.__name__


def test_every_error_class_subclasses_pool_error():
    assert DEFINED
    for cls in DEFINED:
        assert issubclass(cls, PoolError), cls


def test_every_error_class_can_cross_the_wire_by_name():
    assert set(ERROR_TYPES.values()) == set(DEFINED)
    for name, cls in ERROR_TYPES.items():
        assert name == cls.__name__


@pytest.mark.parametrize("cls", DEFINED, ids=by_name)
def test_class_status_is_three_ascii_digits(cls):
    assert isinstance(cls.status, bytes)
    assert len(cls.status) == 3 and cls.status.isdigit()


@pytest.mark.parametrize("status, cls", sorted(STATUS_TYPES.items()), ids=by_name)
def test_status_table_agrees_with_class_status(status, cls):
    assert cls.status == status
    assert issubclass(cls, PoolError)


def test_documented_statuses():
    assert {s: c.__name__ for s, c in STATUS_TYPES.items()} == {
        b"400": "InvalidInput",
        b"403": "Forbidden",
        b"404": "ModelNotFound",
        b"429": "Overloaded",
        b"500": "ModelError",
        b"501": "NotSupported",
        b"503": "Unavailable",
        b"504": "RequestTimeout",
    }
    assert errors.ProtocolError.status == b"400"
    assert errors.WorkerCrashed.status == b"500"


def test_worker_crashed_is_a_model_error():
    assert issubclass(errors.WorkerCrashed, errors.ModelError)
    with pytest.raises(errors.ModelError):
        raise errors.WorkerCrashed("worker pid 12 died twice with this request")


@pytest.mark.parametrize("cls", DEFINED, ids=by_name)
def test_type_name_picks_the_class(cls):
    error = error_from_wire(cls.status, cls.__name__, "details")
    assert type(error) is cls
    assert error.status == cls.status


def test_type_name_wins_over_status():
    error = error_from_wire(b"500", "Overloaded", "queue full")
    assert type(error) is errors.Overloaded
    assert error.status == b"500"  # the status on the wire is kept
    assert type(error_from_wire(b"404", "RequestTimeout", "late")) is errors.RequestTimeout


@pytest.mark.parametrize("status, cls", sorted(STATUS_TYPES.items()), ids=by_name)
@pytest.mark.parametrize("type_name", [None, "", "NoSuchError", "ValueError", "Exception"])
def test_status_picks_the_class_when_type_is_unknown(status, cls, type_name):
    error = error_from_wire(status, type_name, "m")
    assert type(error) is cls
    assert error.status == status


@pytest.mark.parametrize("status", [b"200", b"418", b"599", b"abc", b""])
def test_unknown_status_and_type_give_pool_error(status):
    error = error_from_wire(status, None, "m")
    assert type(error) is PoolError
    assert error.status == status


@pytest.mark.parametrize("message", ["", "no model named 'digitz'", "shape [1, 63] ≠ [-1, 64]\nsecond line"])
def test_message_is_preserved(message):
    error = error_from_wire(b"400", "InvalidInput", message)
    assert error.message == message
    assert str(error) == message
    assert error.args == (message,)


def test_instance_status_override_leaves_the_class_alone():
    error = errors.Unavailable("draining", status=b"599")
    assert error.status == b"599"
    assert errors.Unavailable.status == b"503"
    assert errors.Unavailable("x").status == b"503"


def test_errors_are_catchable_as_pool_error():
    for cls in DEFINED:
        with pytest.raises(PoolError, match="boom"):
            raise cls("boom")
