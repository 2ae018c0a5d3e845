"""Streaming output parsers: a model's generated text → content, reasoning and tool-call pieces.

One `OutputParser` per sequence, fed decoded chunks split anywhere, even mid-tag. It holds back
only what could still become a tag, so a plain answer streams chunk by chunk. So does a tool call
where its format names the function before its arguments (Hermes', Mistral's and harmony's JSON,
Qwen3-Coder's and GLM's XML; not Llama 3's bare JSON, a call only once it is whole): `CallOpened`
once the name is written, `CallArguments` as the arguments are, the `ToolCall` that ends it; a
call of another form comes whole, as a `ToolCall` alone. Pure: no mlx, no I/O; the API layer
builds one with `make_parser` and the engine picks formats with `detect_*`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
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
    always_text,
    llama3_may_call,
    mistral_call_id,
    new_call_id,
    normalize_arguments,
    parameter_schema,
    parse_llama3,
    salvage,
    scan_glm,
    scan_hermes,
    scan_mistral,
    scan_qwen3_coder,
    typed,
)

__all__ = [
    "CALL_OPENERS",
    "HARMONY",
    "HARMONY_FINAL",
    "HARMONY_MARKUP",
    "H_CALL",
    "H_RETURN",
    "TOOL_PARSERS",
    "CallArguments",
    "CallOpened",
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
# A model's reasoning block as tokens: those that open it (`<think>`; gpt-oss's `<|channel|>analysis
# <|message|>`) and the one that ends it (`</think>`; `<|end|>`).
Thinking: TypeAlias = tuple[tuple[int, ...], int]


def opens_thinking(prompt: Sequence[int], think: Thinking) -> bool:
    """Whether `prompt` ends inside a `think` block: its last opener after its last end. Searched
    from the end at C speed: the API asks for every chat request, on the event loop, and a
    prompt with no tag at all was a Python loop over every token (3 ms for 60k)."""
    opens, end = think
    k = len(opens)
    back = list(reversed(prompt))
    ended = _index(back, end)
    at = _index(back, opens[-1])
    while at < ended:
        i = len(back) - 1 - at  # where the candidate opener's last token is in `prompt`
        if i >= k - 1 and tuple(prompt[i - k + 1 : i + 1]) == opens:
            return True
        at = _index(back, opens[-1], at + 1)
    return False


def _index(items: list[int], value: int, start: int = 0) -> int:
    """Where `value` first is in `items` from `start` on; len(items) where it is not."""
    try:
        return items.index(value, start)
    except ValueError:
        return len(items)


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


@dataclass(frozen=True)
class CallOpened:
    """A tool call begun, its function named: its arguments follow as CallArguments, and the
    ToolCall with its id ends it. Its arguments begin with those streamed (the XML formats'
    closing brace comes with it alone); one cut off by the end of the output has them as far as
    they got."""

    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    text: str  # more of the open call's arguments, as the model writes them


Piece: TypeAlias = Content | Reasoning | ToolCall | CallOpened | CallArguments


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
        calls_only: bool = False,
    ) -> None:
        self._think, self._tools, self._channels = reasoning, tools, channels
        self._calls_only = calls_only

    def feed(self, text: str) -> list[Piece]:
        return self._run(text, final=False)

    def finish(self) -> list[Piece]:
        """Flush held text; an unterminated tool call that decodes is still a call, one cut off
        once its name was written a call with its arguments as far as they got, else content."""
        return self._run("", final=True)

    def _run(self, text: str, final: bool) -> list[Piece]:
        if self._channels is not None:
            out = self._channels.run(text, final)
        else:
            first = self._think.split(text, final) if self._think else [Content(text)]
            out = []
            for piece in first:
                if isinstance(piece, Content) and self._tools:
                    out += self._tools.feed(piece.text)
                else:
                    out.append(piece)
            if final and self._tools:
                out += self._tools.finish()
        if self._calls_only:  # what is no call is a call's markup cut short before its name
            out = [p for p in out if not isinstance(p, Content)]
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
    message addressed to a function is a call if tools are on, else its body is content. A call
    streams: its body is its arguments' JSON, whitespace around it left out."""

    def __init__(self, tools_enabled: bool) -> None:
        self._tools = tools_enabled
        self._buf, self._in_body = "", False
        self._kind, self._call, self._args, self._held = "content", CallOpened("", ""), "", ""
        self._body_text = ""  # a call's body so far
        self._object: _JsonObject | None = None  # of a body that is a JSON object

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
                out += self._opened(self._buf[:at])
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

    def _opened(self, header: str) -> list[Piece]:
        recipient = _H_RECIPIENT.search(header)
        channel = _H_CHANNEL.search(header)
        if recipient is not None and self._tools:
            self._kind, self._args, self._held, self._body_text = "call", "", "", ""
            self._object = None
            self._call = CallOpened(new_call_id(), recipient.group(1))
            return [self._call]
        analysis = channel is not None and channel.group(1) == "analysis"
        self._kind = "reasoning" if analysis else "content"
        return []

    def _body(self, text: str) -> list[Piece]:
        if self._kind != "call":
            return [Reasoning(text) if self._kind == "reasoning" else Content(text)]
        self._body_text += text
        if self._object is None and not self._args:  # what the body is may be known now
            body = self._body_text.lstrip()
            if body.startswith("{"):
                self._object = _JsonObject(len(self._body_text) - len(body))
        if self._object is not None:  # as a Hermes call's: mended, to its closing brace
            more = self._object.read(self._body_text)
            self._args += more
            return [CallArguments(more)] if more else []
        # Whitespace is held until more arguments follow it: none may begin or end them.
        text = text if self._args else text.lstrip()
        self._args += text
        text = self._held + text
        shown = text.rstrip()
        self._held = text[len(shown) :]
        return [CallArguments(shown)] if shown else []

    def _closed(self) -> list[Piece]:
        if self._kind != "call":
            return []
        self._kind, args = "content", self._args.strip()
        if self._object is not None:
            return [ToolCall(self._call.id, self._call.name, self._args)]
        return [ToolCall(self._call.id, self._call.name, normalize_arguments(args) or args)]


