"""What both doors ask of the pool, through one ``AsyncClient`` on the broker's frontend."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

from modelpool.client import AsyncClient, protocol
from modelpool.client.errors import ModelNotFound, PoolError, RequestTimeout, Unavailable
from modelpool.client.protocol import quote
from modelpool.gateway import v2

log = logging.getLogger(__name__)

MODELS_TTL = 1.0  # seconds a mmi.models answer serves version checks
PROBE_TIMEOUT = 2.0  # seconds a health probe waits for the broker
LOAD_POLL = 0.1  # seconds between looks while a repository load waits for its versions


class Backend:
    """The pool as the V2 doors see it: health, metadata, versions, statistics and raw inference."""

    def __init__(self, client: AsyncClient, *, name: str = "modelpool", version: str = "") -> None:
        self.client = client
        self.name = name
        self.version = version
        self._models: dict[str, list[dict]] = {}
        self._models_at = -MODELS_TTL

    def server_metadata(self) -> dict:
        """V2 server metadata: what this gateway implements beyond the required API."""
        return {"name": self.name, "version": self.version,
                "extensions": ["binary_tensor_data", "statistics", "model_repository"]}

    async def live(self) -> bool:
        """The broker answers mmi.health (the gateway itself is up if it can ask)."""
        return bool((await self.client.health(timeout=PROBE_TIMEOUT)).get("live"))

    async def ready(self) -> bool:
        """Every configured model has at least one replica ready, and the pool admits requests."""
        return bool((await self.client.health(timeout=PROBE_TIMEOUT)).get("ready"))

    async def models(self, fresh: bool = False) -> dict[str, list[dict]]:
        """The mmi.models entries by name (each model's versions, newest first), at most MODELS_TTL old
        unless ``fresh``."""
        loop = asyncio.get_running_loop()
        if fresh or loop.time() - self._models_at >= MODELS_TTL:
            entries = await self.client.models(timeout=PROBE_TIMEOUT)
            models: dict[str, list[dict]] = {}
            for m in entries:
                models.setdefault(str(m.get("name")), []).append(m)
            self._models, self._models_at = models, loop.time()
        return self._models

    async def entry(self, model: str, version: str = "", fresh: bool = False) -> dict:
        """The mmi.models entry of a model version ("": the one requests go to); ModelNotFound for an
        unknown model or version."""
        versions = (await self.models(fresh)).get(model) or (await self.models(fresh=True)).get(model)
        if versions is None:
            served = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"model {quote(model)} is not served here; models served: {served}")
        return v2.pick_version(model, version, versions)

    async def model_ready(self, model: str, version: str = "") -> bool:
        """The model version has at least one replica ready (fresh answer)."""
        try:
            entry = await self.entry(model, version, fresh=True)
        except ModelNotFound:
            if version and model in self._models:
                raise  # a V2 client asking for a version that is not there gets told which ones are
            return False
        return (entry.get("replicas_ready") or 0) > 0

    async def model_metadata(self, model: str, version: str = "") -> dict:
        """V2 model metadata; the pool's ModelNotFound (404) for an unknown model or version."""
        header: dict[str, Any] = {"op": "metadata"}
        if version:
            header["model_version"] = version
        reply = await self.client.call(model, header, timeout=PROBE_TIMEOUT)
        error = protocol.reply_error(reply)
        if error is not None:
            raise error
        served = version or str(reply.header.get("model_version") or "")
        return v2.model_metadata(reply.header, served)

    async def statistics(self, model: str = "", version: str = "") -> dict:
        """Triton's statistics extension answer for one model version, or every one when ``model`` is ""."""
        if model:
            entries = [await self.entry(model, version)]
        else:
            entries = [e for versions in (await self.models(fresh=True)).values() for e in versions]
        return {"model_stats": [v2.model_statistics(e) for e in entries]}

    async def infer(self, model: str, version: str, header: dict, tensors: Sequence[Any],
                    timeout: float) -> protocol.Reply:
        """Run one request (on ``version``, "": the newest ready); the pool's typed error raised for
        anything but 200."""
        if version:
            header["model_version"] = version
        reply = await self.client.call(model, header, tensors, timeout=timeout)
        error = protocol.reply_error(reply)
        if error is not None:
            raise error
        return reply


    # --- the V2 model repository extension (Triton's): index, load and unload, through mmi.* ----

    async def repository_index(self, ready_only: bool = False) -> list[dict]:
        """Every model the pool can serve: name, version, state, reason."""
        rows = await self.client.repository(timeout=PROBE_TIMEOUT)
        return [r for r in rows if r.get("state") == "READY"] if ready_only else rows

    async def load_model(self, model: str, timeout: float) -> None:
        """Load (or re-read) a model and wait, as Triton does, until each of its versions is ready;
        Unavailable with the loader's error when one cannot load, RequestTimeout when ``timeout`` passes."""
        answer = await self.client.load(model, timeout=PROBE_TIMEOUT)
        wanted = set(answer.get("versions") or [])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            versions = {str(m.get("version")): m for m in await self.client.models(timeout=PROBE_TIMEOUT)
                        if m.get("name") == model}
            failed = [m for v, m in versions.items() if v in wanted and m.get("load_error")
                      and not m.get("replicas_ready")]
            if failed:
                raise Unavailable(f"model {quote(model)} version {quote(str(failed[0].get('version')))} failed to "
                                  f"load: {failed[0]['load_error']}")
            if all(v in versions and versions[v].get("state") == "READY" for v in wanted):
                return
            if loop.time() >= deadline:
                raise RequestTimeout(f"model {quote(model)} is still loading after {timeout:g}s; it goes on loading "
                                     "(GET /v2/models/{model}/ready tells when it is ready)")
            await asyncio.sleep(LOAD_POLL)

    async def unload_model(self, model: str) -> None:
        """Stop serving a model; its replicas finish what they hold and exit."""
        await self.client.unload(model, timeout=PROBE_TIMEOUT)


def status_of(error: PoolError) -> int:
    """The HTTP status of a pool error (its wire status)."""
    try:
        return int(error.status)
    except (TypeError, ValueError):
        return 500
