"""Anthropic's Messages API (/v1/messages) over a scripted engine, with the real `anthropic` SDK
and httpx: the blocks of an answer (thinking, text, tool_use), streamed and not; a conversation's
blocks as the chat messages the template gets; the errors in Anthropic's envelope; x-api-key."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import anthropic
import httpx
import httpx2
import pytest

from lmx.api.app import create_app
from lmx.api.auth import Keys
from lmx.api.deps import AppDeps
from lmx.api.errors import envelope
from lmx.runtime.engine import Delta, GenerationRequest, LoadConfig, SamplingParams
from lmx.runtime.registry import EngineRegistry
from tests.api.conftest import StaticModels
from tests.api.test_outputs import ScriptedEngine, ScriptedTokenizer

ASK = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "Weather?"}]}
TOOL = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


class RecordingTokenizer(ScriptedTokenizer):
    """Keeps the messages and template arguments of each prompt it writes."""

    prompts: ClassVar[list[tuple[Any, dict[str, Any]]]] = []

    def apply_chat_template(self, messages: Any, **kwargs: Any) -> list[int]:
        self.prompts.append((messages, kwargs))
        return super().apply_chat_template(messages, **kwargs)


class RecordingEngine(ScriptedEngine):
    params: ClassVar[list[SamplingParams]] = []  # each stream's

    def __init__(self, config: LoadConfig) -> None:
        super().__init__(config)
        self.tokenizer = RecordingTokenizer()

    def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self.params.append(request.params)
        return super().stream(request)


@pytest.fixture
async def app() -> AsyncIterator[Any]:
    registry = EngineRegistry(RecordingEngine)
    await registry.load(LoadConfig(model_id="m", path=Path()))
    RecordingTokenizer.prompts.clear()
    yield create_app(AppDeps(registry=registry, models=StaticModels(registry)))


@pytest.fixture
async def http(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


def sdk_on(app: Any, key: str = "unused") -> anthropic.AsyncAnthropic:
    """The SDK, over its own HTTP client (httpx2, a fork of httpx), into `app`."""
    client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app))
    return anthropic.AsyncAnthropic(
        base_url="http://t", api_key=key, http_client=client, max_retries=0
    )


@pytest.fixture
def sdk(app: Any) -> anthropic.AsyncAnthropic:
    return sdk_on(app)


def events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """A stream's (event name, data) pairs; each event's data says its name too."""
    out = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n")
        out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
        assert out[-1][1]["type"] == out[-1][0]
    return out


async def test_an_answer_is_its_thinking_text_and_tool_use_blocks(
    sdk: anthropic.AsyncAnthropic,
) -> None:
    message = await sdk.messages.create(**ASK, tools=[TOOL])
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    thinking, text, call = message.content
    assert thinking.type == "thinking" and thinking.thinking == "The user wants weather."
    assert text.type == "text" and text.text == "Checking."
    assert call.type == "tool_use" and (call.name, call.input) == ("get_weather", {"city": "Oslo"})
    assert call.id and message.id.startswith("msg_") and message.model == "m"
    assert (message.stop_reason, message.stop_sequence) == ("tool_use", None)
    prompt = len(json.dumps(RecordingTokenizer.prompts[-1][0]))  # a token per character
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (prompt, 0)
    assert message.usage.output_tokens > 0
    assert message.usage.output_tokens_details is not None
    thought = len("<think>The user wants weather.")  # a token per character, the tag's too
    assert message.usage.output_tokens_details.thinking_tokens == thought
    # Without tools the call is text, and the message ends its turn.
    message = await sdk.messages.create(**ASK)
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.stop_reason == "end_turn"


async def test_a_streamed_answer_comes_in_anthropics_events_and_adds_up_to_the_answer(
    sdk: anthropic.AsyncAnthropic, http: httpx.AsyncClient
) -> None:
    whole = await sdk.messages.create(**ASK, tools=[TOOL])
    async with sdk.messages.stream(**ASK, tools=[TOOL]) as stream:
        streamed = await stream.get_final_message()

    def same(m: anthropic.types.Message) -> dict[str, Any]:
        """`m` less its ids (a message's and its calls', new with each answer)."""
        out = m.model_dump(exclude={"id"})
        out["content"] = [{k: v for k, v in b.items() if k != "id"} for b in out["content"]]
        return out

    assert same(streamed) == same(whole)

    r = await http.post("/v1/messages", json={**ASK, "tools": [TOOL], "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    got = events(r.text)
    names = [name for name, _ in got]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-2:] == ["message_delta", "message_stop"]
    starts = [d["content_block"] for n, d in got if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["thinking", "text", "tool_use"]
    assert starts[2]["input"] == {}  # its input comes as JSON deltas
    deltas = [(d["index"], d["delta"]) for n, d in got if n == "content_block_delta"]
    assert "".join(d["thinking"] for i, d in deltas if i == 0) == "The user wants weather."
    assert "".join(d["text"] for i, d in deltas if i == 1) == "Checking."
    pieces = [d["partial_json"] for i, d in deltas if i == 2]
    assert len(pieces) > 1, "the input streams as the model writes it"
    assert json.loads("".join(pieces)) == {"city": "Oslo"}
    stops = [d["index"] for n, d in got if n == "content_block_stop"]
    assert stops == [0, 1, 2]
    end = got[-2][1]
    assert end["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert end["usage"]["output_tokens"] == whole.usage.output_tokens
    start = got[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == whole.usage.input_tokens


async def test_a_conversations_blocks_reach_the_template_as_chat_messages(
    sdk: anthropic.AsyncAnthropic,
) -> None:
    conversation: Any = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Look it up.", "signature": ""},
                {"type": "text", "text": "Checking."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Oslo"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "-3 C"},
                {"type": "text", "text": "And tomorrow?", "cache_control": {"type": "ephemeral"}},
            ],
        },
    ]
    system: Any = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}]
    await sdk.messages.create(
        model="m", max_tokens=10, system=system, messages=conversation, tools=[TOOL]
    )
    messages, kwargs = RecordingTokenizer.prompts[-1]
    assert messages == [
        {"role": "system", "content": "Be brief.\n\nBe kind."},
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "Look it up.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "-3 C"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert kwargs["tools"][0]["function"]["parameters"] == TOOL["input_schema"]
    assert "enable_thinking" not in kwargs["extra"]
    await sdk.messages.create(**ASK, thinking={"type": "disabled"})
    assert RecordingTokenizer.prompts[-1][1]["extra"]["enable_thinking"] is False


async def test_an_image_a_tool_gave_back_is_a_note_an_image_from_the_user_a_400(
    sdk: anthropic.AsyncAnthropic,
) -> None:
    # As Claude Code's Read tool answers for a PNG: the session goes on, the model told.
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}
    read: Any = {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {}}
    result = {"type": "text", "text": "plot.png:"}
    conversation: Any = [
        {"role": "user", "content": "Look at plot.png"},
        {"role": "assistant", "content": [read]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [result, image]}
            ],
        },
    ]
    await sdk.messages.create(model="m", max_tokens=10, messages=conversation, tools=[TOOL])
    tool = RecordingTokenizer.prompts[-1][0][-1]
    assert tool == {
        "role": "tool",
        "tool_call_id": "toolu_1",
        "content": "plot.png:\n\n[an image the tool gave back, not shown: this model reads text only]",
    }
    conversation[0]["content"] = [image]
    with pytest.raises(anthropic.BadRequestError, match=r"content\[0\] is of type 'image'"):
        await sdk.messages.create(model="m", max_tokens=10, messages=conversation, tools=[TOOL])


async def test_a_tool_result_that_failed_says_so(sdk: anthropic.AsyncAnthropic) -> None:
    read: Any = {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {}}
    for content, said in (("No such file", "Error: No such file"), ("", "Error: the tool failed")):
        failed = {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True}
        conversation: Any = [
            {"role": "user", "content": "Read a.txt"},
            {"role": "assistant", "content": [read]},
            {"role": "user", "content": [{**failed, "content": content}]},
        ]
        await sdk.messages.create(model="m", max_tokens=10, messages=conversation, tools=[TOOL])
        assert RecordingTokenizer.prompts[-1][0][-1]["content"] == said
    conversation[-1]["content"][0]["is_error"] = "yes"
    with pytest.raises(anthropic.BadRequestError, match=r"content\[0\]\.is_error must be"):
        await sdk.messages.create(model="m", max_tokens=10, messages=conversation, tools=[TOOL])


async def test_a_thinking_budget_is_the_engines_as_vllms_is_on_chat(
    sdk: anthropic.AsyncAnthropic, http: httpx.AsyncClient
) -> None:
    await sdk.messages.create(**ASK, thinking={"type": "enabled", "budget_tokens": 2048})
    await sdk.messages.create(**ASK, thinking={"type": "adaptive"})
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert (
        await http.post("/v1/chat/completions", json={**chat, "thinking_token_budget": 9})
    ).is_success
    assert [p.thinking_budget for p in RecordingEngine.params[-3:]] == [2048, None, 9]


async def test_count_tokens_counts_the_prompt_the_template_writes(
    sdk: anthropic.AsyncAnthropic,
) -> None:
    counted = await sdk.messages.count_tokens(model="m", messages=ASK["messages"], tools=[TOOL])
    messages, _ = RecordingTokenizer.prompts[-1]
    assert counted.input_tokens == len(json.dumps(messages))
    message = await sdk.messages.create(**ASK, tools=[TOOL])
    assert message.usage.input_tokens == counted.input_tokens


@pytest.mark.parametrize(
    ("change", "status", "kind", "says"),
    [
        ({"max_tokens": None}, 400, "invalid_request_error", "max_tokens: Field required"),
        ({"temperature": 1.5}, 400, "invalid_request_error", "temperature"),
        ({"model": "nope"}, 404, "not_found_error", "nope"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            400,
            "invalid_request_error",
            "messages[0].content[0] is of type 'image'",
        ),
        (
            {"messages": [{"role": "system", "content": "hi"}]},
            400,
            "invalid_request_error",
            "messages[0].role is 'system'",
        ),
        (
            {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            400,
            "invalid_request_error",
            "tools[0] is of type 'web_search_20250305'",
        ),
        ({"tool_choice": {"type": "tool"}}, 400, "invalid_request_error", "tool_choice must be"),
        (
            {
                "tools": [{"name": "f", "input_schema": {"type": "objekt"}}],
                "tool_choice": {"type": "any"},
            },
            400,
            "invalid_request_error",
            "tools[0].input_schema",
        ),
        (
            {"output_config": {"format": {"type": "json_schema", "schema": {"type": "objekt"}}}},
            400,
            "invalid_request_error",
            "output_config.format",
        ),
        ({"output_config": {"effort": "extreme"}}, 400, "invalid_request_error", "effort"),
        ({"thinking": {"type": "sometimes"}}, 400, "invalid_request_error", "thinking.type"),
        (
            {"thinking": {"type": "enabled", "budget_tokens": -1}},
            400,
            "invalid_request_error",
            "thinking.budget_tokens",
        ),
        ({"messages": [{"role": "user", "content": []}]}, 400, "invalid_request_error", "messages"),
    ],
)
async def test_errors_come_in_anthropics_envelope_naming_the_field(
    http: httpx.AsyncClient, change: dict[str, Any], status: int, kind: str, says: str
) -> None:
    body = {k: v for k, v in {**ASK, **change}.items() if v is not None}
    r = await http.post("/v1/messages", json=body)
    assert r.status_code == status, r.text
    answer = r.json()
    assert answer["type"] == "error" and set(answer["error"]) == {"type", "message"}
    assert answer["error"]["type"] == kind and says in answer["error"]["message"]
    # The OpenAI routes keep OpenAI's.
    r = await http.post("/v1/chat/completions", json={"model": "nope", "messages": []})
    assert set(r.json()) == {"error"}


async def test_the_sdk_raises_the_error_lmx_names(sdk: anthropic.AsyncAnthropic) -> None:
    document: Any = [{"role": "user", "content": [{"type": "document", "source": {}}]}]
    with pytest.raises(anthropic.BadRequestError, match=r"messages\[0\]\.content\[0\]") as info:
        await sdk.messages.create(model="m", max_tokens=5, messages=document)
    said = info.value.body
    assert info.value.request_id is not None  # from `request-id`, the header it reads
    with pytest.raises(anthropic.BadRequestError) as counting:
        await sdk.messages.count_tokens(model="m", messages=document)
    assert counting.value.body == said  # its field named once, as the Messages API names it
    message = await sdk.messages.create(**ASK)
    assert message._request_id is not None


async def test_a_key_may_come_as_x_api_key(app: Any) -> None:
    app.state.deps.keys = Keys(inference=lambda: ("k1",))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.post("/v1/messages", json=ASK)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert "x-api-key" in r.json()["error"]["message"]
        r = await c.post("/v1/messages", json=ASK, headers={"x-api-key": "k2"})
        assert r.status_code == 401
        message = await sdk_on(app, "k1").messages.create(**ASK)
        assert message.stop_reason == "end_turn"
        assert (await c.get("/v1/models", headers={"x-api-key": "k1"})).status_code == 200


async def test_the_models_come_in_anthropics_shape_to_its_clients(
    sdk: anthropic.AsyncAnthropic, http: httpx.AsyncClient
) -> None:
    page = await sdk.models.list()
    assert [(m.id, m.type, m.display_name) for m in page.data] == [("m", "model", "m")]
    assert page.data[0].created_at.tzinfo is not None and not page.has_more
    assert (await sdk.models.retrieve("m")).id == "m"
    # Others (no anthropic-version) get OpenAI's.
    assert (await http.get("/v1/models")).json()["data"][0]["object"] == "model"


def test_a_status_anthropic_names_no_type_for_is_typed_by_its_class() -> None:
    """A model that cannot fit (409) is the client's to change: invalid_request_error, as
    Anthropic types a 4xx it lists no type for; a server's own failure is an api_error."""
    for status, kind in (
        (409, "invalid_request_error"),
        (500, "api_error"),
        (503, "overloaded_error"),
    ):
        r = envelope(status, "no", type_="x", path="/v1/messages")
        assert json.loads(r.body)["error"]["type"] == kind
