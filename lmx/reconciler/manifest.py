"""Reading the desired state from YAML, with errors that name the field path and the line.

Called by the CLI and the reconcile loop. Reading and validating only: writing the user's file
back (keeping comments) belongs to the admin PATCH path.
"""

from __future__ import annotations

import math
from datetime import date
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lmx.errors import ConfigError
from lmx.reconciler.spec import DesiredState

EMPTY = "(root): the file is empty (or only comments); write `models: {}` to declare no models"


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


def _line_at(node: yaml.Node | None, dotted: str) -> int | None:
    """Like `_line_of` for a dotted path whose keys may hold dots themselves (model ids do)."""
    line = None if node is None else node.start_mark.line + 1
    rest = dotted
    while rest and node is not None:
        head: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            keys = [(k.value, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)]
            fits = [(k, v) for k, v in keys if rest == k or rest.startswith(k + ".")]
            if fits:
                key, head = max(fits, key=lambda kv: len(kv[0]))
                rest = rest[len(key) + 1 :]
        elif isinstance(node, yaml.SequenceNode):
            index, _, tail = rest.partition(".")
            if index.isdigit() and int(index) < len(node.value):
                head, rest = node.value[int(index)], tail
        if head is None:
            break
        node, line = head, head.start_mark.line + 1
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


def _compose(text: str, source: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(root)"
        raise ConfigError(
            source, [f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}"]
        ) from None


def _duplicates(node: yaml.Node, path: tuple[int | str, ...], seen: set[int]) -> list[str]:
    """One line per key that appears twice in the same mapping, anywhere under `node`."""
    if id(node) in seen:  # an alias: already walked
        return []
    seen.add(id(node))
    out: list[str] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                line = k.start_mark.line + 1
                if k.value in first:
                    out.append(
                        f"{_path((*path, k.value))} (line {line}): duplicate key (first at line"
                        f" {first[k.value]}); each key may appear once"
                    )
                first.setdefault(k.value, line)
                out += _duplicates(v, (*path, k.value), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out += _duplicates(item, (*path, i), seen)
    return out


def check_text(text: str, *, source: str = "config.yaml") -> yaml.Node | None:
    """The YAML node tree of `text`, or None for a file with no content. Raises ConfigError on
    bad YAML and on a key given twice in one mapping (PyYAML and ruamel would silently keep the
    last, or fail with their own wording), naming the key path and the line."""
    node = _compose(text, source)
    if node is not None and (dups := _duplicates(node, (), set())):
        raise ConfigError(source, dups)
    return node


def is_empty(node: yaml.Node | None) -> bool:
    """Nothing declared at all: no document, or a null one (`---`, `~`). `{}` is not empty."""
    return node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"))


def shown(text: str) -> dict[str, Any]:
    """The data of text that check_text accepted, as the daemon reads it (YAML 1.1: `yes` is
    true) and in JSON's terms, for showing: keys as strings, dates and times in ISO 8601, and
    .inf and .nan as YAML writes them. A document that is not a mapping shows as {}."""
    data = yaml.safe_load(text)
    return _json_value(data) if isinstance(data, dict) else {}


def _json_value(value: Any) -> Any:
    match value:
        case dict():
            return {str(k): _json_value(v) for k, v in value.items()}
        case list():
            return [_json_value(v) for v in value]
        case float() if not math.isfinite(value):
            return ".nan" if math.isnan(value) else ".inf" if value > 0 else "-.inf"
        case date():  # datetime too
            return value.isoformat()
        case None | bool() | int() | float() | str():
            return value
        case _:  # !!binary, !!set: the text of the value
            return str(value)


def parse(text: str, *, source: str = "config.yaml") -> DesiredState:
    """Parse YAML text into a DesiredState. Raises ConfigError naming the line on bad YAML, on a
    duplicate key, and for a file with no content at all (an editor's truncate-then-write seen
    half way must not unload every model: "no models" is written `models: {}`)."""
    node = check_text(text, source=source)
    if is_empty(node):
        raise ConfigError(source, [EMPTY])
    return validate(yaml.safe_load(text), source=source, node=node)


def locate(errors: list[str], text: str) -> list[str]:
    """Errors of the form "a.b: message" (from checks beyond the schema, e.g. the budget) with
    the line of `a.b` in `text` added, as schema errors have it."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return errors
    out = []
    for err in errors:
        path, sep, msg = err.partition(": ")
        if not sep or " " in path or path == "(root)":
            out.append(err)
            continue
        line = _line_at(node, path)
        out.append(f"{path} (line {line}): {msg}" if line is not None else err)
    return out


def read_text(path: Path) -> str:
    """The file's text. Raises ConfigError for an unreadable file."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), ["cannot read: not UTF-8 text"]) from None


def load(path: Path) -> DesiredState:
    """Read and validate `path`. Raises ConfigError (also for an unreadable file)."""
    return parse(read_text(path), source=str(path))
