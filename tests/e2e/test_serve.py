"""`lmx serve` end to end: a real daemon process, the real `openai` SDK, the built-in model."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil  # type: ignore[import-untyped, unused-ignore]
import pytest
import yaml
from transformers import AutoTokenizer

from tests.conftest import Daemon, free_port, wait_for

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours."},
]


@pytest.fixture(scope="module")
def prompt_tokens(tiny_model_dir: Path) -> int:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return len(tok.encode(text, add_special_tokens=False))


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_fresh_home_gets_the_default_manifest(daemon: Daemon) -> None:
    declared = yaml.safe_load(daemon.config_path.read_text())
    assert declared["models"]["lmx-tiny"]["want"] == "pinned"
    assert "# lmx desired state" in daemon.config_path.read_text()


def test_the_log_leaves_out_the_scheduler_and_file_watchers_routine(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory()  # at the default level, info
    declared = yaml.safe_load(daemon.config_path.read_text())
    declared["models"]["lmx-tiny"]["want"] = "resident"
    daemon.config_path.write_text(yaml.safe_dump(declared))

    def entries() -> list[dict[str, Any]]:
        return [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]

    # The scheduler started before the watcher, and the watcher saw the edit before lmx took it.
    wait_for(
        entries,
        lambda es: any(e["event"] == "desired_accepted" and e["generation"] == 2 for e in es),
    )
    chatter = [e for e in entries() if e["logger"].startswith(("apscheduler", "watchfiles"))]
    assert not [e for e in chatter if e["level"] in ("debug", "info")], chatter


def test_sdk_lists_the_pinned_builtin_model(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert "lmx-tiny" in ids


def test_sdk_chat_completion_counts_tokens_like_the_tokenizer(
    client: openai.OpenAI, prompt_tokens: int
) -> None:
    r = client.chat.completions.create(
        model="lmx-tiny", messages=MESSAGES, max_tokens=9, temperature=0, logprobs=True
    )
    choice = r.choices[0]
    assert choice.message.content
    assert choice.finish_reason in ("length", "stop")
    assert r.usage is not None
    assert r.usage.prompt_tokens == prompt_tokens
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert r.usage.completion_tokens == len(choice.logprobs.content)
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 9


def test_sdk_streaming_chat_matches_non_streaming(
    client: openai.OpenAI, prompt_tokens: int
) -> None:
    kwargs = {"model": "lmx-tiny", "messages": MESSAGES, "max_tokens": 9, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )  # type: ignore[call-overload]
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == whole.choices[0].message.content
    assert finish in ("length", "stop")
    assert usage is not None and usage.prompt_tokens == prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_alias_serves_the_same_model(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert r.choices[0].message.content is not None


def test_taken_port_fails_with_one_line_naming_it(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        proc = subprocess.run(
            [sys.executable, "-m", "lmx.cli", "serve", "--port", str(port)],
            env={"LMX_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert str(port) in lines[0] and "in use" in lines[0]


def test_invalid_config_at_start_is_reported_and_healed_by_a_fix(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    home = tmp_path / "bad"
    home.mkdir()
    (home / "config.yaml").write_text("models:\n  m:\n    source: builtin:tiny\n    wnat: pinned\n")
    d = daemon_factory(home, wait=False)
    body = wait_for(lambda: _readyz(d), lambda r: r is not None and r[0] == 503)
    assert "models.m.wnat (line 4): unknown key" in str(body)
    (home / "config.yaml").write_text("models:\n  m:\n    source: builtin:tiny\n    want: pinned\n")
    wait_for(lambda: _readyz(d), lambda r: r is not None and r[0] == 200)


def test_a_start_removes_the_temp_files_of_writes_a_crash_cut_short(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    home, dotfiles = tmp_path / "home", tmp_path / "dotfiles"
    (home / "models" / "org--m").mkdir(parents=True)
    dotfiles.mkdir()
    (dotfiles / "lmx.yaml").write_text("models: {}\n")
    (home / "config.yaml").symlink_to(dotfiles / "lmx.yaml")  # written back where it points
    stale = [
        dotfiles / ".lmx.yaml.k2v9x0qa.tmp",
        home / ".journal.json.3jd8s0wz.tmp",
        home / "models" / "org--m" / "..lmx-download.json.a8f_2kq1.tmp",
    ]
    others = [dotfiles / ".lmx.yaml.swp", home / "notes.tmp"]
    under_way = home / ".footprints.json.p0q9r8s7.tmp"  # newer than the start: not a crash's
    for path in [*stale, *others, under_way]:
        path.write_text("{")
    hour_ago = time.time() - 3600
    for path in [*stale, *others]:
        os.utime(path, (hour_ago, hour_ago))
    os.utime(under_way, (hour_ago + 7200, hour_ago + 7200))

    daemon_factory(home)

    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in [*others, under_way])


def _readyz(d: Daemon) -> tuple[int, object] | None:
    try:
        r = httpx.get(d.url + "/readyz", timeout=2)
    except httpx.HTTPError:
        return None
    return r.status_code, r.json()


def test_sigterm_stops_gracefully_after_unloading(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory(tmp_path / "graceful")
    workers = wait_for(lambda: _worker_pids(d), lambda pids: len(pids) == 2)  # model, spare
    assert _model_pid(d) in workers
    assert d.stop() == 0
    log = d.log()
    assert '"event": "lmx_stopped"' in log
    assert "Traceback" not in log
    assert all(_gone(pid) for pid in workers)


def test_sigterm_ends_an_answer_still_going_after_the_grace_with_an_error_then_done(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    # Cancelled by uvicorn's own timeout, such a stream was cut off mid-body (curl: exit 18), no
    # error and no [DONE], and each logged a traceback.
    d = daemon_factory(tmp_path / "grace", env={"LMX_STOP_GRACE_S": "1"})
    body = {
        "model": "lmx-tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4000,
        "ignore_eos": True,
        "stream": True,
    }
    lines: list[str] = []
    whole: list[httpx.Response] = []  # an answer not streamed, under way too
    asked = threading.Thread(
        target=lambda: whole.append(
            httpx.post(d.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
        )
    )
    with httpx.stream("POST", d.url + "/v1/chat/completions", json=body, timeout=60) as r:
        asked.start()
        for line in r.iter_lines():
            lines.append(line)
            if len(lines) == 20:  # it is under way
                d.proc.terminate()
    assert d.proc.wait(timeout=30) == 0
    asked.join(timeout=30)
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert error["message"] == "the model was unloaded", error
    # Not streamed, it is a 503 to retry (on the daemon that comes back), not a failure's 500.
    (answer,) = whole
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1", answer.text
    assert answer.json()["error"]["message"] == "the model was unloaded"
    assert "Traceback" not in d.log()


def _gone(pid: int) -> bool:
    """The process has exited (a zombie whose new parent has not reaped it yet counts)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _worker_pids(d: Daemon) -> list[int]:
    """The daemon's worker processes: the models' and the spare waiting for the next load."""
    pids = []
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(d.proc.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):  # zombies included
                if "lmx.runtime.mlx_worker" in child.cmdline():
                    pids.append(child.pid)
    return pids


