"""The reconcile loop in a real `lmx serve`: edits of config.yaml load, evict and unload models
with the MLX engine and the built-in model, leave the others alone, and a bad edit changes nothing.

What the daemon did is read from its JSON log (one `action_done` line per action).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

from tests.conftest import Daemon, wait_for

# Context and batch give each engine an 8 MiB KV reservation; with the 32 MiB minimum margin, the
# weights and the worker process (128 MiB estimated, ~100 MiB measured), one footprint is
# 140-170 MiB: two fit this budget, three do not.
BUDGET = "370MiB"
TINY = {
    "source": "builtin:tiny",
    "engine": {"context_length": 4096, "max_batch": 4, "prompt_cache_bytes": 0},
}


def write_config(path: Path, **models: str) -> None:
    """models: id -> want. Written as editors do: a new file renamed over the old one."""
    doc = {
        "memory": {"budget": BUDGET},
        "models": {m: {**TINY, "want": w} for m, w in models.items()},
    }
    tmp = path.with_name(".config.yaml.swp")
    tmp.write_text(yaml.safe_dump(doc))
    os.replace(tmp, path)


def actions(d: Daemon) -> list[dict[str, Any]]:
    out = []
    for line in d.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "action_done":
                out.append(entry)
    return out


def did(d: Daemon, action: str, model: str) -> int:
    """How many times `action` was done to `model` (a long load is logged started, then done)."""
    return sum(
        1 for a in actions(d) if (a["action"], a["model"], a["result"]) == (action, model, "done")
    )


def loaded(d: Daemon) -> set[str]:
    """Models loaded now, by the log: loads less unloads and evictions."""
    held: set[str] = set()
    for a in actions(d):
        if a["action"] == "Load" and a["result"] == "done":
            held.add(a["model"])
        elif a["action"] in ("Unload", "Evict") and a["result"] == "done":
            held.discard(a["model"])
    return held


def chat(d: Daemon, model: str) -> str:
    client = openai.OpenAI(base_url=d.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
    )
    return r.model


def test_editing_the_config_loads_and_evicts_models_and_leaves_the_others_running(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    write_config(home / "config.yaml", a="resident", b="resident")
    d = daemon_factory(home)
    wait_for(lambda: loaded(d), lambda held: held == {"a", "b"})
    assert chat(d, "a") == "a"

    # b goes, c comes (pinned); a is not restarted.
    write_config(d.config_path, a="resident", b="absent", c="pinned")
    wait_for(lambda: loaded(d), lambda held: held == {"a", "c"})
    assert did(d, "Unload", "b") == 1

    # A second pin needs a's room: the least recently used resident model is evicted for it.
    write_config(d.config_path, a="resident", b="absent", c="pinned", p="pinned")
    wait_for(lambda: loaded(d), lambda held: held == {"c", "p"})
    evicted = [x for x in actions(d) if x["action"] == "Evict"]
    assert [(x["model"], x["for_model"]) for x in evicted] == [("a", "p")]
    assert did(d, "Load", "a") == 1 and did(d, "Load", "c") == 1
    assert chat(d, "c") == "c" and chat(d, "p") == "p"
    assert "memory_not_released" not in d.log()


def test_an_invalid_edit_keeps_serving_the_last_good_spec(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    write_config(home / "config.yaml", a="pinned")
    d = daemon_factory(home)  # ready: the pinned model is loaded
    assert chat(d, "a") == "a"

    d.config_path.write_text(d.config_path.read_text().replace("want: pinned", "want: sometimes"))
    body = wait_for(
        lambda: httpx.get(d.url + "/readyz", timeout=5).json(),
        lambda b: b["config_valid"] is False,
    )
    assert "models.a.want" in body["config_error"]
    assert "\nlmx_config_valid 0.0\n" in httpx.get(d.url + "/metrics", timeout=5).text
    assert chat(d, "a") == "a"  # still served, by the engine loaded before the bad edit
    assert did(d, "Unload", "a") == 0 and did(d, "Load", "a") == 1

    write_config(d.config_path, a="pinned", b="resident")
    wait_for(lambda: loaded(d), lambda held: held == {"a", "b"})
    assert httpx.get(d.url + "/readyz", timeout=5).json()["config_valid"] is True
    assert did(d, "Load", "a") == 1


def test_a_models_sampling_defaults_follow_its_spec_without_a_reload(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    doc = {"models": {"m": {**TINY, "want": "pinned", "sampling": {"temperature": 0}}}}
    (home / "config.yaml").write_text(yaml.safe_dump(doc))
    d = daemon_factory(home)
    client = openai.OpenAI(base_url=d.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def said(**fields: Any) -> str | None:
        ask: Any = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        return client.chat.completions.create(**ask, **fields).choices[0].message.content

    greedy = said(temperature=0)
    assert [said(seed=1), said(seed=2)] == [greedy, greedy]  # the spec's temperature: 0
    loads = did(d, "Load", "m")
    doc["models"]["m"]["sampling"] = {"temperature": 2}
    tmp = d.config_path.with_name(".config.yaml.swp")
    tmp.write_text(yaml.safe_dump(doc))
    os.replace(tmp, d.config_path)
    # Each seed its own answer once the edit is read; the model's worker serves on.
    wait_for(lambda: {said(seed=s) for s in (1, 2, 3)}, lambda hot: len(hot) == 3, 20)
    assert did(d, "Load", "m") == loads and "m" in loaded(d)
