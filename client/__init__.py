"""modelpool client library: talk to a pool from Python (no TensorFlow needed)."""
from __future__ import annotations

from modelpool.client.errors import (
    Forbidden,
    InvalidInput,
    ModelError,
    ModelNotFound,
    NotSupported,
    Overloaded,
    PoolError,
    ProtocolError,
    RequestTimeout,
    Unavailable,
    WorkerCrashed,
)
from modelpool.client.aio import AsyncClient
from modelpool.client.sync import Client

__all__ = [
    "AsyncClient",
    "Client",
    "Forbidden",
    "InvalidInput",
    "ModelError",
    "ModelNotFound",
    "NotSupported",
    "Overloaded",
    "PoolError",
    "ProtocolError",
    "RequestTimeout",
    "Unavailable",
    "WorkerCrashed",
]
