"""Output parsers: content, reasoning and tool calls out of streamed text, however it is split."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmx.api.generation import CallBegun, CallEnded, CallText, ChoiceState
from lmx.runtime.engine import Delta, LoadConfig
from lmx.runtime.mlx_tokenizer import MlxTokenizer
from lmx.runtime.parsers import (
    TOOL_PARSERS,
    CallArguments,
    CallOpened,
    Content,
    OutputParser,
    Piece,
    Reasoning,
    ToolCall,
    detect_reasoning,
    detect_tool_parser,
    make_parser,
)
from lmx.runtime.toolcalls import mistral_safe_id

Config = dict[str, Any]  # make_parser keyword arguments
HERMES: Config = {"tool_parser": "hermes", "tools_enabled": True, "reasoning": False}
QWEN3: Config = {"tool_parser": "hermes", "tools_enabled": True, "reasoning": True}
LLAMA3: Config = {"tool_parser": "llama3", "tools_enabled": True, "reasoning": False}
MISTRAL: Config = {"tool_parser": "mistral", "tools_enabled": True, "reasoning": False}
PLAIN: Config = {"tool_parser": None, "tools_enabled": False, "reasoning": False}
THINK: Config = {"tool_parser": None, "tools_enabled": False, "reasoning": True}
R1: Config = {
    "tool_parser": None,
    "tools_enabled": False,
    "reasoning": True,
    "starts_in_reasoning": True,
}
NO_TOOLS: Config = {"tool_parser": "hermes", "tools_enabled": False, "reasoning": True}
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "metric": {"type": ["boolean", "null"]},
        "where": {"type": "object"},
    },
}
GLM: Config = {
    "tool_parser": "glm",
    "tools_enabled": True,
    "reasoning": True,
    "functions": {"get_weather": WEATHER_PARAMETERS},
}
HARMONY: Config = {"tool_parser": "harmony", "tools_enabled": True, "reasoning": True}
CODER: Config = {
    "tool_parser": "qwen3_coder",
    "tools_enabled": True,
    "reasoning": False,
    "functions": {"get_weather": WEATHER_PARAMETERS},
}

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def call(name: str, arguments: str = '{"city": "Paris"}') -> ToolCall:
    return ToolCall(id="", name=name, arguments=arguments)


def run(config: dict[str, Any], chunks: list[str]) -> list[Piece]:
    """Feed `chunks`, finish; adjacent pieces of one kind joined, call ids blanked."""
    parser = make_parser(**config)
    pieces = [p for chunk in chunks for p in parser.feed(chunk)] + parser.finish()
    return normalized(pieces)


def normalized(pieces: list[Piece]) -> list[Piece]:
    """A streamed call as the ToolCall that ends it, once it is checked against what streamed;
    call ids blanked; adjacent text of one kind joined."""
    out: list[Piece] = []
    opened: CallOpened | None = None
    streamed = ""
    for p in pieces:
        if isinstance(p, CallOpened):
            assert opened is None, "a call opened inside another"
            opened, streamed = p, ""
        elif isinstance(p, CallArguments):
            assert opened is not None, "arguments with no call open"
            streamed += p.text
        elif isinstance(p, ToolCall):
            if opened is not None:
                assert (p.id, p.name) == (opened.id, opened.name)
                assert p.arguments.startswith(streamed)
                opened = None
            out.append(dataclasses.replace(p, id=""))
        elif out and type(out[-1]) is type(p):
            out[-1] = type(p)(out[-1].text + p.text)
        else:
            out.append(p)
    assert opened is None, "a call left open"
    return out


CASES: list[tuple[str, dict[str, Any], str, list[Piece]]] = [
    ("plain_answer", PLAIN, "Hello, world!", [Content("Hello, world!")]),
    (
        "think_then_answer",
        THINK,
        "<think>plan</think>\n\nanswer",
        [Reasoning("plan"), Content("answer")],
    ),
    (
        "prompt_opened_think",
        R1,
        "plan\n</think>\n\nanswer",
        [Reasoning("plan\n"), Content("answer")],
    ),
    (
        "prompt_opened_think_model_repeats_tag",
        R1,
        "<think>plan</think>answer",
        [Reasoning("plan"), Content("answer")],
    ),
    ("unterminated_reasoning", R1, "still thinking", [Reasoning("still thinking")]),
    # Reasoning comes before the answer: its tags inside the answer (a JSON string) are text.
    ("think_tag_inside_the_answer", THINK, '{"a": "<think>"}', [Content('{"a": "<think>"}')]),
    (
        "tags_after_reasoning_inside_the_answer",
        THINK,
        "<think>plan</think>Write </think> or <think>.",
        [Reasoning("plan"), Content("Write </think> or <think>.")],
    ),
    (
        "qwen3_call_holding_think_tags",
        QWEN3,
        '<think>p</think>\n\n<tool_call>\n{"name": "f", "arguments": {"s": "<think>"}}\n</tool_call>',
        [Reasoning("p"), call("f", '{"s": "<think>"}')],
    ),
    ("reasoning_off_tags_are_content", PLAIN, "<think>x</think>y", [Content("<think>x</think>y")]),
    (
        "qwen3_think_then_call",
        QWEN3,
        f"<think>need weather</think>\n\n<tool_call>\n{WEATHER}\n</tool_call>",
        [Reasoning("need weather"), call("get_weather")],
    ),
    (
        "tool_tag_inside_reasoning_stays_reasoning",
        QWEN3,
        f"<think><tool_call>{WEATHER}</tool_call></think>ok",
        [Reasoning(f"<tool_call>{WEATHER}</tool_call>"), Content("ok")],
    ),
    ("hermes_one_call", HERMES, f"<tool_call>\n{WEATHER}\n</tool_call>", [call("get_weather")]),
    (
        "hermes_two_calls",
        HERMES,
        f'<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{{"name": "now", "arguments": {{}}}}\n</tool_call>',
        [call("get_weather"), call("now", "{}")],
    ),
    (
        "hermes_content_before_call",
        HERMES,
        f"Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>",
        [Content("Let me check."), call("get_weather")],
    ),
    (
        "hermes_content_after_call",
        HERMES,
        f"<tool_call>{WEATHER}</tool_call>\n\nDone.\n",
        [call("get_weather"), Content("Done.\n")],
    ),
    (
        "hermes_malformed_json_is_content",
        HERMES,
        'Hi\n<tool_call>{"name": "f": {</tool_call>',
        [Content('Hi\n<tool_call>{"name": "f": {</tool_call>')],
    ),
    (  # JSON escapes a control character in a string; a model may write one raw (code)
        "hermes_raw_newline_in_a_string_is_escaped",
        HERMES,
        '<tool_call>{"name": "f", "arguments": {"code": "a\n\tb"}}</tool_call>',
        [call("f", '{"code": "a\\n\\tb"}')],
    ),
    (  # a backslash that begins no JSON escape is one the model meant (a regex, a path)
        "hermes_a_stray_backslash_in_a_string_is_escaped",
        HERMES,
        r'<tool_call>{"name": "grep", "arguments": {"p": "\d+\.py", "d": "C:\Users",'
        r' "ok": "a\"b\n\u00e9\\", "u": "\uZZ \u12"}}</tool_call>',
        [
            call(
                "grep",
                r'{"p": "\\d+\\.py", "d": "C:\\Users", "ok": "a\"b\n\u00e9\\", "u": "\\uZZ \\u12"}',
            )
        ],
    ),
    (  # a quote that cannot end its string (no colon, comma or bracket after it) is inside it
        "hermes_an_unescaped_quote_inside_a_string_is_escaped",
        HERMES,
        '<tool_call>{"name": "sh", "arguments": {"cmd": "echo "hi" > f.txt", "n": 1}}</tool_call>',
        [call("sh", r'{"cmd": "echo \"hi\" > f.txt", "n": 1}')],
    ),
    (  # and a comma before a closing bracket is dropped
        "hermes_a_trailing_comma_is_dropped",
        HERMES,
        '<tool_call>{"name": "f", "arguments": {"a": [1, 2,], "s": ",]", "b": 3,\n}}</tool_call>',
        [call("f", '{"a": [1, 2], "s": ",]", "b": 3\n}')],
    ),
    (
        "hermes_pythons_constants_are_jsons",
        HERMES,
        '<tool_call>{"name": "f", "arguments": {"a": True, "b": [False,None], "s": "True"}}'
        "</tool_call>",
        [call("f", '{"a": true, "b": [false,null], "s": "True"}')],
    ),
    (
        "hermes_a_python_dict_is_a_call",  # whole, at its end: its head is not JSON's
        HERMES,
        "<tool_call>{'name': 'f', 'arguments': {'a': True, 'b': \"it's\", 'c': None}}</tool_call>",
        [call("f", '{"a": true, "b": "it\'s", "c": null}')],
    ),
    (
        "hermes_a_python_set_is_no_call",
        HERMES,
        "<tool_call>{'name': 'f', 'arguments': {'a': {1}}}</tool_call>",
        [Content("<tool_call>{'name': 'f', 'arguments': {'a': {1}}}</tool_call>")],
    ),
    (
        "mistral_a_stray_backslash_in_a_string_is_escaped",
        MISTRAL,
        r'[TOOL_CALLS]grep[ARGS]{"p": "\w+",}',
        [call("grep", r'{"p": "\\w+"}')],
    ),
    (  # the call went out as it streamed: it ends with what came
        "hermes_malformed_json_after_the_calls_head_is_a_call",
        HERMES,
        'Hi\n<tool_call>{"name": "f", "arguments": {"a": 1</tool_call>',
        [Content("Hi"), call("f", '{"a": 1')],
    ),
    (
        "hermes_json_not_a_call_is_content",
        HERMES,
        '<tool_call>{"city": "Paris"}</tool_call>',
        [Content('<tool_call>{"city": "Paris"}</tool_call>')],
    ),
    ("hermes_unterminated_json_call", HERMES, f"<tool_call>\n{WEATHER}\n", [call("get_weather")]),
    (
        # Code in an argument may hold the closing marker: inside the JSON it is not the end.
        "hermes_closing_marker_inside_an_argument",
        HERMES,
        '<tool_call>\n{"name": "write", "arguments": {"s": "a</tool_call>b"}}\n</tool_call> Done.',
        [call("write", '{"s": "a</tool_call>b"}'), Content("Done.")],
    ),
    (
        # Cut off by max_tokens: the call it was writing, its arguments as far as they got.
        "hermes_cut_off_call",
        HERMES,
        'Writing. <tool_call>\n{"name": "write", "arguments": {"s": "a</b> and [',
        [Content("Writing."), call("write", '{"s": "a</b> and [')],
    ),
    (
        "mistral_cut_off_call",
        MISTRAL,
        '[TOOL_CALLS][{"name": "f", "arguments": {}}, {"name": "write", "arguments": {"s": "ab',
        [call("f", "{}"), call("write", '{"s": "ab')],
    ),
    (
        "mistral_cut_off_after_a_whole_call",
        MISTRAL,
        '[TOOL_CALLS][{"name": "f", "arguments": {}}, ',
        [call("f", "{}")],
    ),
    (
        "mistral_cut_off_name_args",
        MISTRAL,
        '[TOOL_CALLS]write[ARGS]{"s": "ab',
        [call("write", '{"s": "ab')],
    ),
    (
        "hermes_unterminated_garbage",
        HERMES,
        '<tool_call>\n{"name": "get_w',
        [Content('<tool_call>\n{"name": "get_w')],
    ),
    ("hermes_output_ends_at_opener", HERMES, "x <tool_call>", [Content("x <tool_call>")]),
    ("hermes_partial_opener_at_finish", HERMES, "a <tool_c", [Content("a <tool_c")]),
    (
        "hermes_string_arguments_kept",
        HERMES,
        '<tool_call>{"name": "f", "arguments": "{\\"a\\":1}"}</tool_call>',
        [call("f", '{"a":1}')],
    ),
    ("hermes_missing_arguments", HERMES, '<tool_call>{"name": "f"}</tool_call>', [call("f", "{}")]),
    (
        "hermes_parameters_key",
        HERMES,
        '<tool_call>{"name": "f", "parameters": {"a": "é"}}</tool_call>',
        [call("f", '{"a": "é"}')],
    ),
    (
        "hermes_list_arguments_is_content",
        HERMES,
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        [Content('<tool_call>{"name": "f", "arguments": [1]}</tool_call>')],
    ),
    (
        "hermes_string_arguments_not_object",
        HERMES,
        '<tool_call>{"name": "f", "arguments": "hi"}</tool_call>',
        [Content('<tool_call>{"name": "f", "arguments": "hi"}</tool_call>')],
    ),
    (
        "tools_disabled_tags_are_content",
        NO_TOOLS,
        f"<tool_call>{WEATHER}</tool_call>",
        [Content(f"<tool_call>{WEATHER}</tool_call>")],
    ),
    (
        "no_tool_parser_tags_are_content",
        {**HERMES, "tool_parser": None},
        f"<tool_call>{WEATHER}</tool_call>",
        [Content(f"<tool_call>{WEATHER}</tool_call>")],
    ),
    (
        "llama3_parameters",
        LLAMA3,
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        [call("get_weather")],
    ),
    ("llama3_python_tag_arguments", LLAMA3, f"<|python_tag|>{WEATHER}", [call("get_weather")]),
    (
        "llama3_semicolons",
        LLAMA3,
        f' {WEATHER}; {{"name": "now", "parameters": {{}}}}',
        [call("get_weather"), call("now", "{}")],
    ),
    (
        "llama3_newlines",
        LLAMA3,
        f'{WEATHER}\n{{"name": "now", "parameters": {{}}}}\n',
        [call("get_weather"), call("now", "{}")],
    ),
    (
        "llama3_openai_shaped",
        LLAMA3,
        '{"type": "function", "function": {"name": "f", "parameters": {}}}',
        [call("f", "{}")],
    ),
    ("llama3_plain_text", LLAMA3, "It is sunny.", [Content("It is sunny.")]),
    ("llama3_json_answer_is_content", LLAMA3, '{"answer": 42}', [Content('{"answer": 42}')]),
    (
        "llama3_name_without_parameters_is_content",
        LLAMA3,
        '{"name": "Bob"}',
        [Content('{"name": "Bob"}')],
    ),
    (
        "llama3_call_after_text_is_content",
        LLAMA3,
        f"Sure: {WEATHER}",
        [Content(f"Sure: {WEATHER}")],
    ),
    ("llama3_call_then_text_is_content", LLAMA3, f"{WEATHER} ok", [Content(f"{WEATHER} ok")]),
    (
        "llama3_python_tag_code_is_content",
        LLAMA3,
        "<|python_tag|>print(1)",
        [Content("<|python_tag|>print(1)")],
    ),
    (
        "mistral_list",
        MISTRAL,
        f'[TOOL_CALLS][{WEATHER}, {{"name": "now", "arguments": {{}}}}]',
        [call("get_weather"), call("now", "{}")],
    ),
    (
        "mistral_content_before",
        MISTRAL,
        f"Checking. [TOOL_CALLS] [{WEATHER}]",
        [Content("Checking."), call("get_weather")],
    ),
    (
        "mistral_name_args",
        MISTRAL,
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]now[ARGS]{}',
        [call("get_weather"), call("now", "{}")],
    ),
    (
        "mistral_call_id",
        MISTRAL,
        '[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}',
        [call("get_weather")],
    ),
    (
        "mistral_malformed",
        MISTRAL,
        '[TOOL_CALLS][{"name": "f", "arguments": {]',
        [Content('[TOOL_CALLS][{"name": "f", "arguments": {]')],
    ),
    (
        "mistral_bad_name",
        MISTRAL,
        "[TOOL_CALLS]two words[ARGS]{}",
        [Content("[TOOL_CALLS]two words[ARGS]{}")],
    ),
    ("mistral_brackets_in_content", MISTRAL, "See [1] and [TOOL", [Content("See [1] and [TOOL")]),
    (
        "coder_call",
        CODER,
        "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "</function>\n</tool_call>",
        [Content("Checking."), call("get_weather")],
    ),
    (
        # Typed by the function's schema: a string stays one whatever it looks like, a value not
        # of its type and a parameter the schema does not name are their text.
        "coder_typed",
        CODER,
        "<tool_call>\n<function=get_weather>\n<parameter=city>\n007\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n<parameter=metric>\nTrue\n</parameter>\n"
        '<parameter=where>\n{"lat": 1}\n</parameter>\n<parameter=note>\n42\n</parameter>\n'
        "<parameter=city2>\nline 1\nline 2\n</parameter>\n</function>\n</tool_call>",
        [
            call(
                "get_weather",
                '{"city": "007", "days": 3, "metric": true, "where": {"lat": 1}, "note": "42", '
                '"city2": "line 1\\nline 2"}',
            )
        ],
    ),
    (
        "coder_null_and_mistyped",
        CODER,
        "<tool_call>\n<function=get_weather>\n<parameter=metric>\nnull\n</parameter>\n"
        "<parameter=days>\nthree\n</parameter>\n</function>\n</tool_call>",
        [call("get_weather", '{"metric": null, "days": "three"}')],
    ),
    (
        "coder_two_calls",
        CODER,
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "</function>\n</tool_call>\n<tool_call>\n<function=other>\n</function>\n</tool_call>",
        [call("get_weather"), call("other", "{}")],
    ),
    (
        "coder_json_as_a_grammar_writes_it",
        CODER,
        f"<tool_call>\n{WEATHER}\n</tool_call>",
        [call("get_weather")],
    ),
    (
        "coder_close_tag_inside_a_value",
        CODER,
        "<tool_call>\n<function=get_weather>\n<parameter=city>\na </tool_call> b\n</parameter>\n"
        "</function>\n</tool_call>",
        [call("get_weather", '{"city": "a </tool_call> b"}')],
    ),
    (
        "coder_cut_off",
        CODER,
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3",
        [call("get_weather")],
    ),
    (
        "glm_call",
        GLM,
        "<think>Weather.</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n"
        "</tool_call>",
        [Reasoning("Weather."), call("get_weather", '{"city": "Paris", "days": 3}')],
    ),
    (
        # GLM-4.7's: no line breaks, and a call may have no arguments.
        "glm47_calls",
        GLM,
        '<tool_call>get_weather<arg_key>where</arg_key><arg_value>{"lat": 1}</arg_value>'
        "</tool_call><tool_call>now</tool_call>",
        [call("get_weather", '{"where": {"lat": 1}}'), call("now", "{}")],
    ),
    (
        "glm_close_tag_inside_a_value",
        GLM,
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>a </tool_call> b"
        "</arg_value>\n</tool_call>",
        [call("get_weather", '{"city": "a </tool_call> b"}')],
    ),
    (
        "glm_cut_off",
        GLM,
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>3",
        [call("get_weather")],
    ),
    ("glm_cut_off_in_its_name", GLM, "<tool_call>get_wea", [Content("<tool_call>get_wea")]),
    (
        "glm_json_as_a_grammar_writes_it",
        GLM,
        f"<tool_call>\n{WEATHER}\n</tool_call>",
        [call("get_weather")],
    ),
    (
        "harmony_answer",
        HARMONY,
        "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final"
        "<|message|>Hello <b>!",
        [Reasoning("Think."), Content("Hello <b>!")],
    ),
    (
        "harmony_past_its_return",  # ignore_eos: the markup that ended it stays out
        HARMONY,
        "<|channel|>final<|message|>Hi<|return|><|start|>assistant<|channel|>final<|message|> again",
        [Content("Hi again")],
    ),
    (
        "harmony_call",
        HARMONY,
        "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary"
        ' to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}',
        [Reasoning("Need weather."), call("get_weather")],
    ),
    (
        "harmony_call_addressed_first",
        HARMONY,
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": '
        '"Paris"}<|call|>',
        [call("get_weather")],
    ),
    (  # as a Hermes call's JSON is (hermes_a_stray_backslash_in_a_string_is_escaped, ...)
        "harmony_a_calls_json_is_mended",
        HARMONY,
        "<|channel|>commentary to=functions.grep <|constrain|>json<|message|> "
        + r'{"p": "\d+", "code": "a'
        + "\n"
        + r'b", "l": [1, 2,],} <|call|>',
        [call("grep", r'{"p": "\\d+", "code": "a\nb", "l": [1, 2]}')],
    ),
    (
        "harmony_preamble_then_answer",
        HARMONY,
        "<|channel|>commentary<|message|>Looking.<|end|><|start|>assistant<|channel|>final"
        "<|message|> Done.",
        [Content("Looking. Done.")],
    ),
    ("harmony_none_at_all", HARMONY, "Hello there", [Content("Hello there")]),
    ("harmony_cut_in_a_header", HARMONY, "<|channel|>analy", []),
    (
        "harmony_call_with_tools_off",
        {**HARMONY, "tools_enabled": False},
        '<|channel|>commentary to=functions.get_weather<|message|>{"city": "Paris"}<|call|>',
        [Content('{"city": "Paris"}')],
    ),
    (
        "coder_not_a_call",
        CODER,
        "<tool_call>\nnot a call\n</tool_call>",
        [Content("<tool_call>\nnot a call\n</tool_call>")],
    ),
]


@pytest.mark.parametrize(
    ("config", "output", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_parses_whole_output(config: dict[str, Any], output: str, expected: list[Piece]) -> None:
    assert run(config, [output]) == expected


@pytest.mark.parametrize(
    ("config", "output", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_any_split_point_and_char_by_char_give_the_same_pieces(
    config: dict[str, Any], output: str, expected: list[Piece]
) -> None:
    for i in range(len(output) + 1):
        assert run(config, [output[:i], output[i:]]) == expected, i
    assert run(config, list(output)) == expected


def test_plain_answer_streams_chunk_by_chunk_with_tools_and_reasoning_on() -> None:
    parser = make_parser(**QWEN3)
    assert parser.feed("Hel") == [Content("Hel")]
    assert parser.feed("lo <") == [Content("lo")]  # " <" may open a tag
    assert parser.feed("b>") == [Content(" <b>")]
    assert parser.feed("\n\n") == []  # may precede a tool call
    assert parser.feed("Bye") == [Content("\n\nBye")]
    assert parser.finish() == []


def test_reasoning_streams_chunk_by_chunk() -> None:
    parser = make_parser(**THINK)
    assert parser.feed("<think>ab") == [Reasoning("ab")]
    assert parser.feed("c</th") == [Reasoning("c")]
    assert parser.feed("ink>\n") == []
    assert parser.feed("x") == [Content("x")]


def test_llama3_holds_only_while_output_may_be_a_call() -> None:
    parser = make_parser(**LLAMA3)
    assert parser.feed("Sure") == [Content("Sure")]
    parser = make_parser(**LLAMA3)
    assert parser.feed(' {"na') == []
    assert parser.feed('me": "f", ') == []
    parser = make_parser(**LLAMA3)
    assert parser.feed('{"ans') == [Content('{"ans')]  # no tool call opens with that key


def test_call_ids_are_unique_openai_style() -> None:
    text = "".join(f'<tool_call>{{"name": "f{i}"}}</tool_call>' for i in range(50))
    parser = make_parser(**HERMES)
    calls = [p for p in parser.feed(text) + parser.finish() if isinstance(p, ToolCall)]
    assert len(calls) == 50
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c.id) for c in calls)
    assert len({c.id for c in calls}) == 50


def test_arguments_are_a_json_object_string() -> None:
    text = '<tool_call>{"name": "f", "arguments": {"q": "naïve", "n": [1, 2]}}</tool_call>'
    [piece] = run(HERMES, [text])
    assert isinstance(piece, ToolCall)
    assert json.loads(piece.arguments) == {"q": "naïve", "n": [1, 2]}


def test_call_ids_are_openais_and_mistrals_are_what_its_templates_take() -> None:
    def ids(config: Config, text: str) -> list[str]:
        parser = make_parser(**config)
        return [p.id for p in [*parser.feed(text), *parser.finish()] if isinstance(p, ToolCall)]

    (hermes,) = ids(HERMES, f"<tool_call>{WEATHER}</tool_call>")
    assert hermes.startswith("call_") and len(hermes) == 29
    mistral = ids(MISTRAL, f"[TOOL_CALLS][{WEATHER}, {WEATHER}]")
    mistral += ids(MISTRAL, '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}')
    assert len(mistral) == 3 and len(set(mistral)) == 3
    assert all(len(i) == 9 and i.isalnum() for i in mistral)


def test_ids_sent_back_to_a_mistral_template_are_ones_it_takes() -> None:
    assert mistral_safe_id("a1B2c3D4e") == "a1B2c3D4e"
    made = mistral_safe_id("call_0SPnmtqs8WTFokV4l4iPvJcj")
    assert (
        len(made) == 9
        and made.isalnum()
        and made == mistral_safe_id("call_0SPnmtqs8WTFokV4l4iPvJcj")
    )
    assert made != mistral_safe_id("call_other")


def test_a_llama3_call_of_a_function_the_request_did_not_declare_is_a_json_answer() -> None:
    # Bare JSON has no marker: {"name": "Bob", "parameters": ...} may be the answer itself.
    answer = '{"name": "Bob", "parameters": {"age": 3}}'
    declared = make_parser(**LLAMA3, functions={"get_weather": {}})
    assert [*declared.feed(answer), *declared.finish()] == [Content(answer)]
    assert run({**LLAMA3, "functions": {"get_weather": {}}}, [WEATHER]) == [call("get_weather")]


def test_unknown_tool_parser_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown tool parser 'xml'"):
        make_parser(tool_parser="xml", tools_enabled=True, reasoning=False)


def test_registry_builds_fresh_parsers() -> None:
    assert set(TOOL_PARSERS) == {"hermes", "llama3", "mistral", "qwen3_coder", "glm"}
    for name in TOOL_PARSERS:
        assert isinstance(
            make_parser(tool_parser=name, tools_enabled=True, reasoning=True), OutputParser
        )


FRAGMENTS = [
    "<think>", "</think>", "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>",
    WEATHER, '{"name": "f"}', "{", "}", "[", "]", ";", '"', "<", "</", "\n", "\n\n", " ",
    "Hello", " world", "é", "<tool", "[TOOL", "call_", "<function=get_weather>",
    "<parameter=city>", "</parameter>", "</function>", "get_weather", "<arg_key>", "</arg_key>",
    "<arg_value>", "</arg_value>", "<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>",
    "<|return|>", "analysis", "final", " to=functions.get_weather",
]  # fmt: skip
CONFIGS: list[Config] = [
    PLAIN,
    THINK,
    R1,
    HERMES,
    QWEN3,
    LLAMA3,
    MISTRAL,
    {**MISTRAL, "reasoning": True},
    CODER,
    GLM,
    HARMONY,
]


@pytest.mark.parametrize("config", CONFIGS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_chunking_never_changes_the_pieces(config: dict[str, Any], data: st.DataObject) -> None:
    output = "".join(data.draw(st.lists(st.sampled_from(FRAGMENTS), max_size=12)))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(output)), max_size=8)))
    chunks = [output[a:b] for a, b in zip([0, *cuts], [*cuts, len(output)], strict=True)]
    assert run(config, chunks) == run(config, [output])


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(st.sampled_from('ab\\",]}[{ /\nué<')),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    arguments=st.dictionaries(st.text(max_size=4), JSON, max_size=4),
    ascii_only=st.booleans(),
    cuts=st.lists(st.integers(0, 400), max_size=6),
)
def test_a_json_call_that_needs_no_mending_streams_as_written(
    arguments: dict[str, Any], ascii_only: bool, cuts: list[int]
) -> None:
    """What mends a model's slips (_JsonCall._read) leaves valid JSON as it is, in any chunks."""
    text = json.dumps(arguments, ensure_ascii=ascii_only)
    for config, output in (
        (HERMES, f'<tool_call>{{"name": "f", "arguments": {text}}}</tool_call>'),
        (MISTRAL, f"[TOOL_CALLS]f[ARGS]{text}"),
        (HARMONY, f"<|channel|>commentary to=functions.f<|message|>{text}<|call|>"),
    ):
        cut = sorted(min(c, len(output)) for c in cuts)
        chunks = [output[a:b] for a, b in zip([0, *cut], [*cut, len(output)], strict=True)]
        assert run(config, chunks) == [call("f", text)], output


