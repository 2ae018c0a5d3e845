"""The `lmx` client commands as a person runs them: subprocesses against a real `lmx serve`.

Reads use the shared session daemon; every test that changes the desired state starts its own
daemon (own LMX_HOME) through `daemon_factory`. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import psutil  # type: ignore[import-untyped, unused-ignore]
import pytest
import yaml
from rich.console import Console

from lmx.cli_render import plan_lines, ps_table, status_footer, status_table
from lmx.client import (
    AdminClient,
    ChangedMeanwhile,
    download_verdict,
    parse_assignments,
    resolve_admin_key,
)
from tests.conftest import Daemon, free_port, start_daemon, wait_for
from tests.hubserver import HubServer

CLI_TIMEOUT_S = 30.0


def cli_env(home: Path | None) -> dict[str, str]:
    unset = ("LMX_URL", "LMX_HOST", "LMX_PORT", "LMX_ADMIN_KEY")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["LMX_HOME"] = str(home) if home else "/nonexistent-lmx-home"
    env["COLUMNS"] = "200"
    return env


def lmx(
    d: Daemon, *args: str, timeout_s: float = CLI_TIMEOUT_S, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "--url", d.url, home=d.home, timeout_s=timeout_s, stdin=stdin)


def run_cli(
    *args: str,
    home: Path | None = None,
    timeout_s: float = CLI_TIMEOUT_S,
    stdin: str = "",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmx.cli", *args],
        env=cli_env(home) | (env or {}),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def status(d: Daemon) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(d.url + "/admin/status", timeout=10).json()
    return body


def desired(d: Daemon) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(d.url + "/admin/desired", timeout=10).json()
    return body


def is_ready(doc: dict[str, Any], model: str) -> bool:
    m = doc["models"].get(model)
    return m is not None and any(
        c["type"] == "Ready" and c["status"] for c in m.get("conditions", [])
    )


# -- the pure parts: words to a merge patch, a plan to a diff --


def test_key_value_words_become_a_merge_patch_of_yaml_scalars() -> None:
    words = ["want=pinned", "engine.max_batch=8", "aliases=a, b", "idle_ttl=null", "revision=0123"]
    assert parse_assignments(words) == {
        "want": "pinned",
        "engine": {"max_batch": 8},
        "aliases": ["a", "b"],
        "idle_ttl": None,
        "revision": "0123",  # a sha of digits stays a string
    }
    with pytest.raises(ValueError, match="not key=value"):
        parse_assignments(["want"])


def test_a_plan_reads_like_a_diff() -> None:
    plan = {
        "actions": [
            {"action": "Resume", "model": "back"},
            {"action": "Evict", "model": "old", "for_model": "new", "freed_bytes": 2**30},
            {"action": "Unload", "model": "r", "reason": "SpecChanged", "forced": False},
            {"action": "Load", "model": "r", "footprint_bytes": 3 * 2**20, "why": "resident"},
            {"action": "Load", "model": "new", "footprint_bytes": 5 * 2**30, "why": "pinned"},
        ],
        "blocked": [{"model": "big", "reason": "InsufficientMemory", "message": "needs 9 GiB"}],
        "under_way": [{"action": "Download", "model": "next"}],
        "budget_bytes": 8 * 2**30,
        "used_bytes": 6 * 2**30,
    }
    assert [str(t) for t in plan_lines(plan)] == [
        "~ resume back (what began its drain was undone: it stays loaded)",
        "- evict old (LRU: frees 1.0 GiB for new)",
        "-/+ reload r (spec changed; 3.0 MiB, resident)",
        "+ load new (5.0 GiB, pinned)",
        "~ downloading next (under way)",
        "~ blocked big: InsufficientMemory needs 9 GiB",
        "",
        "Plan: 1 to add, 1 to reload, 1 to remove, 1 under way, 1 blocked; "
        "memory after: 6.0 GiB of 8.0 GiB budget.",
    ]
    # A load under way is no "No changes": the running state is on its way to the desired one.
    loading = {"actions": [], "blocked": [], "under_way": [{"action": "Load", "model": "m"}]}
    assert str(plan_lines(loading)[0]) == "~ loading m (under way)"


def test_a_plan_shows_a_spec_change_that_loads_nothing_again_as_an_unload() -> None:
    # `l` is loaded on request: its next request loads it again, not this plan. `r` is busy.
    plan = {
        "actions": [
            {"action": "Drain", "model": "r", "reason": "SpecChanged"},
            {"action": "Unload", "model": "l", "reason": "SpecChanged", "forced": False},
        ],
        "blocked": [{"model": "r", "reason": "Draining", "message": "SpecChanged: waiting"}],
        "budget_bytes": 8 * 2**30,
        "used_bytes": 2**30,
    }
    assert [str(t) for t in plan_lines(plan)] == [
        "- drain r (spec changed; unloads once its requests finish)",
        "- unload l (spec changed)",
        "~ blocked r: Draining SpecChanged: waiting",
        "",
        "Plan: 0 to add, 2 to remove, 1 blocked; memory after: 1.0 GiB of 8.0 GiB budget.",
    ]


def test_ps_shows_what_waits_and_when_a_model_idles_out() -> None:
    resident = {"conditions": [{"type": "Resident", "status": True}], "in_flight": 4}
    doc = {
        "models": {
            "jit": {**resident, "waiting": 2, "idle_ttl_s": 300.0},
            "kept": {**resident, "idle_ttl_s": None},
            "gone": {"conditions": [{"type": "Resident", "status": False}]},
        }
    }
    console = Console(record=True, width=200)
    console.print(ps_table(doc))
    rows = {line.split()[0]: line.split() for line in console.export_text().splitlines()}
    assert set(rows) == {"MODEL", "jit", "kept"}
    # MODEL PID RESIDENT FOOTPRINT IN-FLIGHT WAITING LAST-USED IDLE-TTL CONTEXT
    assert rows["jit"][4:8] == ["4", "2", "-", "5m00s"]
    assert rows["kept"][4:8] == ["4", "0", "-", "-"]


def test_status_says_what_failed_where_a_model_backs_off_and_what_its_spec_did_not_get() -> None:
    failed = {"type": "Degraded", "status": True, "reason": "DownloadFailed"}
    failed["message"] = "cannot reach the Hub: Name or service not known"
    doc = {
        "models": {"m": {"want": "downloaded", "conditions": [failed]}},
        "plan": {"blocked": [{"model": "m", "reason": "BackingOff", "message": "retrying in 25s"}]},
    }
    table, notes = status_table(doc)
    console = Console(record=True, width=200)
    console.print(table)
    assert "Blocked: BackingOff" in console.export_text()
    assert [str(n) for n in notes] == [
        "m: DownloadFailed: cannot reach the Hub: Name or service not known; retrying in 25s"
    ]
    # And what a model does otherwise than its spec says.
    doc["models"]["m"]["notes"] = ["engine.context_length 8192 is more than the model's own 4096"]
    assert [str(n) for n in status_table(doc)[1]][1:] == [
        "m: engine.context_length 8192 is more than the model's own 4096"
    ]


def test_pull_of_a_quarantined_model_says_how_to_retry_it() -> None:
    held = {"type": "Quarantined", "status": True, "reason": "DownloadFailed"}
    held["message"] = "gated repo: request access on the Hub, then set a token"
    doc = {"observedGeneration": 3, "models": {"g": {"want": "downloaded", "conditions": [held]}}}
    verdict = download_verdict(doc, "g", 3)
    assert verdict is not None and not verdict.ok
    assert verdict.message == (
        "g is quarantined: DownloadFailed: gated repo: request access on the Hub, then set a "
        "token (to retry: lmx set g want=absent, then want=downloaded)"
    )


def test_status_ends_with_the_daemons_warnings() -> None:
    doc = {"config": {"valid": True}, "warnings": ["lmx listens beyond loopback and ..."]}
    lines = [str(t) for t in status_footer(doc)]
    assert lines[-1] == "Warning: lmx listens beyond loopback and ..."
    assert not [line for line in status_footer({}) if "Warning" in str(line)]


def test_status_of_an_invalid_file_says_whether_a_last_good_state_serves() -> None:
    bad = {"valid": False, "error": "config.yaml: models.a.wnat (line 2): unknown key"}
    for kept, says in ((True, "the last good state is kept"), (False, "no model is served")):
        doc = {"config": {**bad, "path": "/h/config.yaml", "last_good_kept": kept}}
        heading = next(str(t) for t in status_footer(doc) if "INVALID" in str(t))
        assert heading.startswith("Config: INVALID (/h/config.yaml); " + says), heading


# -- reads, on the shared daemon --


def test_status_ps_and_plan_show_the_builtin_model(daemon: Daemon) -> None:
    st = lmx(daemon, "status")
    assert st.returncode == 0, st.stderr
    row = next(line for line in st.stdout.splitlines() if line.startswith("lmx-tiny"))
    assert "pinned" in row and "Ready" in row
    assert "Config: valid" in st.stdout and "Generation:" in st.stdout
    ps = lmx(daemon, "ps")
    assert ps.returncode == 0 and "lmx-tiny" in ps.stdout and "IDLE TTL" in ps.stdout
    plan = lmx(daemon, "plan")
    assert plan.returncode == 0
    assert "No changes. The running state matches the desired state." in plan.stdout
    doc = json.loads(lmx(daemon, "status", "--json").stdout)
    assert doc["models"]["lmx-tiny"]["want"] == "pinned"
    loaded = json.loads(lmx(daemon, "ps", "--json").stdout)
    pid = loaded["lmx-tiny"]["pid"]
    assert psutil.Process(pid).parent().pid == daemon.proc.pid  # its worker process
    row = next(line for line in ps.stdout.splitlines() if line.startswith("lmx-tiny"))
    assert str(pid) in row.split()


def test_chat_answers_each_line_with_the_conversation_before_it(daemon: Daemon) -> None:
    # A blank line is no turn; /clear forgets the turns before it, so the third is asked alone.
    turns = "Hello there\n\nAnd again\n/clear\nHello there\n/bye\nnot sent\n"
    args = ("chat", "lmx-tiny", "--max-tokens", "4", "--verbose", "--system", "Be brief.")
    r = lmx(daemon, *args, stdin=turns)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and r.stdout.endswith("\n")
    stats = [line.split() for line in r.stderr.splitlines() if "prompt tokens" in line]
    assert [words[3:5] for words in stats] == [["4", "tokens"]] * 3
    first, second, third = (int(words[0]) for words in stats)
    assert second > first  # the second turn carries the first, question and answer
    assert third == first  # the same line, after /clear: the system prompt and itself
    refused = lmx(daemon, "chat", "nope", stdin="Hi\n")
    assert refused.returncode == 1
    assert refused.stderr.startswith("lmx: model 'nope' not found; available: lmx-tiny")


def test_chat_asks_one_prompt_with_what_is_piped_below_it(daemon: Daemon) -> None:
    args = ("chat", "lmx-tiny", "-p", "Summarize this:", "--max-tokens", "2", "--verbose")
    prompt_tokens = []
    for stdin in ("", "line one\nline two\n"):
        r = lmx(daemon, *args, stdin=stdin)
        assert r.returncode == 0, r.stderr
        (stats,) = [line.split() for line in r.stderr.splitlines() if "prompt tokens" in line]
        assert stats[3:5] == ["2", "tokens"]
        prompt_tokens.append(int(stats[0]))
    assert prompt_tokens[1] > prompt_tokens[0]  # one turn: the lines below the prompt


def test_chat_on_a_terminal_shows_a_refused_turn_and_goes_on(daemon: Daemon) -> None:
    master, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmx.cli", "chat", "nope", "--url", daemon.url],
        env=cli_env(daemon.home),
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(terminal)
    try:
        os.write(master, b"Hi\nHi again\n\x04")  # two turns, then Ctrl-D
        out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        os.close(master)
    assert proc.returncode == 0, err
    refused = [line for line in err.splitlines() if line.startswith("lmx: model 'nope' not found")]
    assert len(refused) == 2 and out.count(">>> ") == 3


def _one_place(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> Daemon:
    """A daemon whose model `m` decodes one sequence at a time."""
    home = tmp_path / "one"
    home.mkdir()
    (home / "config.yaml").write_text(
        "models:\n  m:\n    source: builtin:tiny\n    want: pinned\n    engine: {max_batch: 1}\n"
    )
    return daemon_factory(home)


@contextlib.contextmanager
def _place_held(d: Daemon) -> Iterator[None]:
    """Another client holds `m`'s one place (for seconds: 4,000 tokens) until the block ends."""
    ask = [{"role": "user", "content": "Hi"}]
    hold = {"model": "m", "messages": ask, "max_tokens": 4000, "stream": True, "ignore_eos": True}
    with (
        httpx.Client(base_url=d.url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=hold) as held,
    ):
        assert held.status_code == 200
        lines = held.iter_lines()  # kept: a dropped iterator would close the stream
        assert next(lines)  # its answer has begun: it has the place
        yield


