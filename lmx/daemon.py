"""The daemon: composes settings, registry, store, reconciler and the HTTP app, and runs uvicorn.

Called by `lmx serve`. Lifecycle as named steps: `bind` (fail fast on a taken port), the home's
lock (one daemon per LMX_HOME; once held, the temp files a crash left go), `startup` (first
reconcile), `stopping` (end event streams) and `shutdown` (unload everything), with uvicorn
handling signals in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import math
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import structlog
import uvicorn

from lmx.api.admin import open_to_network
from lmx.api.app import create_app
from lmx.api.auth import Keys
from lmx.api.deps import AppDeps, Control
from lmx.api.metrics import Metrics
from lmx.api.response_store import ResponseStore
from lmx.homelock import HomeInUse, HomeLock
from lmx.reconciler import Reconciler, ReconcilerSettings
from lmx.reconciler.editing import DesiredEditor
from lmx.runtime import files, mlx_engine
from lmx.runtime.download_manifest import MANIFEST_NAME
from lmx.runtime.engine import EngineState
from lmx.runtime.intake import Intake
from lmx.runtime.memory import MemoryProbe
from lmx.runtime.mlx_engine import MlxEngine
from lmx.runtime.registry import EngineRegistry
from lmx.runtime.scheduling import yield_to_workers
from lmx.runtime.store import ModelStore
from lmx.settings import Settings

log = structlog.get_logger(__name__)

# Once the models unload at the end of a stop's grace, the time the answers' ends take to go out.
_ENDING_S = 5.0


class StartupError(Exception):
    """The daemon cannot start; the message is the one line the person sees."""


def default_manifest() -> str:
    return resources.files("lmx").joinpath("manifests/default.yaml").read_text(encoding="utf-8")


def ensure_config(settings: Settings) -> None:
    """Write the default manifest where no config file exists yet (a fresh machine)."""
    path = settings.config_path
    if path.exists():
        return
    if path.is_symlink():  # a dotfiles link whose target is away: written over, it would be lost
        raise StartupError(f"config file {path} links to {path.readlink()}, which does not exist")
    if path != settings.home / "config.yaml":
        raise StartupError(f"config file {path} does not exist")
    files.write_atomic(path, default_manifest())  # its temp file, cut short, goes at the next start
    log.info("default_config_written", path=str(path))


def remove_stale_temps(settings: Settings, *, before_s: float) -> None:
    """Remove the temp files of lmx's atomic writes that a crash cut short (its state and
    manifests in LMX_HOME, the config file wherever it is), older than `before_s`: the time this
    daemon took the home's lock, after which only it writes them."""
    home = settings.home
    targets = [settings.config_path.resolve(), home / "journal.json", home / "footprints.json"]
    targets += [d / MANIFEST_NAME for d in settings.models_dir.glob("*/")]
    for target in targets:
        for tmp in files.remove_stale_temps(target, before_s=before_s):
            log.info("stale_temp_removed", path=str(tmp))


