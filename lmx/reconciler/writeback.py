"""Writing an accepted change back to the user's config.yaml: merge patch, comments kept, atomic.

Called by the reconciler's PATCH path. RFC 7396 merge patches are applied to ruamel's round-trip
tree so untouched keys keep their comments and order. Writes go to a temp file in the same
directory, are fsynced, then renamed over the file: a crash leaves the old or the new file whole.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError

from lmx.errors import ConfigError


def etag_of(text: str) -> str:
    """The strong ETag of a config file's content."""
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:32] + '"'


def _yaml() -> YAML:
    y = YAML()
    y.preserve_quotes = True
    y.width = 100
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def load_tree(text: str, source: str = "config.yaml") -> CommentedMap:
    """The round-trip tree of `text` (an empty mapping for an empty file)."""
    try:
        tree = _yaml().load(text)
    except YAMLError as exc:
        raise ConfigError(source, [f"(root): invalid YAML: {exc}"]) from None
    if tree is None:
        return CommentedMap()
    if not isinstance(tree, CommentedMap):
        raise ConfigError(source, ["(root): expected a mapping"])
    return tree


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396: objects merge recursively, `null` deletes, anything else replaces. In place."""
    if not isinstance(patch, Mapping):
        return patch
    if not isinstance(target, dict):
        target = CommentedMap()
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = merge_patch(target.get(key), value)
    return target


def to_plain(tree: Any) -> Any:
    """The tree as plain dicts and lists (what validation and JSON see)."""
    if isinstance(tree, Mapping):
        return {str(k): to_plain(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [to_plain(v) for v in tree]
    return tree


def dump_tree(tree: CommentedMap) -> str:
    buf = io.StringIO()
    _yaml().dump(tree, buf)
    return buf.getvalue()


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text`: temp file, fsync, rename, fsync the directory. Keeps the mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
