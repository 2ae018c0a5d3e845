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
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark, YAMLError
from ruamel.yaml.tokens import CommentToken

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
    """RFC 7396: objects merge recursively, `null` deletes, anything else replaces. In place.
    A list replacing one is written as it was (`aliases: [a, b]` stays on its line); a key added
    after the last one goes ahead of the comments that close the mapping's text from outside it
    (see _move_outer_comments)."""
    if not isinstance(patch, Mapping):
        if not isinstance(patch, list):
            return patch
        seq = CommentedSeq(patch)
        if isinstance(target, CommentedSeq) and target.fa.flow_style():
            seq.fa.set_flow_style()
        return seq
    if not isinstance(target, dict):
        target = CommentedMap()
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif key in target:
            target[key] = merge_patch(target[key], value)
        else:
            ended = _last_line(target)
            target[key] = merge_patch(None, value)
            ends = _last_line(target)
            if ended is not None and ends is not None:
                _move_outer_comments(target, ended, ends)
    return target


def _after(node: CommentedMap | CommentedSeq) -> int:
    """Where in an item's comments (`node.ca.items`) the comment after it goes: in a mapping's,
    after its value; in a list's, first."""
    return 2 if isinstance(node, CommentedMap) else 0


def _last_line(node: Any) -> tuple[CommentedMap | CommentedSeq, Any] | None:
    """The item on the last line of `node`'s text, and the mapping or list it is in: its last
    item, or within that item's value the last item of the last mapping or list. None where the
    text ends otherwise (an empty one, a list's mapping that is no round-trip one)."""
    if not isinstance(node, CommentedMap | CommentedSeq) or not node:
        return None
    at = next(reversed(node)) if isinstance(node, CommentedMap) else len(node) - 1
    value = node[at]
    if isinstance(value, CommentedMap | CommentedSeq) and value:
        return _last_line(value)
    return None if isinstance(value, dict | list) else (node, at)


def _move_outer_comments(
    mapping: CommentedMap,
    ended: tuple[CommentedMap | CommentedSeq, Any],
    ends: tuple[CommentedMap | CommentedSeq, Any],
) -> None:
    """Moves the comment lines that close `mapping`'s text from outside it from after the line it
    `ended` with, before a key was added, to after the line it `ends` with now.

    ruamel keeps every comment line up to the next key with the line before them: a file's closing
    comments (a commented-out example model) go with its last value, and a key added after that
    value would be written after them, seemingly part of them. Those written left of the mapping's
    keys (with the blank lines before them) are outside it."""
    node, at = ended
    token = (node.ca.items.get(at) or [None] * 3)[_after(node)]
    first = (mapping.lc.data or {}).get(next(iter(mapping))) if token is not None else None
    if first is None:  # no comment, or a mapping the file did not have
        return
    column = first[1]  # of the mapping's keys, as the file writes them
    text: str = token.value
    cut = text.find("\n") + 1  # the end of its line: an end-of-line comment stays on the line
    lines = text[cut:].splitlines(keepends=True) if cut else []
    left = [i for i, ln in enumerate(lines) if ln.strip() and len(ln) - len(ln.lstrip()) < column]
    if not left:
        return
    start = left[0]
    while start and not lines[start - 1].strip():
        start -= 1
    token.value = text[:cut] + "".join(lines[:start])
    node, at = ends
    slots: list[Any] = [None] * 4
    slots[_after(node)] = CommentToken("\n" + "".join(lines[start:]), CommentMark(0))
    node.ca.items[at] = slots


def dump_tree(tree: CommentedMap) -> str:
    buf = io.StringIO()
    _yaml().dump(tree, buf)
    return buf.getvalue()