def _model_pid(d: Daemon, model: str = "lmx-tiny") -> int | None:
    """The worker process serving `model`, as /admin/status reports it."""
    try:
        status = httpx.get(d.url + "/admin/status", timeout=5).json()
    except httpx.HTTPError:
        return None
    pid: int | None = status["models"].get(model, {}).get("pid")
    return pid


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux's scheduling policies")
def test_the_daemon_yields_the_cpu_to_its_model_workers(daemon: Daemon) -> None:
    # lmx.runtime.scheduling: the daemon's threads take no wakeup preemption, the workers (the
    # model's and the spare) keep the default policy.
    assert os.sched_getscheduler(daemon.proc.pid) == os.SCHED_BATCH
    workers = wait_for(lambda: _worker_pids(daemon), lambda pids: len(pids) == 2)
    assert _model_pid(daemon) in workers
    for pid in workers:
        wait_for(lambda pid=pid: os.sched_getscheduler(pid), lambda p: p == os.SCHED_OTHER)


def test_a_killed_model_worker_is_replaced_and_serving_resumes(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory(tmp_path / "crash")
    first = _model_pid(d)
    assert first is not None
    (spare,) = wait_for(lambda: set(_worker_pids(d)) - {first}, lambda pids: len(pids) == 1)
    os.kill(first, signal.SIGKILL)
    # Loaded again after the crash backoff, in the spare that was waiting.
    wait_for(lambda: _model_pid(d), lambda pid: pid == spare)
    client = openai.OpenAI(base_url=d.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    wait_for(lambda: _readyz(d), lambda r: r is not None and r[0] == 200)
    r = client.chat.completions.create(model="lmx-tiny", messages=MESSAGES, max_tokens=4)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert "killed by SIGKILL" in d.log() and d.proc.poll() is None


def test_a_killed_daemon_takes_its_model_workers_with_it(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory(tmp_path / "orphan")
    workers = wait_for(lambda: _worker_pids(d), lambda pids: len(pids) == 2)  # model, spare
    d.proc.kill()
    d.proc.wait(10)
    wait_for(lambda: all(_gone(pid) for pid in workers), bool)


def test_a_second_daemon_on_the_same_home_fails_at_once_and_a_crashed_ones_does_not_block(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    home = tmp_path / "shared"
    first = daemon_factory(home)
    config, key = first.config_path.read_bytes(), (home / "admin.key").read_bytes()
    journal = (home / "journal.json").stat().st_mtime_ns
    proc = subprocess.run(
        [sys.executable, "-m", "lmx.cli", "serve", "--port", str(free_port())],
        env={**os.environ, "LMX_HOME": str(home), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert str(home) in lines[0] and "in use by another lmx daemon" in lines[0]
    assert f"pid {first.proc.pid}" in lines[0] and f"port {first.port}" in lines[0]
    assert first.config_path.read_bytes() == config and (home / "admin.key").read_bytes() == key
    assert (home / "journal.json").stat().st_mtime_ns == journal
    ready = _readyz(first)
    assert ready is not None and ready[0] == 200  # the first serves on, untouched
    # Killed outright, the first leaves its lock file behind: the OS has released the lock.
    first.proc.kill()
    first.proc.wait(10)
    daemon_factory(home)


def test_sigterm_with_an_event_stream_attached_stops_at_once(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory(tmp_path / "events")
    with httpx.stream("GET", d.url + "/admin/events", timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines) == ": connected"
        started = time.monotonic()
        d.proc.terminate()
        ended_cleanly = True
        try:
            for _ in lines:
                pass
        except httpx.HTTPError:
            ended_cleanly = False
    assert d.proc.wait(20) == 0
    took_s = time.monotonic() - started
    log = d.log()
    assert ended_cleanly and took_s < 3.0, (took_s, log[-2000:])
    assert "Traceback" not in log and "timeout graceful shutdown" not in log
    assert '"event": "lmx_stopped"' in log