@given(text=st.text(st.characters(exclude_characters="<[{"), max_size=40))
def test_text_without_markup_comes_back_whole(text: str) -> None:
    for config in CONFIGS:
        pieces = run(config, list(text))
        assert "".join(p.text for p in pieces if isinstance(p, Content | Reasoning)) == text


QWEN3_TEMPLATE = (
    "{%- if tools %}<tools>{{ tools }}</tools> return <tool_call>{...}</tool_call>{%- endif %}"
    "{%- if message.reasoning_content %}<think>\\n{{ message.reasoning_content }}\\n</think>{%- endif %}"
)
LLAMA31_TEMPLATE = (
    "{%- if builtin_tools %}{{- '<|python_tag|>' + tool_call.name + '.call(' }}{%- endif %}"
    '{%- elif message.role == "ipython" %}{{- \'{"name": "\' + tool_call.name + \'", "parameters": \' }}'
)
LLAMA32_TEMPLATE = (
    '{%- if message.role == "ipython" or message.role == "tool" %}<|start_header_id|>ipython'
    '{{- \'{"name": "\' + tool_call.name + \'", "parameters": \' + tool_call.arguments | tojson }}'
)
MISTRAL_TEMPLATE = (
    "{%- if message.tool_calls %}{{- '[TOOL_CALLS]' }}{{- tool_call.name + '[ARGS]' }}"
)
QWEN3_CODER_TEMPLATE = (
    "{{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}"
    "{{- '<parameter=' + args_name + '>\\n' }}"
)
GLM_TEMPLATE = (
    "{{- '<tool_call>' + tc.name }}{% for k, v in tc.arguments.items() %}"
    "{{- '<arg_key>' + k + '</arg_key><arg_value>' + v + '</arg_value>' }}{% endfor %}"
    "{%- if reasoning_content %}<think>{{ reasoning_content }}</think>{% endif %}"
)
PLAIN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\\n{{ m.content }}<|im_end|>{% endfor %}"
)


