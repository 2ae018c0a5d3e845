"""Constrained decoding with the real tiny model: mlx-lm's BatchGenerator with per-sequence processors.

Sequences are added as the MLX engine adds them (own sampler, the request's processors, then the
constraint's), so what holds here holds in the engine. The model has random weights: it wanders,
and only the grammar makes its output valid JSON or a well-formed tool call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.generate import BatchGenerator, StopSequences, generate_step

from lmx.runtime import grammars
from lmx.runtime.engine import SamplingParams
from lmx.runtime.mlx_constraint import ConstrainedProcessor, ConstraintError, ConstraintFactory
from lmx.runtime.mlx_sampling import make_processors, make_sampler

MAX_TOKENS = 256
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "unit": {"enum": ["c", "f"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": -99, "maximum": 99},
                    "b": {"type": "integer", "minimum": -99, "maximum": 99},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]
SAMPLINGS = [
    pytest.param(SamplingParams(temperature=0.0), id="greedy"),
    *(pytest.param(SamplingParams(temperature=1.0, seed=s), id=f"t1-seed{s}") for s in (1, 2, 3)),
]


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    factory: ConstraintFactory
    prompt: list[int] = field(default_factory=list)


@dataclass
class Output:
    text: str
    finish_reason: str
    processor: ConstrainedProcessor


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Loaded:
    loaded: Any = mlx_lm.load(str(tiny_model_dir))
    model, tokenizer = loaded[0], loaded[1]
    vocab_size = int(model.args.vocab_size)  # the logits width, as the engine would take it
    messages = [{"role": "user", "content": "Answer in JSON."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return Loaded(model, tokenizer, ConstraintFactory(tokenizer, vocab_size), list(prompt))


def generate(tiny: Loaded, *requests: tuple[str, SamplingParams]) -> list[Output]:
    """Run `requests` (grammar, sampling) as one batch to the end, as the engine inserts them."""
    eos = tiny.factory.eos_token_ids
    gen: Any = BatchGenerator(tiny.model, stop_tokens=[[t] for t in eos], completion_batch_size=8)
    procs = [tiny.factory.make_processor(g) for g, _ in requests]
    uids = gen.insert(
        [tiny.prompt] * len(requests),
        max_tokens=[MAX_TOKENS] * len(requests),
        samplers=[make_sampler(p) for _, p in requests],  # None: the batch's greedy sampler
        logits_processors=[
            [*make_processors(p, eos), proc] for (_, p), proc in zip(requests, procs, strict=True)
        ],
        stop_sequences=[StopSequences([[t] for t in eos]) for _ in requests],
    )
    tokens: dict[int, list[int]] = {uid: [] for uid in uids}
    finish: dict[int, str] = {}
    try:
        while len(finish) < len(uids):
            for r in gen.next()[1]:
                tokens[r.uid].append(r.token)
                if r.finish_reason is not None:
                    finish[r.uid] = r.finish_reason
    finally:
        gen.close()
    return [
        Output(tiny.tokenizer.decode([t for t in tokens[u] if t not in eos]), finish[u], proc)
        for u, proc in zip(uids, procs, strict=True)
    ]


def finite_ids(logits: mx.array) -> list[int]:
    finite: list[bool] = mx.isfinite(logits[0]).tolist()  # type: ignore[assignment]
    return [i for i, ok in enumerate(finite) if ok]


def check_person(obj: Any) -> None:
    assert isinstance(obj, dict)
    assert set(obj) == {"name", "age", "color"}
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 12
    assert type(obj["age"]) is int and 0 <= obj["age"] <= 150
    assert obj["color"] in {"red", "green", "blue"}


def tool_calls(text: str) -> list[dict[str, Any]]:
    """Parse Hermes output that must be nothing but tool calls."""
    blocks = re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text, flags=re.S)
    rebuilt = "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in blocks)
    assert rebuilt == text, f"text besides tool calls: {text!r}"
    return [json.loads(b) for b in blocks]


def check_call(call: dict[str, Any]) -> None:
    assert set(call) == {"name", "arguments"}
    args = call["arguments"]
    if call["name"] == "get_weather":
        assert set(args) == {"city", "unit"}
        assert isinstance(args["city"], str) and len(args["city"]) <= 12
        assert args["unit"] in {"c", "f"}
    else:
        assert call["name"] == "add"
        assert set(args) == {"a", "b"}
        assert all(type(v) is int and -99 <= v <= 99 for v in args.values())


@pytest.mark.parametrize("params", SAMPLINGS)
def test_json_schema_output_parses_and_validates(tiny: Loaded, params: SamplingParams) -> None:
    (out,) = generate(tiny, (grammars.json_schema(PERSON).text, params))
    assert out.finish_reason == "stop"
    check_person(json.loads(out.text))
    assert out.processor.done
    assert out.processor.error is None


@pytest.mark.parametrize("params", SAMPLINGS)
def test_required_tool_call_is_hermes_text_with_valid_arguments(
    tiny: Loaded, params: SamplingParams
) -> None:
    g = grammars.tool_call(TOOLS, token_ids=tiny.factory.marker_ids)
    (out,) = generate(tiny, (g.text, params))
    assert out.finish_reason == "stop"
    calls = tool_calls(out.text)
    assert calls
    for call in calls:
        check_call(call)


def test_named_tool_call_calls_only_that_function(tiny: Loaded) -> None:
    g = grammars.tool_call(TOOLS, named="get_weather", token_ids=tiny.factory.marker_ids)
    (out,) = generate(tiny, (g.text, SamplingParams(temperature=1.0, seed=7)))
    assert out.finish_reason == "stop"
    (call,) = tool_calls(out.text)
    assert call["name"] == "get_weather"
    check_call(call)


@pytest.mark.parametrize("params", SAMPLINGS)
def test_json_object_overrides_a_model_that_wants_to_stop_at_once(
    tiny: Loaded, params: SamplingParams
) -> None:
    # Biased to EOS, `"` and `}`: unconstrained, it would answer with nothing at all.
    enc = tiny.tokenizer.encode
    bias = {tiny.factory.eos_token_ids[0]: 30.0, enc('"')[0]: 25.0, enc("}")[0]: 20.0}
    biased = SamplingParams(temperature=params.temperature, seed=params.seed, logit_bias=bias)
    (out,) = generate(tiny, (grammars.json_object().text, biased))
    assert out.finish_reason == "stop"
    assert isinstance(json.loads(out.text), dict)


def test_sequences_in_one_batch_each_follow_their_own_grammar(tiny: Loaded) -> None:
    schema = grammars.json_schema(PERSON).text
    tools = grammars.tool_call(TOOLS, named="add", token_ids=tiny.factory.marker_ids).text
    outs = generate(
        tiny,
        (schema, SamplingParams(temperature=0.0)),
        (tools, SamplingParams(temperature=1.0, seed=11)),
        (schema, SamplingParams(temperature=1.0, seed=12)),
    )
    assert [o.finish_reason for o in outs] == ["stop"] * 3
    check_person(json.loads(outs[0].text))
    (call,) = tool_calls(outs[1].text)
    assert call["name"] == "add"
    check_call(call)
    check_person(json.loads(outs[2].text))


def test_processor_works_with_mlx_lm_generate_step(tiny: Loaded) -> None:
    proc = tiny.factory.make_processor(grammars.json_schema(PERSON).text)
    tokens = []
    for token, _ in generate_step(
        mx.array(tiny.prompt), tiny.model, max_tokens=MAX_TOKENS, logits_processors=[proc]
    ):
        if token in tiny.factory.eos_token_ids:
            break
        tokens.append(token)
    check_person(json.loads(tiny.tokenizer.decode(tokens)))


def test_a_token_the_grammar_forbids_raises_or_ends_the_sequence(tiny: Loaded) -> None:
    grammar = grammars.json_object().text
    v = tiny.factory.vocab_size
    logits = mx.zeros((1, v))
    forbidden = mx.array([*tiny.prompt, tiny.tokenizer.encode("x")[0]])
    raising = tiny.factory.make_processor(grammar)
    raising(mx.array(tiny.prompt), logits)
    with pytest.raises(
        ConstraintError, match=r"failed at generated token 1: .*doesn.t satisfy the grammar"
    ):
        raising(forbidden, logits)
    ending = tiny.factory.make_processor(grammar, on_error="end")
    ending(mx.array(tiny.prompt), logits)
    out = ending(forbidden, logits)
    assert ending.error is not None and ending.done
    assert finite_ids(out) == tiny.factory.eos_token_ids


def test_grammar_that_does_not_compile_raises_constraint_error(tiny: Loaded) -> None:
    with pytest.raises(ConstraintError, match="does not compile"):
        tiny.factory.make_processor(grammars.tool_call(TOOLS).text.replace("call:", "call::"))


def test_logits_wider_than_the_tokenizer_get_the_extra_rows_masked(tiny: Loaded) -> None:
    wide = ConstraintFactory(tiny.tokenizer, tiny.factory.vocab_size + 64)
    proc = wide.make_processor(grammars.json_object().text)
    out = proc(mx.array(tiny.prompt), mx.zeros((1, wide.vocab_size)))
    assert out.shape == (1, wide.vocab_size)
    finite = finite_ids(out)
    assert finite
    assert max(finite) < tiny.factory.vocab_size
    assert all(tiny.tokenizer.decode([i]).lstrip().startswith("{") for i in finite)


# One value each, so that the grammar leaves the model no choice in them.
MARKED = {"a": "</tool_call>", "b": "<think>", "c": "x</think>y", "d": "<|im_end|>"}
MARKUP = {
    "type": "object",
    "properties": {
        **{k: {"enum": [v]} for k, v in MARKED.items()},
        "note": {"type": "string", "maxLength": 8},
    },
    "required": [*MARKED, "note"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("params", SAMPLINGS)
def test_a_string_may_hold_a_markers_text(tiny: Loaded, params: SamplingParams) -> None:
    # The model's added tokens (<tool_call>, <|im_end|>...) written as text inside JSON strings:
    # llguidance forced such a value as the marker's token, which the grammar then refused.
    markers = tiny.factory.marker_ids
    tool = {"type": "function", "function": {"name": "tag", "parameters": MARKUP}}
    schema, call = (
        grammars.json_schema(MARKUP, markers=markers).text,
        grammars.tool_call([tool], named="tag", token_ids=markers).text,
    )
    answer, called = generate(tiny, (schema, params), (call, params))
    assert (answer.finish_reason, called.finish_reason) == ("stop", "stop")
    assert answer.processor.error is None and called.processor.error is None
    assert json.loads(answer.text) == {**MARKED, "note": json.loads(answer.text)["note"]}
    (made,) = tool_calls(called.text)
    assert made["arguments"] == {**MARKED, "note": made["arguments"]["note"]}
