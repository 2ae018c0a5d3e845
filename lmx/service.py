"""`lmx service install|uninstall|status|logs`: run `lmx serve` as a per-user service.

Renders launchd/com.opta.lmx.plist.template (macOS LaunchAgent) or launchd/lmx.service.template
(systemd --user unit), writes it atomically and drives launchctl/systemctl through one injectable
runner. The CLI registers it with `add_commands`; it never needs root and never imports the daemon.
"""

from __future__ import annotations

import argparse
import getpass
import itertools
import os
import plistlib
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any, Protocol
from xml.sax.saxutils import escape as xml_escape

from lmx.errors import LmxError
from lmx.runtime import files
from lmx.settings import DEFAULT_HOST, DEFAULT_PORT, Settings, default_home, local_url

LABEL = "com.opta.lmx"
UNIT = "lmx.service"
TEMPLATES_DIR = Path(__file__).resolve().parent / "launchd"
POLL_S = 0.5
BOOTOUT_WAIT_S = 40.0  # past the plist's ExitTimeOut (30 s), by which launchd has SIGKILLed it
BOOTSTRAP_TRIES = 5  # launchd answers EIO (5) while a booted-out label is still being torn down
EXIT_NO_USER_MANAGER = 4  # as LSB's "status unknown": there is no service manager to ask
# systemctl's words when it cannot reach the user's manager ("to bus", or "to user scope bus").
_NO_USER_BUS = re.compile(r"Failed to connect to (\w+ scope )?bus")


class ServiceError(LmxError):
    """A service step failed; the message is the one line the person sees."""

    exit_code = 1


class NoUserManager(ServiceError):
    """`systemctl --user` cannot reach this user's systemd: no login session started one (a
    container, `su`, a cron job), or XDG_RUNTIME_DIR does not point to it."""

    exit_code = EXIT_NO_USER_MANAGER


@dataclass(frozen=True)
class Result:
    code: int
    out: str = ""
    err: str = ""


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], *, capture: bool = True) -> Result: ...


def run_command(argv: Sequence[str], *, capture: bool = True) -> Result:
    """Every external program lmx service starts goes through here; capture=False streams."""
    try:
        done = subprocess.run(list(argv), capture_output=capture, text=True, check=False)
    except FileNotFoundError:
        return Result(127, err=f"{argv[0]}: command not found")
    return Result(done.returncode, done.stdout or "", done.stderr or "")


@dataclass(frozen=True)
class ServiceSpec:
    """What the service runs: the whole `lmx serve` command line and its environment."""

    argv: tuple[str, ...]
    home: Path  # LMX_HOME: also the working directory, and where macOS logs go
    path_env: str

    @property
    def log_path(self) -> Path:
        return self.home / "logs" / "lmx.log"


def spec_for(
    settings: Settings, *, config: Path | None, executable: str, system: str
) -> ServiceSpec:
    """The current interpreter, unresolved (resolving a venv's python would leave the venv); -P
    keeps the working directory off sys.path. Host, port and config are baked in, absolute."""
    argv = [executable, "-P", "-m", "lmx.cli", "serve"]
    argv += ["--host", settings.host, "--port", str(settings.port)]
    if config is not None:
        if not settings.config_path.is_file():
            raise ServiceError(f"config file {settings.config_path} does not exist")
        argv += ["--config", str(settings.config_path.absolute())]
    bindir = str(Path(executable).parent)
    system_path = "/usr/local/bin:/usr/bin:/bin"
    if system == "darwin":
        system_path = "/opt/homebrew/bin:" + system_path + ":/usr/sbin:/sbin"
    return ServiceSpec(tuple(argv), settings.home.absolute(), f"{bindir}:{system_path}")


def _checked(value: str) -> str:
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise ServiceError(f"cannot put {value!r} in a service file: it has a control character")
    return value


def unit_quote(value: str, *, expands: bool = False) -> str:
    """One systemd word: C-style quotes, `%` specifiers escaped, and `$` where systemd expands."""
    s = _checked(value).replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return '"' + (s.replace("$", "$$") if expands else s) + '"'


def _exec_start(argv: Sequence[str]) -> str:
    # systemd never expands `$` in the program path, and refuses quotes and backslashes there.
    if any(c in argv[0] for c in "\"'\\"):
        raise ServiceError(f"systemd cannot run a program whose path has quotes: {argv[0]}")
    return " ".join([unit_quote(argv[0]), *(unit_quote(a, expands=True) for a in argv[1:])])


