"""Streaming output parsers: a model's generated text → content, reasoning and tool-call pieces.

One `OutputParser` per sequence, fed decoded chunks split anywhere, even mid-tag. It holds back
only what could still become a tag, so a plain answer streams chunk by chunk. Pure: no mlx, no
I/O; the API layer builds one with `make_parser` and the engine picks formats with `detect_*`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Protocol, TypeAlias

from lmx.runtime.toolcalls import (
    GLM_ARG_KEY,
    HERMES_CLOSE,
    HERMES_OPEN,
    MISTRAL_ARGS,
    MISTRAL_CALL_ID,
    MISTRAL_OPEN,
    PYTHON_TAG,
    XML_FUNCTION,
    Functions,
    Scanned,
    ToolCall,
    llama3_may_call,
    mistral_call_id,
    new_call_id,
    normalize_arguments,
    parse_llama3,
    salvage,
    scan_glm,
    scan_hermes,
    scan_mistral,
    scan_qwen3_coder,
)

__all__ = [
    "CALL_OPENERS",
    "HARMONY",
    "HARMONY_FINAL",
    "HARMONY_MARKUP",
    "H_CALL",
    "H_RETURN",
    "TOOL_PARSERS",
    "Content",
    "Functions",
    "OutputParser",
    "Piece",
    "Reasoning",
    "ToolCall",
    "detect_reasoning",
    "detect_tool_parser",
    "make_parser",
]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_THINK_TAGS = (THINK_OPEN, THINK_CLOSE)
# gpt-oss's harmony format: messages `<|start|>{header}<|message|>{body}`, each ended by `<|end|>`,
# or by `<|call|>` or `<|return|>`, which end the output. The header names the message's channel
# (`<|channel|>analysis`: reasoning; `final`: the answer; `commentary`: a function call when it is
# addressed `to=functions.NAME`, else words for the user).
H_START, H_CHANNEL, H_MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
H_END, H_CALL, H_RETURN, H_CONSTRAIN = "<|end|>", "<|call|>", "<|return|>", "<|constrain|>"
_H_ENDS = (H_END, H_CALL, H_RETURN)
HARMONY_FINAL = H_CHANNEL + "final" + H_MESSAGE  # a prompt's end that opens the answer
_H_RECIPIENT = re.compile(r"to=functions\.([\w.\-]+)")
_H_CHANNEL = re.compile(re.escape(H_CHANNEL) + r"\s*(\w+)")
# The markup these parsers read: it stays in a sequence's text even where the tokenizer counts
# its token as special (lmx.runtime.mlx_tokenizer leaves the other special tokens out).
MARKUP = frozenset(
    {
        HERMES_OPEN,
        HERMES_CLOSE,
        MISTRAL_OPEN,
        MISTRAL_ARGS,
        MISTRAL_CALL_ID,
        PYTHON_TAG,
        *_THINK_TAGS,
    }
)
# Harmony's markup stays only in a harmony model's text: `<|end|>` is also Phi-3's end of a turn.
HARMONY_MARKUP = frozenset({H_START, H_CHANNEL, H_MESSAGE, H_CONSTRAIN, *_H_ENDS})


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class Reasoning:
    text: str


Piece: TypeAlias = Content | Reasoning | ToolCall


class ToolStage(Protocol):
    """Splits the content stream (reasoning already removed) into content and tool calls."""

    def feed(self, text: str) -> list[Piece]: ...
    def finish(self) -> list[Piece]: ...


class OutputParser:
    """Pieces of one sequence's output, in order. Feed chunks, then call `finish` once."""

    def __init__(
        self,
        *,
        reasoning: _ThinkSplitter | None,
        tools: ToolStage | None,
        channels: _Harmony | None = None,
    ) -> None:
        self._think, self._tools, self._channels = reasoning, tools, channels

    def feed(self, text: str) -> list[Piece]:
        return self._run(text, final=False)

    def finish(self) -> list[Piece]:
        """Flush held text; an unterminated tool call that decodes is still a call, one cut off
        once its name was written a call with its arguments as far as they got, else content."""
        return self._run("", final=True)

    def _run(self, text: str, final: bool) -> list[Piece]:
        if self._channels is not None:
            return _merged(self._channels.run(text, final))
        first = self._think.split(text, final) if self._think else [Content(text)]
        out: list[Piece] = []
        for piece in first:
            if isinstance(piece, Content) and self._tools:
                out += self._tools.feed(piece.text)
            else:
                out.append(piece)
        if final and self._tools:
            out += self._tools.finish()
        return _merged(out)