class _JsonCall:
    """One call's text as it comes, for a format that names the function before its arguments'
    JSON object (`head`, matched at the call's start, its group 1 the name, ending at the
    object's `{`): the call opens once its head is written, and its arguments stream to the
    object's closing brace (see _JsonObject). A call of another form (a list of calls; its arguments
    before its name) opens nothing: it comes whole from the format's scanner."""

    def __init__(self, head: re.Pattern[str], new_id: Callable[[], str]) -> None:
        self._head, self._new_id = head, new_id
        self._call: CallOpened | None = None
        self._args: list[str] = []
        self._object = _JsonObject()
        self._other = False  # the head was of another form

    def feed(self, text: str) -> list[Piece]:
        """The pieces that the call's text so far, `text`, adds."""
        out: list[Piece] = []
        if self._other:
            return out
        if self._call is None:
            head = self._head.match(text)
            if head is None:
                self._other = len(text) > _HEAD_MAX
                return out
            self._call = CallOpened(self._new_id(), head.group(1))
            self._object.at = head.end() - 1
            out.append(self._call)
        more = self._object.read(text)
        if more:
            self._args.append(more)
            out.append(CallArguments(more))
        return out

    def close(self) -> list[Piece] | None:
        """The ToolCall that ends the call it opened (its arguments those streamed, complete or
        cut off); None if it opened none."""
        if self._call is None:
            return None
        return [ToolCall(self._call.id, self._call.name, "".join(self._args))]


def _after_space(text: str, i: int) -> int:
    """Where the whitespace at `text[i:]` ends."""
    while i < len(text) and text[i].isspace():
        i += 1
    return i


# What may follow a string's closing quote: in JSON, a colon, a comma or a closing bracket; a `<`
# where a call's JSON breaks off at its closing tag.
_ENDS_STRING = frozenset(",:}]<")
# Python's constants, which a model writing a dict for a call's arguments writes for JSON's.
_PYTHON_JSON = {"True": "true", "False": "false", "None": "null"}
_PYTHON_CONSTANT = re.compile(r"(True|False|None)(?=\W)")
# At a backslash in a JSON string: an escape (group 1), or a backslash that begins none (no
# group); no match while the text ends before that is known.
_ESCAPE = re.compile(
    r'\\(?:([\\"/bfnrt]|u[0-9a-fA-F]{4})|(?=[^u])|u(?![0-9a-fA-F]{0,3}\Z))', re.DOTALL
)