@pytest.mark.parametrize(
    ("template", "vocab", "tool_parser", "reasoning"),
    [
        (QWEN3_TEMPLATE, {"<tool_call>", "</tool_call>", "<think>", "</think>"}, "hermes", True),
        (LLAMA31_TEMPLATE, {"<|python_tag|>", "<|eot_id|>"}, "llama3", False),
        (LLAMA32_TEMPLATE, {"<|eot_id|>"}, "llama3", False),
        (MISTRAL_TEMPLATE, {"[TOOL_CALLS]", "[ARGS]"}, "mistral", False),
        (PLAIN_TEMPLATE, {"<|im_start|>", "hello"}, None, False),
        (None, {"[TOOL_CALLS]"}, "mistral", False),
        (None, {"</think>"}, None, True),
        (QWEN3_TEMPLATE, {"<|python_tag|>"}, "hermes", True),  # a Hermes fine-tune of Llama 3.1
        (QWEN3_CODER_TEMPLATE, {"<tool_call>", "</tool_call>"}, "qwen3_coder", False),
        (GLM_TEMPLATE, {"<tool_call>", "</tool_call>"}, "glm", True),
        (PLAIN_TEMPLATE, {"<|start|>", "<|channel|>", "<|message|>", "<|call|>"}, "harmony", True),
    ],
    ids=[
        "qwen3",
        "llama3.1",
        "llama3.2",
        "mistral",
        "plain",
        "vocab_only",
        "r1_vocab",
        "hermes_on_llama",
        "qwen3_coder",
        "glm",
        "harmony",
    ],
)
def test_detects_formats_from_template_and_vocab(
    template: str | None, vocab: set[str], tool_parser: str | None, reasoning: bool
) -> None:
    assert detect_tool_parser(template, vocab) == tool_parser
    assert detect_reasoning(template, vocab) is reasoning


