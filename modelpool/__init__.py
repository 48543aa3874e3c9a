"""modelpool: a ZeroMQ serving pool for Keras/TensorFlow models, one spawned process per model replica.

Everything installed lives under this one name: ``modelpool.client`` (the client library and the wire
protocol), ``modelpool.broker`` and ``modelpool.modelproc`` (the server side), ``modelpool.cli``. The
repository keeps them in its top-level ``client/``, ``broker/`` and ``modelproc/`` folders; setup.cfg
maps them here.
"""
from __future__ import annotations

from modelpool import client as _client
from modelpool.client import *  # noqa: F403 (the client library's public names: Client, AsyncClient, errors)

__version__ = "0.2.0"
__all__ = list(_client.__all__)
