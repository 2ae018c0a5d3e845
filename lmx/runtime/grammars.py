"""Grammars for constrained decoding: OpenAI `response_format` and forced tool calls, for llguidance.

Pure (no MLX): the API builds a `Grammar` per request, and an invalid schema raises ValueError
naming the problem (a 400 for the client); the engine compiles `Grammar.text` per sequence
(`lmx.runtime.mlx_constraint`). Whitespace is bounded so a model cannot pad JSON forever.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance

from lmx.runtime.parsers import H_CHANNEL, H_CONSTRAIN, H_MESSAGE

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# One space, or one line break and an indent, wherever JSON allows whitespace: pretty printing
# still works, while runs of blanks (a known failure of constrained models) are cut short.
WHITESPACE_PATTERN = r"\x20|\n[\x20\x09]{0,32}"
# llguidance writes the text a grammar leaves no choice in (an enum's one value) as the tokenizer
# splits it, and the tokenizer makes a marker's text ("</tool_call>") the marker's token, which
# llguidance takes as special and a JSON string then refuses: generation failed there. Where a
# schema holds a marker's text, the model picks the tokens instead, among those of plain text.
_NO_FORCING = '%llguidance {"no_forcing": true}\n'


@dataclass(frozen=True)
class CallSyntax:
    """How a model family writes tool calls: each inside `wrap`, all of them inside `around`,
    several joined by `separator` (None: one call only)."""

    wrap: tuple[str, str] = ("", "")
    around: tuple[str, str] = ("", "")
    separator: str | None = None


# Hermes / Qwen: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, several joined
# by a newline.
HERMES = CallSyntax(wrap=("<tool_call>\n", "\n</tool_call>"), separator="\n")
# Mistral: one list of calls after the marker, as its chat templates write them.
MISTRAL = CallSyntax(around=("[TOOL_CALLS][", "]"), separator=", ")
# Llama 3: one call, bare JSON.
BARE_JSON = CallSyntax()


@dataclass(frozen=True)
class Grammar:
    """An llguidance grammar (`text`, what `Constraint.grammar` carries) and a short log label."""

    text: str
    description: str
    warnings: tuple[str, ...] = ()


def _options(strict: bool) -> JsonCompileOptions:
    # Non-strict schemas drop keywords llguidance does not implement instead of failing.
    return {"whitespace_pattern": WHITESPACE_PATTERN, "lenient": not strict}


def _checked(text: str, description: str, what: str) -> Grammar:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text)
    if is_error:
        raise ValueError(f"invalid {what}: {messages[0] if messages else 'unknown error'}")
    # Special tokens can only be checked against a tokenizer, when the engine compiles it.
    warnings = tuple(m for m in messages if "special_token" not in m)
    return Grammar(text, description, warnings)


def _schema_text(schema: Mapping[str, Any], strict: bool) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(dict(schema), overrides=_options(strict))


def json_object() -> Grammar:
    """Any JSON object (`response_format: {"type": "json_object"}`)."""
    return _checked(_schema_text({"type": "object"}, strict=True), "json_object", "JSON schema")


def _holds_marker(value: Any, markers: Collection[str]) -> bool:
    """Whether a marker's text is in `value` (a schema), where a string of the output may need it."""
    text = json.dumps(value, ensure_ascii=False)
    return any(m in text for m in markers)


