"""modelpool client library: talk to a pool from Python (no TensorFlow needed)."""
from __future__ import annotations

from client.errors import (
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
from client.aio import AsyncClient
from client.sync import Client

__all__ = [
    "AsyncClient",
    "Client",
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
