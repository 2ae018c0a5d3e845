"""Writing an accepted change back to the user's config.yaml: merge patch, comments kept.

Called by the reconciler's PATCH path. RFC 7396 merge patches are applied to ruamel's round-trip
tree so untouched keys keep their comments and order. The file itself is replaced with
`lmx.runtime.files.write_atomic`.
"""

from __future__ import annotations

import hashlib
import hmac
import io
from collections.abc import Mapping
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError

from lmx.errors import ConfigError
from lmx.reconciler import manifest


def etag_of(text: str, key: bytes) -> str:
    """The strong ETag of a config file's content, keyed: a plain hash of a file holding secrets
    would let anyone who can read the ETag test a guess of them (the rest of the file is shown)."""
    return '"' + hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:32] + '"'


def _yaml() -> YAML:
    y = YAML()
    y.preserve_quotes = True
    y.width = 100
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def load_tree(text: str, source: str = "config.yaml") -> CommentedMap:
    """The round-trip tree of `text` (an empty mapping for an empty file). Raises ConfigError
    for bad YAML or a duplicate key, worded as when the daemon reads the file (line, key path)."""
    manifest.check_text(text, source=source)
    return load_checked_tree(text, source)


def load_checked_tree(text: str, source: str = "config.yaml") -> CommentedMap:
    """`load_tree` for text that `manifest.check_text` (or `manifest.parse`) has accepted: its
    duplicate keys are not looked for again. Raises ConfigError for what only ruamel refuses."""
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


def dump_tree(tree: CommentedMap) -> str:
    buf = io.StringIO()
    _yaml().dump(tree, buf)
    return buf.getvalue()