def test_detects_the_builtin_models_template_as_hermes() -> None:
    from importlib.resources import files

    template = files("lmx.runtime").joinpath("data/chat_template.jinja").read_text()
    assert detect_tool_parser(template, set()) == "hermes"


def test_a_choice_counts_the_tokens_its_reasoning_took() -> None:
    state = ChoiceState(0, make_parser(**QWEN3))
    state.absorb(Delta("<think>", token_ids=(1,)))  # held: it counts with what it opens
    state.absorb(Delta("abc", token_ids=(2, 3)))
    assert state.reasoning_tokens == 3
    state.absorb(Delta("de</think>Hi!", token_ids=(4, 5, 6)))  # 2 of its 5 characters thought
    assert state.reasoning_tokens == 4
    state.absorb(Delta("</think>", token_ids=(7,)))  # after the answer began: its text
    state.absorb(Delta("", finish_reason="stop", completion_tokens=7))
    assert (state.reasoning_tokens, "".join(state.content)) == (4, "Hi!</think>")
    short = ChoiceState(0, make_parser(**QWEN3))
    ended = Delta(
        "<think>abcdefgh", token_ids=(1,) * 5, finish_reason="length", completion_tokens=3
    )
    short.absorb(ended)
    assert short.reasoning_tokens == 3  # never more than the answer's tokens
    harmony = ChoiceState(0, make_parser(**HARMONY))
    for text in ("<|channel|>", "analysis", "<|message|>", "hm", "<|end|>", "<|start|>"):
        harmony.absorb(Delta(text, token_ids=(1,)))
    harmony.absorb(Delta("assistant<|channel|>final<|message|>Hi", token_ids=(1,) * 5))
    harmony.absorb(Delta("", finish_reason="stop", completion_tokens=11))
    assert harmony.reasoning_tokens == 4  # its header's three and its text's one