class _JsonObject:
    """A JSON object's text as it comes, from its `{` at `at` in a text that grows, mended."""

    def __init__(self, at: int = 0) -> None:
        self.at = at  # where in the text it goes on
        self._ended = False  # at its closing brace, or at a `<`
        self._depth, self._in_string = 0, False

    def read(self, text: str) -> str:
        """The object's text from `at` on, which moves to where it ends: at the end of `text`,
        after the object's closing brace, or before a `<` outside its strings, which no JSON
        holds (a malformed call's closing tag: nothing after it is read).

        Slips a model makes in JSON are mended as they come, the text being on its way out: a
        control character written raw in a string (a newline in code) is escaped, as are a
        backslash that begins no escape (`\\d` in a regex, `C:\\Users`: the backslash the model
        meant) and a quote that no colon, comma or closing bracket follows (`"echo "hi" > f"`:
        one inside the string); a comma before a closing bracket is dropped, and Python's
        `True`, `False` and `None` are JSON's `true`, `false` and `null`. Where the next
        characters decide (a backslash's, a quote's, a comma's), reading stops before it until
        they come. Valid JSON comes out as it came in."""
        out: list[str] = []
        begin = i = self.at
        while i < len(text) and not self._ended:
            ch = text[i]
            if self._in_string:
                if ch < " ":
                    out += [text[begin:i], _escaped(ch)]
                    begin = i + 1
                elif ch == "\\":
                    escape = _ESCAPE.match(text, i)
                    if escape is None:  # not yet known: its next characters to come
                        break
                    if escape.lastindex is None:  # begins no escape: the model meant it
                        out += [text[begin:i], "\\\\"]
                        begin = i + 1
                    else:
                        i = escape.end()
                        continue
                elif ch == '"':
                    after = _after_space(text, i + 1)
                    if after == len(text):  # whether it ends the string is not known yet
                        break
                    if text[after] not in _ENDS_STRING:  # a quote inside it, unescaped
                        out += [text[begin:i], '\\"']
                        begin = i + 1
                    else:
                        self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                self._ended = self._depth == 0
            elif ch == ",":
                after = _after_space(text, i + 1)
                if after == len(text):
                    break
                if text[after] in "}]":
                    out.append(text[begin:i])
                    begin = i + 1
            elif ch in "TFN":
                word = _PYTHON_CONSTANT.match(text, i)
                if word is None:
                    if any(w.startswith(text[i:]) for w in _PYTHON_JSON):
                        break  # the word is not whole yet
                else:
                    out += [text[begin:i], _PYTHON_JSON[word[1]]]
                    begin = i = word.end()
                    continue
            elif ch == "<":
                self._ended = True
                break
            i += 1
        out.append(text[begin:i])
        self.at = i
        return "".join(out)


@dataclass(frozen=True)
class _Xml:
    """How a format writes a call in XML (see XML_FUNCTION)."""

    function: re.Pattern[str]  # a function's opening, matched where one may start; group 1 its name
    parameter: re.Pattern[str]  # an argument's opening, its value next; group 1 its key
    value_end: str
    newline: bool  # a newline at each end of a value is the format's, not the value's
    function_end: str | None  # None: a call is one function, ended by the call's end


_CODER_XML = _Xml(
    re.compile(r"\s*" + re.escape(XML_FUNCTION) + r"([\w.\-]+)>"),
    # The newline after the opening is the format's: it is whole once the character after it came.
    re.compile(r"<parameter=([^>\n]+)>(?:\n|(?=[^\n]))"),
    "</parameter>",
    True,
    "</function>",
)
_GLM_XML = _Xml(
    re.compile(r"\s*([\w.\-]+)\s*(?=" + re.escape(GLM_ARG_KEY) + ")"),
    re.compile(re.escape(GLM_ARG_KEY) + r"(.*?)</arg_key>\s*<arg_value>", re.DOTALL),
    "</arg_value>",
    False,
    None,
)