def ensure_admin_key(path: Path) -> str:
    """Read the admin key, creating it (random, mode 0600) on first start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip()
    key = "lmx-admin-" + secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(key + "\n")
    log.info("admin_key_created", path=str(path))
    return key


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket now, so a taken port fails before any model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"port {port} on {host} is already in use") from None
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._file_key = ensure_admin_key(settings.home / "admin.key")
        self.intake = Intake()
        self.spares = mlx_engine.Spares()
        self._ending: asyncio.Task[None] | None = None  # once stopping: see _end_answers
        self._unloading = False  # its grace over, it unloads the models
        self.registry = EngineRegistry(
            functools.partial(MlxEngine, intake=self.intake, spares=self.spares)
        )
        self.memory = MemoryProbe(mlx_engine.mlx_counters, idle=self.spares.pids)
        self.store = ModelStore(
            settings.home,
            base_dir=settings.config_path.parent,
            engine_process_bytes=mlx_engine.WORKER_PROCESS_BYTES,
        )
        self.reconciler = Reconciler(
            ReconcilerSettings(home=settings.home),
            registry=self.registry,
            store=self.store,
            memory=self.memory,
            config_path=settings.config_path,
        )
        self.deps = AppDeps(
            registry=self.registry,
            models=self.reconciler,
            control=Control(self.reconciler, DesiredEditor(settings.config_path, self.reconciler)),
            cors_origins=lambda: self.reconciler.desired.server.cors_origins,
            keys=Keys(
                admin=self.admin_key,
                inference=lambda: self.reconciler.desired.server.api_keys,
                protect_admin_reads=not settings.is_loopback,
            ),
            metrics=Metrics(self.live_metrics),
            intake=self.intake,
            # Kept on disk too: a conversation continued by previous_response_id outlives a restart.
            responses=ResponseStore.on_disk(settings.home / "responses.db"),
            chats=ResponseStore.on_disk(settings.home / "chats.db"),
            served_since_s=time.time(),
        )
        self.app = create_app(self.deps, on_startup=self.startup, on_shutdown=self.shutdown)

    def admin_key(self) -> str:
        """The admin key: from the desired state if declared, else LMX_HOME/admin.key."""
        return self.reconciler.desired.server.admin_key or self._file_key

    def live_metrics(self) -> dict[str, dict[str, float]]:
        """Gauges and engine counters read at scrape time from their owners: the registry and
        the reconciler."""
        out: dict[str, dict[str, float]] = {
            k: {}
            for k in (
                "queue_depth",
                "in_flight",
                "resident_bytes",
                "state",
                "steps",
                "prefill_steps",
                "step_seconds",
                "overhead_seconds",
            )
        }
        for mid, m in self.registry.snapshot().items():
            engine = self.registry.get(mid)
            stats = engine.stats() if engine else None
            out["queue_depth"][mid] = stats.queued if stats else 0
            out["in_flight"][mid] = m.in_flight
            out["resident_bytes"][mid] = m.resident_bytes
            out["state"][mid] = 1.0 if m.state is EngineState.READY else 0.0
            if stats:
                out["steps"][mid] = stats.steps
                out["prefill_steps"][mid] = stats.prefill_steps
                out["step_seconds"][mid] = stats.step_s
                out["overhead_seconds"][mid] = stats.overhead_s
        status = self.reconciler.status()
        out["memory"] = {
            k.removesuffix("_bytes"): float(v)
            for k, v in status["memory"].items()
            if isinstance(v, int | float)
        }
        out["config"] = {"valid": 1.0 if status["config"]["valid"] else 0.0}
        out["conditions"] = {
            f"{mid}\t{c['type']}": 1.0 if c["status"] else 0.0
            for mid, m in status["models"].items()
            for c in m["conditions"]
        }
        return out

    async def startup(self) -> None:
        log.info(
            "lmx_starting",
            host=self.settings.host,
            port=self.settings.port,
            home=str(self.settings.home),
            device=mlx_engine.device_name(),
        )
        await asyncio.to_thread(self.spares.refill)
        await self.reconciler.start()
        if open_to_network(self.deps.keys):
            log.warning(
                "api_open_to_network",
                host=self.settings.host,
                port=self.settings.port,
                fix="declare server.api_keys in the config file, or listen on 127.0.0.1",
            )

    def stopping(self) -> None:
        """The server has begun to stop: end the event streams (their clients reconnect to the
        next daemon, resuming where they left off), and give the answers under way
        `stop_grace_s` to finish (see _end_answers)."""
        self.reconciler.events.close()
        self._ending = asyncio.get_running_loop().create_task(self._end_answers())

    async def _end_answers(self) -> None:
        """Unload the models once the grace has passed: each answer still under way ends with an
        error (a stream with an error event, then [DONE]), which its client reads, before the
        server stops waiting for their responses. Cancelled by it, they were cut off mid-body
        (curl: exit 18), and each logged a traceback."""
        await asyncio.sleep(self.settings.stop_grace_s)
        self._unloading = True
        await self.reconciler.stop()

    async def shutdown(self) -> None:
        if self._ending is not None:
            if not self._unloading:  # every answer ended in time
                self._ending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ending
        await self.reconciler.stop()
        await asyncio.to_thread(self.spares.close)
        for kept in (self.deps.responses, self.deps.chats):
            await asyncio.to_thread(kept.close)
        log.info("lmx_stopped")


class _Server(uvicorn.Server):
    """uvicorn's server, telling the daemon the moment it begins to stop: before it waits for
    open connections, so that endless responses (event streams) end instead of holding the
    shutdown up for `timeout_graceful_shutdown` and being cancelled."""

    def __init__(self, config: uvicorn.Config, *, on_stopping: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_stopping = on_stopping

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_stopping()
        await super().shutdown(sockets)


def run(settings: Settings) -> int:
    lock = HomeLock(settings.home)
    try:
        sock = bind(settings.host, settings.port)
        try:
            # Before anything in the home is written: a second daemon must change nothing.
            lock.acquire(port=settings.port)
            locked_at_s = time.time()
        except HomeInUse as exc:
            sock.close()
            raise StartupError(str(exc)) from None
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot lock {lock.path}: {exc.strerror}") from None
        ensure_config(settings)
        remove_stale_temps(settings, before_s=locked_at_s)
    except StartupError as exc:
        print(f"lmx: {exc}", file=sys.stderr)
        return 1
    yield_to_workers()  # before any thread or worker starts: they inherit it
    daemon = Daemon(settings)
    config = uvicorn.Config(
        daemon.app,
        log_config=None,
        access_log=False,
        lifespan="on",
        # The answers' grace, then the time their ends take to go out once the models unload.
        timeout_graceful_shutdown=math.ceil(settings.stop_grace_s + _ENDING_S),
    )
    server = _Server(config, on_stopping=daemon.stopping)
    # uvicorn re-raises SIGTERM after its graceful shutdown, into the handler that was there
    # before it: a no-op one makes a requested stop exit 0 (launchd/systemd: not a failure).
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        lock.release()
    return 0 if server.started else 1
