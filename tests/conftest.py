"""Shared fixtures: the built-in model (built once per session), a loaded engine, a real daemon.

Every server here binds 127.0.0.1 on a free port; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from lmx.runtime.builtin import ensure_builtin

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # before huggingface_hub is imported

pytest_plugins = ["tests.conftest_hub"]

START_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("builtin-cache")


@pytest.fixture(scope="session")
def tiny_model_dir(builtin_cache: Path) -> Path:
    return ensure_builtin("tiny", builtin_cache)


T = TypeVar("T")


def wait_for(probe: Callable[[], T], ok: Callable[[T], bool], timeout_s: float = 30.0) -> T:
    """Poll `probe` until `ok(value)`; raise TimeoutError with the last value after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    value = probe()
    while not ok(value):
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met in {timeout_s}s; last value {value!r}")
        time.sleep(0.1)
        value = probe()
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Daemon:
    """A real `lmx serve` process on 127.0.0.1 with its own LMX_HOME."""

    home: Path
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.home / "config.yaml"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lmx serve exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"lmx serve not ready after {timeout_s}s:\n{self.log()}")

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_daemon(
    home: Path,
    builtin_cache: Path,
    *,
    port: int | None = None,
    args: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
) -> Daemon:
    """Start `lmx serve` (does not wait for readiness). `env` overrides the child's environment."""
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    # Reuse the session's built-in model build instead of building one per daemon.
    builtin = home / "builtin"
    if not builtin.exists():
        builtin.symlink_to(builtin_cache, target_is_directory=True)
    env = {
        **os.environ,
        "LMX_HOME": str(home),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    log_path = home / "daemon.log"
    with log_path.open("ab") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmx.cli", "serve", "--port", str(port), *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Daemon(home=home, port=port, proc=proc, log_path=log_path)


@pytest.fixture
def daemon_factory(tmp_path: Path, builtin_cache: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(
        home: Path | None = None,
        *,
        wait: bool = True,
        args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
    ) -> Daemon:
        d = start_daemon(home or tmp_path / "home", builtin_cache, args=args, env=env)
        started.append(d)
        if wait:
            d.wait_ready()
        return d

    yield make
    for d in started:
        d.stop()


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory, builtin_cache: Path) -> Iterator[Daemon]:
    """One shared daemon serving the default manifest (the built-in model, pinned), logging at
    debug level (each generation's end too)."""
    home = tmp_path_factory.mktemp("lmx-home")
    d = start_daemon(home, builtin_cache, args=("--log-level", "debug"))
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


@pytest.fixture
async def engine(tiny_model_dir: Path) -> AsyncIterator[object]:
    from lmx.runtime.engine import LoadConfig
    from lmx.runtime.mlx_engine import MlxEngine

    e = MlxEngine(LoadConfig(model_id="tiny", path=tiny_model_dir, prompt_cache_bytes=0))
    await asyncio.to_thread(e.load)
    try:
        yield e
    finally:
        await asyncio.to_thread(e.unload)
