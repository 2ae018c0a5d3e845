"""Reasoning and tool calls reach the client in OpenAI's shape, streamed and not.

The engine here is scripted (a fake at the engine boundary): it replays a fixed output split into
awkward chunks, so the API's mapping of parsed pieces to messages and deltas is what is tested.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import httpx
import llguidance
import pytest

from lmx.api.app import create_app
from lmx.api.deps import AppDeps
from lmx.runtime.engine import (
    Delta,
    EngineState,
    EngineStats,
    GenerationRequest,
    LoadConfig,
)
from lmx.runtime.registry import EngineRegistry
from lmx.runtime.sampling import SamplingDefaults
from tests.api.conftest import StaticModels
from tests.api.test_v1 import sse_events, streamed_calls

OUTPUT = (
    "<think>The user wants weather.</think>\n\nChecking."
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
)


class ScriptedTokenizer:
    eos_token_ids = frozenset({0})
    tool_parser = "hermes"
    reasoning = True
    thinking = None  # its tags are characters: the prompt's last words tell
    marker_ids: Mapping[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: Any, **_: Any) -> list[int]:
        return self.encode(json.dumps(messages))


class ScriptedEngine:
    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.tokenizer = ScriptedTokenizer()
        self.context_length = 100_000
        self.state = EngineState.UNLOADED
        self.pid = None
        self.sampling_defaults = SamplingDefaults()

    def load(self) -> None:
        self.state = EngineState.READY

    def unload(self) -> None:
        self.state = EngineState.UNLOADED

    def resident_bytes(self) -> int:
        return 0

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0, 0, 0, 0)

    def hold(self, request_id: str, places: int) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()  # no queue to hold places in

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        chunks = [OUTPUT[i : i + 3] for i in range(0, len(OUTPUT), 3)]
        for c in chunks[:-1]:  # a token per character, as the tokenizer has it
            yield Delta(text=c, token_ids=tuple(map(ord, c)))
        yield Delta(
            text=chunks[-1],
            token_ids=tuple(map(ord, chunks[-1])),
            finish_reason="stop",
            prompt_tokens=len(request.prompt_tokens),
            completion_tokens=len(OUTPUT),
        )


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    registry = EngineRegistry(ScriptedEngine)  # type: ignore[arg-type]
    await registry.load(LoadConfig(model_id="m", path=Path()))
    app = create_app(AppDeps(registry=registry, models=StaticModels(registry)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


class NotingTokenizer(ScriptedTokenizer):
    """Notes the threads it encodes on."""

    threads: ClassVar[set[int]] = set()

    def encode(self, text: str) -> list[int]:
        self.threads.add(threading.get_ident())
        return super().encode(text)


class NotingEngine(ScriptedEngine):
    def __init__(self, config: LoadConfig) -> None:
        super().__init__(config)
        self.tokenizer = NotingTokenizer()


async def test_prompts_are_rendered_and_encoded_off_the_event_loop() -> None:
    # A 60k-token conversation took 60 ms to encode: on the loop, every stream waited.
    registry = EngineRegistry(NotingEngine)  # type: ignore[arg-type]
    await registry.load(LoadConfig(model_id="m", path=Path()))
    app = create_app(AppDeps(registry=registry, models=StaticModels(registry)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.post("/v1/chat/completions", json=BODY)).status_code == 200
        assert (await c.post("/v1/completions", json={"model": "m", "prompt": "hi"})).is_success
        assert (await c.post("/v1/responses", json={"model": "m", "input": "hi"})).is_success
    assert NotingTokenizer.threads and threading.get_ident() not in NotingTokenizer.threads


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}


async def test_message_has_reasoning_content_and_tool_calls(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/chat/completions", json=BODY)).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    msg = choice["message"]
    # By both the names clients read it by: DeepSeek's and vLLM's (and LM Studio's for gpt-oss).
    assert msg["reasoning_content"] == msg["reasoning"] == "The user wants weather."
    assert msg["content"] == "Checking."
    (call,) = msg["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}


async def test_usage_counts_the_reasoning_tokens_streamed_or_not(client: httpx.AsyncClient) -> None:
    # A token per character: the reasoning's, and those of the tag that opens it (see _count).
    thought = len("<think>The user wants weather.")
    body = (await client.post("/v1/chat/completions", json=BODY)).json()
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": thought}
    streamed = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    r = await client.post("/v1/chat/completions", json=streamed)
    usage = [e for e in sse_events(r.text) if e != "[DONE]"][-1]["usage"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": thought}
    answer = (await client.post("/v1/responses", json={"model": "m", "input": "hi"})).json()
    assert answer["usage"]["output_tokens_details"] == {"reasoning_tokens": thought}


async def test_stream_carries_reasoning_content_and_indexed_tool_call_deltas(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/v1/chat/completions", json={**BODY, "stream": True})
    chunks = [e for e in sse_events(r.text) if e != "[DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user wants weather."
    assert all(d.get("reasoning_content") == d.get("reasoning") for d in deltas)
    assert "".join(d.get("content") or "" for d in deltas) == "Checking."
    calls = streamed_calls(deltas)
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", '{"city": "Oslo"}')]
    assert len([d for d in deltas if d.get("tool_calls")]) > 1, "the arguments stream"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert "<think>" not in r.text and "<tool_call>" not in r.text


async def test_a_responses_call_streams_its_arguments_as_they_are_written(
    client: httpx.AsyncClient,
) -> None:
    tools = [{"type": "function", "name": "get_weather", "parameters": {}}]
    ask = {"model": "m", "input": "hi", "tools": tools}
    r = await client.post("/v1/responses", json={**ask, "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert len(deltas) > 1 and "".join(deltas) == done["arguments"] == '{"city": "Oslo"}'
    added = next(
        e
        for e in events
        if e["type"] == "response.output_item.added" and e["item"]["type"] == "function_call"
    )
    assert added["item"]["arguments"] == "" and added["item"]["name"] == "get_weather"
    whole = (await client.post("/v1/responses", json=ask)).json()
    assert whole["output"][-1]["arguments"] == done["arguments"]


async def test_without_tools_the_markup_is_content(client: httpx.AsyncClient) -> None:
    body = {k: v for k, v in BODY.items() if k != "tools"}
    msg = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]
    assert "tool_calls" not in msg
    assert msg["content"].startswith("Checking.<tool_call>")


class ThinkingTokenizer(ScriptedTokenizer):
    """A template that opens the answer's <think> block itself (Qwen3-Thinking, R1 distills),
    whatever `enable_thinking` says; `<think>` is one token, as in those tokenizers."""

    THINK = 0x110000

    def encode(self, text: str) -> list[int]:
        parts = [super(ThinkingTokenizer, self).encode(p) for p in text.split("<think>")]
        return [t for i, p in enumerate(parts) for t in ([self.THINK] if i else []) + p]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join("<think>" if i == self.THINK else chr(i) for i in ids)

    def apply_chat_template(self, messages: Any, **_: Any) -> list[int]:
        return self.encode(json.dumps(messages) + "<|im_start|>assistant\n<think>\n")


class CallingEngine(ScriptedEngine):
    """Answers with a bare tool call, as a grammar makes a model write it."""

    def __init__(self, config: LoadConfig) -> None:
        super().__init__(config)
        self.tokenizer = ThinkingTokenizer()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
        yield Delta(text=call, token_ids=(1,), finish_reason="stop", completion_tokens=1)


async def test_a_constrained_answer_after_an_opened_think_block_is_the_answer() -> None:
    registry = EngineRegistry(CallingEngine)  # type: ignore[arg-type]
    await registry.load(LoadConfig(model_id="m", path=Path()))
    app = create_app(AppDeps(registry=registry, models=StaticModels(registry)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        # The grammar makes the call the answer from its first token: not reasoning.
        forced = {**BODY, "tool_choice": "required"}
        msg = (await c.post("/v1/chat/completions", json=forced)).json()["choices"][0]["message"]
        assert [t["function"]["name"] for t in msg["tool_calls"]] == ["get_weather"]
        assert "reasoning" not in msg
        # Unconstrained, the same text is the model thinking inside the block it was given.
        msg = (await c.post("/v1/chat/completions", json=BODY)).json()["choices"][0]["message"]
        assert "tool_calls" not in msg and msg["reasoning_content"].startswith("<tool_call>")


MISTRAL_CALLS = (
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {}}, '
    '{"name": "get_weather", "arguments": {}}]'
)


class MistralTokenizer(ScriptedTokenizer):
    tool_parser = "mistral"
    reasoning = False


class MistralEngine(ScriptedEngine):
    """Answers with two calls in one list, as Mistral writes them; keeps each request's grammar."""

    grammars: ClassVar[list[str]] = []

    def __init__(self, config: LoadConfig) -> None:
        super().__init__(config)
        self.tokenizer = MistralTokenizer()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        assert request.constraint is not None
        self.grammars.append(request.constraint.grammar)
        yield Delta(text=MISTRAL_CALLS, token_ids=(1,), finish_reason="stop", completion_tokens=1)


