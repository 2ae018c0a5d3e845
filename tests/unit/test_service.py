"""`lmx service`: rendering for launchd and systemd, and the command sequences, through a fake runner.

No test runs launchctl, systemctl or journalctl: every external command goes to the fakes here.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lmx import service
from lmx.service import Host, Result, Runner, ServiceError, ServiceSpec, render, spec_for
from lmx.settings import Settings

ODD = "Tom & Jerry <lab> 100% $HOME"  # XML and systemd metacharacters in one directory name


def odd_spec(tmp_path: Path, *, host: str | None = None, port: int | None = None) -> ServiceSpec:
    home = tmp_path / ODD / ".opta-lmx"
    python = str(tmp_path / ODD / "venv" / "bin" / "python")
    config = tmp_path / ODD / 'my "best" config.yaml'
    config.parent.mkdir(parents=True, exist_ok=True)
    config.touch()
    settings = Settings.from_env(home=home, config=config, host=host, port=port)
    return spec_for(settings, config=config, executable=python, system="darwin")


@dataclass
class FakeLaunchctl:
    """launchd as launchctl shows it: a label that is loaded or not, slow to let go after bootout."""

    loaded: bool = False
    drain_polls: int = 0  # `print` still finds the label this many times after a bootout
    eio: int = 0  # `bootstrap` answers EIO this many times first
    fail: dict[str, Result] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    print_out: str = "gui/501/com.opta.lmx = {\n\tstate = running\n\tpid = 4242\n\truns = 2\n}\n"

    def __call__(self, argv: Sequence[str], *, capture: bool = True) -> Result:
        self.calls.append(tuple(argv))
        verb = argv[1] if argv[0] == "launchctl" else argv[0]
        if verb in self.fail:
            return self.fail[verb]
        if verb == "print":
            if self.loaded or self.drain_polls > 0:
                self.drain_polls -= 0 if self.loaded else 1
                return Result(0, out=self.print_out)
            return Result(113, err='Bad request.\nCould not find service "com.opta.lmx"')
        if verb == "bootout":
            self.loaded = False
        if verb == "bootstrap":
            if self.eio:
                self.eio -= 1
                return Result(5, err="Bootstrap failed: 5: Input/output error")
            self.loaded = True
        return Result(0)

    def mutations(self) -> list[str]:
        return [c[1] for c in self.calls if c[0] == "launchctl" and c[1] != "print"]


@dataclass
class Recorder:
    """Any other runner: records argv, answers 0 unless told otherwise by the first word after flags."""

    replies: dict[str, Result] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    captured: list[bool] = field(default_factory=list)

    def __call__(self, argv: Sequence[str], *, capture: bool = True) -> Result:
        self.calls.append(tuple(argv))
        self.captured.append(capture)
        verb = next(a for a in argv[1:] if not a.startswith("-"))
        return self.replies.get(verb, Result(0))


def mac(tmp_path: Path, runner: Runner, *, dry_run: bool = False) -> tuple[Host, list[str]]:
    out: list[str] = []
    path = tmp_path / "Library" / "LaunchAgents" / "com.opta.lmx.plist"
    return Host("darwin", path, 501, runner, out.append, lambda s: None, dry_run), out


def linux(
    tmp_path: Path, runner: Runner, *, dry_run: bool = False, linger: bool = True
) -> tuple[Host, list[str]]:
    out: list[str] = []
    path = tmp_path / ".config" / "systemd" / "user" / "lmx.service"
    return Host("linux", path, 1000, runner, out.append, lambda s: None, dry_run, linger), out


# --- rendering -------------------------------------------------------------------------------


def test_spec_runs_this_interpreter_unresolved_with_host_port_and_an_absolute_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").touch()
    real = tmp_path / "python3.12"
    real.touch()
    link = tmp_path / "venv" / "bin" / "python"
    link.parent.mkdir(parents=True)
    link.symlink_to(real)
    settings = Settings.from_env(home=tmp_path / "h", config=Path("c.yaml"), port=8080)
    spec = spec_for(settings, config=Path("c.yaml"), executable=str(link), system="linux")
    assert spec.argv == (
        str(link), "-P", "-m", "lmx.cli", "serve", "--host", "127.0.0.1", "--port", "8080",
        "--config", str(tmp_path / "c.yaml"),
    )  # fmt: skip
    assert spec.path_env.startswith(f"{link.parent}:")
    no_config = spec_for(
        Settings.from_env(home=tmp_path), config=None, executable="/p", system="linux"
    )
    assert "--config" not in no_config.argv


def test_plist_is_valid_keeps_alive_on_failure_and_escapes_odd_paths(tmp_path: Path) -> None:
    spec = odd_spec(tmp_path)
    text = render("darwin", spec)
    assert "Tom &amp; Jerry &lt;lab&gt;" in text
    assert 'my "best" config.yaml' in text
    plist = plistlib.loads(text.encode())
    home = str(tmp_path / ODD / ".opta-lmx")
    assert plist["Label"] == "com.opta.lmx"
    assert plist["ProgramArguments"] == list(spec.argv)
    assert plist["ProgramArguments"][0] == str(tmp_path / ODD / "venv" / "bin" / "python")
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False, "Crashed": True}
    assert plist["ThrottleInterval"] == 10
    assert plist["ProcessType"] == "Interactive"
    assert plist["SoftResourceLimits"] == {"NumberOfFiles": 10240}
    assert plist["WorkingDirectory"] == home
    assert plist["EnvironmentVariables"]["LMX_HOME"] == home
    assert plist["EnvironmentVariables"]["PATH"].startswith(str(tmp_path / ODD / "venv" / "bin"))
    assert not any(k.startswith("MALLOC") for k in plist["EnvironmentVariables"])
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == f"{home}/logs/lmx.log"


def test_unit_quotes_exec_start_so_systemd_sees_each_argument_whole(tmp_path: Path) -> None:
    spec = odd_spec(tmp_path)
    lines = render("linux", spec).splitlines()
    exec_start = next(ln for ln in lines if ln.startswith("ExecStart="))
    words = shlex.split(exec_start.removeprefix("ExecStart="))  # systemd's quoting rules, here
    assert words[0] == str(tmp_path / "Tom & Jerry <lab> 100%% $HOME" / "venv" / "bin" / "python")
    assert words[-1] == str(tmp_path / "Tom & Jerry <lab> 100%% $$HOME" / 'my "best" config.yaml')
    unescaped = [w.replace("%%", "%") for w in words[:1]]
    unescaped += [w.replace("%%", "%").replace("$$", "$") for w in words[1:]]
    assert unescaped == list(spec.argv)
    home = str(tmp_path / ODD / ".opta-lmx").replace("%", "%%")
    assert f'Environment="LMX_HOME={home}"' in lines
    assert f"WorkingDirectory={home}" in lines
    for line in ("Restart=on-failure", "RestartSec=5", "StartLimitBurst=5"):
        assert line in lines
    assert "Environment=MALLOC_TRIM_THRESHOLD_=131072" in lines
    assert "Environment=MALLOC_MMAP_THRESHOLD_=131072" in lines
    assert "WantedBy=default.target" in lines


def test_a_program_path_systemd_cannot_run_is_refused_but_launchd_takes_it(tmp_path: Path) -> None:
    spec = ServiceSpec(('/opt/"odd"/python', "-m", "lmx.cli", "serve"), tmp_path, "/bin")
    with pytest.raises(ServiceError, match="systemd cannot run"):
        render("linux", spec)
    assert plistlib.loads(render("darwin", spec).encode())["ProgramArguments"][0] == spec.argv[0]


def test_a_config_file_that_does_not_exist_is_refused_at_install(tmp_path: Path) -> None:
    settings = Settings.from_env(home=tmp_path, config=tmp_path / "missing.yaml")
    with pytest.raises(ServiceError, match=r"missing\.yaml does not exist"):
        spec_for(settings, config=tmp_path / "missing.yaml", executable="/p", system="linux")


@pytest.mark.parametrize("system", ["darwin", "linux"])
def test_a_value_with_a_newline_is_refused_rather_than_written(tmp_path: Path, system: str) -> None:
    spec = ServiceSpec(("/usr/bin/python", "serve\nExecStartPre=/bin/evil"), tmp_path, "/bin")
    with pytest.raises(ServiceError, match="control character"):
        render(system, spec)


# --- writing ---------------------------------------------------------------------------------


def test_write_is_atomic_and_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "agents" / "com.opta.lmx.plist"
    assert service.write_atomic(path, "one") is True
    assert service.write_atomic(path, "one") is False  # unchanged: not even rewritten
    assert path.stat().st_mode & 0o777 == 0o644

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        service.write_atomic(path, "two")
    assert path.read_text() == "one"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


# --- macOS: launchctl ----------------------------------------------------------------------------


def test_install_bootstraps_a_fresh_agent_and_lets_run_at_load_start_it(tmp_path: Path) -> None:
    launchctl = FakeLaunchctl()
    host, out = mac(tmp_path, launchctl)
    spec = odd_spec(tmp_path)
    assert service.install(host, spec) == 0
    assert launchctl.calls == [
        ("launchctl", "print", "gui/501/com.opta.lmx"),
        ("launchctl", "enable", "gui/501/com.opta.lmx"),
        ("launchctl", "bootstrap", "gui/501", str(host.unit_path)),
    ]
    assert host.unit_path.read_text() == render("darwin", spec)
    assert (spec.home / "logs").is_dir()  # launchd cannot open StandardOutPath without it
    assert out == [f"lmx service installed: {host.unit_path}, serving http://127.0.0.1:1234/v1"]


def test_installing_twice_gives_the_same_file_and_restarts_in_place(tmp_path: Path) -> None:
    launchctl = FakeLaunchctl()
    host, _ = mac(tmp_path, launchctl)
    spec = odd_spec(tmp_path)
    service.install(host, spec)
    first = host.unit_path.read_bytes()
    launchctl.calls.clear()
    service.install(host, spec)
    assert host.unit_path.read_bytes() == first
    assert [p.name for p in host.unit_path.parent.iterdir()] == [host.unit_path.name]
    assert launchctl.calls[1:] == [("launchctl", "kickstart", "-k", "gui/501/com.opta.lmx")]


def test_a_changed_agent_is_booted_out_waited_for_then_bootstrapped_through_eio(
    tmp_path: Path,
) -> None:
    launchctl = FakeLaunchctl(loaded=True, drain_polls=2, eio=2)
    host, _ = mac(tmp_path, launchctl)
    host.unit_path.parent.mkdir(parents=True)
    host.unit_path.write_text("an older definition")
    service.install(host, odd_spec(tmp_path))
    verbs = [c[1] for c in launchctl.calls]
    assert verbs == ["print", "bootout", "print", "print", "print", "enable"] + ["bootstrap"] * 3
    assert launchctl.loaded


def test_a_failing_launchctl_step_raises_one_line_naming_the_command(tmp_path: Path) -> None:
    err = "Bootstrap failed: 119: Service is disabled\n"
    host, _ = mac(tmp_path, FakeLaunchctl(fail={"bootstrap": Result(119, err=err)}))
    with pytest.raises(ServiceError) as exc:
        service.install(host, odd_spec(tmp_path))
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("`launchctl bootstrap gui/501 ")
    assert message.endswith("failed (exit 119): Bootstrap failed: 119: Service is disabled")


@pytest.mark.parametrize("system", ["darwin", "linux"])
def test_dry_run_writes_nothing_and_only_queries(tmp_path: Path, system: str) -> None:
    runner = FakeLaunchctl() if system == "darwin" else Recorder()
    host, out = (mac if system == "darwin" else linux)(tmp_path, runner, dry_run=True)
    spec = odd_spec(tmp_path)
    assert service.install(host, spec) == 0
    assert not host.unit_path.exists()
    assert not spec.home.exists()
    assert [c[1] for c in runner.calls] in (["print"], [])  # read-only queries only
    assert out[0] == f"would write {host.unit_path}:\n{render(system, spec)}"
    assert all(line.startswith("would run: ") for line in out[1:])
    assert len(out) == (3 if system == "darwin" else 5)


def test_uninstall_boots_out_and_removes_the_plist(tmp_path: Path) -> None:
    launchctl = FakeLaunchctl()
    host, out = mac(tmp_path, launchctl)
    service.install(host, odd_spec(tmp_path))
    launchctl.calls.clear()
    assert service.uninstall(host) == 0
    assert launchctl.mutations() == ["bootout"]
    assert not host.unit_path.exists()
    assert service.uninstall(host) == 0  # again: nothing to do, still fine
    assert launchctl.mutations() == ["bootout"]
    assert out[-1] == "lmx service is not installed"


def test_status_reports_pid_and_url_and_exits_3_when_not_running(tmp_path: Path) -> None:
    launchctl = FakeLaunchctl()
    host, out = mac(tmp_path, launchctl)
    service.install(host, odd_spec(tmp_path, host="::1", port=8080))
    out.clear()
    assert service.status(host) == 0
    assert out[1:3] == ["state: running, pid 4242", "url:   http://[::1]:8080/v1"]
    service.install(host, odd_spec(tmp_path, host="0.0.0.0", port=8080))  # all interfaces
    assert out[-1].endswith(", serving http://127.0.0.1:8080/v1")  # what a client here can reach
    out.clear()
    assert service.status(host) == 0
    assert out[2] == "url:   http://127.0.0.1:8080/v1"
    launchctl.print_out = "gui/501/com.opta.lmx = {\n\tstate = not running\n\tlast exit code = 1\n}"
    out.clear()
    assert service.status(host) == 3
    assert out[1] == "state: not running, last exit 1"
    launchctl.loaded = False
    out.clear()
    assert service.status(host) == 3
    assert out[1] == "state: not loaded"


def test_logs_tail_the_json_log_file_and_follow(tmp_path: Path) -> None:
    runner = Recorder()
    host, _ = mac(tmp_path, runner)
    spec = odd_spec(tmp_path)
    with pytest.raises(ServiceError, match="no log at"):
        service.logs(host, follow=False, lines=100)
    service.write_atomic(host.unit_path, render("darwin", spec))
    spec.log_path.parent.mkdir(parents=True)
    spec.log_path.write_text('{"event": "lmx_starting"}\n')
    assert service.logs(host, follow=True, lines=20) == 0
    assert runner.calls == [("tail", "-n", "20", "-F", str(spec.log_path))]
    assert runner.captured == [False]  # streamed to the terminal, not buffered


# --- Linux: systemctl --user -----------------------------------------------------------------


def test_linux_install_reloads_enables_and_restarts_in_that_order(tmp_path: Path) -> None:
    systemctl = Recorder()
    host, out = linux(tmp_path, systemctl, linger=False)
    spec = odd_spec(tmp_path)
    assert service.install(host, spec) == 0
    assert systemctl.calls == [
        ("systemctl", "--user", "daemon-reload"),
        ("systemctl", "--user", "reset-failed", "lmx.service"),
        ("systemctl", "--user", "enable", "lmx.service"),
        ("systemctl", "--user", "restart", "lmx.service"),
    ]
    assert host.unit_path.read_text() == render("linux", spec)
    assert "loginctl enable-linger" in out[-1]


def test_linux_install_ignores_a_failed_reset_but_not_a_failed_enable(tmp_path: Path) -> None:
    err = "Failed to enable unit: Access denied"
    host, _ = linux(tmp_path, Recorder({"reset-failed": Result(1), "enable": Result(1, err=err)}))
    with pytest.raises(ServiceError, match=f"systemctl --user enable lmx.service` failed .*{err}$"):
        service.install(host, odd_spec(tmp_path))


def test_linux_uninstall_disables_removes_and_reloads(tmp_path: Path) -> None:
    systemctl = Recorder()
    host, _ = linux(tmp_path, systemctl)
    service.install(host, odd_spec(tmp_path))
    systemctl.calls.clear()
    assert service.uninstall(host) == 0
    assert systemctl.calls == [
        ("systemctl", "--user", "disable", "--now", "lmx.service"),
        ("systemctl", "--user", "daemon-reload"),
    ]
    assert not host.unit_path.exists()


def test_linux_status_reads_systemctl_show_and_the_unit_url(tmp_path: Path) -> None:
    shown = "ActiveState=active\nSubState=running\nMainPID=777\nNRestarts=2\n"
    systemctl = Recorder({"show": Result(0, out=shown)})
    host, out = linux(tmp_path, systemctl)
    service.install(host, odd_spec(tmp_path, port=4321))
    out.clear()
    assert service.status(host) == 0
    assert systemctl.calls[-1] == (
        "systemctl", "--user", "show", "lmx.service", "-p", "ActiveState,SubState,MainPID,NRestarts",
    )  # fmt: skip
    assert out[1:] == [
        "state: active (running), pid 777, restarts 2",
        "url:   http://127.0.0.1:4321/v1",
        "logs:  journalctl --user -u lmx.service",
    ]
    systemctl.replies["show"] = Result(0, out="ActiveState=failed\nSubState=failed\nMainPID=0\n")
    assert service.status(host) == 3


def test_linux_logs_come_from_the_journal(tmp_path: Path) -> None:
    journal = Recorder()
    host, _ = linux(tmp_path, journal)
    service.logs(host, follow=True, lines=50)
    assert journal.calls == [
        ("journalctl", "--user", "-u", "lmx.service", "-n", "50", "-o", "cat", "-f")
    ]


# --- the command line ------------------------------------------------------------------------


def test_commands_register_and_a_failure_is_one_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="lmx")
    service.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["service", "install", "--dry-run", "--port", "8080"])
    assert (args.dry_run, args.port, args.host, args.config) == (True, 8080, None, None)
    assert parser.parse_args(["service", "logs", "-f"]).lines == 100

    host, _ = linux(tmp_path, Recorder({"show": Result(1, err="Failed to get properties")}))
    monkeypatch.setattr(Host, "current", classmethod(lambda cls, dry_run=False: host))
    status_args = parser.parse_args(["service", "status"])
    assert status_args.func(status_args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("lmx service: `systemctl --user show lmx.service")


@pytest.mark.parametrize(
    "said",
    [
        "Failed to connect to bus: No medium found",  # systemd 252, no XDG_RUNTIME_DIR
        "Failed to connect to bus: No such file or directory",  # no user manager runs
        "Failed to connect to user scope bus via local transport: $DBUS_SESSION_BUS_ADDRESS and"
        " $XDG_RUNTIME_DIR not defined (consider using --machine=<user>@.host --user to connect"
        " to bus of other user)",  # systemd 256
    ],
)
@pytest.mark.parametrize("command", ["status", "install"])
def test_linux_without_a_user_session_says_so_and_what_to_do_and_exits_4(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    said: str,
    command: str,
) -> None:
    parser = argparse.ArgumentParser(prog="lmx")
    service.add_commands(parser.add_subparsers(dest="command", required=True))
    no_bus = Result(1, err=said + "\n")
    host, out = linux(tmp_path, Recorder({"show": no_bus, "daemon-reload": no_bus}))
    monkeypatch.setattr(Host, "current", classmethod(lambda cls, dry_run=False: host))
    monkeypatch.setenv("LMX_HOME", str(tmp_path / "home"))  # where install puts its logs
    args = parser.parse_args(["service", command])
    assert args.func(args) == service.EXIT_NO_USER_MANAGER == 4  # LSB: status unknown
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and out == []
    assert err.startswith("lmx service: no systemd user session")
    assert said in err  # what systemctl said, for a search
    for remedy in ("loginctl enable-linger", "XDG_RUNTIME_DIR=/run/user/1000", "lmx serve"):
        assert remedy in err


def test_the_real_runner_reports_a_missing_program_as_exit_127() -> None:
    assert service.run_command(["true"]).code == 0
    missing = service.run_command(["lmx-no-such-program-here"])
    assert (missing.code, missing.err) == (127, "lmx-no-such-program-here: command not found")


def test_sudo_is_refused_so_no_root_owned_file_lands_in_a_users_home(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("SUDO_USER", "someone")
    with pytest.raises(ServiceError, match="without sudo"):
        Host.current()
