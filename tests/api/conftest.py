"""API tests: the real app over ASGITransport with a real tiny engine and a static model directory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmx.api.app import create_app
from lmx.api.deps import AppDeps
from lmx.errors import ModelNotFound
from lmx.reconciler.status import Listed
from lmx.runtime.engine import LoadConfig
from lmx.runtime.mlx_engine import MlxEngine
from lmx.runtime.registry import EngineRegistry
from lmx.runtime.sampling import SamplingDefaults


class StaticModels:
    """The reconciler's part of the API, reduced to: serve what the registry has loaded."""

    def __init__(self, registry: EngineRegistry) -> None:
        self.registry = registry
        self.specs: dict[str, SamplingDefaults] = {}  # the sampling a model's spec would set

    def servable(self) -> list[str]:
        return self.registry.ids()

    def listed(self) -> list[Listed]:
        snapshot = self.registry.snapshot().values()
        return [
            Listed(
                m.model_id,
                m.model_id,
                str(m.config.path),
                m.config.path,
                "loaded",
                m.context_length,
            )
            for m in snapshot
        ]

    def status(self) -> dict[str, Any]:
        return {"config": {"valid": True}, "models": {}}

    async def ensure_ready(self, name: str) -> str:
        if name not in self.registry.ids():
            raise ModelNotFound(name, self.registry.ids())
        return name

    def sampling(self, model_id: str) -> SamplingDefaults:
        return self.specs.get(model_id, SamplingDefaults())


@pytest.fixture(scope="module")
async def registry(tiny_model_dir: Path) -> AsyncIterator[EngineRegistry]:
    reg = EngineRegistry(MlxEngine)
    await reg.load(LoadConfig(model_id="tiny", path=tiny_model_dir, max_batch=8, max_queue=4))
    try:
        yield reg
    finally:
        await reg.unload("tiny")


@pytest.fixture(scope="module")
async def client(registry: EngineRegistry) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(AppDeps(registry=registry, models=StaticModels(registry)))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://lmx.test") as c:
        yield c
