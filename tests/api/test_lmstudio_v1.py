"""LM Studio's native chat (/api/v1/chat): its output items, stream events and kept conversations,
over a scripted engine (a fake at the engine boundary)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import httpx

from lmx.api.app import create_app
from lmx.api.deps import AppDeps
from lmx.api.lmstudio_v1 import chat_request
from lmx.api.schemas import NativeChatRequest
from lmx.runtime.engine import Delta, GenerationRequest, LoadConfig
from lmx.runtime.registry import EngineRegistry
from tests.api.conftest import StaticModels
from tests.api.test_outputs import ScriptedEngine, answer
from tests.sse import named_events


class Reasoner(ScriptedEngine):
    """Thinks, then answers; keeps each request's prompt (the chat messages, as JSON)."""

    prompts: ClassVar[list[list[dict[str, Any]]]] = []

    def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self.prompts.append(json.loads(self.tokenizer.decode(request.prompt_tokens)))
        return answer("<think>Blue is calm.</think>Blue.")


async def _client() -> httpx.AsyncClient:
    registry = EngineRegistry(Reasoner)  # type: ignore[arg-type]
    await registry.load(LoadConfig(model_id="m", path=Path()))
    app = create_app(AppDeps(registry=registry, models=StaticModels(registry)))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_an_answer_is_its_reasoning_and_message_streamed_as_namednamed_events() -> None:
    async with await _client() as c:
        ask = {"model": "m", "input": "Favourite colour?", "system_prompt": "Be brief."}
        whole = (await c.post("/api/v1/chat", json=ask)).json()
        assert whole["output"] == [
            {"type": "reasoning", "content": "Blue is calm."},
            {"type": "message", "content": "Blue."},
        ]
        assert whole["model_instance_id"] == "m" and whole["response_id"].startswith("resp_")
        stats = whole["stats"]
        # (the scripted engine's deltas carry no count of the prompt's tokens; see the e2e test)
        assert stats["total_output_tokens"] == 33 and stats["reasoning_output_tokens"] > 0
        assert Reasoner.prompts[-1] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Favourite colour?"},
        ]
        events = named_events((await c.post("/api/v1/chat", json={**ask, "stream": True})).content)
        kinds = [e["type"] for e in events]
        deltas = {k: kinds.count(k) for k in ("reasoning.delta", "message.delta")}
        assert [k for k in kinds if not k.endswith(".delta")] == [
            "chat.start",
            "prompt_processing.start",
            "prompt_processing.end",
            "reasoning.start",
            "reasoning.end",
            "message.start",
            "message.end",
            "chat.end",
        ]
        assert all(deltas.values())
        assert kinds.index("reasoning.delta") < kinds.index("reasoning.end")
        assert kinds.index("message.delta") < kinds.index("message.end")
        text = "".join(e["content"] for e in events if e["type"] == "message.delta")
        result = events[-1]["result"]
        assert text == "Blue." and result["output"] == whole["output"]


async def test_a_kept_answer_is_continued_and_branched_by_its_id() -> None:
    async with await _client() as c:
        first = (await c.post("/api/v1/chat", json={"model": "m", "input": "A"})).json()
        asked = {"model": "m", "input": "B", "previous_response_id": first["response_id"]}
        second = (await c.post("/api/v1/chat", json=asked)).json()
        said = {"role": "assistant", "content": "Blue.", "reasoning_content": "Blue is calm."}
        assert Reasoner.prompts[-1] == [
            {"role": "user", "content": "A"},
            said,
            {"role": "user", "content": "B"},
        ]
        # From the second: both turns before; from the first again: a branch.
        third = {**asked, "input": "C", "previous_response_id": second["response_id"]}
        await c.post("/api/v1/chat", json=third)
        assert [m["content"] for m in Reasoner.prompts[-1]] == ["A", "Blue.", "B", "Blue.", "C"]
        await c.post("/api/v1/chat", json={**asked, "input": "D"})
        assert [m["content"] for m in Reasoner.prompts[-1]] == ["A", "Blue.", "D"]
        # Not kept: no id to continue.
        once = await c.post("/api/v1/chat", json={"model": "m", "input": "E", "store": False})
        assert "response_id" not in once.json()


def test_its_settings_become_the_chat_requests() -> None:
    body = NativeChatRequest.model_validate(
        {
            "model": "m",
            "input": "Hi",
            "reasoning": "off",
            "repeat_penalty": 1.1,
            "max_output_tokens": 9,
            "top_k": 20,
            "min_p": 0.05,
            "context_length": 4096,  # lmx loads a model with its spec's context, for everyone
        }
    )
    chat = chat_request(body, ())
    assert chat.reasoning_effort == "none" and chat.repetition_penalty == 1.1
    assert (chat.max_completion_tokens, chat.top_k, chat.min_p) == (9, 20, 0.05)
    for effort, expected in (("low", "low"), ("high", "high"), ("on", None)):
        on = chat_request(body.model_copy(update={"reasoning": effort}), ())
        assert on.reasoning_effort == expected


async def test_input_items_are_one_user_message_and_an_image_is_named() -> None:
    async with await _client() as c:
        items = [{"type": "message", "content": "Favourite"}, {"type": "message", "content": "?"}]
        first = (await c.post("/api/v1/chat", json={"model": "m", "input": items})).json()
        assert Reasoner.prompts[-1] == [{"role": "user", "content": "Favourite\n\n?"}]
        again = {"model": "m", "input": "And?", "previous_response_id": first["response_id"]}
        await c.post("/api/v1/chat", json=again)
        assert [m["content"] for m in Reasoner.prompts[-1]] == ["Favourite\n\n?", "Blue.", "And?"]
        asked = len(Reasoner.prompts)
        picture = {"type": "image", "data_url": "data:image/png;base64,iVBORw0KGgo="}
        for bad, param in (
            ([items[0], picture], "input[1]"),
            ([{"type": "text", "text": "Hi"}], "input[0].type"),
            ([{"type": "message", "content": ["Hi"]}], "input[0].content"),
            ([], "input"),
        ):
            r = await c.post("/api/v1/chat", json={"model": "m", "input": bad})
            assert r.status_code == 400, bad
            assert r.json()["error"]["param"] == param, r.json()
        assert len(Reasoner.prompts) == asked  # none reached the model