LONG = "x" * 40 + '\n"quoted"'  # a long string argument, with what JSON escapes
STREAMING: list[tuple[str, dict[str, Any], str, str]] = [
    # (format, config, output, the call's arguments)
    (
        "hermes",
        HERMES,
        f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": {json.dumps(LONG)}}}}}'
        "\n</tool_call>",
        json.dumps({"city": LONG}),
    ),
    (
        "mistral",
        MISTRAL,
        f'[TOOL_CALLS]get_weather[ARGS]{{"city": {json.dumps(LONG)}}}',
        json.dumps({"city": LONG}),
    ),
    (
        "harmony",
        HARMONY,
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        f' {{"city": {json.dumps(LONG)}}} <|call|>',
        json.dumps({"city": LONG}),
    ),
    (
        "qwen3_coder",
        CODER,
        f"<tool_call>\n<function=get_weather>\n<parameter=days>\n3\n</parameter>\n"
        f"<parameter=city>\n{LONG}\n</parameter>\n</function>\n</tool_call>",
        json.dumps({"days": 3, "city": LONG}),
    ),
    (
        "glm",
        GLM,
        f"<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>{LONG}</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
        json.dumps({"city": LONG, "days": 3}),
    ),
]


@pytest.mark.parametrize(
    ("config", "output", "arguments"), [c[1:] for c in STREAMING], ids=[c[0] for c in STREAMING]
)
def test_a_call_opens_once_its_name_is_written_and_its_arguments_stream(
    config: dict[str, Any], output: str, arguments: str
) -> None:
    parser = make_parser(**config)
    fed: list[tuple[int, Piece]] = []  # each piece, with the characters fed when it came
    for i, ch in enumerate(output):
        fed += [(i + 1, p) for p in parser.feed(ch)]
    fed += [(len(output), p) for p in parser.finish()]
    opened = next(at for at, p in fed if isinstance(p, CallOpened))
    assert opened < output.index("x" * 40), "it opened before its arguments came"
    streamed = [p.text for _, p in fed if isinstance(p, CallArguments)]
    assert len(streamed) > len(LONG) // 2, "the string argument streamed as it was written"
    last = [p for _, p in fed if isinstance(p, ToolCall)]
    assert [(c.name, c.arguments) for c in last] == [("get_weather", arguments)]
    assert arguments.startswith("".join(streamed))
    assert normalized([p for _, p in fed]) == [call("get_weather", arguments)]


