"""The `lmx` command: `serve` runs the daemon; the other commands talk to a running daemon
through its admin API (lmx.client), `chat` through its chat completions, and show the answers
(lmx.cli_render).

Parses flags into explicit values (Settings, paths) and hands them on; no command reads another's
flags. Exit status: 0 on success, 1 on a runtime failure, 2 on bad usage (a bad --url too),
3 when `lmx status` finds the daemon unhealthy (its config file invalid, or a model quarantined)
or `lmx plan` finds the config file invalid (its plan is for the last good state), 4 when
`lmx service` finds no systemd user session to ask (lmx.service), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from lmx import __version__
from lmx.errors import LmxError
from lmx.service import add_commands as add_service_commands
from lmx.settings import Settings, env_host, env_port, local_url

_EVENTS_RECONNECT_S = 30.0  # `lmx events` follows a restarting daemon this long

if TYPE_CHECKING:
    from lmx.client import AdminClient

# `lmx status`: the config is invalid or a model is quarantined; `lmx plan`: the config is invalid.
EXIT_UNHEALTHY = 3


def _serve(args: argparse.Namespace) -> int:
    from lmx.daemon import run
    from lmx.logs import configure

    configure(args.log_level)
    try:
        settings = Settings.from_env(config=args.config, host=args.host, port=args.port)
    except ValueError as exc:
        print(f"lmx: {exc}", file=sys.stderr)
        return 2
    return run(settings)


def _make_model(args: argparse.Namespace) -> int:
    from lmx.runtime.builtin import build_model

    path = build_model(args.name, args.dir)
    print(path)
    return 0


def _client(args: argparse.Namespace) -> AdminClient:
    from lmx.client import AdminClient, resolve_admin_key

    return AdminClient(_daemon_url(args.url), resolve_admin_key(args.admin_key))


def _daemon_url(flag: str | None) -> str:
    """--url, else $LMX_URL, else where `lmx serve` listens by the same environment ($LMX_HOST,
    $LMX_PORT, else 127.0.0.1:1234). Raises InvalidUrl for an $LMX_PORT that is no number."""
    if flag is not None:
        return flag
    if url := os.environ.get("LMX_URL"):
        return url
    try:
        return local_url(env_host(), env_port())
    except ValueError as exc:
        from lmx.client import InvalidUrl

        raise InvalidUrl(str(exc)) from None


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def _status(args: argparse.Namespace) -> int:
    from rich.text import Text

    from lmx.cli_render import console, status_footer, status_table

    with _client(args) as c:
        doc = c.status()
    code = EXIT_UNHEALTHY if unhealthy(doc) else 0
    if args.json:
        _print_json(doc)
        return code
    con = console()
    table, notes = status_table(doc)
    con.print(table if doc.get("models") else "No models are declared.")
    for line in [*notes, Text(""), *status_footer(doc)]:
        con.print(line)
    return code


def unhealthy(doc: dict[str, Any]) -> bool:
    """The config file is invalid (the daemon keeps the last good state) or a model is
    quarantined (it waits for a change of its spec): what a script checking `lmx status` must
    see. Loads, downloads and backoffs in progress are not problems."""
    if not (doc.get("config") or {}).get("valid", True):
        return True
    return any(
        c.get("type") == "Quarantined" and c.get("status")
        for m in (doc.get("models") or {}).values()
        for c in m.get("conditions") or []
    )


def _ps(args: argparse.Namespace) -> int:
    from lmx.cli_render import console, loaded_models, ps_table

    with _client(args) as c:
        doc = c.status()
    if args.json:
        _print_json(loaded_models(doc))
        return 0
    console().print(ps_table(doc) if loaded_models(doc) else "No models are loaded.")
    return 0


def _show_plan(plan: dict[str, Any], *, dry_run: bool) -> None:
    from lmx.cli_render import console, plan_lines

    con = console()
    for line in plan_lines(plan):
        con.print(line)
    if dry_run:
        con.print("Dry run: nothing was changed.")


def _plan(args: argparse.Namespace) -> int:
    from rich.text import Text

    from lmx.cli_render import config_lines, console

    with _client(args) as c:
        plan = c.plan()
    config = plan.get("config") or {}
    code = 0 if config.get("valid", True) else EXIT_UNHEALTHY
    if args.json:
        _print_json(plan)
        return code
    if code:  # the plan alone ("No changes") would read as if the file's edits were in place
        invalid = "this plan is for the last valid desired state"
        for line in [*config_lines(config, invalid=invalid), Text("")]:
            console().print(line)
    _show_plan(plan, dry_run=False)
    return code


def _apply(args: argparse.Namespace) -> int:
    name = "stdin" if str(args.file) == "-" else str(args.file)
    try:
        text = sys.stdin.read() if name == "stdin" else args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"lmx: cannot read {name}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 1
    with _client(args) as c:
        body = c.replace(text, dry_run=args.dry_run)
    if args.json:
        _print_json(body)
    elif args.dry_run:
        _show_plan(body["plan"], dry_run=True)
    else:
        print(f"Applied {name}: generation {body['generation']}. `lmx status` shows the progress.")
    return 0


def _set(args: argparse.Namespace) -> int:
    if args.delete == bool(args.assignments):
        print("lmx: give key=value pairs or --delete (not both)", file=sys.stderr)
        return 2
    from lmx.client import parse_assignments

    try:
        fields = parse_assignments(args.assignments)
    except ValueError as exc:
        print(f"lmx: {exc}", file=sys.stderr)
        return 2
    with _client(args) as c:
        doc, etag = c.desired()
        declared = (doc.get("desired") or {}).get("models") or {}
        # A file missing or not YAML reads as declaring nothing: the daemon's answer says why.
        readable = doc.get("valid", True) or declared
        if readable and args.model not in declared and (args.delete or "source" not in fields):
            # A new model needs its source; the daemon's 422 named a line of the patched file.
            need = "" if args.delete else f"; give its source (lmx set {args.model} source=...)"
            print(f"lmx: model {args.model} is not declared{need}", file=sys.stderr)
            return 1
        patch = {"models": {args.model: None if args.delete else fields}}
        body = c.patch(patch, if_match=etag or None, dry_run=args.dry_run)
    if args.json:
        _print_json(body)
    elif args.dry_run:
        _show_plan(body["plan"], dry_run=True)
    elif body.get("generation") == doc.get("generation"):
        print(f"No change: models.{args.model} already says so.")
    else:
        what = "deleted" if args.delete else "set " + " ".join(args.assignments)
        print(f"models.{args.model}: {what} (generation {body['generation']}).")
    return 0


def _events(args: argparse.Namespace) -> int:
    from lmx.cli_render import event_line
    from lmx.client import DaemonError

    connected = False
    last: int | None = None
    lost_at: float | None = None

    def opened() -> None:
        nonlocal connected, lost_at
        if not connected:
            print(f"Following events from {c.url} (Ctrl-C stops)", file=sys.stderr, flush=True)
        elif lost_at is not None:
            print(f"lmx: reconnected to {c.url}", file=sys.stderr, flush=True)
        connected, lost_at = True, None

    # Ctrl-C ends the follow at once, wherever the read is: every event shown is already
    # printed, and nothing else is left to finish. (Unwinding the HTTP stream with a
    # KeyboardInterrupt instead twice left the process running past SIGINT in one CI run.)
    signal.signal(signal.SIGINT, _stop_following)
    with _client(args) as c:
        while True:
            try:
                for event in c.events(on_open=opened, after=last):
                    last = event.get("seq", last)
                    print(json.dumps(event) if args.json else event_line(event), flush=True)
            except DaemonError as exc:
                # A daemon restarting (launchd, an upgrade) comes back within seconds:
                # follow on from the last event seen, for a while.
                if lost_at is None:  # once an outage, not at each try (every second)
                    lost_at = time.monotonic()
                    if connected:
                        print(f"lmx: {exc}; reconnecting", file=sys.stderr, flush=True)
                if not connected or time.monotonic() - lost_at > _EVENTS_RECONNECT_S:
                    raise
                time.sleep(1.0)


def _stop_following(_signum: int, _frame: FrameType | None) -> None:
    sys.stdout.flush()
    os._exit(0)


def _chat(args: argparse.Namespace) -> int:
    """A conversation with a model in the terminal: each line a turn, its answer streamed to
    stdout and the model's reasoning to stderr (with --prompt, one turn). Ctrl-C stops an answer
    (twice: lmx), /clear forgets the turns so far, Ctrl-D or /bye ends the conversation. On a
    terminal a turn the daemon refuses (a conversation grown past the model's context, say) is
    shown and left out, and the conversation goes on; from a script it ends lmx with its
    error."""
    from lmx.client import DaemonError

    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = system
    asked = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    body = {"model": args.model, **{k: v for k, v in asked.items() if v is not None}}
    if args.prompt is not None:
        piped = "" if sys.stdin.isatty() else sys.stdin.read()
        said = f"{args.prompt}\n\n{piped}" if piped.strip() else args.prompt
        with _client(args) as c:
            turn = [*messages, {"role": "user", "content": said}]
            _answer(c, {**body, "messages": turn}, verbose=args.verbose)
        return 0
    with _client(args) as c:
        while (line := _next_turn()) is not None and line.strip() not in ("/bye", "/exit"):
            if not line.strip():
                continue
            if line.strip() == "/clear":  # a new conversation, its system prompt kept
                messages = system
                if sys.stdin.isatty():
                    print("(a new conversation)", file=sys.stderr, flush=True)
                continue
            turn = [*messages, {"role": "user", "content": line}]
            try:
                answer = _answer(c, {**body, "messages": turn}, verbose=args.verbose)
            except DaemonError as exc:
                if not sys.stdin.isatty():
                    raise
                print(f"lmx: {exc}", file=sys.stderr, flush=True)
                continue
            if answer is not None:  # else stopped before it began: the turn is left out
                messages = [*turn, {"role": "assistant", "content": answer}]
    return 0


def _next_turn() -> str | None:
    """The next line typed (with a prompt on a terminal), None at the end of the input."""
    if sys.stdin.isatty():
        try:
            return input(">>> ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return line.removesuffix("\n") if line else None


def _answer(c: AdminClient, body: dict[str, Any], *, verbose: bool) -> str | None:
    """One answer streamed out as it comes, and its text (None if stopped before its first
    token). A first Ctrl-C stops it at once, waiting or not for the model (the stream closed: the
    daemon cancels the generation, or gives up its place in the queue); a second ends lmx."""
    stop = _Interrupt()
    previous = signal.signal(signal.SIGINT, stop)
    started, text, usage, thinking, began = time.perf_counter(), [], None, False, False
    chunks = c.chat(body)
    try:
        try:
            for chunk in chunks:
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if thought := delta.get("reasoning_content"):
                        began = thinking = True
                        print(thought, end="", file=sys.stderr, flush=True)
                    if piece := delta.get("content"):
                        began = True
                        if thinking:  # the answer begins below its reasoning
                            thinking = False
                            print(file=sys.stderr, flush=True)
                        text.append(piece)
                        print(piece, end="", flush=True)
        finally:  # from here a first Ctrl-C is only noted, so that the stream still closes
            stop.armed = False
    except _Stopped:
        pass
    finally:
        chunks.close()
        signal.signal(signal.SIGINT, previous)
    print(flush=True)
    if verbose and usage:
        seconds = time.perf_counter() - started
        made = usage.get("completion_tokens", 0)
        print(
            f"{usage.get('prompt_tokens', 0)} prompt tokens, {made} tokens in {seconds:.2f} s"
            f" ({made / seconds:.1f} tokens/s)",
            file=sys.stderr,
            flush=True,
        )
    return "".join(text) if began or not stop.asked else None


class _Stopped(Exception):
    """A first Ctrl-C during an answer."""


class _Interrupt:
    """A SIGINT handler: the first stops the answer (raising _Stopped wherever it waits, while
    armed), the second ends the process."""

    def __init__(self) -> None:
        self.asked = False
        self.armed = True

    def __call__(self, _signum: int, _frame: FrameType | None) -> None:
        if self.asked:
            sys.stdout.flush()
            os._exit(130)
        self.asked = True
        if self.armed:
            raise _Stopped


def _pull(args: argparse.Namespace) -> int:
    from lmx.cli_render import console, download_progress
    from lmx.client import download_verdict, watch_download

    model: str = args.model
    with _client(args) as c:
        doc, etag = c.desired()
        spec = ((doc.get("desired") or {}).get("models") or {}).get(model)
        patch: dict[str, Any] = {}
        if spec is None:
            source = args.source or (model if "/" in model else None)
            if source is None:
                print(f"lmx: model {model} is not declared; give its --source", file=sys.stderr)
                return 1
            patch = {"source": source, "want": "downloaded"}
        else:
            if spec.get("want") == "absent":
                patch["want"] = "downloaded"
            if args.source and args.source != spec.get("source"):
                patch["source"] = args.source
        if args.revision and args.revision != (spec or {}).get("revision", "main"):
            patch["revision"] = args.revision
        if not patch and (done := download_verdict(c.status(), model, 0)) and done.ok:
            print(f"{model} is already downloaded.")
            return 0

        def start() -> int:
            if not patch:
                return int(doc.get("generation", 0))
            return int(c.patch({"models": {model: patch}}, if_match=etag or None)["generation"])

        bars = download_progress(console())
        task = bars.add_task(model, total=None)

        def on_progress(ev: dict[str, Any]) -> None:
            total = ev.get("bytes_total") or None
            done, rate, eta = ev.get("bytes_done", 0), ev.get("rate_bps"), ev.get("eta_s")
            bars.update(task, completed=done, total=total, rate_bps=rate, eta_s=eta)
            bars.start()  # at the first progress: a pull that fails before shows no empty bar

        try:
            try:
                verdict = watch_download(c, model, start, on_progress)
                if verdict.ok:
                    bars.update(task, completed=bars.tasks[0].total or 0, eta_s=None)
            finally:
                if bars.live.is_started:  # stopping one never started prints an empty line
                    bars.stop()
        except KeyboardInterrupt:
            print("lmx: stopped watching; the daemon carries on downloading", file=sys.stderr)
            return 130
    if not verdict.ok:
        print(f"lmx: {verdict.message}", file=sys.stderr)
        return 1
    print(verdict.message)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmx", description="Local LLM daemon with declarative models.")
    p.add_argument("--version", action="version", version=f"lmx {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon (OpenAI API on 127.0.0.1:1234)")
    serve.add_argument(
        "--config", type=Path, help="desired-state file (default LMX_HOME/config.yaml)"
    )
    serve.add_argument("--host", help="address to bind (default $LMX_HOST, else 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default $LMX_PORT, else 1234)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=_serve)

    make = sub.add_parser("make-model", help="build a built-in offline model into DIR")
    make.add_argument("dir", type=Path)
    make.add_argument("--name", default="tiny", help="which built-in model (default tiny)")
    make.set_defaults(func=_make_model)
    _admin_commands(sub)
    add_service_commands(sub)
    return p


def _admin_commands(sub: Any) -> None:
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument(
        "--url",
        help="the daemon (default $LMX_URL, else where `lmx serve` listens: http://$LMX_HOST:"
        "$LMX_PORT, a wildcard host by loopback, else http://127.0.0.1:1234)",
    )
    conn.add_argument(
        "--admin-key",
        help="admin key (default $LMX_ADMIN_KEY, else the daemon's: server.admin_key in"
        " LMX_HOME/config.yaml if declared, else LMX_HOME/admin.key)",
    )
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="machine-readable output")
    dry = argparse.ArgumentParser(add_help=False)
    dry.add_argument("--dry-run", action="store_true", help="show the plan; change nothing")

    def add(name: str, func: Any, help_: str, *parents: argparse.ArgumentParser) -> Any:
        cmd = sub.add_parser(name, help=help_, parents=[conn, *parents])
        cmd.set_defaults(func=func)
        return cmd

    add(
        "status",
        _status,
        "models, their state and memory; config validity (exits 3 if the config is invalid"
        " or a model is quarantined)",
        out,
    )
    add("ps", _ps, "loaded models", out)
    add(
        "plan",
        _plan,
        "what the daemon would do now to match the desired state (exits 3 if the config is"
        " invalid: the plan is then for the last valid state)",
        out,
    )
    apply = add("apply", _apply, "replace the desired state with FILE", out, dry)
    apply.add_argument("-f", "--file", type=Path, required=True, help="YAML file, or - for stdin")
    st = add("set", _set, "change one model: lmx set MODEL key=value ...", out, dry)
    st.add_argument("model")
    st.add_argument("assignments", nargs="*", metavar="key=value", help="key=null deletes a key")
    st.add_argument("--delete", action="store_true", help="remove the model from the state")
    add("events", _events, "follow the daemon's events (Ctrl-C stops)", out)
    chat = add("chat", _chat, "talk with MODEL: each line of input a turn, its answer streamed")
    chat.add_argument("model", help="a model's id or alias, as clients name it")
    chat.add_argument("--system", help="the system prompt")
    chat.add_argument(
        "-p",
        "--prompt",
        help="ask this one turn and exit; input that is not a terminal is read to its end and"
        " added below it (cat notes.txt | lmx chat MODEL -p 'Summarize:')",
    )
    chat.add_argument("--max-tokens", type=int, help="the most tokens an answer may take")
    chat.add_argument("--temperature", type=float, help="sampling temperature (0: greedy)")
    chat.add_argument(
        "--verbose", action="store_true", help="each answer's tokens and speed on stderr"
    )
    pull = add("pull", _pull, "download MODEL and show progress")
    pull.add_argument("model")
    pull.add_argument("--source", help="Hub repo (org/name) or local directory for a new model")
    pull.add_argument("--revision", help="branch, tag or commit to pin")


def main(argv: Sequence[str] | None = None) -> int:
    # huggingface_hub reads its environment once, at import: no telemetry or agent probes.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except LmxError as exc:
        from lmx.client import DaemonError, Invalid, InvalidUrl

        if isinstance(exc, InvalidUrl):
            print(f"lmx: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, Invalid):
            for problem in exc.problems:
                print(f"lmx: invalid: {problem}", file=sys.stderr)
            print("lmx: nothing was changed", file=sys.stderr)
        elif isinstance(exc, DaemonError):
            print(f"lmx: {exc}", file=sys.stderr)
        else:
            raise
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