class _ThinkSplitter:
    """`<think>…</think>` → Reasoning; tags dropped, and the whitespace that follows `</think>`.
    Reasoning comes before the answer: once the answer has begun, the tags are its text (a JSON
    string holding `<think>`, say)."""

    def __init__(self, inside: bool) -> None:
        self._inside, self._held, self._strip, self._answering = inside, "", False, False

    def split(self, text: str, final: bool) -> list[Piece]:
        buf, out = self._held + text, list[Piece]()
        while not self._answering and (hit := _first(buf, _THINK_TAGS))[0] >= 0:
            self._emit(out, buf[: hit[0]])
            buf = buf[hit[0] :]
            if self._answering:
                break  # the tag is the answer's text
            buf = buf[len(hit[1]) :]
            # A second `<think>` (the prompt already opened one) or a stray `</think>` is dropped too.
            self._inside = hit[1] == THINK_OPEN
            self._strip = self._strip or not self._inside
        keep = 0 if final or self._answering else _partial(buf, _THINK_TAGS)
        self._emit(out, buf[: len(buf) - keep])
        self._held = buf[len(buf) - keep :]
        return out

    def _emit(self, out: list[Piece], text: str) -> None:
        if self._inside:
            out += [Reasoning(text)] if text else []
            return
        text = text.lstrip() if self._strip else text
        if text:
            self._strip = False
            self._answering = self._answering or not text.isspace()
            out.append(Content(text))