def test_a_call_of_another_form_comes_whole() -> None:
    """A call whose arguments come before its name, a list of calls, a Llama 3 call: once
    complete, as before."""
    for config, output in (
        (HERMES, '<tool_call>{"arguments": {"city": "Paris"}, "name": "get_weather"}</tool_call>'),
        (HERMES, f"<tool_call>[{WEATHER}]</tool_call>"),
        (MISTRAL, f"[TOOL_CALLS][{WEATHER}]"),
        (LLAMA3, WEATHER),
    ):
        parser = make_parser(**config)
        pieces = [p for ch in output for p in parser.feed(ch)] + parser.finish()
        assert [type(p) for p in pieces] == [ToolCall], output
        assert normalized(pieces) == [call("get_weather")]


def _answer(state: ChoiceState, output: str) -> list[Any]:
    """What `output`, fed to `state` a character at a time, adds to the answer."""
    added = [a for ch in output for a in state.absorb(Delta(ch))]
    return added + state.absorb(Delta("", finish_reason="stop"))


def test_a_choice_streams_its_calls_by_index_and_ends_each_whole() -> None:
    state = ChoiceState(0, make_parser(**CODER))
    one = "<tool_call>\n<function=get_weather>\n<parameter=days>\n3\n</parameter>\n</function>\n"
    added = _answer(state, f"{one}</tool_call><tool_call>{WEATHER}</tool_call>")
    begun = [a for a in added if isinstance(a, CallBegun)]
    assert [(b.index, b.name) for b in begun] == [(0, "get_weather"), (1, "get_weather")]
    ended = [a.call for a in added if isinstance(a, CallEnded)]
    assert ended == state.tool_calls and [c.id for c in ended] == [b.id for b in begun]
    for i, whole in enumerate(ended):  # the closing brace the XML never wrote comes too
        assert "".join(a.text for a in added if isinstance(a, CallText) and a.index == i) == (
            whole.arguments
        )
    assert json.loads(ended[0].arguments) == {"days": 3}
    assert state.finish_reason == "tool_calls"


