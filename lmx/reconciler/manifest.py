"""Reading the desired state from YAML, with errors that name the field path and the line.

Called by the CLI and the reconcile loop. Reading and validating only: writing the user's file
back (keeping comments) belongs to the admin PATCH path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lmx.errors import ConfigError
from lmx.reconciler.spec import DesiredState


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the YAML node at `loc`, or of its nearest existing parent."""
    line = None if node is None else node.start_mark.line + 1
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def _path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-")) or "(root)"


def validate(
    data: Any, *, source: str = "desired state", node: yaml.Node | None = None
) -> DesiredState:
    """Validate a plain mapping. Raises ConfigError with one line per problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(root): expected a mapping, got {type(data).__name__}"])
    try:
        return DesiredState.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not str(p).startswith(("function-", "int", "str")))
            msg = err["msg"].removeprefix("Value error, ")
            line = _line_of(node, loc)
            where = f" (line {line})" if line is not None else ""
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            if not loc and msg.startswith("models."):
                # Cross-field checks name their own path: "models.a.aliases.0: ...".
                path, _, msg = msg.partition(": ")
                loc = tuple(int(p) if p.isdigit() else p for p in path.split("."))
                line = _line_of(node, loc)
                where = f" (line {line})" if line is not None else ""
            lines.append(f"{_path(loc)}{where}: {msg}")
        raise ConfigError(source, lines) from None


def parse(text: str, *, source: str = "config.yaml") -> DesiredState:
    """Parse YAML text into a DesiredState. Raises ConfigError naming the line on bad YAML."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(root)"
        raise ConfigError(
            source, [f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}"]
        ) from None
    return validate(data, source=source, node=node)


def load(path: Path) -> DesiredState:
    """Read and validate `path`. Raises ConfigError (also for an unreadable file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    return parse(text, source=str(path))