def _xml(value: object) -> str:
    return xml_escape(_checked(str(value)))


def render(system: str, spec: ServiceSpec, templates: Path = TEMPLATES_DIR) -> str:
    """The service file for `system`, each value escaped for its format (XML, or systemd's)."""
    if system == "darwin":
        name = f"{LABEL}.plist.template"
        args = "\n".join(f"    <string>{_xml(a)}</string>" for a in spec.argv)
        values = {"label": LABEL, "program_arguments": args, "home": _xml(spec.home)}
        values |= {"path": _xml(spec.path_env), "log_path": _xml(spec.log_path)}
    else:
        name = "lmx.service.template"
        values = {
            "exec_start": _exec_start(spec.argv),
            "working_directory": _checked(str(spec.home)).replace("%", "%%"),  # a path: unquoted
            "env_home": unit_quote(f"LMX_HOME={spec.home}"),
            "env_path": unit_quote(f"PATH={spec.path_env}"),
        }
    try:
        return Template((templates / name).read_text(encoding="utf-8")).substitute(values)
    except FileNotFoundError:
        raise ServiceError(
            f"{templates / name} is missing: install lmx from its source tree"
        ) from None


def write_atomic(path: Path, text: str) -> bool:
    """Replace `path` by one rename, so launchd/systemd never read half a file. Idempotent:
    returns False, writing nothing, when the content is already `text`."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    files.write_atomic(path, text, mode=0o644)
    return True


def _failure(argv: Sequence[str], r: Result) -> str:
    said = (r.err.strip() or r.out.strip()).splitlines()
    return f"`{shlex.join(argv)}` failed (exit {r.code})" + (f": {said[-1]}" if said else "")


def _error(argv: Sequence[str], r: Result, uid: int) -> ServiceError:
    """The error for a failed command: what to do about a missing systemd user session, else
    the command and the last line it said."""
    said = r.err.strip().splitlines()
    if argv[0] == "systemctl" and said and _NO_USER_BUS.search(said[-1]):
        return NoUserManager(
            f"no systemd user session to run the service in (systemctl said: {said[-1]});"
            f" log in to one (ssh or a desktop, not `su`), or run `loginctl enable-linger` and"
            f" set XDG_RUNTIME_DIR=/run/user/{uid}; or run `lmx serve` directly"
        )
    return ServiceError(_failure(argv, r))


@dataclass
class Host:
    """This user's service manager: the platform, the service file, and the one runner."""

    system: str  # "darwin" or "linux"
    unit_path: Path
    uid: int
    runner: Runner = run_command
    out: Callable[[str], None] = print
    sleep: Callable[[float], None] = time.sleep
    dry_run: bool = False
    linger: bool = True  # Linux: whether the user manager outlives logout (loginctl enable-linger)

    @classmethod
    def current(cls, *, dry_run: bool = False) -> Host:
        if sys.platform not in ("darwin", "linux"):
            raise ServiceError(f"needs macOS (launchd) or Linux (systemd), not {sys.platform}")
        if os.geteuid() == 0 and (sys.platform == "darwin" or "SUDO_USER" in os.environ):
            raise ServiceError("run this as the user the service is for, without sudo")
        config_dir = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        path = config_dir / "systemd/user" / UNIT
        if sys.platform == "darwin":
            path = Path.home() / "Library/LaunchAgents" / f"{LABEL}.plist"
        linger = Path("/var/lib/systemd/linger", getpass.getuser()).exists()
        return cls(sys.platform, path, os.getuid(), dry_run=dry_run, linger=linger)

    @property
    def target(self) -> str:
        return f"gui/{self.uid}/{LABEL}"

    def ask(self, *argv: str) -> Result:
        """A read-only query: it runs even under --dry-run."""
        return self.runner(argv)

    def do(self, *argv: str, check: bool = True) -> Result:
        """A command that changes something: only printed under --dry-run; a failure raises."""
        if self.dry_run:
            self.out(f"would run: {shlex.join(argv)}")
            return Result(0)
        r = self.runner(argv)
        if check and r.code != 0:
            raise _error(argv, r, self.uid)
        return r

    def loaded(self) -> bool:
        return self.ask("launchctl", "print", self.target).code == 0

    def bootout(self) -> None:
        """Stop and unload the agent, and wait until launchd has really let go of the label."""
        argv = ("launchctl", "bootout", self.target)
        r = self.do(*argv, check=False)
        if r.code not in (0, 3, 36):  # 3: already gone; 36: still stopping (waited on below)
            raise ServiceError(_failure(argv, r))
        for _ in range(int(BOOTOUT_WAIT_S / POLL_S)):
            if self.dry_run or not self.loaded():
                return
            self.sleep(POLL_S)
        raise ServiceError(f"launchd still holds {LABEL} {BOOTOUT_WAIT_S:.0f} s after bootout")

    def bootstrap(self) -> None:
        argv = ("launchctl", "bootstrap", f"gui/{self.uid}", str(self.unit_path))
        for attempt in range(1, BOOTSTRAP_TRIES + 1):
            r = self.do(*argv, check=False)
            if r.code == 0:
                return
            if r.code != 5 or attempt == BOOTSTRAP_TRIES:
                raise ServiceError(_failure(argv, r))
            self.sleep(1.0)


