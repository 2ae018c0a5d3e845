"""Tool calls as the OpenAI API carries them, and how each model family writes them in its output.

Pure decoding of text already cut out of a stream; `parsers.py` does the streaming and calls this.
Never raises on model output: a call that does not decode is None, and the caller keeps the raw
text as content.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import secrets
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeAlias

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
# Calls of XML inside <tool_call>, each value plain text (typed by the function's parameters
# schema). Qwen3-Coder's: `<function=name>`, then `<parameter=key>` per argument, its value on
# the lines between. GLM-4.5's and later: the name, then `<arg_key>key</arg_key>` and
# `<arg_value>value</arg_value>` per argument.
XML_FUNCTION, GLM_ARG_KEY = "<function=", "<arg_key>"
MISTRAL_OPEN, MISTRAL_ARGS, MISTRAL_CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
MISTRAL_ID_LENGTH = 9
PYTHON_TAG = "<|python_tag|>"

_ID_ALPHABET = string.ascii_letters + string.digits
_DECODER = json.JSONDecoder()
_NAME = re.compile(r"[\w.\-]+")
_XML_FUNCTION = re.compile(r"<function=([\w.\-]+)>(.*?)(?:</function>|\Z)", re.DOTALL)
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)
_GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)
# Keys a Llama 3 tool call may open with; anything else after `{` is an ordinary JSON answer.
_LLAMA3_KEYS = ("name", "parameters", "arguments", "type", "function")


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object serialized as a string (OpenAI wire form)


# A scanner's answer once a call's text is complete: (its calls, None if malformed; length used).
Scanned: TypeAlias = tuple[list[ToolCall] | None, int]
# The request's functions, by name: each its parameters' JSON schema (None: not known).
Functions: TypeAlias = Mapping[str, Mapping[str, Any]] | None


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def mistral_call_id() -> str:
    """A call id as Mistral's chat templates require of the calls sent back to them: 9 letters
    and digits (a `call_...` id made the next turn's template fail)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(MISTRAL_ID_LENGTH))


def mistral_safe_id(call_id: str) -> str:
    """`call_id` if Mistral's templates take it, else 9 letters and digits derived from it (the
    same for the call and its tool message)."""
    if len(call_id) == MISTRAL_ID_LENGTH and call_id.isascii() and call_id.isalnum():
        return call_id
    digest = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    out = []
    for _ in range(MISTRAL_ID_LENGTH):
        digest, i = divmod(digest, len(_ID_ALPHABET))
        out.append(_ID_ALPHABET[i])
    return "".join(out)


def normalize_arguments(args: object) -> str | None:
    """`args` as the string of a JSON object; None if it is neither an object nor a string of one."""
    if args is None or args == "":
        return "{}"
    if isinstance(args, dict):
        try:
            return json.dumps(args, ensure_ascii=False)
        except (TypeError, ValueError):  # a Python literal's set or bytes: no JSON for it
            return None
    if isinstance(args, str):
        parsed = loads_or_none(args)
        return args if isinstance(parsed, dict) else None
    return None


def decode_calls(
    value: object, *, need_args: bool = False, new_id: Callable[[], str] = new_call_id
) -> list[ToolCall] | None:
    """The calls in one decoded JSON value (a call object or a non-empty list of them), or None.

    A call is `{"name", "arguments" | "parameters"}`, optionally wrapped OpenAI-style in
    `{"function": ...}`; `need_args` rejects one with neither key (for bare-JSON formats).
    """
    items = value if isinstance(value, list) else [value]
    calls = [c for item in items if (c := _decode_call(item, need_args, new_id)) is not None]
    return calls if calls and len(calls) == len(items) else None


def scan_hermes(text: str, final: bool) -> Scanned | None:
    """`text` follows `<tool_call>`; None until `</tool_call>` arrives (unless `final`). A
    `</tool_call>` inside the call's JSON (an argument holding that text: code, say) is not its
    end: the JSON before it is still open."""
    start = 0
    while (end := text.find(HERMES_CLOSE, start)) >= 0:
        calls = _loads_calls(text[:end])
        if calls is not None or not _still_open(text[:end]):
            return calls, end + len(HERMES_CLOSE)
        start = end + 1
    return (_loads_calls(text), len(text)) if final else None


def scan_qwen3_coder(text: str, final: bool, functions: Functions = None) -> Scanned | None:
    """`text` follows `<tool_call>`: Qwen3-Coder's XML (see XML_FUNCTION), or Hermes' JSON (what
    a grammar makes it write). Cut off by the end of the output, a call is what it wrote whole:
    its name and the parameters it closed. `functions`: the request's, by name, each its
    parameters' JSON schema."""
    return _scan_xml(text, final, ("<parameter=", "</parameter>"), partial(_coder, functions))


def scan_glm(text: str, final: bool, functions: Functions = None) -> Scanned | None:
    """`text` follows `<tool_call>`: GLM's XML (see XML_FUNCTION), or Hermes' JSON; as
    scan_qwen3_coder."""
    return _scan_xml(text, final, ("<arg_value>", "</arg_value>"), partial(_glm, functions))


def _scan_xml(
    text: str,
    final: bool,
    value_tags: tuple[str, str],
    calls: Callable[[str, bool], list[ToolCall] | None],
) -> Scanned | None:
    """None until `</tool_call>` arrives (unless `final`); one inside a value (code, say) is
    not the call's end. `calls(body, closed)`: the calls in the text before it."""
    if text.lstrip().startswith(("{", "[")):
        return scan_hermes(text, final)
    start = 0
    while (end := text.find(HERMES_CLOSE, start)) >= 0:
        body = text[:end]
        if body.count(value_tags[0]) <= body.count(value_tags[1]):
            return calls(body, True), end + len(HERMES_CLOSE)
        start = end + 1
    return (calls(text, False), len(text)) if final else None


def _coder(functions: Functions, body: str, _closed: bool) -> list[ToolCall] | None:
    if not body.strip().startswith(XML_FUNCTION):
        return None
    calls = [
        _typed_call(name, _XML_PARAMETER.findall(params), functions)
        for name, params in _XML_FUNCTION.findall(body)
    ]
    return calls or None


def _glm(functions: Functions, body: str, closed: bool) -> list[ToolCall] | None:
    name, key, args = body.partition(GLM_ARG_KEY)
    name = name.strip()
    if not _NAME.fullmatch(name) or not (key or closed):  # cut off, a name may be too
        return None
    return [_typed_call(name, _GLM_ARG.findall(key + args), functions)]


def _typed_call(name: str, pairs: list[tuple[str, str]], functions: Functions) -> ToolCall:
    """A call of `name` with these (key, text) arguments, each typed by its schema."""
    arguments = {
        key.strip(): typed(value, parameter_schema(functions, name, key.strip()))
        for key, value in pairs
    }
    return ToolCall(new_call_id(), name, json.dumps(arguments, ensure_ascii=False))


def parameter_schema(functions: Functions, name: str, key: str) -> object:
    """The JSON schema of function `name`'s parameter `key`, if the request gave one."""
    schema = (functions or {}).get(name)
    properties = schema.get("properties") if isinstance(schema, Mapping) else None
    return properties.get(key) if isinstance(properties, Mapping) else None


def _kinds(schema: object) -> list[Any]:
    kinds = schema.get("type") if isinstance(schema, Mapping) else None
    return [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else []


def always_text(schema: object) -> bool:
    """Whether `typed` gives any text under `schema` back as itself, a string."""
    kinds = _kinds(schema)
    return "null" not in kinds and (not kinds or kinds[0] == "string")


def typed(value: str, schema: object) -> Any:
    """A parameter's text as the JSON value its schema's type says; the text itself where the
    schema names no type, or the text is none of that type's values."""
    kinds = _kinds(schema)
    word = value.strip().lower()
    if "null" in kinds and word == "null":
        return None
    for kind in kinds:
        if kind == "string":
            return value
        if kind == "boolean" and word in ("true", "false"):
            return word == "true"
        parsed = loads_or_none(value)
        if kind in _JSON_KINDS and _JSON_KINDS[kind](parsed):
            return parsed
    return value


_JSON_KINDS: Mapping[str, Callable[[Any], bool]] = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def scan_mistral(text: str, final: bool) -> Scanned | None:
    """`text` follows `[TOOL_CALLS]`: a JSON list of calls, or `name[ARGS]{...}` (newer tokenizers)."""
    start = len(text) - len(text.lstrip())
    if text.startswith("[", start):
        got = _decode_at(text, start, "[")
        if got is not None:
            return decode_calls(got[0], new_id=mistral_call_id), got[1]
    elif (cut := text.find(MISTRAL_ARGS)) >= 0:
        got = _decode_at(text, cut + len(MISTRAL_ARGS), "{")
        if got is not None:
            name = _mistral_name(text, cut)
            call = {"name": name, "arguments": got[0]}
            return (decode_calls(call, new_id=mistral_call_id) if name else None), got[1]
    return (None, len(text)) if final else None


def _mistral_name(text: str, cut: int) -> str | None:
    """The function name of `name[CALL_ID]id[ARGS]`, `text[cut:]` being its `[ARGS]`; None if
    what stands there is no name."""
    name = text[:cut].split(MISTRAL_CALL_ID)[0].strip()
    return name if _NAME.fullmatch(name) else None


_NAME_FIELD = re.compile(r'"name"\s*:\s*"([\w.\-]+)"')
_ARGS_FIELD = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


def salvage(text: str, new_id: Callable[[], str] = new_call_id) -> list[ToolCall] | None:
    """The calls in `text`, a call's text cut off by the end of the output (max_tokens), as
    OpenAI reports them: those it finished, and the one cut off with its name and its arguments
    as far as they got; None if it finished none and got no name, or is not JSON cut short."""
    done, text = _complete_items(text, new_id)
    names = list(_NAME_FIELD.finditer(text))
    if names and _cut_short(text):
        last = names[-1]
        at = _ARGS_FIELD.search(text, last.end())
        return [*done, ToolCall(new_id(), last.group(1), text[at.end() :].strip() if at else "")]
    cut = text.find(MISTRAL_ARGS)  # name[ARGS]{...
    name = _mistral_name(text, cut) if cut > 0 else None
    rest = text[cut + len(MISTRAL_ARGS) :].strip()
    if name and _cut_short(rest):
        return [*done, ToolCall(new_id(), name, rest)]
    return done or None


def _complete_items(text: str, new_id: Callable[[], str]) -> tuple[list[ToolCall], str]:
    """The calls of a JSON list's items that are complete, and the text after them (all of
    `text`, and none, when it is no list)."""
    body, done, i = text.lstrip(), list[ToolCall](), 1
    if not body.startswith("["):
        return [], text
    while True:
        while i < len(body) and (body[i].isspace() or body[i] == ","):
            i += 1
        got = _decode_at(body, i, "{")
        calls = decode_calls(got[0], new_id=new_id) if got is not None else None
        if got is None or calls is None:
            return done, body[i:]
        done, i = done + calls, got[1]


def _still_open(text: str) -> bool:
    """JSON begun and cut short inside one of its strings (where a marker is text, not markup)."""
    return text.lstrip().startswith(("{", "[")) and _json_prefix(text) == (True, True)


def _cut_short(text: str) -> bool:
    """Whether `text` may be JSON cut short rather than malformed (see _json_prefix)."""
    return _json_prefix(text)[0]


def _json_prefix(text: str) -> tuple[bool, bool]:
    """Whether `text` may begin some JSON, roughly (outside its strings, every bracket it closes
    is the one last opened: enough to tell JSON cut short from malformed), and whether it ends
    inside a string."""
    opened: list[str] = []
    in_string = escaped = False
    for ch in text:
        if in_string:
            in_string, escaped = (escaped or ch != '"'), (not escaped and ch == "\\")
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            opened.append(ch)
        elif ch in "}]" and (not opened or opened.pop() != "{["["}]".index(ch)]):
            return False, False
    return True, in_string


def llama3_may_call(head: str) -> bool:
    """Whether output starting with `head` (leading whitespace removed) may still be a tool call."""
    if head.startswith(PYTHON_TAG) or PYTHON_TAG.startswith(head):
        return True
    if not head.startswith("{"):
        return False
    rest = head[1:].lstrip()
    if not rest:
        return True
    if rest[0] != '"':
        return False
    key, quote, _ = rest[1:].partition('"')
    return key in _LLAMA3_KEYS if quote else any(k.startswith(key) for k in _LLAMA3_KEYS)


def parse_llama3(text: str) -> list[ToolCall] | None:
    """The calls if the whole of `text` is Llama 3 tool-call JSON: objects (or lists of them),
    after an optional `<|python_tag|>`, separated by `;` or whitespace; otherwise None."""
    body = text.strip().removeprefix(PYTHON_TAG)
    calls: list[ToolCall] = []
    i = 0
    while True:
        while i < len(body) and (body[i].isspace() or body[i] == ";"):
            i += 1
        if i == len(body):
            return calls or None
        got = _decode_at(body, i, "{[")
        decoded = decode_calls(got[0], need_args=True) if got is not None else None
        if got is None or decoded is None:
            return None
        calls += decoded
        i = got[1]


def _decode_call(item: object, need_args: bool, new_id: Callable[[], str]) -> ToolCall | None:
    if isinstance(item, dict) and isinstance(item.get("function"), dict):
        item = item["function"]
    if not isinstance(item, dict):
        return None
    name = item.get("name")
    key = "arguments" if "arguments" in item else "parameters"
    if not isinstance(name, str) or not name or (need_args and key not in item):
        return None
    arguments = normalize_arguments(item.get(key))
    return None if arguments is None else ToolCall(new_id(), name, arguments)


def loads_or_none(text: str) -> Any:
    """The JSON value `text` holds; None if it holds none."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _loads_calls(text: str) -> list[ToolCall] | None:
    """The calls in `text`, JSON or, as some models write a call, a Python literal (single
    quotes, True, None)."""
    if not text.strip():
        return None
    value = loads_or_none(text)
    return decode_calls(_python_literal(text) if value is None else value)


def _python_literal(text: str) -> Any:
    """The value of `text`, a Python dict or list literal; None if it is none (or too long to
    read safely)."""
    body = text.strip()
    if not body.startswith(("{", "[")) or len(body) > _LITERAL_MAX:
        return None
    try:
        return ast.literal_eval(body)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


# The longest call read as a Python literal (ast parses it whole, nesting and all).
_LITERAL_MAX = 1 << 20


def _decode_at(text: str, i: int, openers: str) -> tuple[Any, int] | None:
    """The JSON value at `text[i:]` (after whitespace) and where it ends, if it opens with one of
    `openers`. None while incomplete or malformed: an object or list is self-delimiting, a
    number is not, so only those can end a call before the output does."""
    i += len(text) - i - len(text[i:].lstrip())
    if i == len(text) or text[i] not in openers:
        return None
    try:
        return _DECODER.raw_decode(text, i)
    except (ValueError, RecursionError):
        return None
