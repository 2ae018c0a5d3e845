"""Grammar builders for response_format and forced tool calls, checked with a real llguidance matcher.

The tokenizer is byte-level (one token per byte) plus an EOS and the two Hermes markers as added
tokens, so that a grammar's language is tested, not one model's tokenization.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from lmx.runtime import grammars
from lmx.runtime.grammars import Grammar

EOS, TOOL_OPEN, TOOL_CLOSE = 256, 257, 258
MARKERS = {"<tool_call>": TOOL_OPEN, "</tool_call>": TOOL_CLOSE}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}


def byte_level(markers: dict[str, int]) -> llguidance.LLTokenizer:
    """A token per byte, then EOS, then `markers` as added tokens (their ids in that order)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    t = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(["<|eos|>"])
    t.add_tokens(list(markers))
    return llguidance.LLTokenizer(t.to_str(), eos_token=EOS)


@pytest.fixture(scope="module")
def tok() -> llguidance.LLTokenizer:
    return byte_level(MARKERS)


def matches(tok: llguidance.LLTokenizer, grammar: Grammar, *texts: str | int) -> bool:
    """Whether the whole output (texts, and token ids for markers) is a complete match."""
    m = llguidance.LLMatcher(tok, grammar.text, log_level=0)
    for part in texts:
        ids = [part] if isinstance(part, int) else tok.tokenize_str(part)
        if not m.consume_tokens(ids):
            return False
    return bool(m.is_accepting())


def hermes(*calls: dict[str, Any]) -> list[str | int]:
    out: list[str | int] = []
    for i, call in enumerate(calls):
        out += ["\n"] if i else []
        out += [TOOL_OPEN, "\n" + json.dumps(call) + "\n", TOOL_CLOSE]
    return out


def test_json_object_accepts_objects_only(tok: llguidance.LLTokenizer) -> None:
    g = grammars.json_object()
    assert matches(tok, g, '{"a": [1, {"b": null}], "c": "d"}')
    assert matches(tok, g, "{}")
    assert not matches(tok, g, "[1, 2]")
    assert not matches(tok, g, '"text"')
    assert not matches(tok, g, '{"a": 1')  # incomplete: not accepting
    assert g.description == "json_object"


def test_json_whitespace_allows_pretty_printing_but_not_runs_of_blanks(
    tok: llguidance.LLTokenizer,
) -> None:
    g = grammars.json_object()
    assert matches(tok, g, json.dumps({"a": {"b": [1, 2]}}, indent=2))
    assert matches(tok, g, '{"a":1,"b":2}')
    assert not matches(tok, g, '{"a":  1}')
    assert not matches(tok, g, '{"a":\n\n1}')
    assert not matches(tok, g, '{"a":' + "\n" + " " * 40 + "1}")


def test_json_schema_enforces_required_fields_enum_and_integer_bounds(
    tok: llguidance.LLTokenizer,
) -> None:
    g = grammars.json_schema(PERSON, strict=True, name="person")
    assert matches(tok, g, '{"name": "Ann", "age": 30, "color": "red"}')
    assert not matches(tok, g, '{"name": "Ann", "age": 30}')
    assert not matches(tok, g, '{"name": "Ann", "age": 30, "color": "blue"}')
    assert not matches(tok, g, '{"name": "Ann", "age": 151, "color": "red"}')
    assert not matches(tok, g, '{"name": "Ann", "age": 3.5, "color": "red"}')
    assert not matches(tok, g, '{"name": "Annabelle!", "age": 1, "color": "red"}')
    assert not matches(tok, g, '{"name": "Ann", "age": 1, "color": "red", "x": 1}')
    assert "person" in g.description


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"type": "objekt"}, "objekt"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
        ({"type": "string", "pattern": "(("}, "unclosed group"),
        ({"type": "integer", "minimum": "zero"}, "minimum"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
    ],
)
def test_invalid_schema_raises_value_error_naming_the_problem(
    schema: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match="invalid JSON schema") as info:
        grammars.json_schema(schema, strict=True)
    assert problem in str(info.value)


def test_schema_that_is_not_an_object_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected an object, got list"):
        grammars.json_schema([{"type": "object"}])  # type: ignore[arg-type]


def test_non_strict_schema_ignores_unsupported_keywords(tok: llguidance.LLTokenizer) -> None:
    schema = {"type": "object", "properties": {"at": {"type": "string", "format": "no-such"}}}
    g = grammars.json_schema(schema, strict=False)
    assert matches(tok, g, '{"at": "whenever"}')
    assert any("no-such" in w for w in g.warnings)
    with pytest.raises(ValueError, match="Unknown format: no-such"):
        grammars.json_schema(schema, strict=True)