class _Harmony:
    """Harmony's messages (see H_START) → reasoning, content and calls; the markup dropped. A
    message addressed to a function is a call if tools are on, else its body is content."""

    def __init__(self, tools_enabled: bool) -> None:
        self._tools = tools_enabled
        self._buf, self._in_body = "", False
        self._kind, self._name, self._args = "content", "", ""

    def run(self, text: str, final: bool) -> list[Piece]:
        self._buf += text
        out: list[Piece] = []
        while True:
            if not self._in_body:
                at = self._buf.find(H_MESSAGE)
                if at < 0:
                    if final and "<|" not in self._buf:  # no harmony at all: plain text
                        out.append(Content(self._buf))
                    break
                self._opened(self._buf[:at])
                self._buf, self._in_body = self._buf[at + len(H_MESSAGE) :], True
                continue
            at, tag = _first(self._buf, _H_ENDS)
            if at < 0:
                keep = 0 if final else _partial(self._buf, _H_ENDS)
                out += self._body(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                if final:
                    out += self._closed()
                break
            out += self._body(self._buf[:at]) + self._closed()
            self._buf, self._in_body = self._buf[at + len(tag) :], False
        return out

    def _opened(self, header: str) -> None:
        recipient = _H_RECIPIENT.search(header)
        channel = _H_CHANNEL.search(header)
        if recipient is not None and self._tools:
            self._kind, self._name, self._args = "call", recipient.group(1), ""
        else:
            analysis = channel is not None and channel.group(1) == "analysis"
            self._kind = "reasoning" if analysis else "content"

    def _body(self, text: str) -> list[Piece]:
        if self._kind == "call":
            self._args += text
            return []
        return [Reasoning(text) if self._kind == "reasoning" else Content(text)]

    def _closed(self) -> list[Piece]:
        if self._kind != "call":
            return []
        self._kind, args = "content", self._args.strip()
        return [ToolCall(new_call_id(), self._name, normalize_arguments(args) or args)]


class _TaggedTools:
    """Tool calls that open with a marker (`<tool_call>`, `[TOOL_CALLS]`); a scanner finds the end.

    Whitespace next to a call is formatting and dropped, so trailing whitespace is held back until
    the next non-space arrives; a malformed call comes back as raw content, that whitespace included.
    """

    def __init__(
        self,
        opener: str,
        scan: Callable[[str, bool], Scanned | None],
        new_id: Callable[[], str] = new_call_id,
    ) -> None:
        self._opener, self._scan, self._new_id = opener, scan, new_id
        self._buf, self._in_call, self._gap, self._after_call = "", False, "", False

    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        return self._run(final=False)

    def finish(self) -> list[Piece]:
        return self._run(final=True)

    def _run(self, final: bool) -> list[Piece]:
        out: list[Piece] = []
        while self._buf or (final and self._in_call):
            if self._in_call:
                if (got := self._scan(self._buf, final)) is None:
                    break
                calls, end = got
                if not calls and final and self._scan(self._buf, False) is None:
                    # Cut off by the end of the output (max_tokens): the call it was writing,
                    # as far as it got, rather than its markup as content.
                    calls = salvage(self._buf, self._new_id)
                if calls:
                    out += calls
                    self._after_call = True
                else:
                    self._emit(out, self._gap + self._opener + self._buf[:end])
                self._buf, self._in_call, self._gap = self._buf[end:], False, ""
                continue
            at = self._buf.find(self._opener)
            if at < 0:
                keep = 0 if final else _partial(self._buf, (self._opener,), hold_space=True)
                self._emit(out, self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                break
            before = self._buf[:at]
            self._emit(out, before.rstrip())
            self._gap = before[len(before.rstrip()) :]
            self._buf, self._in_call = self._buf[at + len(self._opener) :], True
        return out

    def _emit(self, out: list[Piece], text: str) -> None:
        text = text.lstrip() if self._after_call else text
        if text:
            self._after_call = False
            out.append(Content(text))


class _Llama3Tools:
    """Bare-JSON calls (Llama 3.x): held only while the output may still be one, parsed at finish.
    With `functions`, a call of any other function is an ordinary JSON answer (the format has no
    marker that tells the two apart)."""

    def __init__(self, functions: Functions = None) -> None:
        self._names = functions
        self._held, self._passing = "", False

    def feed(self, text: str) -> list[Piece]:
        if self._passing:
            return [Content(text)] if text else []
        self._held += text
        head = self._held.lstrip()
        if not head or llama3_may_call(head):
            return []
        self._passing, held, self._held = True, self._held, ""
        return [Content(held)]

    def finish(self) -> list[Piece]:
        held, self._held = self._held, ""
        calls = parse_llama3(held) if held else None
        if calls and self._names is not None and any(c.name not in self._names for c in calls):
            calls = None
        return [*calls] if calls else [Content(held)] if held else []


# Each takes the request's functions.
TOOL_PARSERS: Mapping[str, Callable[[Functions], ToolStage]] = MappingProxyType(
    {
        "hermes": lambda _fns: _TaggedTools(HERMES_OPEN, scan_hermes),
        "llama3": _Llama3Tools,
        "mistral": lambda _fns: _TaggedTools(MISTRAL_OPEN, scan_mistral, mistral_call_id),
        "qwen3_coder": lambda fns: _TaggedTools(
            HERMES_OPEN, partial(scan_qwen3_coder, functions=fns)
        ),
        "glm": lambda fns: _TaggedTools(HERMES_OPEN, partial(scan_glm, functions=fns)),
    }
)
# The marker that opens every call of a format (Llama 3's bare JSON calls have none): a model that
# cannot write it cannot call a tool.
CALL_OPENERS: Mapping[str, str] = MappingProxyType(
    {"hermes": HERMES_OPEN, "mistral": MISTRAL_OPEN, "qwen3_coder": HERMES_OPEN, "glm": HERMES_OPEN}
)
# Most specific first: a Hermes fine-tune of Llama 3.1 keeps `<|python_tag|>` in its vocab.
_TOOL_MARKERS = (("hermes", HERMES_OPEN), ("mistral", MISTRAL_OPEN), ("llama3", PYTHON_TAG))


# The format of gpt-oss, whose messages carry its reasoning, answer and calls (see H_START): a
# parser of its own, not a tool stage.
HARMONY = "harmony"


def detect_tool_parser(chat_template: str | None, vocab: Collection[str]) -> str | None:
    """The TOOL_PARSERS key for a model, from its chat template first, then its vocabulary;
    HARMONY for a vocabulary with harmony's markup."""
    if _harmony(vocab):
        return HARMONY
    template = chat_template or ""
    if HERMES_OPEN in template:  # XML inside <tool_call>: Qwen3-Coder's, GLM's
        for name, marker in (("qwen3_coder", XML_FUNCTION), ("glm", GLM_ARG_KEY)):
            if marker in template:
                return name
    for name, marker in _TOOL_MARKERS:
        if marker in template:
            return name
    if "ipython" in template and "parameters" in template:  # Llama 3.2/3.3 JSON tool calling
        return "llama3"
    return next((name for name, marker in _TOOL_MARKERS if marker in vocab), None)


def detect_reasoning(chat_template: str | None, vocab: Collection[str]) -> bool:
    """Whether the model writes `<think>…</think>`, or harmony's analysis channel."""
    if _harmony(vocab):
        return True
    return any(tag in (chat_template or "") or tag in vocab for tag in _THINK_TAGS)


def _harmony(vocab: Collection[str]) -> bool:
    return H_CHANNEL in vocab and H_MESSAGE in vocab


def make_parser(
    *,
    tool_parser: str | None,
    tools_enabled: bool,
    reasoning: bool,
    starts_in_reasoning: bool = False,
    functions: Functions = None,
) -> OutputParser:
    """A parser for one sequence. `starts_in_reasoning`: the prompt already opened `<think>`;
    `functions`: those the request declared.

    Raises ValueError for a `tool_parser` that is not a TOOL_PARSERS key.
    """
    if tool_parser is not None and tool_parser not in (*TOOL_PARSERS, HARMONY):
        known = ", ".join(sorted((*TOOL_PARSERS, HARMONY)))
        raise ValueError(f"unknown tool parser {tool_parser!r}; known: {known}")
    if tool_parser == HARMONY:
        return OutputParser(reasoning=None, tools=None, channels=_Harmony(tools_enabled))
    tools = TOOL_PARSERS[tool_parser](functions) if tools_enabled and tool_parser else None
    return OutputParser(
        reasoning=_ThinkSplitter(starts_in_reasoning) if reasoning else None, tools=tools
    )


def _first(buf: str, tags: tuple[str, ...]) -> tuple[int, str]:
    """The earliest tag in `buf` and where it starts; (-1, "") if none."""
    hits = [(i, tag) for tag in tags if (i := buf.find(tag)) >= 0]
    return min(hits) if hits else (-1, "")


def _partial(buf: str, tags: tuple[str, ...], *, hold_space: bool = False) -> int:
    """Length of the suffix of `buf` to hold back: the longest that is a proper prefix of a tag,
    and with `hold_space` the whitespace before it too."""
    n = 0
    for k in range(min(len(buf), max(map(len, tags)) - 1), 0, -1):
        if any(t.startswith(buf[-k:]) for t in tags):
            n = k
            break
    if hold_space:
        n = len(buf) - len(buf[: len(buf) - n].rstrip())
    return n


def _merged(pieces: list[Piece]) -> list[Piece]:
    """Adjacent content (or reasoning) joined into one piece; empty ones dropped."""
    out: list[Piece] = []
    for p in pieces:
        if isinstance(p, Content | Reasoning) and not p.text:
            continue
        last = out[-1] if out else None
        if isinstance(p, Content) and isinstance(last, Content):
            out[-1] = Content(last.text + p.text)
        elif isinstance(p, Reasoning) and isinstance(last, Reasoning):
            out[-1] = Reasoning(last.text + p.text)
        else:
            out.append(p)
    return out
