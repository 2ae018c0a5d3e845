"""A Hub model through a real `lmx serve`: declared in config.yaml, downloaded by the daemon (a
subprocess, pointed at the local Hub server through its environment) with the real
huggingface_hub client, verified, loaded by MLX and served to the openai SDK; and a download cut
by SIGKILL, finished by the next process without fetching again what was already verified.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

from tests.conftest import Daemon, wait_for
from tests.hubserver import HubServer

REPO = "lmx-test/tiny"
WEIGHTS = "model.safetensors"
TINY = {"context_length": 1024, "max_batch": 2, "prompt_cache_bytes": 0}


def hub_env(hub: HubServer, tmp_path: Path) -> dict[str, str]:
    return {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def write_config(path: Path, **models: dict[str, Any]) -> None:
    """Written as editors do: a new file renamed over the old one."""
    tmp = path.with_name(".config.yaml.swp")
    tmp.write_text(yaml.safe_dump({"memory": {"budget": "1GiB"}, "models": models}))
    os.replace(tmp, path)


def tiny_repo(hub: HubServer, model_dir: Path) -> tuple[str, dict[str, bytes]]:
    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    return hub.add_repo(REPO, files), files


class Events:
    """The daemon's /admin/events, read on a thread until an event satisfies `last` (then the
    stream is closed, so the daemon's graceful shutdown need not wait for it)."""

    def __init__(self, url: str, last: Callable[[dict[str, Any]], bool]) -> None:
        self.items: list[dict[str, Any]] = []
        self.opened, self.done = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url, last), daemon=True)
        self._thread.start()
        if not self.opened.wait(10):
            raise TimeoutError("the event stream did not open")

    def _read(self, url: str, last: Callable[[dict[str, Any]], bool]) -> None:
        # The read timeout bounds a stall; the daemon's keep-alive comments come more often.
        with (
            contextlib.suppress(httpx.HTTPError),
            httpx.stream("GET", url + "/admin/events", timeout=30) as r,
        ):
            for line in r.iter_lines():
                self.opened.set()
                if line.startswith("data: "):
                    self.items.append(event := json.loads(line.removeprefix("data: ")))
                    if last(event):
                        self.done.set()
                        return

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in list(self.items) if e.get("type") == kind]


def model_status(d: Daemon, mid: str) -> dict[str, Any]:
    models: dict[str, Any] = httpx.get(d.url + "/admin/status", timeout=5).json()["models"]
    return models.get(mid, {})


def is_ready(d: Daemon, mid: str) -> bool:
    conds = model_status(d, mid).get("conditions", [])
    ready = any(c["type"] == "Ready" and c["status"] for c in conds)
    return ready and httpx.get(d.url + "/readyz", timeout=5).status_code == 200


def test_a_pinned_hub_model_is_downloaded_verified_loaded_and_served(
    daemon_factory: Callable[..., Daemon],
    hub_server: HubServer,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    commit, files = tiny_repo(hub_server, tiny_model_dir)
    home = tmp_path / "home"
    home.mkdir()
    write_config(home / "config.yaml")  # nothing yet: subscribe first, then declare the model
    d = daemon_factory(home, env=hub_env(hub_server, tmp_path))
    total = sum(len(b) for b in files.values())
    events = Events(
        d.url, lambda e: e["type"] == "download_progress" and e["bytes_done"] == e["bytes_total"]
    )

    write_config(d.config_path, tiny={"source": REPO, "want": "pinned", "engine": TINY})
    wait_for(lambda: is_ready(d, "tiny"), bool, timeout_s=60)

    client = openai.OpenAI(base_url=d.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert reply.model == "tiny" and reply.choices[0].message.content is not None
    status = model_status(d, "tiny")
    assert (status["source"], status["revision"], status["commit"]) == (REPO, "main", commit)
    assert events.done.wait(10)
    progress = events.of("download_progress")
    assert all(e["model"] == "tiny" and e["bytes_total"] == total for e in progress)
    assert (progress[-1]["bytes_done"], progress[-1]["eta_s"]) == (total, 0.0)
    assert all(len(hub_server.served(name)) == 1 for name in files)  # each file fetched once
    on_disk = home / "models" / REPO.replace("/", "--")
    assert all((on_disk / name).read_bytes() == data for name, data in files.items())


def test_a_download_killed_mid_file_is_finished_by_the_next_process_without_refetching(
    daemon_factory: Callable[..., Daemon],
    hub_server: HubServer,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    _, files = tiny_repo(hub_server, tiny_model_dir)
    hub_server.bytes_per_s = 256 * 1024  # ~3 s for the weights: time to kill the daemon
    home = tmp_path / "home"
    home.mkdir()
    write_config(home / "config.yaml", tiny={"source": REPO, "want": "pinned", "engine": TINY})
    env = hub_env(hub_server, tmp_path)
    first = daemon_factory(home, env=env, wait=False)
    wait_for(lambda: hub_server.served(WEIGHTS), bool, timeout_s=60)
    first.proc.kill()  # SIGKILL: no shutdown, no cleanup
    first.proc.wait(10)
    assert not (home / "models" / REPO.replace("/", "--") / ".lmx-download.json").exists()
    hub_server.bytes_per_s = None

    second = daemon_factory(home, env=env)  # ready: the pinned model is loaded
    assert is_ready(second, "tiny")

    before = sorted(n for n in files if n < WEIGHTS)  # fetched and verified before the kill
    assert before and all(len(hub_server.served(name)) == 1 for name in before)
    assert len(hub_server.served(WEIGHTS)) == 2
    assert "download_resuming" in second.log()
