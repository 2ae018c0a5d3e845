"""pytest plugin: the `hub_server` fixture, a local Hub (tests/hubserver.py) that huggingface_hub
talks to instead of huggingface.co, in a sandboxed HF_HOME with no token and no Xet.

huggingface_hub reads its environment once, at import, into `huggingface_hub.constants`; setting
HF_ENDPOINT and friends now would change nothing. So the fixture sets the environment (for
subprocesses) and patches those constants (for this process), so that a call passing no `endpoint`
reaches the local server and never the real Hub. It also:
- shrinks `constants.DOWNLOAD_CHUNK_SIZE` to 64 KiB (from 10 MiB), so a drop mid-file leaves bytes
  on disk to resume from and progress arrives in several steps;
- replaces the `time` module seen by huggingface_hub's retry code with one whose `sleep` records
  the delay in `hub.sleeps` and returns at once: tests stay fast and can assert that a retry backed
  off (one sleep per retry) instead of looping tightly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from huggingface_hub import close_session, constants, file_download
from huggingface_hub.utils import _http

from tests.hubserver import HubServer


class _RecordingTime:
    """Stands in for the `time` module inside huggingface_hub: records sleeps, skips them."""

    def __init__(self, sleeps: list[float]) -> None:
        self.sleeps = sleeps

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


@pytest.fixture
def hub_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HubServer]:
    hf_home = tmp_path_factory.mktemp("hf-home")
    hub = HubServer().start()
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    patched: dict[str, object] = {
        "ENDPOINT": hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "DOWNLOAD_CHUNK_SIZE": 64 * 1024,
        # With telemetry on, building headers fetches {ENDPOINT}/api/agent-harnesses once per
        # process (to tag AI agents in the user agent): an extra request tests would count.
        "HF_HUB_DISABLE_TELEMETRY": True,
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
    }
    for name, constant in patched.items():
        monkeypatch.setattr(constants, name, constant)
    clock = _RecordingTime(hub.sleeps)
    monkeypatch.setattr(file_download, "time", clock)
    monkeypatch.setattr(_http, "time", clock)
    close_session()  # pooled connections from an earlier test must not leak into this one
    try:
        yield hub
    finally:
        close_session()
        hub.stop()
    assert not hub.errors, f"the hub server failed: {hub.errors!r}"