async def test_a_required_call_of_mistral_may_be_several_unless_parallel_calls_are_off() -> None:
    registry = EngineRegistry(MistralEngine)  # type: ignore[arg-type]
    await registry.load(LoadConfig(model_id="m", path=Path()))
    app = create_app(AppDeps(registry=registry, models=StaticModels(registry)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        forced = {**BODY, "tool_choice": "required"}
        msg = (await c.post("/v1/chat/completions", json=forced)).json()["choices"][0]["message"]
        assert [len(t["id"]) for t in msg["tool_calls"]] == [9, 9]
        assert allows(MistralEngine.grammars[-1], MISTRAL_CALLS)
        await c.post("/v1/chat/completions", json={**forced, "parallel_tool_calls": False})
        assert not allows(MistralEngine.grammars[-1], MISTRAL_CALLS)
        one = '[TOOL_CALLS][{"name": "get_weather", "arguments": {}}]'
        assert allows(MistralEngine.grammars[-1], one)


async def answer(text: str) -> AsyncIterator[Delta]:
    """`text` as a model's deltas, four characters each, then its end."""
    for i in range(0, len(text), 4):
        yield Delta(text=text[i : i + 4], token_ids=(1,))
    yield Delta(text="", finish_reason="stop", completion_tokens=len(text))


def scripted(text: str) -> type[ScriptedEngine]:
    class Answering(ScriptedEngine):
        def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
            return answer(text)

    return Answering


BY_BYTE = llguidance.LLTokenizer("byte")


def allows(grammar: str, text: str) -> bool:
    """Whether `grammar` lets a model write `text` (its markers as text, as for a tokenizer
    without them)."""
    m = llguidance.LLMatcher(BY_BYTE, grammar, log_level=0)
    return m.consume_tokens(BY_BYTE.tokenize_str(text)) and m.is_accepting()


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


@pytest.mark.parametrize(
    ("output", "first"),
    [
        # As OpenAI streams a call: its first delta carries the role, null content and the call.
        (CALL, {"role": "assistant", "content": None, "tool_calls": "..."}),
        (
            "<think>Hm.</think>" + CALL,
            {"role": "assistant", "content": None, "reasoning_content": "...", "reasoning": "..."},
        ),
        # Text opens as it always did: the role with empty content, then the text.
        ("Sunny.", {"role": "assistant", "content": ""}),
    ],
)
async def test_a_streamed_answer_opens_with_the_role_and_null_content_unless_it_is_text(
    output: str, first: dict[str, Any]
) -> None:
    registry = EngineRegistry(scripted(output))  # type: ignore[arg-type]
    await registry.load(LoadConfig(model_id="m", path=Path()))
    app = create_app(AppDeps(registry=registry, models=StaticModels(registry)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/v1/chat/completions", json={**BODY, "stream": True})
    deltas = [e["choices"][0]["delta"] for e in sse_events(r.text) if e != "[DONE]"]
    opening = {
        k: "..." if k.endswith(("calls", "reasoning_content", "reasoning")) else v
        for k, v in deltas[0].items()
    }
    assert opening == first
    assert [d for d in deltas if "role" in d] == deltas[:1]
    if CALL in output:
        assert all("content" not in d for d in deltas[1:])
    else:
        assert "".join(d.get("content") or "" for d in deltas) == output


async def test_without_parallel_tool_calls_a_models_second_call_is_left_out() -> None:
    two = CALL + CALL.replace("Oslo", "Bergen")
    registry = EngineRegistry(scripted(two))  # type: ignore[arg-type]
    await registry.load(LoadConfig(model_id="m", path=Path()))
    app = create_app(AppDeps(registry=registry, models=StaticModels(registry)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for parallel, cities in ((None, ["Oslo", "Bergen"]), (False, ["Oslo"])):
            body = {**BODY, "parallel_tool_calls": parallel}
            msg = (await c.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]
            assert [
                json.loads(t["function"]["arguments"])["city"] for t in msg["tool_calls"]
            ] == cities
            r = await c.post("/v1/chat/completions", json={**body, "stream": True})
            deltas = [e["choices"][0]["delta"] for e in sse_events(r.text) if e != "[DONE]"]
            streamed = [t["arguments"] for t in streamed_calls(deltas)]
            assert [json.loads(a)["city"] for a in streamed] == cities
        answer = await c.post(
            "/v1/responses",
            json={
                "model": "m",
                "input": "hi",
                "tools": [{"type": "function", "name": "get_weather", "parameters": {}}],
                "parallel_tool_calls": False,
            },
        )
        assert [o["type"] for o in answer.json()["output"]].count("function_call") == 1


PATCH = '*** Begin Patch\n*** Add File: é.txt\n+say "hi" \\o/ \U0001f600\n*** End Patch'


@pytest.mark.parametrize("key", ["input", "patch"])
async def test_a_custom_tools_input_streams_as_its_text_is_written(key: str) -> None:
    """Codex's apply_patch: the text of the string the model writes, unescaped piece by piece
    (escapes cut between them, \\u00e9 and a surrogate pair among them); where the model names
    the string otherwise, it goes out whole at the end."""
    arguments = json.dumps({key: PATCH})  # ASCII: é and 😀 as \u escapes
    call = f'<tool_call>\n{{"name": "apply_patch", "arguments": {arguments}}}\n</tool_call>'
    registry = EngineRegistry(scripted(call))  # type: ignore[arg-type]
    await registry.load(LoadConfig(model_id="m", path=Path()))
    app = create_app(AppDeps(registry=registry, models=StaticModels(registry)))
    ask = {"model": "m", "input": "hi", "tools": [{"type": "custom", "name": "apply_patch"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/v1/responses", json={**ask, "stream": True})
        whole = (await c.post("/v1/responses", json=ask)).json()
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    deltas = [e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta"]
    done = next(e for e in events if e["type"] == "response.custom_tool_call_input.done")
    assert "".join(deltas) == done["input"] == PATCH
    assert len(deltas) > 10 if key == "input" else deltas == [PATCH]
    assert events[-1]["response"]["output"][-1]["input"] == whole["output"][-1]["input"] == PATCH


CODER_CALL = (
    "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
)


class CoderTokenizer(ScriptedTokenizer):
    tool_parser = "qwen3_coder"
    reasoning = False


class CoderEngine(ScriptedEngine):
    """Answers as Qwen3-Coder calls a function, unless a grammar constrains it; keeps each
    request's grammar."""

    grammars: ClassVar[list[str]] = []

    def __init__(self, config: LoadConfig) -> None:
        super().__init__(config)
        self.tokenizer = CoderTokenizer()

    def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if request.constraint is not None:
            self.grammars.append(request.constraint.grammar)
        return answer(CODER_CALL)


async def test_qwen3_coder_calls_come_typed_by_the_functions_schema() -> None:
    registry = EngineRegistry(CoderEngine)  # type: ignore[arg-type]
    await registry.load(LoadConfig(model_id="m", path=Path()))
    app = create_app(AppDeps(registry=registry, models=StaticModels(registry)))
    parameters = {"type": "object", "properties": {"days": {"type": "integer"}}}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": parameters}}]
    body = {**BODY, "tools": tools}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        choice = (await c.post("/v1/chat/completions", json=body)).json()["choices"][0]
        (call,) = choice["message"]["tool_calls"]
        assert call["function"] == {
            "name": "get_weather",
            "arguments": '{"city": "Oslo", "days": 3}',
        }
        assert (
            choice["message"]["content"] == "Checking." and choice["finish_reason"] == "tool_calls"
        )
        r = await c.post("/v1/chat/completions", json={**body, "stream": True})
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line[6:7] == "{"]
        deltas = [ch["choices"][0]["delta"] for ch in chunks if ch["choices"]]
        streamed = [{k: c[k] for k in ("name", "arguments")} for c in streamed_calls(deltas)]
        assert streamed == [call["function"]]
        # A required call is written as Hermes' JSON, which the parser reads as well.
        await c.post("/v1/chat/completions", json={**body, "tool_choice": "required"})
        json_call = '<tool_call>\n{"name": "get_weather", "arguments": {"days": 3}}\n</tool_call>'
        assert allows(CoderEngine.grammars[-1], json_call)


HARMONY_CALL = (
    "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary"
    ' to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}'
)


class HarmonyTokenizer(ScriptedTokenizer):
    tool_parser = "harmony"


HARMONY_FORCED = (
    '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}'
)


class HarmonyEngine(ScriptedEngine):
    """Answers as gpt-oss calls a function, in harmony's messages (the <|call|> that ends them
    is an end of the output, left out of its text); under a grammar, with the call alone, or
    with JSON if the grammar does not allow that. Keeps each request's prompt and grammar."""

    prompts: ClassVar[list[str]] = []
    grammars: ClassVar[list[str]] = []

    def __init__(self, config: LoadConfig) -> None:
        super().__init__(config)
        self.tokenizer = HarmonyTokenizer()

    def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self.prompts.append(self.tokenizer.decode(request.prompt_tokens))
        if request.constraint is None:
            return answer(HARMONY_CALL)
        self.grammars.append(request.constraint.grammar)
        forced = allows(request.constraint.grammar, HARMONY_FORCED)
        return answer(HARMONY_FORCED if forced else '{"city": "Oslo"}')


async def test_gpt_oss_harmony_reasons_and_calls_in_its_channels() -> None:
    registry = EngineRegistry(HarmonyEngine)  # type: ignore[arg-type]
    await registry.load(LoadConfig(model_id="m", path=Path()))
    app = create_app(AppDeps(registry=registry, models=StaticModels(registry)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for stream in (False, True):
            r = await c.post("/v1/chat/completions", json={**BODY, "stream": stream})
            if stream:
                chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line[6:7] == "{"]
                deltas = [ch["choices"][0]["delta"] for ch in chunks if ch["choices"]]
                reasoning = "".join(d.get("reasoning") or "" for d in deltas)
                calls = [{k: c[k] for k in ("name", "arguments")} for c in streamed_calls(deltas)]
                finish = [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1]
                content = "".join(d.get("content") or "" for d in deltas)
            else:
                choice = r.json()["choices"][0]
                reasoning = choice["message"]["reasoning"]  # LM Studio's field for gpt-oss
                calls = [tc["function"] for tc in choice["message"]["tool_calls"]]
                finish, content = choice["finish_reason"], choice["message"]["content"] or ""
            assert reasoning == "Need the weather." and not content and finish == "tool_calls"
            assert calls == [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}]
            assert "<|" not in r.text
        # A required call: the grammar writes its message as gpt-oss does, after the prompt's
        # `<|start|>assistant`, with no reasoning first, and a Hermes call does not pass.
        city = {"type": "object", "properties": {"city": {"type": "string"}}}
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": city}}]
        forced = {**BODY, "tools": tools, "tool_choice": "required"}
        msg = (await c.post("/v1/chat/completions", json=forced)).json()["choices"][0]["message"]
        assert not HarmonyEngine.prompts[-1].endswith("<|message|>")
        assert not allows(HarmonyEngine.grammars[-1], CALL)
        assert [t["function"] for t in msg["tool_calls"]] == [
            {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
        ]
        assert "reasoning" not in msg and msg["content"] is None
        # Other functions than the one named do not pass.
        named = {**BODY, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
        named["tools"] = [*tools, {"type": "function", "function": {"name": "get_time"}}]
        await c.post("/v1/chat/completions", json=named)
        assert not allows(HarmonyEngine.grammars[-1], HARMONY_FORCED)
        assert allows(
            HarmonyEngine.grammars[-1],
            "<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{}",
        )
        # A JSON answer starts in the final channel at once: content, as the grammar says.
        fmt = {**BODY, "response_format": {"type": "json_object"}}
        msg = (await c.post("/v1/chat/completions", json=fmt)).json()["choices"][0]["message"]
        assert HarmonyEngine.prompts[-1].endswith("<|channel|>final<|message|>")
        assert msg["content"] == '{"city": "Oslo"}' and not msg.get("tool_calls")


class MisconfiguredTokenizer(ScriptedTokenizer):
    tool_parser = "no-such-format"  # a parser for the answer cannot be made


class Queued:
    """A sequence queued in the engine, never run: notes whether it was closed."""

    closed: ClassVar[list[bool]] = []

    def __aiter__(self) -> Queued:
        return self

    async def __anext__(self) -> Delta:
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed.append(True)


class MisconfiguredEngine(ScriptedEngine):
    def __init__(self, config: LoadConfig) -> None:
        super().__init__(config)
        self.tokenizer = MisconfiguredTokenizer()

    def stream(self, request: GenerationRequest) -> Queued:  # type: ignore[override]
        return Queued()


async def test_a_request_that_fails_after_its_sequences_are_queued_cancels_them() -> None:
    registry = EngineRegistry(MisconfiguredEngine)  # type: ignore[arg-type]
    await registry.load(LoadConfig(model_id="m", path=Path()))
    app = create_app(AppDeps(registry=registry, models=StaticModels(registry)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/v1/chat/completions", json={**BODY, "n": 2, "stream": True})
    assert r.status_code == 500
    assert Queued.closed == [True, True]
    assert registry.snapshot()["m"].in_flight == 0  # the model is let go


async def test_lm_studios_route_says_why_an_answer_stopped(client: httpx.AsyncClient) -> None:
    called = (await client.post("/api/v0/chat/completions", json=BODY)).json()
    assert called["choices"][0]["finish_reason"] == "tool_calls"
    assert called["stats"]["stop_reason"] == "toolCalls"
    plain = {k: v for k, v in BODY.items() if k != "tools"}
    said = (await client.post("/api/v0/chat/completions", json=plain)).json()
    assert said["stats"]["stop_reason"] == "eosFound"
    # Streamed, the chunks are /v1's.
    streamed = await client.post("/api/v0/chat/completions", json={**plain, "stream": True})
    assert "stats" not in streamed.text and streamed.text.endswith("data: [DONE]\n\n")


class RecordingEngine(ScriptedEngine):
    """Answers "Hi", keeping each request as the engine gets it."""

    requests: ClassVar[list[GenerationRequest]] = []

    def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self.requests.append(request)
        return answer("Hi")


async def test_lm_studios_parameters_reach_the_sampler_by_its_names() -> None:
    registry = EngineRegistry(RecordingEngine)  # type: ignore[arg-type]
    await registry.load(LoadConfig(model_id="m", path=Path()))
    app = create_app(AppDeps(registry=registry, models=StaticModels(registry)))
    said = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        lm_studio = {**said, "repeat_penalty": 1.3, "max_tokens": -1}
        assert (await c.post("/v1/chat/completions", json=lm_studio)).status_code == 200
    (request,) = RecordingEngine.requests
    assert request.params.repetition_penalty == 1.3
    assert request.params.max_tokens == 100_000 - len(request.prompt_tokens)  # the context's room
