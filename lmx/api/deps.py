"""What the HTTP layer needs from the rest of the daemon, passed to `create_app(deps)`.

No module-level singletons: tests build `AppDeps` with fakes at the engine boundary, the CLI builds
it with the real reconciler and registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from lmx.api.auth import Keys
from lmx.api.metrics import Metrics
from lmx.api.response_store import ResponseStore
from lmx.reconciler.editing import DesiredEditor
from lmx.reconciler.loop import Reconciler
from lmx.reconciler.status import Listed
from lmx.runtime.intake import Intake
from lmx.runtime.registry import EngineRegistry
from lmx.runtime.sampling import SamplingDefaults


class ModelDirectory(Protocol):
    """Which names a request may use, and getting a model ready to serve (the reconciler)."""

    def servable(self) -> list[str]:
        """Model ids and aliases a request may name now, ready or loadable on demand."""

    def listed(self) -> list[Listed]:
        """The servable names, with what a model list shows of each."""

    async def ensure_ready(self, name: str) -> str:
        """The model id for `name`, once it is loaded. Raises ModelNotFound or TemporaryError."""

    def sampling(self, model_id: str) -> SamplingDefaults:
        """The sampling defaults the model's spec sets (see lmx.runtime.sampling)."""

    def status(self) -> dict[str, Any]:
        """The reconciler's status document (see lmx.reconciler.status)."""


@dataclass(frozen=True)
class Control:
    """The control plane behind /admin: the reconciler and the one writer of the config file."""

    reconciler: Reconciler
    editor: DesiredEditor


@dataclass
class AppDeps:
    registry: EngineRegistry
    models: ModelDirectory
    control: Control | None = None
    cors_origins: Callable[[], tuple[str, ...]] = lambda: ()
    keys: Keys = field(default_factory=Keys)
    metrics: Metrics = field(default_factory=Metrics)
    intake: Intake = field(default_factory=Intake)  # shared with the engines (lmx.runtime.intake)
    responses: ResponseStore = field(default_factory=ResponseStore)  # /v1/responses kept
    chats: ResponseStore = field(default_factory=ResponseStore)  # LM Studio's /api/v1/chat kept
    served_since_s: float = 0.0