def json_schema(
    schema: Mapping[str, Any],
    strict: bool = False,
    *,
    name: str = "",
    markers: Collection[str] = (),
) -> Grammar:
    """Output matching `schema` (`response_format: {"type": "json_schema", ...}`). `markers`:
    the model's marker texts (`ConstraintFactory.marker_ids`), which its strings may then hold.

    Raises ValueError naming the problem when the schema is invalid, or, if `strict`, when it uses
    a keyword or format llguidance cannot enforce; otherwise those are ignored (see `warnings`).
    Like OpenAI's, `strict` defaults to False; unlike OpenAI, lmx constrains either way.
    """
    if not isinstance(schema, Mapping):
        raise ValueError(f"invalid JSON schema: expected an object, got {type(schema).__name__}")
    try:
        text = _schema_text(schema, strict)
    except ValueError as exc:
        raise ValueError(f"invalid JSON schema: {exc}") from None
    if _holds_marker(schema, markers):
        body = json.dumps({**schema, "x-guidance": _options(strict)})
        text = llguidance.LLMatcher.grammar_from_lark(f"{_NO_FORCING}start: %json {body}\n")
    return _checked(text, f"json_schema {name or '(unnamed)'}", "JSON schema")


def _rebase_refs(node: Any, prefix: str) -> Any:
    """Rewrite local `$ref`s ("#/...") of a schema that is about to be nested under `prefix`."""
    if isinstance(node, Mapping):
        return {
            k: (
                prefix + v[1:]
                if k == "$ref" and isinstance(v, str) and v.startswith("#")
                else _rebase_refs(v, prefix)
            )
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rebase_refs(v, prefix) for v in node]
    return node


_NO_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {},
    "additionalProperties": False,
}


def _functions(tools: Sequence[Mapping[str, Any]]) -> dict[str, tuple[Mapping[str, Any], bool]]:
    """Name → (parameters schema, strict), from OpenAI tools (`{"type": "function", ...}`)."""
    out: dict[str, tuple[Mapping[str, Any], bool]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool)
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str) or not name:
            raise ValueError(f"tools[{i}]: a function needs a non-empty name")
        if name in out:
            raise ValueError(f"tools[{i}]: duplicate function name {name!r}")
        # No parameters (left out, or `{}`) is a function that takes none, as OpenAI reads it.
        params = fn.get("parameters") or _NO_PARAMETERS
        if not isinstance(params, Mapping):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        strict = bool(fn.get("strict"))
        if (problem := _parameters_problem(json.dumps(params), strict)) is not None:
            raise ValueError(f"function {name!r} parameters: {problem}")
        out[name] = (params, strict)
    return out


@functools.lru_cache(maxsize=256)
def _parameters_problem(schema_json: str, strict: bool) -> str | None:
    """Why a function's parameters schema (JSON text) is refused, or None. Cached: clients send
    the same tools with every request, and compiling each takes a fraction of a millisecond or
    more of the event loop's time."""
    schema = json.loads(schema_json)
    if schema.get("type") != "object":  # arguments are an object, as OpenAI requires
        got = repr(schema["type"]) if "type" in schema else "none"
        return f"the schema's type must be 'object', not {got}"
    try:
        _checked(_schema_text(schema, strict), "", "schema")
    except ValueError as exc:
        return str(exc)
    return None


def _chosen(
    tools: Sequence[Mapping[str, Any]], named: str | None
) -> dict[str, tuple[Mapping[str, Any], bool]]:
    """The functions a forced call may be of (see _functions): `named` alone, else all of them.
    Raises ValueError for no tools, an unknown `named`, or an invalid parameters schema."""
    functions = _functions(tools)
    if named is not None:
        if named not in functions:
            known = ", ".join(sorted(functions)) or "none"
            raise ValueError(f"tool_choice names function {named!r}, not in tools ({known})")
        functions = {named: functions[named]}
    if not functions:
        raise ValueError("tool_choice requires a tool call, but no tools were given")
    return functions


def check_tools(tools: Sequence[Mapping[str, Any]]) -> None:
    """What `tool_call` checks of `tools`, for a request that leaves the call to the model.
    Raises ValueError naming the tool at fault."""
    _functions(tools)


def _lark_seq(*items: str) -> str:
    return " ".join(i for i in items if i)


