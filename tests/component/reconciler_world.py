"""A reconciler wired to fake engines, a real store on tmp_path and a config file, for tests."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmx.reconciler.loop import Reconciler
from lmx.reconciler.settings import ReconcilerSettings
from lmx.runtime.engine import EngineState
from lmx.runtime.registry import EngineRegistry
from lmx.runtime.store import ModelStore
from tests.fakes import FakeEngines, GiB, make_model_dir

FAST = {
    "resync_interval_s": 3600.0,
    "watch_settle_ms": 20,
    "watch_debounce_ms": 100,
    "drain_timeout_s": 5.0,
    "load_timeout_s": 5.0,
    "unload_timeout_s": 5.0,
    "release_timeout_s": 0.2,
    "release_poll_s": 0.02,
    "release_grace_s": 0.5,
    "release_recheck_s": 0.05,
    "ready_timeout_s": 5.0,
    "max_failures": 3,
    "backoff_base_s": 0.05,
    "backoff_max_s": 0.2,
}


def model(path: Path, want: str = "resident", **extra: Any) -> dict[str, Any]:
    """A model entry for a local directory; no prompt cache, so its footprint is its weights
    plus the minimum margin (32 MiB below 640 MiB of weights, else 5%)."""
    engine = {"prompt_cache_bytes": 0, **extra.pop("engine", {})}
    return {"source": str(path), "want": want, "engine": engine, **extra}


@dataclass
class World:
    tmp: Path
    engines: FakeEngines = field(default_factory=FakeEngines)
    settings: dict[str, Any] = field(default_factory=dict)
    reconciler: Reconciler | None = None
    registry: EngineRegistry | None = None

    @property
    def config_path(self) -> Path:
        return self.tmp / "config.yaml"

    @property
    def home(self) -> Path:
        return self.tmp / "home"

    def model_dir(self, name: str, gib: float = 1.0) -> Path:
        return make_model_dir(self.tmp / "models" / name, int(gib * GiB))

    def write(self, budget: str | int = "3GiB", **models: dict[str, Any]) -> None:
        """Write the config file the way editors do: a new file renamed over the old one."""
        text = yaml.safe_dump({"memory": {"budget": budget}, "models": models})
        self.write_text(text)

    def write_text(self, text: str) -> None:
        tmp = self.config_path.with_name(".config.yaml.swp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def build(self, **overrides: Any) -> Reconciler:
        settings = ReconcilerSettings(home=self.home, **{**FAST, **self.settings, **overrides})
        self.registry = EngineRegistry(self.engines)
        self.reconciler = Reconciler(
            settings,
            registry=self.registry,
            store=ModelStore(self.home, base_dir=self.tmp),
            memory=self.engines.memory.probe(),
            config_path=self.config_path,
        )
        return self.reconciler

    @property
    def r(self) -> Reconciler:
        assert self.reconciler is not None
        return self.reconciler

    @property
    def reg(self) -> EngineRegistry:
        assert self.registry is not None
        return self.registry

    def ready(self, mid: str) -> bool:
        slot = self.reg.snapshot().get(mid)
        return slot is not None and slot.state is EngineState.READY and not slot.draining

    def loaded(self) -> set[str]:
        return set(self.reg.ids())

    def condition(self, mid: str, ctype: str) -> dict[str, Any]:
        """The condition as status reports it; empty until the loop first reported the model."""
        models = self.r.status()["models"]
        conds = models[mid]["conditions"] if mid in models else []
        missing = {"status": None, "reason": None, "message": ""}
        return next((c for c in conds if c["type"] == ctype), missing)


async def until(probe: Callable[[], Any], timeout_s: float = 5.0) -> Any:
    """Poll `probe` until it returns a truthy value; fail after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        # Polls state that other tasks own; no single event covers every condition tested.
        while not (value := probe()):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return value


def settle(world: World) -> Callable[[], bool]:
    """True once the loop has caught up with the latest generation."""
    return lambda: world.r.observed_generation == world.r.generation