class _XmlCall:
    """One call's text as it comes, in Qwen3-Coder's or GLM's XML: each function opens a call
    once its name is written; an argument goes out once its value closes, typed by the request's
    schema, or, where that types any text as a string, as it is written. Hermes' JSON, which
    these models write under a grammar, streams as _JsonCall streams it."""

    def __init__(self, xml: _Xml, functions: Functions) -> None:
        self._xml, self._functions = xml, functions
        self._json: _JsonCall | None = None
        self._call: CallOpened | None = None
        self._args: list[str] = []
        self._at = 0  # where the text not yet read starts
        self._key: str | None = None  # the argument whose value is being read
        self._text = False  # that value goes out as it is written
        self._begun = False

    def feed(self, text: str) -> list[Piece]:
        """The pieces that the call's text so far, `text`, adds."""
        if self._json is None and not self._begun and text.lstrip().startswith(("{", "[")):
            self._json = _JsonCall(_HERMES_HEAD, new_call_id)
        if self._json is not None:
            return self._json.feed(text)
        out: list[Piece] = []
        while (more := self._read(text)) is not None:
            out += more
        return out

    def close(self) -> list[Piece] | None:
        """The ToolCall that ends the call open, if any (an argument cut off: as far as it got,
        if it went out as it was written); None if no call opened."""
        if self._json is not None:
            return self._json.close()
        if not self._begun:
            return None
        if self._call is None:
            return []
        if self._key is not None and self._text:
            self._args.append('"')
        return self._ended()

    def _read(self, text: str) -> list[Piece] | None:
        """What the next part of `text` adds; None until more of it comes."""
        xml = self._xml
        if self._call is None:
            if (head := xml.function.match(text, self._at)) is None:
                return None
            self._call, self._begun = CallOpened(new_call_id(), head.group(1)), True
            self._args, self._at = [], head.end()
            return [self._call]
        if self._key is not None:
            return self._value(text)
        opening = xml.parameter.search(text, self._at)
        end = text.find(xml.function_end, self._at) if xml.function_end else -1
        if end >= 0 and (opening is None or end < opening.start()):
            self._at = end + len(xml.function_end or "")
            return self._ended()
        if opening is None:
            return None
        self._key, self._at = opening.group(1).strip(), opening.end()
        self._text = always_text(parameter_schema(self._functions, self._call.name, self._key))
        return self._added(self._named(self._key) + '"') if self._text else []

    def _value(self, text: str) -> list[Piece] | None:
        """What more of the value being read adds; None until more of it comes."""
        assert self._key is not None and self._call is not None
        xml, start = self._xml, self._at
        end = text.find(xml.value_end, start)
        if end < 0:
            if not self._text:
                return None
            # What may still be the format's: the value's closing tag begun, a newline before it.
            stop = len(text) - _partial(text[start:], (xml.value_end,))
            stop -= xml.newline and stop > start and text[stop - 1] == "\n"
            self._at = stop
            return self._added(_escaped(text[start:stop])) if stop > start else None
        value, self._at = text[start:end], end + len(xml.value_end)
        if xml.newline:
            value = value.removesuffix("\n")
        key, self._key = self._key, None
        if self._text:
            return self._added(_escaped(value) + '"')
        schema = parameter_schema(self._functions, self._call.name, key)
        return self._added(self._named(key) + json.dumps(typed(value, schema), ensure_ascii=False))

    def _named(self, key: str) -> str:
        """An argument's key, after the one before it if any."""
        return ("{" if not self._args else ", ") + json.dumps(key, ensure_ascii=False) + ": "

    def _added(self, text: str) -> list[Piece]:
        self._args.append(text)
        return [CallArguments(text)]

    def _ended(self) -> list[Piece]:
        """The open call's end: its arguments' object closed."""
        assert self._call is not None
        call, self._call, self._key = self._call, None, None
        return [ToolCall(call.id, call.name, "".join(self._args) + ("}" if self._args else "{}"))]