def test_named_tool_call_allows_exactly_one_call_of_that_function(
    tok: llguidance.LLTokenizer,
) -> None:
    g = grammars.tool_call([WEATHER, ADD], named="add", token_ids=MARKERS)
    add = {"name": "add", "arguments": {"a": 1, "b": 2}}
    assert matches(tok, g, *hermes(add))
    assert not matches(tok, g, *hermes(add, add))
    assert not matches(tok, g, *hermes({"name": "get_weather", "arguments": {"city": "Oslo"}}))
    assert not matches(tok, g, *hermes({"name": "add", "arguments": {"a": 1}}))
    assert not matches(tok, g, "Sure! ", *hermes(add))


def test_required_tool_call_allows_any_tool_one_or_more_times(
    tok: llguidance.LLTokenizer,
) -> None:
    g = grammars.tool_call([WEATHER, ADD], token_ids=MARKERS)
    weather = {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}
    add = {"name": "add", "arguments": {"a": -4, "b": 2}}
    assert matches(tok, g, *hermes(weather))
    assert matches(tok, g, *hermes(add, weather))
    assert not matches(tok, g, "")
    assert not matches(tok, g, *hermes({"name": "mul", "arguments": {}}))
    assert not matches(tok, g, *hermes({"name": "get_weather", "arguments": {"unit": "c"}}))
    single = grammars.tool_call([WEATHER, ADD], parallel=False, token_ids=MARKERS)
    assert matches(tok, single, *hermes(add))
    assert not matches(tok, single, *hermes(add, weather))


def test_tool_call_markers_must_be_the_marker_tokens(tok: llguidance.LLTokenizer) -> None:
    g = grammars.tool_call([ADD], token_ids=MARKERS)
    assert "<[257]>" in g.text
    assert "<[258]>" in g.text
    assert not matches(tok, g, "<", "tool_call>\n", '{"name": "add", "arguments": {"a": 1}}')


@pytest.mark.parametrize("params", [None, {}])
def test_a_function_without_parameters_takes_no_arguments(
    tok: llguidance.LLTokenizer, params: dict[str, Any] | None
) -> None:
    function: dict[str, Any] = {"name": "ping"} | ({} if params is None else {"parameters": params})
    g = grammars.tool_call([{"type": "function", "function": function}], token_ids=MARKERS)
    assert matches(tok, g, *hermes({"name": "ping", "arguments": {}}))
    assert not matches(tok, g, *hermes({"name": "ping", "arguments": {"!": True}}))


H_CHANNEL, H_CONSTRAIN, H_MESSAGE = 257, 258, 259
HARMONY_MARKERS = {"<|channel|>": H_CHANNEL, "<|constrain|>": H_CONSTRAIN, "<|message|>": H_MESSAGE}


@pytest.fixture(scope="module")
def harmony_tok() -> llguidance.LLTokenizer:
    return byte_level(HARMONY_MARKERS)


def harmony(name: str, arguments: dict[str, Any]) -> list[str | int]:
    """A call as gpt-oss writes it, after `<|start|>assistant`."""
    head = f"commentary to=functions.{name} "
    return [H_CHANNEL, head, H_CONSTRAIN, "json", H_MESSAGE, json.dumps(arguments)]


def test_a_harmony_call_is_one_message_to_a_function_with_its_arguments(
    harmony_tok: llguidance.LLTokenizer,
) -> None:
    g = grammars.harmony_call([WEATHER, ADD], token_ids=HARMONY_MARKERS)
    add = harmony("add", {"a": 1, "b": 2})
    assert matches(harmony_tok, g, *add)
    assert matches(harmony_tok, g, *harmony("get_weather", {"city": "Oslo", "unit": "f"}))
    assert not matches(harmony_tok, g, *harmony("add", {"a": 1}))  # b is required
    assert not matches(harmony_tok, g, *harmony("mul", {"a": 1, "b": 2}))
    assert not matches(harmony_tok, g, *add, *add)  # a call ends the output
    # Its markers are the marker tokens, not their text.
    text = "<|channel|>commentary to=functions.add <|constrain|>json<|message|>{}"
    assert not matches(harmony_tok, g, text)
    named = grammars.harmony_call([WEATHER, ADD], named="get_weather", token_ids=HARMONY_MARKERS)
    assert not matches(harmony_tok, named, *add)
    with pytest.raises(ValueError, match="names function 'mul', not in tools"):
        grammars.harmony_call([ADD], named="mul")


def test_bare_json_tool_call_without_wrap(tok: llguidance.LLTokenizer) -> None:
    g = grammars.tool_call([WEATHER], named="get_weather", syntax=grammars.BARE_JSON)
    assert matches(tok, g, '{"name": "get_weather", "arguments": {"city": "Rome"}}')