def _lark_text(text: str, token_ids: Mapping[str, int]) -> str:
    """`text` as a lark sequence; the known marker tokens in it become exact token refs."""
    if not token_ids:
        return json.dumps(text, ensure_ascii=False) if text else ""
    pattern = "|".join(re.escape(t) for t in sorted(token_ids, key=len, reverse=True))
    parts = re.split(f"({pattern})", text)
    return " ".join(
        f"<[{token_ids[p]}]>" if p in token_ids else json.dumps(p, ensure_ascii=False)
        for p in parts
        if p
    )


def tool_call(
    tools: Sequence[Mapping[str, Any]],
    named: str | None = None,
    syntax: CallSyntax = HERMES,
    *,
    parallel: bool = True,
    token_ids: Mapping[str, int] | None = None,
) -> Grammar:
    """Output that is only tool calls, `{"name": ..., "arguments": {...}}` each, in `syntax`.

    `named` forces exactly one call of that function (`tool_choice: {"function": ...}`); otherwise
    any of `tools`, one or more calls (`tool_choice: "required"`), one if not `parallel` or if
    `syntax` takes one only. `token_ids` (the model's `ConstraintFactory.marker_ids`) maps
    marker texts to their single token, which the output must then use. Pass it for any model
    whose tokenizer has the markers as added tokens: llguidance takes every added `<...>` token
    as special, and fails at generation time on such a marker written as text.
    Raises ValueError for no tools, an unknown `named`, or an invalid parameters schema.
    """
    functions = _chosen(tools, named)
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": name},
                "arguments": _rebase_refs(params, f"#/anyOf/{i}/properties/arguments"),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for i, (name, (params, _)) in enumerate(functions.items())
    ]
    # Unenforceable keywords of a strict function failed above; the rest are ignored.
    all_strict = all(strict for _, strict in functions.values())
    body = {"x-guidance": _options(all_strict), "anyOf": calls}
    ids = token_ids or {}
    (open_, close), (first, last) = syntax.wrap, syntax.around
    call = _lark_seq(_lark_text(open_, ids), "%json " + json.dumps(body), _lark_text(close, ids))
    many = parallel and named is None and syntax.separator is not None
    repeated = f"call ({json.dumps(syntax.separator)} call)*" if many else "call"
    start = _lark_seq(_lark_text(first, ids), repeated, _lark_text(last, ids))
    forcing = _NO_FORCING if _holds_marker(body, ids) else ""
    lark = f"{forcing}start: {start}\ncall: {call}\n"
    label = f"tool_call {'+' if many else ''}{'|'.join(functions)}"
    return _checked(llguidance.LLMatcher.grammar_from_lark(lark), label, "tool call grammar")


def harmony_call(
    tools: Sequence[Mapping[str, Any]],
    named: str | None = None,
    *,
    token_ids: Mapping[str, int] | None = None,
) -> Grammar:
    """One tool call as gpt-oss writes it in harmony, after a prompt that ends at `<|start|>
    assistant`: a commentary message to `functions.NAME`, its body the arguments' JSON (the
    `<|call|>` that ends it is the model's end of output). `named` and `token_ids` as for
    `tool_call`, whose errors it raises; one call only, as a harmony call ends the output."""
    functions = _chosen(tools, named)
    ids = token_ids or {}
    rules, forcing = [], ""
    for i, (name, (params, strict)) in enumerate(functions.items()):
        head = f"{H_CHANNEL}commentary to=functions.{name} {H_CONSTRAIN}json{H_MESSAGE}"
        body = {**params, "x-guidance": _options(strict)}
        rules.append(f"call{i}: {_lark_seq(_lark_text(head, ids), '%json ' + json.dumps(body))}")
        forcing = _NO_FORCING if _holds_marker(params, ids) else forcing
    start = " | ".join(f"call{i}" for i in range(len(functions)))
    lark = forcing + f"start: {start}\n" + "".join(r + "\n" for r in rules)
    label = f"harmony_call {'|'.join(functions)}"
    return _checked(llguidance.LLMatcher.grammar_from_lark(lark), label, "tool call grammar")