def _escaped(text: str) -> str:
    """`text` as it stands inside a JSON string."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


# Heads of the calls that stream (see _JsonCall); one longer than _HEAD_MAX is of another form.
_HERMES_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*"([\w.\-]+)"\s*,\s*"(?:arguments|parameters)"\s*:\s*\{'
)
_MISTRAL_HEAD = re.compile(  # `name[ARGS]{`, or `name[CALL_ID]id[ARGS]{`
    r"\s*([\w.\-]+)\s*(?:"
    + re.escape(MISTRAL_CALL_ID)
    + r"\w*)?"
    + re.escape(MISTRAL_ARGS)
    + r"\s*\{"
)
_HEAD_MAX = 256


class _TaggedTools:
    """Tool calls that open with a marker (`<tool_call>`, `[TOOL_CALLS]`); a scanner finds the end.
    With `stream` (a fresh _JsonCall or _XmlCall for each call), a call of the form it reads
    streams as it is written.

    Whitespace next to a call is formatting and dropped, so trailing whitespace is held back until
    the next non-space arrives; a malformed call comes back as raw content, that whitespace
    included, unless it went out already as it streamed (then it ends with what came).
    """

    def __init__(
        self,
        opener: str,
        scan: Callable[[str, bool], Scanned | None],
        new_id: Callable[[], str] = new_call_id,
        stream: Callable[[], _JsonCall | _XmlCall] | None = None,
    ) -> None:
        self._opener, self._scan, self._new_id, self._stream = opener, scan, new_id, stream
        self._buf, self._in_call, self._gap, self._after_call = "", False, "", False
        self._call: _JsonCall | _XmlCall | None = None

    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        return self._run(final=False)

    def finish(self) -> list[Piece]:
        return self._run(final=True)

    def _run(self, final: bool) -> list[Piece]:
        out: list[Piece] = []
        while self._buf or (final and self._in_call):
            if self._in_call:
                got = self._scan(self._buf, final)
                if self._call is not None:
                    out += self._call.feed(self._buf if got is None else self._buf[: got[1]])
                if got is None:
                    break
                calls, end = got
                ended = self._call.close() if self._call is not None else None
                if ended is None and not calls and final and self._scan(self._buf, False) is None:
                    # Cut off by the end of the output (max_tokens): the call it was writing,
                    # as far as it got, rather than its markup as content.
                    calls = salvage(self._buf, self._new_id)
                if ended is not None or calls:
                    out += ended if ended is not None else calls or []
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
            self._call = self._stream() if self._stream else None
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


class _ForcedBareCall:
    """Llama 3's one call under a grammar that lets the model write nothing else: it streams as a
    Hermes call's JSON does, and one cut off once its name was written is a call with its
    arguments as far as they got."""

    def __init__(self) -> None:
        self._text, self._call = "", _JsonCall(_HERMES_HEAD, new_call_id)

    def feed(self, text: str) -> list[Piece]:
        self._text += text
        return self._call.feed(self._text)

    def finish(self) -> list[Piece]:
        return self._call.close() or []


# Each takes the request's functions.
TOOL_PARSERS: Mapping[str, Callable[[Functions], ToolStage]] = MappingProxyType(
    {
        "hermes": lambda _fns: _TaggedTools(
            HERMES_OPEN, scan_hermes, stream=lambda: _JsonCall(_HERMES_HEAD, new_call_id)
        ),
        "llama3": _Llama3Tools,
        "mistral": lambda _fns: _TaggedTools(
            MISTRAL_OPEN,
            scan_mistral,
            mistral_call_id,
            lambda: _JsonCall(_MISTRAL_HEAD, mistral_call_id),
        ),
        "qwen3_coder": lambda fns: _TaggedTools(
            HERMES_OPEN,
            partial(scan_qwen3_coder, functions=fns),
            stream=lambda: _XmlCall(_CODER_XML, fns),
        ),
        "glm": lambda fns: _TaggedTools(
            HERMES_OPEN, partial(scan_glm, functions=fns), stream=lambda: _XmlCall(_GLM_XML, fns)
        ),
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
    calls_only: bool = False,
) -> OutputParser:
    """A parser for one sequence. `starts_in_reasoning`: the prompt already opened `<think>`;
    `functions`: those the request declared; `calls_only`: a grammar lets the model write tool
    calls alone, so text that is no call (their markup, cut off by max_tokens before a call's
    name) is dropped, not content.

    Raises ValueError for a `tool_parser` that is not a TOOL_PARSERS key.
    """
    if tool_parser is not None and tool_parser not in (*TOOL_PARSERS, HARMONY):
        known = ", ".join(sorted((*TOOL_PARSERS, HARMONY)))
        raise ValueError(f"unknown tool parser {tool_parser!r}; known: {known}")
    if tool_parser == HARMONY:
        return OutputParser(
            reasoning=None, tools=None, channels=_Harmony(tools_enabled), calls_only=calls_only
        )
    tools = TOOL_PARSERS[tool_parser](functions) if tools_enabled and tool_parser else None
    if tools is not None and calls_only and tool_parser == "llama3":
        tools = _ForcedBareCall()
    return OutputParser(
        reasoning=_ThinkSplitter(starts_in_reasoning) if reasoning else None,
        tools=tools,
        calls_only=calls_only,
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
    """Adjacent content (or reasoning, or a call's arguments) joined into one piece; empty ones
    dropped."""
    out: list[Piece] = []
    for p in pieces:
        if isinstance(p, Content | Reasoning | CallArguments) and not p.text:
            continue
        last = out[-1] if out else None
        if isinstance(p, Content | Reasoning | CallArguments) and type(last) is type(p):
            out[-1] = type(p)(last.text + p.text)
        else:
            out.append(p)
    return out