def _chat_turn_waits(d: Daemon, *args: str) -> subprocess.Popen[str]:
    """`lmx chat m ARGS` asked one turn, which waits for `m`'s place (held)."""
    chat = subprocess.Popen(
        [sys.executable, "-m", "lmx.cli", "chat", "m", *args, "--url", d.url],
        env=cli_env(d.home),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert chat.stdin is not None
    chat.stdin.write("Hello\n")
    chat.stdin.flush()
    wait_for(lambda: _waiting(d), lambda n: n == 1, 20)
    return chat


def _waiting(d: Daemon) -> int:
    return int(status(d)["models"]["m"]["waiting"])


def test_chat_stops_a_turn_still_waiting_for_its_first_token(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = _one_place(tmp_path, daemon_factory)
    brief = ("--max-tokens", "1", "--verbose")
    with _place_held(d):
        chat = _chat_turn_waits(d, *brief)
        try:
            chat.send_signal(signal.SIGINT)
            # The turn ends at once, its place in the queue given up; the other goes on.
            wait_for(lambda: _waiting(d), lambda n: n == 0, 10)
            assert status(d)["models"]["m"]["in_flight"] == 1
        except BaseException:
            chat.kill()
            raise
    # The next turn, once the place is free, is asked without the stopped one.
    out, err = chat.communicate("Again\n", timeout=CLI_TIMEOUT_S)
    assert chat.returncode == 0, err
    alone = lmx(d, "chat", "m", *brief, stdin="Again\n")
    assert alone.returncode == 0, alone.stderr
    assert out.startswith("\n") and out.count("\n") == 2  # no text for the stopped turn
    assert [line.split()[:3] for line in err.splitlines()] == [
        line.split()[:3] for line in alone.stderr.splitlines()
    ]  # one line of stats: the second turn's prompt as long as the same line's alone


def test_chat_from_a_script_ends_with_the_error_its_answer_ends_with(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = _one_place(tmp_path, daemon_factory)
    with _place_held(d):
        chat = _chat_turn_waits(d)
        try:  # its answer begun, waiting for a place: the model's worker dies
            os.kill(status(d)["models"]["m"]["pid"], signal.SIGKILL)
            out, err = chat.communicate("Not sent\n", timeout=CLI_TIMEOUT_S)
        finally:
            chat.kill()
    assert chat.returncode == 1
    assert out == ""
    assert err == ("lmx: the model's worker process exited unexpectedly (killed by SIGKILL)\n"), err


def test_an_unreachable_daemon_is_one_line_and_exit_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    r = run_cli("status", "--url", url)
    assert r.returncode == 1
    assert r.stderr == f"lmx: cannot reach the daemon at {url} (is `lmx serve` running?)\n"


def test_without_a_url_the_cli_finds_the_daemon_where_serve_listens(daemon: Daemon) -> None:
    served = {"LMX_HOST": "0.0.0.0", "LMX_PORT": str(daemon.port)}  # as `lmx serve` reads them
    for args in (("status",), ("ps", "--json")):
        r = run_cli(*args, env=served)
        assert r.returncode == 0, (args, r.stderr)
    elsewhere = f"http://127.0.0.1:{free_port()}"
    r = run_cli("status", env={**served, "LMX_URL": elsewhere})  # $LMX_URL before the two
    assert r.returncode == 1 and elsewhere in r.stderr, r.stderr
    r = run_cli("status", "--url", daemon.url, env={**served, "LMX_URL": elsewhere})
    assert r.returncode == 0, r.stderr  # and --url before $LMX_URL
    for command in ("status", "serve"):  # serve's was a traceback
        r = run_cli(command, env={"LMX_PORT": "twelve"})
        assert r.returncode == 2
        assert r.stderr == "lmx: invalid LMX_PORT 'twelve': give a port number\n"
    r = run_cli("status", env={**served, "LMX_STOP_GRACE_S": "soon"})  # serve's alone
    assert r.returncode == 0, r.stderr


def test_set_on_a_config_file_missing_or_not_yaml_says_so(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """Not "model lmx-tiny is not declared": the file reads as declaring nothing."""
    d = daemon_factory()
    good = d.config_path.read_text()
    d.config_path.unlink()
    wait_for(lambda: status(d)["config"]["valid"], lambda valid: not valid)
    r = lmx(d, "set", "lmx-tiny", "want=resident")
    assert r.returncode == 1 and f"{d.config_path} is missing" in r.stderr, r.stderr
    d.config_path.write_text(good + "jit: [\n")
    wait_for(lambda: status(d)["config"]["error"] or "", lambda e: "YAML" in e)
    r = lmx(d, "set", "lmx-tiny", "want=resident")
    assert r.returncode == 1 and "not declared" not in r.stderr and "line" in r.stderr, r.stderr
    assert d.config_path.read_text() == good + "jit: [\n"


def test_a_wrong_admin_key_is_refused_with_exit_1(daemon: Daemon) -> None:
    before = desired(daemon)["generation"]
    r = lmx(daemon, "set", "lmx-tiny", "want=resident", "--admin-key", "not-the-key")
    assert r.returncode == 1
    assert r.stderr.strip() == "lmx: the admin key was refused (--admin-key)"
    assert desired(daemon)["generation"] == before


def test_a_write_after_a_concurrent_change_says_changed_meanwhile(daemon: Daemon) -> None:
    key = resolve_admin_key((daemon.home / "admin.key").read_text().strip())
    with AdminClient(daemon.url, key) as client, pytest.raises(ChangedMeanwhile, match="retry"):
        client.patch({"models": {}}, if_match='"an-etag-from-before"')  # 412: nothing changes


# -- changes, each on its own daemon --


def test_set_dry_run_changes_nothing_then_set_adds_a_model_that_becomes_ready(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory()
    before = desired(d)
    text_before = d.config_path.read_text()
    dry = lmx(d, "set", "llama", "source=builtin:tiny-llama", "want=resident", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "+ download llama" in dry.stdout and "Dry run: nothing was changed." in dry.stdout
    assert desired(d)["generation"] == before["generation"]
    assert d.config_path.read_text() == text_before

    r = lmx(d, "set", "llama", "source=builtin:tiny-llama", "want=resident")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: status(d), lambda doc: is_ready(doc, "llama"), timeout_s=30)
    row = next(line for line in lmx(d, "status").stdout.splitlines() if line.startswith("llama"))
    assert "resident" in row and "Ready" in row

    r = lmx(d, "set", "llama", "engine.max_batch=4", "aliases=l1,l2", "idle_ttl=1h")
    assert r.returncode == 0, r.stderr
    spec = desired(d)["desired"]["models"]["llama"]
    assert spec["engine"] == {"max_batch": 4} and spec["aliases"] == ["l1", "l2"]
    assert spec["idle_ttl"] == "1h"
    assert lmx(d, "set", "llama", "idle_ttl=null").returncode == 0
    assert "idle_ttl" not in desired(d)["desired"]["models"]["llama"]

    assert lmx(d, "set", "llama", "--delete").returncode == 0
    assert "llama" not in desired(d)["desired"]["models"]
    # A model not declared: without a source, said so (the 422 named a line of the patched file).
    r = lmx(d, "set", "llama", "want=resident")
    assert r.returncode == 1 and r.stderr == (
        "lmx: model llama is not declared; give its source (lmx set llama source=...)\n"
    )


def test_apply_of_an_invalid_file_names_each_field_and_changes_nothing(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    d = daemon_factory()
    text_before, gen_before = d.config_path.read_text(), desired(d)["generation"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "models:\n  x:\n    source: builtin:tiny\n    want: often\n    engine: {max_batch: 0}\n"
    )
    r = lmx(d, "apply", "-f", str(bad))
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    # Each names its field and its line in the file given.
    assert any(line.startswith("lmx: invalid: models.x.want (line 4):") for line in lines), r.stderr
    assert any(
        line.startswith("lmx: invalid: models.x.engine.max_batch (line 5):") for line in lines
    )
    assert d.config_path.read_text() == text_before
    assert desired(d)["generation"] == gen_before

    good = tmp_path / "good.yaml"
    good.write_text(
        yaml.safe_dump({"models": {"lmx-tiny": {"source": "builtin:tiny", "want": "absent"}}})
    )
    dry = lmx(d, "apply", "-f", str(good), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "- unload lmx-tiny (want: absent)" in dry.stdout
    assert d.config_path.read_text() == text_before
    assert lmx(d, "apply", "-f", str(good)).returncode == 0
    assert d.config_path.read_text() == good.read_text()


class Lines:
    """A subprocess's stream, read line by line on a thread, so that every wait is bounded."""

    def __init__(self, stream: IO[str]) -> None:
        self._q: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._stream = stream
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        """After the process exited: the pump reaches EOF, then the pipe is closed."""
        self._thread.join(5)
        self._stream.close()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._q.put(line)

    def until(self, ok: Callable[[str], bool], timeout_s: float = 15.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=0.1)
            except queue.Empty:
                continue
            self.seen.append(line)
            if ok(line):
                return line
        raise TimeoutError(f"no such line in {timeout_s}s; saw {self.seen!r}")


@contextlib.contextmanager
def following_events(url: str, home: Path) -> Iterator[tuple[subprocess.Popen[str], Lines, Lines]]:
    """`lmx events --json` against `url`, once it says it is following: (process, stderr, stdout).
    Killed at the end if still running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmx.cli", "events", "--json", "--url", url],
        env=cli_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    err, out = Lines(proc.stderr), Lines(proc.stdout)
    try:
        err.until(lambda line: line.startswith("Following events"))
        yield proc, err, out
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        err.close()
        out.close()


def test_events_prints_a_change_and_ctrl_c_exits_0(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory()
    with following_events(d.url, d.home) as (proc, err, out):
        assert lmx(d, "set", "lmx-tiny", "want=resident").returncode == 0
        line = out.until(lambda line: json.loads(line)["type"] == "desired_changed")
        assert json.loads(line)["origin"] == "admin"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0, err.seen


def test_admin_events_resume_after_last_event_id(daemon: Daemon) -> None:
    def first_events(last_event_id: str, n: int) -> list[tuple[str, dict[str, Any]]]:
        """The first `n` (id, event) pairs of a stream resumed after `last_event_id`."""
        got: list[tuple[str, dict[str, Any]]] = []
        headers = {"Last-Event-ID": last_event_id}
        with httpx.stream("GET", daemon.url + "/admin/events", headers=headers, timeout=10) as r:
            assert r.status_code == 200
            sid = ""
            for line in r.iter_lines():
                if line.startswith("id: "):
                    sid = line[4:]
                elif line.startswith("data: "):
                    got.append((sid, json.loads(line[6:])))
                    if len(got) == n:
                        break
        return got

    # What the daemon kept (from its start: the model's load, its conditions) is replayed...
    replay = [(sid, e) for sid, e in first_events("0", 4) if e["type"] != "dropped"][:3]
    seqs = [e["seq"] for _, e in replay]
    assert [int(sid) for sid, _ in replay] == seqs == list(range(seqs[0], seqs[0] + 3))
    # ...from any point in it.
    assert [e["seq"] for _, e in first_events(str(seqs[1]), 1)] == [seqs[2]]
    for bad in (b"x", b"-1", "²".encode("latin-1")):  # "²" passes str.isdigit, not int()
        r = httpx.get(daemon.url + "/admin/events", headers={"Last-Event-ID": bad}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "Last-Event-ID", bad


def test_events_follows_a_restarting_daemon(tmp_path: Path, builtin_cache: Path) -> None:
    port, home = free_port(), tmp_path / "home"
    first = start_daemon(home, builtin_cache, port=port)
    second = None
    try:
        first.wait_ready()
        with following_events(first.url, home) as (proc, err, out):
            assert first.stop() == 0
            err.until(lambda line: "reconnecting" in line)
            second = start_daemon(home, builtin_cache, port=port)
            second.wait_ready()
            assert lmx(second, "set", "lmx-tiny", "want=resident").returncode == 0
            line = out.until(lambda line: json.loads(line)["type"] == "desired_changed")
            assert json.loads(line)["origin"] == "admin"
            assert proc.poll() is None
            err.until(lambda line: line.startswith("lmx: reconnected to "))
            assert sum("reconnecting" in line for line in err.seen) == 1  # not one a second
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0, err.seen
    finally:
        for d in (first, second):
            if d is not None:
                d.stop()


def hub_repo(weights_bytes: int) -> dict[str, bytes]:
    """A Hub repo with a Qwen3-shaped config and one safetensors file (U8 bytes)."""
    header = json.dumps(
        {"w": {"dtype": "U8", "shape": [weights_bytes], "data_offsets": [0, weights_bytes]}}
    ).encode()
    config = {
        "model_type": "qwen3",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_size": 64,
        "max_position_embeddings": 512,
        "torch_dtype": "bfloat16",
    }
    return {
        "model.safetensors": struct.pack("<Q", len(header)) + header + bytes(weights_bytes),
        "config.json": json.dumps(config).encode(),
    }


def test_pull_downloads_a_hub_model_then_says_it_is_there_and_reports_a_missing_repo(
    daemon_factory: Callable[..., Daemon], hub_server: HubServer
) -> None:
    hub_server.add_repo("org/small", hub_repo(512 * 1024))
    d = daemon_factory()
    r = lmx(d, "pull", "small", "--source", "org/small")
    assert r.returncode == 0, r.stderr
    assert "small is downloaded" in r.stdout
    assert (d.home / "models" / "org--small" / "model.safetensors").is_file()
    assert desired(d)["desired"]["models"]["small"]["want"] == "downloaded"

    again = lmx(d, "pull", "small")
    assert again.returncode == 0 and "small is already downloaded." in again.stdout

    missing = lmx(d, "pull", "org/nope")
    assert missing.returncode == 1
    assert missing.stderr.startswith("lmx: org/nope ") and "RepoNotFound" in missing.stderr
    assert missing.stdout == ""  # no progress was shown, so not even an empty line of it


def test_set_uses_the_admin_key_declared_in_the_config_file(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    from lmx.daemon import default_manifest

    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text(default_manifest() + "server:\n  admin_key: cfg-9d2e1\n")
    d = daemon_factory(home)
    r = lmx(d, "set", "lmx-tiny", "want=resident")
    assert r.returncode == 0, r.stderr
    assert desired_with_key(d, "cfg-9d2e1")["desired"]["models"]["lmx-tiny"]["want"] == "resident"
    # An explicit key still wins: the admin.key file's is not the daemon's key now.
    file_key = (home / "admin.key").read_text().strip()
    r = lmx(d, "set", "lmx-tiny", "want=pinned", "--admin-key", file_key)
    assert r.returncode == 1 and "refused (--admin-key)" in r.stderr


def desired_with_key(d: Daemon, key: str) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {key}"}
    body: dict[str, Any] = httpx.get(d.url + "/admin/desired", headers=auth, timeout=10).json()
    return body


def test_status_and_plan_exit_3_while_the_config_is_invalid(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory()
    good = d.config_path.read_text()
    d.config_path.write_text(good + "jit: true\njit: false\n")
    wait_for(lambda: status(d)["config"]["valid"], lambda valid: not valid)
    for args in (("status",), ("status", "--json"), ("plan",), ("plan", "--json")):
        r = lmx(d, *args)
        assert r.returncode == 3, (args, r.stdout, r.stderr)
    assert "jit (line" in lmx(d, "status").stdout
    # The plan is for the last valid state: "No changes" alone would say the edit is in place.
    lines = lmx(d, "plan").stdout.splitlines()
    assert lines[0].startswith("Config: INVALID") and "last valid desired state" in lines[0]
    assert lines[1].strip().startswith("jit (line") and "duplicate key" in lines[1], lines
    config = json.loads(lmx(d, "plan", "--json").stdout)["config"]
    assert config == status(d)["config"] and not config["valid"]
    d.config_path.write_text(good)
    wait_for(lambda: status(d)["config"]["valid"], bool)
    assert lmx(d, "status").returncode == 0
    assert lmx(d, "plan").returncode == 0


def test_a_quarantined_model_makes_status_unhealthy() -> None:
    from lmx.cli import unhealthy

    quarantined = {"type": "Quarantined", "status": True, "reason": "LoadFailed"}
    fine = {"type": "Quarantined", "status": False}
    assert unhealthy({"config": {"valid": True}, "models": {"m": {"conditions": [quarantined]}}})
    assert not unhealthy({"config": {"valid": True}, "models": {"m": {"conditions": [fine]}}})
    assert unhealthy({"config": {"valid": False}, "models": {}})


@pytest.mark.parametrize("url", ["http://[::1", "ftp://127.0.0.1:1234", "localhost:1234"])
def test_a_bad_url_is_one_line_and_exit_2(url: str) -> None:
    r = run_cli("status", "--url", url)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"lmx: invalid URL {url!r}") and r.stderr.count("\n") == 1, r.stderr


def test_the_admin_key_is_the_one_the_daemon_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMX_HOME", str(tmp_path))
    monkeypatch.delenv("LMX_ADMIN_KEY", raising=False)
    (tmp_path / "admin.key").write_text("from-file\n")
    assert resolve_admin_key(None).value == "from-file"
    (tmp_path / "config.yaml").write_text("models: {}\nserver: {admin_key: null}\n")
    assert resolve_admin_key(None).value == "from-file"
    (tmp_path / "config.yaml").write_text("models: {}\nserver:\n  admin_key: from-config\n")
    key = resolve_admin_key(None)
    assert key.value == "from-config" and "server.admin_key" in key.origin
    monkeypatch.setenv("LMX_ADMIN_KEY", "from-env")
    assert resolve_admin_key(None).value == "from-env"
    assert resolve_admin_key("from-flag").value == "from-flag"


# systemctl as it answers `--user` where no user manager can be reached (systemd 252).
NO_USER_SYSTEMCTL = """#!/bin/sh
if [ -z "$XDG_RUNTIME_DIR" ]; then
  echo "Failed to connect to bus: No medium found" >&2
else
  echo "Failed to connect to bus: No such file or directory" >&2
fi
exit 1
"""


@pytest.mark.skipif(sys.platform != "linux", reason="systemd user services are Linux's")
def test_service_status_without_a_systemd_user_session_says_what_to_do_and_exits_4(
    tmp_path: Path,
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(NO_USER_SYSTEMCTL)
    (bin_dir / "systemctl").chmod(0o755)
    env = cli_env(tmp_path / "home")
    for name in ("XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS", "SUDO_USER"):
        env.pop(name, None)  # a container's shell, or `su`'s
    env |= {"PATH": f"{bin_dir}:{env['PATH']}", "XDG_CONFIG_HOME": str(tmp_path / "config")}
    r = subprocess.run(
        [sys.executable, "-m", "lmx.cli", "service", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    assert r.returncode == 4, r.stderr
    assert r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("lmx service: no systemd user session")
    assert "No medium found" in r.stderr
    assert "loginctl enable-linger" in r.stderr and "lmx serve" in r.stderr
