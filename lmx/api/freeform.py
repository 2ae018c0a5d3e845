"""Custom tools (OpenAI's freeform tools, such as Codex's `apply_patch`): a tool whose input is
text, not JSON arguments. The model sees a function of one string, `input`, told the tool's
grammar if it has one (not enforced); its call's input is that string. Used by /v1/responses
(lmx.api.responses) and /v1/chat/completions alike.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lmx.errors import RequestError
from lmx.runtime.toolcalls import loads_or_none

# A custom tool's input is text, not JSON arguments: the model sees a function of one string,
# `input`, and its calls come back as custom_tool_call items holding that string.
FREEFORM: dict[str, Any] = {
    "type": "object",
    "properties": {"input": {"type": "string"}},
    "required": ["input"],
    "additionalProperties": False,
}


def freeform_description(tool: dict[str, Any], at: str) -> str:
    """A custom tool's description for the model, with where its input goes and, for a grammar
    format, the grammar (told to the model, not enforced)."""
    fmt = tool.get("format") or {"type": "text"}
    fmt = fmt if isinstance(fmt, dict) else {}
    described = str(tool.get("description") or "")
    if fmt.get("type") == "text":
        return f"{described}\n\nIts input is plain text, given as `input`.".lstrip()
    syntax, definition = fmt.get("syntax"), fmt.get("definition")
    if fmt.get("type") != "grammar" or syntax not in ("lark", "regex"):
        raise RequestError(
            f"{at}.format must be {{type: text}} or {{type: grammar, syntax: lark or regex,"
            " definition}",
            param=f"{at}.format",
        )
    if not isinstance(definition, str):
        raise RequestError(f"{at}.format needs definition as a string", param=f"{at}.format")
    told = f"Its input, given as `input`, is text in this {syntax} grammar:\n{definition}"
    return f"{described}\n\n{told}".lstrip()


def freeform_input(arguments: str) -> str:
    """A custom tool's input, from the arguments the model wrote for it: their `input`, their
    one string if the model named it otherwise, else the arguments' text as it is. Arguments cut
    off inside that string (max_output_tokens) give what came of it."""
    args = loads_or_none(arguments)
    for cut in range(6):  # cut off inside a string, perhaps within an escape (`\u00e`)
        if args is not None:
            break
        args = loads_or_none(arguments[: len(arguments) - cut] + '"}')
    if isinstance(args, dict):
        if isinstance(args.get("input"), str):
            return str(args["input"])
        texts = [v for v in args.values() if isinstance(v, str)]
        if len(args) == 1 and texts:
            return texts[0]
    return arguments


class InputReader:
    """A custom tool's input as the model writes its arguments, `{"input": "..."}`: the string's
    text, unescaped, a piece at a time. An escape cut between pieces waits for its end; arguments
    that open otherwise stream nothing (their input goes out whole at their end)."""

    _OPENING = re.compile(r'\s*\{\s*"input"\s*:\s*"')
    _COMPACT = '{"input":"'
    _PLAIN = re.compile(r'[^"\\]+')

    def __init__(self) -> None:
        self._raw = ""  # the arguments not yet read
        self._in: bool | None = None  # inside the string; None: its opening not yet read

    def feed(self, text: str) -> str:
        """The input's text that `text`, the arguments' next piece, completes."""
        self._raw += text
        if self._in is None:
            m = self._OPENING.match(self._raw)
            if m is None:
                compact = "".join(self._raw.split())
                if len(compact) >= len(self._COMPACT) or not self._COMPACT.startswith(compact):
                    self._in = False
                return ""
            self._in, self._raw = True, self._raw[m.end() :]
        if not self._in:
            return ""
        try:
            text, self._raw = self._unescaped(self._raw)
        except ValueError:  # an escape JSON has not: the whole input at the end says what came
            self._in = False
            return ""
        return text

    def _unescaped(self, raw: str) -> tuple[str, str]:
        """The text of `raw`, the string's next characters, up to its closing quote or to an
        escape whose end has not come; and what is left of `raw` after it."""
        out, i = [], 0
        while i < len(raw) and raw[i] != '"':
            if run := self._PLAIN.match(raw, i):
                out.append(run.group())
                i = run.end()
                continue
            width = 2  # \n, \", ...; \uXXXX, and two of them for a surrogate pair
            if raw[i + 1 : i + 2] == "u":
                width = 12 if raw[i + 2 : i + 4].upper() in ("D8", "D9", "DA", "DB") else 6
            if i + width > len(raw):
                break  # the escape's end comes with a later piece
            out.append(json.loads(f'"{raw[i : i + width]}"'))
            i += width
        if raw[i : i + 1] == '"':
            self._in = False
        return "".join(out), raw[i:]
