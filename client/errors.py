"""One error hierarchy for the whole pool; remote errors are rebuilt from (status, type, message)."""
from __future__ import annotations


class PoolError(Exception):
    """Base class of every error modelpool raises."""

    status = b"500"

    def __init__(self, message: str = "", *, status: bytes | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message


class ProtocolError(PoolError):
    """A message does not follow the modelpool wire protocol."""

    status = b"400"


class InvalidInput(PoolError):
    """The request's tensors do not fit the model (shape, dtype, names)."""

    status = b"400"


class ModelNotFound(PoolError):
    """No model of that name is served by this pool."""

    status = b"404"


class Overloaded(PoolError):
    """The model's queue is full; retry later."""

    status = b"429"


class Forbidden(PoolError):
    """The caller may not do this from where it is (runtime control from another host)."""

    status = b"403"


class ModelError(PoolError):
    """The model raised while computing the request."""

    status = b"500"


class WorkerCrashed(ModelError):
    """The request was in flight on a worker that died, on every try it was given."""

    status = b"500"


class NotSupported(PoolError):
    """The operation or management service is not implemented."""

    status = b"501"


class Unavailable(PoolError):
    """No live worker can take the request now (starting, failed to load, shutting down)."""

    status = b"503"


class RequestTimeout(PoolError):
    """The request's deadline passed before it was answered."""

    status = b"504"


ERROR_TYPES: dict[str, type[PoolError]] = {
    cls.__name__: cls
    for cls in (
        PoolError,
        ProtocolError,
        InvalidInput,
        ModelNotFound,
        Overloaded,
        Forbidden,
        ModelError,
        WorkerCrashed,
        NotSupported,
        Unavailable,
        RequestTimeout,
    )
}

STATUS_TYPES: dict[bytes, type[PoolError]] = {
    b"400": InvalidInput,
    b"403": Forbidden,
    b"404": ModelNotFound,
    b"429": Overloaded,
    b"500": ModelError,
    b"501": NotSupported,
    b"503": Unavailable,
    b"504": RequestTimeout,
}


def error_from_wire(status: bytes, type_name: str | None, message: str) -> PoolError:
    """Rebuild a typed error from a reply's status and error header."""
    cls = ERROR_TYPES.get(type_name or "") or STATUS_TYPES.get(status, PoolError)
    return cls(message, status=status)