def test_mistral_tool_calls_are_one_list_of_any_length_unless_not_parallel(
    tok: llguidance.LLTokenizer,
) -> None:
    # As Mistral's templates write them: `[TOOL_CALLS][{...}, {...}]`.
    weather = {"name": "get_weather", "arguments": {"city": "Oslo"}}
    add = {"name": "add", "arguments": {"a": 1, "b": 2}}
    g = grammars.tool_call([WEATHER, ADD], syntax=grammars.MISTRAL)
    assert matches(tok, g, "[TOOL_CALLS]" + json.dumps([weather]))
    assert matches(tok, g, "[TOOL_CALLS]" + json.dumps([weather, add, weather]))
    assert not matches(tok, g, "[TOOL_CALLS]" + json.dumps([weather]) + json.dumps([add]))
    single = grammars.tool_call([WEATHER, ADD], syntax=grammars.MISTRAL, parallel=False)
    assert matches(tok, single, "[TOOL_CALLS]" + json.dumps([add]))
    assert not matches(tok, single, "[TOOL_CALLS]" + json.dumps([weather, add]))
    named = grammars.tool_call([WEATHER, ADD], named="add", syntax=grammars.MISTRAL)
    assert not matches(tok, named, "[TOOL_CALLS]" + json.dumps([add, add]))


def pick_lowest(tok: llguidance.LLTokenizer, grammar: Grammar) -> list[int]:
    """The output of a model that takes the lowest token the grammar allows, until the grammar
    allows only its end."""
    m = llguidance.LLMatcher(tok, grammar.text, log_level=0)
    out: list[int] = []
    while not m.is_stopped() and len(out) < 200:
        bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), np.uint8), bitorder="little")
        token = int(np.flatnonzero(bits)[0])
        assert m.consume_token(token), m.get_error()
        out.append(token)
    return out


@pytest.mark.parametrize("kind", ["tool_call", "json_schema"])
def test_a_markers_text_that_a_string_must_hold_is_written_as_text(
    tok: llguidance.LLTokenizer, kind: str
) -> None:
    # llguidance forced an enum's one value as the tokenizer splits it, and the tokenizer made
    # "</tool_call>" the marker's token, which the JSON string then refused: generation failed.
    params = {
        "type": "object",
        "properties": {"s": {"enum": ["a</tool_call>"]}},
        "required": ["s"],
        "additionalProperties": False,
    }
    if kind == "tool_call":
        tool = {"type": "function", "function": {"name": "f", "parameters": params}}
        out = pick_lowest(tok, grammars.tool_call([tool], named="f", token_ids=MARKERS))
        # The call's own markers are their tokens; the argument's is text.
        assert out[0] == TOOL_OPEN and out.count(TOOL_CLOSE) == 1 and out[-1] == TOOL_CLOSE
        assert json.loads(tok.decode_str(out[1:-1]))["arguments"] == {"s": "a</tool_call>"}
    else:
        out = pick_lowest(tok, grammars.json_schema(params, markers=MARKERS))
        assert TOOL_CLOSE not in out
        assert json.loads(tok.decode_str(out)) == {"s": "a</tool_call>"}


def test_tool_parameters_with_local_refs_still_resolve(tok: llguidance.LLTokenizer) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "move",
            "parameters": {
                "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}}}},
                "type": "object",
                "properties": {"to": {"$ref": "#/$defs/point"}},
                "required": ["to"],
            },
        },
    }
    g = grammars.tool_call([ADD, tool], token_ids=MARKERS)
    assert matches(tok, g, *hermes({"name": "move", "arguments": {"to": {"x": 3}}}))
    assert not matches(tok, g, *hermes({"name": "move", "arguments": {"to": {"x": "3"}}}))


@pytest.mark.parametrize(
    ("tools", "named", "message"),
    [
        ([WEATHER], "add", "names function 'add', not in tools \\(get_weather\\)"),
        ([], None, "no tools were given"),
        ([WEATHER, WEATHER], None, "duplicate function name 'get_weather'"),
        ([{"type": "function", "function": {"parameters": {}}}], None, "needs a non-empty name"),
    ],
)
def test_tool_call_rejects_bad_tool_choice(
    tools: list[dict[str, Any]], named: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        grammars.tool_call(tools, named=named)


def test_tool_call_with_invalid_parameters_names_the_function() -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}
    with pytest.raises(ValueError, match=r"function 'f' parameters: .*objekt"):
        grammars.tool_call([WEATHER, bad])


def test_strict_tool_rejects_unsupported_keywords_that_a_lax_one_ignores() -> None:
    params = {"type": "object", "properties": {"at": {"type": "string", "format": "no-such"}}}
    lax = {"type": "function", "function": {"name": "f", "parameters": params}}
    strict = {"type": "function", "function": {"name": "f", "parameters": params, "strict": True}}
    assert grammars.tool_call([lax]).warnings
    with pytest.raises(ValueError, match=r"function 'f' parameters: .*no-such"):
        grammars.tool_call([strict])