def _installed(host: Host) -> dict[str, Any] | None:
    """The installed service file as {"ProgramArguments": [...], ...}, or None where there is none."""
    try:
        if host.system == "darwin":
            with host.unit_path.open("rb") as f:
                return dict(plistlib.load(f))
        lines = host.unit_path.read_text(encoding="utf-8").splitlines()
        cmd = next((ln[10:] for ln in lines if ln.startswith("ExecStart=")), "")
        words = shlex.split(cmd)
    except (OSError, ValueError):  # absent, or not a file lmx wrote
        return None
    return {"ProgramArguments": [w.replace("%%", "%").replace("$$", "$") for w in words]}


def served_url(argv: Sequence[str]) -> str:
    opts = dict(itertools.pairwise(argv))
    host, port = opts.get("--host", DEFAULT_HOST), opts.get("--port", str(DEFAULT_PORT))
    return f"{local_url(host, port)}/v1"


def install(host: Host, spec: ServiceSpec) -> int:
    """Write the service file and (re)start the service; running it twice changes nothing more."""
    text = render(host.system, spec)
    if host.dry_run:
        changed = not host.unit_path.exists() or host.unit_path.read_text(encoding="utf-8") != text
        host.out(f"would write {host.unit_path}{'' if changed else ' (unchanged)'}:\n{text}")
    else:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)  # launchd will not create it
        changed = write_atomic(host.unit_path, text)
    if host.system == "darwin":
        loaded = host.loaded()
        if loaded and not changed:
            host.do("launchctl", "kickstart", "-k", host.target)  # same file: restart in place
        else:
            if loaded:
                host.bootout()  # launchd rereads a plist only on bootstrap
            host.do("launchctl", "enable", host.target)  # undo a `launchctl disable` from before
            host.bootstrap()  # RunAtLoad starts it: a kickstart now would race that start
    else:
        host.do("systemctl", "--user", "daemon-reload")
        host.do("systemctl", "--user", "reset-failed", UNIT, check=False)  # clear a start limit hit
        host.do("systemctl", "--user", "enable", UNIT)
        host.do("systemctl", "--user", "restart", UNIT)  # starts it, or restarts onto new code
    if not host.dry_run:
        host.out(f"lmx service installed: {host.unit_path}, serving {served_url(spec.argv)}")
        if host.system == "linux" and not host.linger:
            host.out("note: it stops when you log out; `loginctl enable-linger` keeps it running")
    return 0


def uninstall(host: Host) -> int:
    """Stop the service and remove its file; a no-op (exit 0) where nothing is installed."""
    loaded = host.system == "darwin" and host.loaded()
    if not loaded and not host.unit_path.exists():
        host.out("lmx service is not installed")
        return 0
    if loaded:
        host.bootout()
    elif host.system == "linux":
        host.do("systemctl", "--user", "disable", "--now", UNIT)
    if host.dry_run:
        host.out(f"would remove {host.unit_path}")
    else:
        host.unit_path.unlink(missing_ok=True)
    if host.system == "linux":
        host.do("systemctl", "--user", "daemon-reload")
    if not host.dry_run:
        host.out(f"lmx service uninstalled: removed {host.unit_path}")
    return 0


