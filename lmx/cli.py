"""The `lmx` command: `serve` runs the daemon; the other commands talk to a running daemon.

Parses flags into explicit values (Settings, paths) and hands them on; no command reads another's
flags. Exit status: 0 on success, 1 on a runtime failure, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lmx import __version__
from lmx.settings import Settings


def _serve(args: argparse.Namespace) -> int:
    from lmx.daemon import run
    from lmx.logs import configure

    configure(args.log_level)
    return run(Settings.from_env(config=args.config, host=args.host, port=args.port))


def _make_model(args: argparse.Namespace) -> int:
    from lmx.runtime.builtin import build_model

    path = build_model(args.name, args.dir)
    print(path)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmx", description="Local LLM daemon with declarative models.")
    p.add_argument("--version", action="version", version=f"lmx {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon (OpenAI API on 127.0.0.1:1234)")
    serve.add_argument(
        "--config", type=Path, help="desired-state file (default LMX_HOME/config.yaml)"
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 1234)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=_serve)

    make = sub.add_parser("make-model", help="build a built-in offline model into DIR")
    make.add_argument("dir", type=Path)
    make.add_argument("--name", default="tiny", help="which built-in model (default tiny)")
    make.set_defaults(func=_make_model)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # huggingface_hub reads its environment once, at import: no telemetry or agent probes.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
