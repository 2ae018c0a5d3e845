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
    (see _move_outer_comments); a key deleted takes its own comments, not the next key's (see
    _delete)."""
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
            if key in target:
                _delete(target, key)
        elif key in target:
            target[key] = merge_patch(target[key], value)
            if isinstance(target[key], CommentedMap) and not target[key]:
                _write_empty(target, key)
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
    """The item on the last line of `node`'s text, and the mapping or list it is in (see
    _end_of). None for an empty one."""
    if not isinstance(node, CommentedMap | CommentedSeq) or not node:
        return None
    return _end_of(node, next(reversed(node)) if isinstance(node, CommentedMap) else len(node) - 1)


def _end_of(
    node: CommentedMap | CommentedSeq, at: Any
) -> tuple[CommentedMap | CommentedSeq, Any] | None:
    """The item on the last line of the text of `node[at]`: that item (a scalar, an empty `{}` or
    `[]`), or within its value the last item of the last mapping or list. None where the text
    ends otherwise (a list's mapping that is no round-trip one)."""
    value = node[at]
    if isinstance(value, CommentedMap | CommentedSeq):
        return _last_line(value) if value else (node, at)
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
    token = _token_after(ended)
    first = (mapping.lc.data or {}).get(next(iter(mapping))) if token is not None else None
    if token is None or first is None:  # no comment, or a mapping the file did not have
        return
    head, lines = _split(token.value)
    start = _outer_start(lines, first[1])  # left of the mapping's keys, as the file writes them
    if start == len(lines):
        return
    token.value = head + "".join(lines[:start])
    _set_after(ends, "".join(lines[start:]))


def _delete(mapping: CommentedMap, key: Any) -> None:
    """Deletes `key` with its comments: the block of comment lines right above it (no blank line
    or deeper line between them and it) and those after its text that are deeper than it.

    ruamel keeps the comment lines before a key with the line before them: those after the
    deleted key's text that are no deeper (the next key's, or what closes the mapping) stay, above
    the next key or after the previous one's text; an emptied mapping keeps them above its first
    key for _write_empty."""
    if key not in mapping.lc.data:  # merged in from an anchor (`<<: *x`): not written here
        mapping.pop(key)
        return
    keys = list(mapping)
    at = keys.index(key)
    last = at == len(keys) - 1
    column = mapping.lc.data[key][1]
    own = _end_of(mapping, key)
    token = _token_after(own) if own else None
    lines = _split(token.value)[1] if token else []
    kept = lines[_outer_start(lines, column + 1) :]
    del mapping[key]
    # The lines above it: after the previous entry's text, or above the mapping's first key.
    if at:
        prev = _end_of(mapping, keys[at - 1])
        if prev is None:
            return  # the previous entry ends where no comment can follow it (see _end_of)
        token = _token_after(prev)
        head, above = _split(token.value) if token else ("", [])
        above, kept = _cut_block(above, kept, column, first=False)
        text = "".join(above + kept if last else above)
        if token is not None:
            token.value = head + text
        elif text:
            _set_after(prev, text)
    else:
        pre = _pre_comments(mapping)
        above = _text_of(pre).splitlines(keepends=True)
        above, kept = _cut_block(above, kept, column, first=True)
        text = "".join(above + kept if last else above)
        pre[:] = [CommentToken(text, CommentMark(0))] if text else []
    if kept and not last:
        slots = mapping.ca.items.setdefault(keys[at + 1], [None] * 4)
        slots[1] = [CommentToken("".join(kept), CommentMark(0)), *(slots[1] or [])]


def _write_empty(parent: CommentedMap, key: Any) -> None:
    """Writes the mapping `parent[key]`, emptied by a patch, as `{}` on its key's line, with the
    comment lines that were above its first key after that line: left above it, they would put
    the `{}` on a line of its own, left of them, which is no YAML."""
    mapping = parent[key]
    mapping.fa.set_flow_style()
    pre = _pre_comments(mapping)
    text = _text_of(pre)
    pre[:] = []
    if not text:
        return
    slots = parent.ca.items.setdefault(key, [None] * 4)
    if slots[2] is None:  # no end-of-line comment
        slots[2] = CommentToken("\n" + text, CommentMark(0))
    else:
        slots[2].value += text


def _token_after(end: tuple[CommentedMap | CommentedSeq, Any]) -> CommentToken | None:
    """The comment token after the line that `end` (see _end_of) is on: its end-of-line comment
    and the comment lines after it."""
    node, at = end
    token: CommentToken | None = (node.ca.items.get(at) or [None] * 3)[_after(node)]
    return token


def _set_after(end: tuple[CommentedMap | CommentedSeq, Any], lines: str) -> None:
    """Puts comment `lines` after the line that `end` is on, which has no comment."""
    node, at = end
    slots = node.ca.items.setdefault(at, [None] * 4)
    slots[_after(node)] = CommentToken("\n" + lines, CommentMark(0))


def _pre_comments(mapping: CommentedMap) -> list[CommentToken]:
    """The comment lines above `mapping`'s first key, as a list ruamel writes (made if none).
    For a mapping that is a key's value, the list the key's comments hold too."""
    if mapping.ca.comment is None:
        mapping.ca.comment = [None, None]
    if mapping.ca.comment[1] is None:
        mapping.ca.comment[1] = []
    pre: list[CommentToken] = mapping.ca.comment[1]
    return pre


def _text_of(tokens: list[CommentToken]) -> str:
    """The lines of comment tokens above a key, each at its column, as ruamel writes them."""
    return "".join(
        t.value if t.value.startswith("\n") else " " * t.column + t.value for t in tokens
    )


def _split(text: str) -> tuple[str, list[str]]:
    """A comment token's text after a line: the rest of that line (an end-of-line comment), and
    the lines after it."""
    cut = text.find("\n") + 1 or len(text)
    return text[:cut], text[cut:].splitlines(keepends=True)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _outer_start(lines: list[str], column: int) -> int:
    """Where, among the comment lines after an item's text, those left of `column` begin, with
    the blank lines before them; len(lines) if none is."""
    for i, line in enumerate(lines):
        if line.strip() and _indent(line) < column:
            while i and not lines[i - 1].strip():
                i -= 1
            return i
    return len(lines)


def _cut_block(
    above: list[str], kept: list[str], column: int, *, first: bool
) -> tuple[list[str], list[str]]:
    """The comment lines `above` a deleted key at `column` without its block (those right above
    it: no blank line between them, none deeper than the key), and the lines `kept` from after
    it, with one blank gap between them: the one above it if it had one (or if it was `first`)."""
    start = len(above)
    while start and above[start - 1].strip() and _indent(above[start - 1]) <= column:
        start -= 1
    gap = not above[start - 1].strip() if start else first
    while gap and kept and not kept[0].strip():
        kept = kept[1:]
    return above[:start], kept


def dump_tree(tree: CommentedMap) -> str:
    buf = io.StringIO()
    _yaml().dump(tree, buf)
    return buf.getvalue()
