"""What both doors ask of the pool, through one ``AsyncClient`` on the broker's frontend."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

from modelpool.client import AsyncClient, protocol
from modelpool.client.errors import ModelNotFound, PoolError
from modelpool.client.protocol import quote
from modelpool.gateway import v2

log = logging.getLogger(__name__)

MODELS_TTL = 1.0  # seconds a mmi.models answer serves version checks
PROBE_TIMEOUT = 2.0  # seconds a health probe waits for the broker


class Backend:
    """The pool as the V2 doors see it: health, metadata, versions, statistics and raw inference."""

    def __init__(self, client: AsyncClient, *, name: str = "modelpool", version: str = "") -> None:
        self.client = client
        self.name = name
        self.version = version
        self._models: dict[str, dict] = {}
        self._models_at = -MODELS_TTL

    def server_metadata(self) -> dict:
        """V2 server metadata: what this gateway implements beyond the required API."""
        return {"name": self.name, "version": self.version,
                "extensions": ["binary_tensor_data", "statistics"]}

    async def live(self) -> bool:
        """The broker answers mmi.health (the gateway itself is up if it can ask)."""
        return bool((await self.client.health(timeout=PROBE_TIMEOUT)).get("live"))

    async def ready(self) -> bool:
        """Every configured model has at least one replica ready, and the pool admits requests."""
        return bool((await self.client.health(timeout=PROBE_TIMEOUT)).get("ready"))

    async def models(self, fresh: bool = False) -> dict[str, dict]:
        """The mmi.models entries by name, at most MODELS_TTL old unless ``fresh``."""
        loop = asyncio.get_running_loop()
        if fresh or loop.time() - self._models_at >= MODELS_TTL:
            entries = await self.client.models(timeout=PROBE_TIMEOUT)
            self._models = {str(m.get("name")): m for m in entries}
            self._models_at = loop.time()
        return self._models

    async def entry(self, model: str, version: str = "") -> dict:
        """A model's mmi.models entry; ModelNotFound for an unknown model or another version."""
        entry = (await self.models()).get(model) or (await self.models(fresh=True)).get(model)
        if entry is None:
            served = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"model {quote(model)} is not served here; models served: {served}")
        v2.check_version(model, version, str(entry.get("version") or ""))
        return entry

    async def model_ready(self, model: str, version: str = "") -> bool:
        """The model has at least one replica ready (fresh answer)."""
        entry = (await self.models(fresh=True)).get(model)
        if entry is None:
            return False
        v2.check_version(model, version, str(entry.get("version") or ""))
        return (entry.get("replicas_ready") or 0) > 0

    async def model_metadata(self, model: str, version: str = "") -> dict:
        """V2 model metadata; the pool's ModelNotFound (404) for an unknown model."""
        if version:
            await self.entry(model, version)
        meta = await self.client.metadata(model)
        return v2.model_metadata(meta, version or str((self._models.get(model) or {}).get("version") or ""))

    async def statistics(self, model: str = "", version: str = "") -> dict:
        """Triton's statistics extension answer for one model, or every model when ``model`` is ""."""
        if model:
            entries = [await self.entry(model, version)]
        else:
            entries = list((await self.models(fresh=True)).values())
        return {"model_stats": [v2.model_statistics(e) for e in entries]}

    async def infer(self, model: str, version: str, header: dict, tensors: Sequence[Any],
                    timeout: float) -> protocol.Reply:
        """Run one request; the pool's typed error raised for anything but 200."""
        if version:
            await self.entry(model, version)
        reply = await self.client.call(model, header, tensors, timeout=timeout)
        error = protocol.reply_error(reply)
        if error is not None:
            raise error
        return reply


def status_of(error: PoolError) -> int:
    """The HTTP status of a pool error (its wire status)."""
    try:
        return int(error.status)
    except (TypeError, ValueError):
        return 500