def test_one_call_leaves_a_second_streamed_call_out_whole() -> None:
    state = ChoiceState(0, make_parser(**HERMES), one_call=True)
    added = _answer(state, f"<tool_call>{WEATHER}</tool_call><tool_call>{WEATHER}</tool_call>")
    assert [a.index for a in added if isinstance(a, CallBegun | CallText | CallEnded)] == (
        [0] * len([a for a in added if not isinstance(a, Content)])
    )
    assert len(state.tool_calls) == 1 and state.tool_calls[0].arguments == '{"city": "Paris"}'


class _Special(str):
    special = True


def _tokenizer(vocab: dict[str, int]) -> MlxTokenizer:
    """An MlxTokenizer over a wrapper of `vocab`, whose tokens are all special ones."""
    wrapper = SimpleNamespace(
        _detokenizer=object(),
        _tokenizer=SimpleNamespace(added_tokens_decoder={i: _Special(t) for t, i in vocab.items()}),
        eos_token_ids=[9],
        chat_template="",
        get_vocab=lambda: vocab,
        encode=lambda text, **_: [vocab.get(text, 40)],
    )
    return MlxTokenizer(wrapper, LoadConfig(model_id="m", path=Path()), {})


def test_a_harmony_model_ends_its_output_at_a_call_as_at_its_answer() -> None:
    tok = _tokenizer(
        {"<|start|>": 1, "<|channel|>": 2, "<|message|>": 3, "<|call|>": 12, "<|return|>": 9}
    )
    assert (tok.tool_parser, tok.reasoning) == ("harmony", True)
    assert tok.eos_token_ids == {9, 12}
    assert tok.hidden_ids == set()  # its markup stays in the text, for its parser


