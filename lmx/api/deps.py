"""What the HTTP layer needs from the rest of the daemon, passed to `create_app(deps)`.

No module-level singletons: tests build `AppDeps` with fakes at the engine boundary, the CLI builds
it with the real reconciler and registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from lmx.runtime.registry import EngineRegistry


class ModelDirectory(Protocol):
    """Which names a request may use, and getting a model ready to serve (the reconciler)."""

    def servable(self) -> list[str]:
        """Model ids and aliases a request may name now, ready or loadable on demand."""

    async def ensure_ready(self, name: str) -> str:
        """The model id for `name`, once it is loaded. Raises ModelNotFound or TemporaryError."""


@dataclass
class AppDeps:
    registry: EngineRegistry
    models: ModelDirectory
    api_keys: tuple[str, ...] = ()
    served_since_s: float = field(default=0.0)