def status(host: Host) -> int:
    """Print what is installed and running; exit 0 when it runs, 3 when it does not (as LSB).
    Raises NoUserManager (exit 4, LSB's "unknown") where systemd has no user manager to ask."""
    installed = _installed(host)
    if host.system == "darwin":
        r = host.ask("launchctl", "print", host.target)
        info = dict(re.findall(r"^\t(\w[\w ]*?) = (.*)$", r.out, re.MULTILINE))
        running = r.code == 0 and "pid" in info
        state = f"running, pid {info.get('pid')}" if running else "not loaded"
        if r.code == 0 and not running:
            state = f"{info.get('state', 'loaded')}, last exit {info.get('last exit code', '?')}"
        logs = str(_log_path(installed))
    else:
        show = ("systemctl", "--user", "show", UNIT, "-p", "ActiveState,SubState,MainPID,NRestarts")
        r = host.ask(*show)
        if r.code != 0:
            raise _error(show, r, host.uid)
        info = dict(line.split("=", 1) for line in r.out.splitlines() if "=" in line)
        running = info.get("ActiveState") == "active" and info.get("MainPID", "0") != "0"
        state = f"{info.get('ActiveState')} ({info.get('SubState')})"
        state += f", pid {info['MainPID']}" if running else ""
        state += f", restarts {info.get('NRestarts', '0')}" + ("" if host.linger else ", no linger")
        logs = f"journalctl --user -u {UNIT}"
    host.out(f"file:  {host.unit_path}" + ("" if installed else " (not installed)"))
    host.out(f"state: {state}")
    host.out(f"url:   {served_url((installed or {}).get('ProgramArguments', []))}")
    host.out(f"logs:  {logs}")
    return 0 if running else 3


def _log_path(installed: dict[str, Any] | None) -> Path:
    return Path((installed or {}).get("StandardErrorPath") or default_home() / "logs" / "lmx.log")


def logs(host: Host, *, follow: bool, lines: int) -> int:
    if host.system == "darwin":
        path = _log_path(_installed(host))
        if not path.exists():
            raise ServiceError(f"no log at {path} yet: is the service installed?")
        argv = ["tail", "-n", str(lines), *(["-F"] if follow else []), str(path)]
    else:
        argv = ["journalctl", "--user", "-u", UNIT, "-n", str(lines), "-o", "cat"]
        argv += ["-f"] if follow else []
    r = host.runner(argv, capture=False)
    if r.code not in (0, 130):
        raise ServiceError(_failure(argv, r))
    return 0


def _handler(
    action: Callable[[Host, argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """Wrap a command: build the Host, and turn a ServiceError into one line on stderr and its
    exit code (1, or 4 where there is no systemd user manager)."""

    def handle(args: argparse.Namespace) -> int:
        try:
            return action(Host.current(dry_run=getattr(args, "dry_run", False)), args)
        except ServiceError as exc:
            print(f"lmx service: {exc}", file=sys.stderr)
            return exc.exit_code

    return handle


def _install(host: Host, args: argparse.Namespace) -> int:
    settings = Settings.from_env(config=args.config, host=args.host, port=args.port)
    spec = spec_for(settings, config=args.config, executable=sys.executable, system=host.system)
    return install(host, spec)


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `lmx service install|uninstall|status|logs` on the `lmx` parser."""
    service = subparsers.add_parser("service", help="run `lmx serve` as a per-user service")
    sub = service.add_subparsers(dest="service_command", required=True)
    inst = sub.add_parser("install", help="write the service file, then (re)start the service")
    inst.add_argument("--config", type=Path, help="desired-state file for `lmx serve`")
    inst.add_argument("--host", help="address for `lmx serve` to bind (default 127.0.0.1)")
    inst.add_argument("--port", type=int, help="port for `lmx serve` (default 1234)")
    uninst = sub.add_parser("uninstall", help="stop the service and remove its file")
    for p in (inst, uninst):
        p.add_argument("--dry-run", action="store_true", help="print what would be written and run")
    inst.set_defaults(func=_handler(_install))
    uninst.set_defaults(func=_handler(lambda host, _: uninstall(host)))
    stat = sub.add_parser(
        "status",
        help="installed? running? pid, URL; exit 3 when not running, 4 when systemd has no user"
        " session to ask",
    )
    stat.set_defaults(func=_handler(lambda host, _: status(host)))
    lg = sub.add_parser("logs", help="show the service's logs")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    lg.add_argument("-n", "--lines", type=int, default=100, help="how many recent lines (100)")
    lg.set_defaults(func=_handler(lambda host, a: logs(host, follow=a.follow, lines=a.lines)))