def test_a_models_reasoning_opens_and_ends_with_its_own_markup() -> None:
    """What a thinking budget counts from and writes: gpt-oss's analysis message, else a
    `<think>` block."""
    harmony = {"<|start|>": 1, "<|channel|>": 2, "<|message|>": 3, "<|end|>": 7, "<|return|>": 9}
    assert _tokenizer(harmony).thinking == ((2, 40, 3), 7)  # 40: "analysis", as encoded
    assert _tokenizer({"<think>": 4, "</think>": 5, "<|im_end|>": 9}).thinking == ((4,), 5)
    assert _tokenizer({"<think>": 4, "<|im_end|>": 9}).thinking is None


def test_harmonys_markup_is_left_out_of_other_models_text() -> None:
    # Phi-3 ends a turn with its own <|end|>: written past an ignored EOS, it is no answer.
    tok = _tokenizer({"<|user|>": 1, "<|end|>": 7, "<|endoftext|>": 9, "<think>": 4})
    assert tok.tool_parser is None
    assert tok.hidden_ids == {1, 7, 9}


@pytest.mark.parametrize(
    ("config", "output", "expected"),
    [
        (HERMES, f"<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{{ ", [call("get_weather")]),
        (QWEN3, '<tool_call>\n{"na', []),
        (MISTRAL, f"[TOOL_CALLS][{WEATHER}, {{", [call("get_weather")]),
        (MISTRAL, "[TOOL_CA", []),
        (LLAMA3, WEATHER, [call("get_weather")]),
        (LLAMA3, WEATHER[:-3], [call("get_weather", '{"city": "Paris')]),
        (LLAMA3, '{"name": "get_wea', []),
    ],
)
def test_a_call_forced_by_a_grammar_is_read_however_it_was_cut(
    config: Config, output: str, expected: list[Piece]
) -> None:
    """Under a grammar that allows only calls, text that is no call is a call's markup cut off
    by max_tokens before its name: dropped, where without the grammar it is content. A call cut
    once its name was written is a call with its arguments as far as they got."""
    forced = {**config, "calls_only": True}
    for i in range(len(output) + 1):
        assert run(forced, [output[:i], output[i:]]) == expected, i
    assert any(isinstance(p, Content) for p in run(config, [output])) or expected == [
        call("get_weather")
    ]


def test_a_forced_llama3_call_streams() -> None:
    parser = make_parser(**LLAMA3, calls_only=True)
    assert parser.feed('{"name": "get_weather"') == []
    opened, *args = parser.feed(', "arguments": {"city"')
    assert isinstance(opened, CallOpened) and opened.name == "get_weather"
    assert args == [CallArguments('{"city')]  # a quote waits for what follows it
