"""The /v1 surface over ASGI: shapes, parameters and the OpenAI error envelope."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from lmx.api.app import create_app
from lmx.api.auth import Keys
from lmx.api.deps import AppDeps
from lmx.api.generation import chat_prompt
from lmx.api.schemas import ChatCompletionRequest
from lmx.runtime.engine import Delta, GenerationRequest, LoadConfig
from lmx.runtime.mlx_engine import MlxEngine
from lmx.runtime.registry import EngineRegistry
from tests.api.conftest import StaticModels
from tests.harmony import harmony_model

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}]}
JSON_TYPE = {"content-type": "application/json"}


def sse_events(text: str) -> list[Any]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def streamed_calls(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A streamed choice's tool calls put together as OpenAI's SDK does: by index, the id, type
    and name in a call's first delta only, its arguments appended."""
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        for part in d.get("tool_calls") or ():
            i = part["index"]
            if i not in calls:
                assert part.keys() >= {"id", "type", "function"} and part["function"]["name"]
                assert i == len(calls), "calls are indexed in turn from 0"
                calls[i] = {"id": part["id"], "name": part["function"]["name"], "arguments": ""}
            else:
                assert part.keys() == {"index", "function"} and part["function"].keys() == {
                    "arguments"
                }
            calls[i]["arguments"] += part["function"]["arguments"]
    return list(calls.values())


def assert_envelope(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    return err


async def test_models_lists_loaded_model(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny"]
    assert body["data"][0]["object"] == "model"
    # With a trailing slash, the list too, not "model '' not found".
    for api in ("/v1", "/api/v0"):
        r = await client.get(f"{api}/models/")
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["tiny"], r.text


async def test_chat_completion_has_openai_shape_and_counts(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 7, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 7
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 7


async def test_streaming_chat_ends_with_done_and_usage(client: httpx.AsyncClient) -> None:
    payload = {**CHAT, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    r = await client.post("/v1/chat/completions", json=payload)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length"


@pytest.mark.parametrize(
    ("path", "n"),
    [("/v1/chat/completions", 1), ("/v1/chat/completions", 2), ("/v1/completions", 2)],
)
async def test_a_streams_last_events_end_its_body_in_one_message(
    registry: EngineRegistry, path: str, n: int
) -> None:
    # The last chunk, usage and [DONE] reach the server as one body message that ends the
    # response (one write), not one message each and an empty one after. With n choices only
    # the last one to end waits for the stream's end.
    app = create_app(AppDeps(registry=registry, models=StaticModels(registry)))
    # Its sampled choices all run to max_tokens (one ended at an EOS now and then).
    body = {"model": "tiny", "max_tokens": 4, "stream": True, "n": n, "ignore_eos": True}
    body |= {"stream_options": {"include_usage": True}}
    body |= {"messages": CHAT["messages"]} if "chat" in path else {"prompt": "Hello"}
    raw = json.dumps(body).encode()
    sent: list[dict[str, Any]] = []
    requests = [{"type": "http.request", "body": raw, "more_body": False}]

    ended = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop()
        await ended.wait()  # as a server does: the client stays until the response has ended
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message["more_body"]:
            ended.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"lmx.test")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "scheme": "http",
    }
    await app(scope, receive, send)
    # Each event as it comes: not cached, and not held back by a buffering proxy.
    assert {(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")} <= set(
        sent[0]["headers"]
    )
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert [m["more_body"] for m in bodies] == [True] * (len(bodies) - 1) + [False]
    last = sse_events(bodies[-1]["body"].decode())
    assert last[-1] == "[DONE]" and last[-2]["usage"]["completion_tokens"] == 4 * n
    assert len(last) == 3 and last[0]["choices"][0]["finish_reason"] == "length"
    events = [e for m in bodies for e in sse_events(m["body"].decode())]
    ends = [c["index"] for e in events if e != "[DONE]" for c in e["choices"] if c["finish_reason"]]
    assert sorted(ends) == list(range(n))


async def test_unknown_model_is_404_envelope(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    err = assert_envelope(r, 404, "model")
    assert "nope" in err["message"] and "tiny" in err["message"]


async def test_a_route_lmx_does_not_serve_is_named_as_openai_names_it(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/v1/audio/speech", json={"model": "tiny", "input": "hi"})
    assert assert_envelope(r, 404)["message"] == "Invalid URL (POST /v1/audio/speech)"
    r = await client.get("/v1/chat/completions")
    assert assert_envelope(r, 405)["message"] == "Invalid URL (GET /v1/chat/completions)"
    assert r.headers["allow"] == "POST"


async def test_an_embedding_input_may_be_its_text_or_its_token_ids(
    client: httpx.AsyncClient, registry: EngineRegistry
) -> None:
    async with registry.acquire("tiny") as engine:
        ids = engine.tokenizer.encode("hello there")
    got = []
    for given in ("hello there", ["hello there"], ids, [ids]):
        r = await client.post("/v1/embeddings", json={"model": "tiny", "input": given})
        assert r.status_code == 200, r.text
        assert [d["index"] for d in r.json()["data"]] == [0]
        assert r.json()["usage"] == {"prompt_tokens": len(ids), "total_tokens": len(ids)}
        got.append(r.json()["data"][0]["embedding"])
    assert got[1:] == got[:1] * 3
    r = await client.post("/v1/embeddings", json={"model": "nope", "input": "x"})
    assert_envelope(r, 404, "model")


async def test_invalid_parameter_names_the_field(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "temperature": 7})
    assert_envelope(r, 400, "temperature")
    for number in ("NaN", "Infinity"):  # JSON as Python reads it
        body = json.dumps(CHAT)[:-1] + f', "temperature": {number}}}'
        r = await client.post("/v1/chat/completions", content=body, headers=JSON_TYPE)
        assert "a finite number" in assert_envelope(r, 400, "temperature")["message"]
    r = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert_envelope(r, 400, "messages")
    # Not JSON: where it broke, and no param (the character's position is none).
    r = await client.post("/v1/chat/completions", content=b'{"model": ,}', headers=JSON_TYPE)
    err = assert_envelope(r, 400)
    assert err["message"].startswith("body: not valid JSON at character 10") and not err["param"]


async def test_a_json_schema_format_without_its_schema_names_the_field_of_each_api(
    client: httpx.AsyncClient,
) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "x"}}
    r = await client.post("/v1/chat/completions", json={**CHAT, "response_format": rf})
    err = assert_envelope(r, 400, "response_format.json_schema.schema")
    assert err["message"] == "response_format.json_schema.schema: required for type json_schema"
    text = {"format": {"type": "json_schema", "name": "x"}}
    r = await client.post("/v1/responses", json={"model": "tiny", "input": "hi", "text": text})
    err = assert_envelope(r, 400, "text.format.schema")
    assert err["message"] == "text.format.schema: required for type json_schema"


async def test_a_lone_surrogate_is_a_400_naming_the_string_that_holds_it(
    client: httpx.AsyncClient,
) -> None:
    # JSON may escape one (`\ud800`); it is no Unicode text, and the tokenizer raised a TypeError
    # on it (a 500). A pair of them is a character: an emoji, as json.dumps writes it.
    lone = '{"model": "tiny", "max_tokens": 2, "prompt": ["Hi", "a\\udc00"]}'
    r = await client.post("/v1/completions", content=lone.encode(), headers=JSON_TYPE)
    err = assert_envelope(r, 400, "prompt[1]")
    assert err["message"] == (
        "prompt[1] holds a lone UTF-16 surrogate (\\udc00) at character 1: no Unicode text, "
        "which a model could read"
    )
    embed = json.dumps({"model": "tiny", "input": "\ud800"})
    r = await client.post("/v1/embeddings", content=embed, headers=JSON_TYPE)
    assert_envelope(r, 400, "input")
    part = {"type": "text", "text": "x\ud800"}
    body = {**CHAT, "messages": [{"role": "user", "content": [part]}]}
    r = await client.post("/v1/chat/completions", content=json.dumps(body), headers=JSON_TYPE)
    assert_envelope(r, 400, "messages[0].content[0].text")
    pair = '{"model": "tiny", "max_tokens": 2, "prompt": "\\ud83d\\ude00"}'
    r = await client.post("/v1/completions", content=pair.encode(), headers=JSON_TYPE)
    assert r.status_code == 200, r.text


async def test_a_message_other_than_the_assistants_needs_content(
    client: httpx.AsyncClient,
) -> None:
    for message in ({"role": "user"}, {"role": "system", "content": None}):
        r = await client.post("/v1/chat/completions", json={**CHAT, "messages": [message]})
        err = assert_envelope(r, 400, "messages[0]")
        assert "message needs content" in err["message"]
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    said = {"role": "assistant", "content": None, "tool_calls": calls}
    turns = [*CHAT["messages"], said, {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    r = await client.post("/v1/chat/completions", json={**CHAT, "messages": turns, "max_tokens": 2})
    assert r.status_code == 200, r.text


def _answer(call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": "ok"}


@pytest.mark.parametrize(
    ("call", "param"),
    [
        ({"type": "function", "function": {"name": "f", "arguments": "{}"}}, "id"),
        ({"id": "c1", "type": "code", "function": {"name": "f", "arguments": "{}"}}, "type"),
        ({"id": "c1", "type": "function", "function": {"arguments": "{}"}}, "function.name"),
        ({"id": "c1", "type": "function", "function": {"name": "f"}}, "function.arguments"),
    ],
)
async def test_an_assistant_messages_tool_call_needs_an_id_its_type_a_name_and_arguments(
    client: httpx.AsyncClient, call: dict[str, Any], param: str
) -> None:
    said = {"role": "assistant", "content": None, "tool_calls": [call]}
    turns = [*CHAT["messages"], said, _answer("c1")]
    r = await client.post("/v1/chat/completions", json={**CHAT, "messages": turns, "max_tokens": 2})
    assert_envelope(r, 400, f"messages[1].tool_calls[0].{param}")


async def test_tool_turns_are_taken_as_local_servers_take_them(client: httpx.AsyncClient) -> None:
    # OpenAI refuses a tool message that answers no call of the message before it; LM Studio and
    # vLLM take it (agents trim old turns), and so do we. Arguments may come as an object.
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    said = {"role": "assistant", "content": None, "tool_calls": [call]}
    for turns in ([*CHAT["messages"], said, _answer("c1")], [*CHAT["messages"], _answer("c9")]):
        body = {**CHAT, "messages": turns, "max_tokens": 2}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text


async def test_an_unsupported_content_part_is_named_with_its_message(
    client: httpx.AsyncClient,
) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    turns = [*CHAT["messages"], {"role": "user", "content": [image]}]
    r = await client.post("/v1/chat/completions", json={**CHAT, "messages": turns})
    assert_envelope(r, 400, "messages[1].content[0].type")


async def test_a_body_sent_without_the_json_content_type_says_so(
    client: httpx.AsyncClient,
) -> None:
    form = {"content-type": "application/x-www-form-urlencoded"}  # curl -d's default
    r = await client.post("/v1/chat/completions", content=json.dumps(CHAT), headers=form)
    err = assert_envelope(r, 400)
    assert err["message"].endswith("with the header content-type: application/json)")


async def test_token_ids_outside_the_vocabulary_are_400s_naming_the_field(
    client: httpx.AsyncClient,
) -> None:
    # The worker would index past the model's embedding or logits (it crashed on such ids).
    base = {"model": "tiny", "max_tokens": 2}
    r = await client.post("/v1/completions", json={**base, "prompt": [5, 99_999_999]})
    err = assert_envelope(r, 400, "prompt")
    assert "99999999 is outside the model's vocabulary (0 to 2047)" in err["message"]
    r = await client.post("/v1/completions", json={**base, "prompt": "Hi", "logit_bias": {"-3": 5}})
    assert_envelope(r, 400, "logit_bias")
    # A top_k past the vocabulary filters nothing: no error.
    r = await client.post("/v1/completions", json={**base, "prompt": "Hi", "top_k": 5000})
    assert r.status_code == 200, r.text


async def test_a_request_that_could_never_fit_the_queue_is_a_400_not_a_429(
    client: httpx.AsyncClient,
) -> None:
    # This model takes 12 sequences at once (max_batch 8 + max_queue 4): a 429 would be retried.
    body = {"model": "tiny", "max_tokens": 2, "prompt": ["Hi"] * 7, "n": 2}
    err = assert_envelope(await client.post("/v1/completions", json=body), 400, "prompt")
    assert "asks for 14 sequences" in err["message"] and "at most 12" in err["message"]
    r = await client.post("/v1/chat/completions", json={**CHAT, "n": 13})
    assert_envelope(r, 400, "n")


async def test_a_request_keeps_the_place_it_arrived_to_while_its_prompt_is_built(
    client: httpx.AsyncClient, registry: EngineRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prompts are built on a thread: a request arriving later with a quicker one (token ids)
    # must find the last place taken, not take it and leave the first one a 429.
    building, built = threading.Event(), threading.Event()
    async with registry.acquire("tiny") as engine:
        tokenizer = engine.tokenizer
        encode = tokenizer.encode

        def slow_encode(text: str) -> list[int]:
            building.set()
            built.wait(10)
            return encode(text)

        monkeypatch.setattr(tokenizer, "encode", slow_encode)
        body = {"model": "tiny", "max_tokens": 2}
        with engine.hold("others", 11):  # of its 12 places
            first = asyncio.create_task(
                client.post("/v1/completions", json={**body, "prompt": "Hi"})
            )
            assert await asyncio.to_thread(building.wait, 10)
            later = await client.post("/v1/completions", json={**body, "prompt": [5, 6]})
            built.set()
            assert_envelope(later, 429)
            assert (await first).status_code == 200


async def test_best_of_other_than_n_is_refused(client: httpx.AsyncClient) -> None:
    body = {"model": "tiny", "max_tokens": 2, "prompt": "Hi", "n": 2}
    assert_envelope(await client.post("/v1/completions", json={**body, "best_of": 3}), 400)
    r = await client.post("/v1/completions", json={**body, "best_of": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


async def test_a_forced_call_cut_before_its_name_is_no_content(client: httpx.AsyncClient) -> None:
    """tool_choice required, cut by max_tokens inside the call's markup: no `<tool_call>` text
    reaches the client as content, streamed or not."""
    f = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for max_tokens in (1, 2, 3):
        body = {**CHAT, "tools": [f], "tool_choice": "required", "max_tokens": max_tokens}
        (choice,) = (await client.post("/v1/chat/completions", json=body)).json()["choices"]
        assert choice["finish_reason"] == "length"
        assert not choice["message"]["content"], choice
        r = await client.post("/v1/chat/completions", json={**body, "stream": True})
        deltas = [e["choices"][0]["delta"] for e in sse_events(r.text) if e != "[DONE]"]
        assert not any(d.get("content") for d in deltas), deltas


async def test_tool_errors_name_the_tool_or_the_choice_at_fault(client: httpx.AsyncClient) -> None:
    ok = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    bad = {"type": "function", "function": {"name": "g", "parameters": {"type": "objekt"}}}
    body = {**CHAT, "tools": [ok, bad], "tool_choice": "required"}
    err = assert_envelope(await client.post("/v1/chat/completions", json=body), 400)
    assert err["param"] == "tools[1].function.parameters" and "objekt" in err["message"]
    body = {**CHAT, "tools": [ok, ok], "tool_choice": "required"}
    err = assert_envelope(await client.post("/v1/chat/completions", json=body), 400, "tools[1]")
    assert "duplicate function name 'f'" in err["message"]
    unnamed = {"type": "function", "function": {}}
    body = {**CHAT, "tools": [ok], "tool_choice": unnamed}
    r = await client.post("/v1/chat/completions", json=body)
    assert_envelope(r, 400, "tool_choice.function.name")
    body = {**CHAT, "tools": [ok], "tool_choice": {"type": "function", "function": {"name": "h"}}}
    r = await client.post("/v1/chat/completions", json=body)
    assert_envelope(r, 400, "tool_choice")


@pytest.mark.parametrize("choice", [{"tool_choice": "auto"}, {}, {"tool_choice": "none"}])
@pytest.mark.parametrize(
    ("parameters", "words"),
    [
        ({"type": "objekt"}, "objekt"),
        ({"type": "string"}, "'object'"),
        ({"properties": {}}, "'object'"),
    ],
)
async def test_invalid_parameters_are_a_400_naming_the_tool_whatever_the_tool_choice(
    client: httpx.AsyncClient, choice: dict[str, Any], parameters: dict[str, Any], words: str
) -> None:
    ok = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    bad = {"type": "function", "function": {"name": "g", "parameters": parameters}}
    body = {**CHAT, "tools": [ok, bad], "max_tokens": 2, **choice}
    err = assert_envelope(await client.post("/v1/chat/completions", json=body), 400)
    assert err["param"] == "tools[1].function.parameters" and words in err["message"], err
    assert err["code"] == "invalid_function_parameters"  # OpenAI's


async def test_tool_choice_none_shows_the_tools_and_no_call_can_begin(
    client: httpx.AsyncClient, registry: EngineRegistry
) -> None:
    async with registry.acquire("tiny") as engine:
        opener = engine.tokenizer.marker_ids["<tool_call>"]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    # The call's opening token pushed to the top: only a forbidden one is not drawn first.
    body = {**CHAT, "tools": [tool], "max_tokens": 6, "temperature": 0}
    body["logit_bias"] = {str(opener): 100}
    auto = (await client.post("/v1/chat/completions", json=body)).json()
    none = (await client.post("/v1/chat/completions", json={**body, "tool_choice": "none"})).json()
    bare = {k: v for k, v in body.items() if k != "tools"}
    alone = (await client.post("/v1/chat/completions", json=bare)).json()
    # The tools are in the prompt: the same prefix as the turns that may call them.
    assert none["usage"]["prompt_tokens"] == auto["usage"]["prompt_tokens"]
    assert none["usage"]["prompt_tokens"] > alone["usage"]["prompt_tokens"]
    assert auto["choices"][0]["message"].get("tool_calls") or "<tool_call>" in str(auto)
    message = none["choices"][0]["message"]
    assert not message.get("tool_calls") and "<tool_call>" not in message["content"]
    assert none["choices"][0]["finish_reason"] == "length"


async def test_context_overflow_is_400_naming_the_limit(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100_000})
    err = assert_envelope(r, 400, "max_tokens")
    assert "4096" in err["message"] and err["code"] == "context_length_exceeded"
    # The field the client sent is the one named.
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_completion_tokens": 5000})
    assert_envelope(r, 400, "max_completion_tokens")


async def test_completions_with_token_ids_and_echo(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 4,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    r2 = await client.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": "Once upon", "max_tokens": 3, "echo": True},
    )
    assert r2.json()["choices"][0]["text"].startswith("Once upon")


async def test_echo_with_logprobs_scores_the_prompt_as_evaluation_harnesses_ask(
    client: httpx.AsyncClient,
) -> None:
    # lm-evaluation-harness's loglikelihood: the prompt echoed, its tokens' logprobs, no tokens.
    body = {"model": "tiny", "prompt": "Once upon a time", "echo": True, "logprobs": 2}
    r = await client.post("/v1/completions", json={**body, "max_tokens": 0})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == "Once upon a time" == "".join(lp["tokens"])
    assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 0
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v < 0 for v in lp["token_logprobs"][1:]) and lp["text_offset"][0] == 0
    assert all(len(top) == 2 for top in lp["top_logprobs"][1:])
    # With tokens after it: the prompt's entries lead, the completion's follow, offsets running on.
    r = await client.post("/v1/completions", json={**body, "max_tokens": 3, "temperature": 0})
    (choice,) = r.json()["choices"]
    full, n = choice["logprobs"], len(lp["tokens"])
    assert full["tokens"][:n] == lp["tokens"] and len(full["tokens"]) == n + 3
    assert full["token_logprobs"][1:n] == pytest.approx(lp["token_logprobs"][1:], abs=1e-5)
    assert "".join(full["tokens"]) == choice["text"]
    assert full["text_offset"][n] == len("Once upon a time")
    # Streamed: the echoed prompt and its logprobs come with the choice's first event.
    stream = {**body, "max_tokens": 3, "temperature": 0, "stream": True}
    r = await client.post("/v1/completions", json=stream)
    chunks = [e["choices"][0] for e in sse_events(r.text) if e != "[DONE]"]
    assert chunks[0]["text"].startswith("Once upon a time")
    assert chunks[0]["logprobs"]["tokens"][:n] == lp["tokens"]
    assert "".join(c["text"] for c in chunks) == choice["text"]
    # Each chunk's offsets run on from the last one's, as the whole answer's do.
    streamed = [o for c in chunks if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert streamed == full["text_offset"]
    plain = {**body, "echo": False, "max_tokens": 3, "temperature": 0}
    whole = (await client.post("/v1/completions", json=plain)).json()["choices"][0]
    r = await client.post("/v1/completions", json={**plain, "stream": True})
    chunks = [e["choices"][0] for e in sse_events(r.text) if e != "[DONE]"]
    streamed = [o for c in chunks if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert streamed == whole["logprobs"]["text_offset"] and len(streamed) == 3
    r = await client.post("/v1/completions", json={**body, "echo": False, "max_tokens": 0})
    assert_envelope(r, 400, "max_tokens")


async def test_max_tokens_minus_one_is_as_many_as_the_context_leaves(
    client: httpx.AsyncClient,
) -> None:
    # LM Studio's documentation sends -1 for no limit: its clients' requests must not be 400s.
    room = 5
    body = {"model": "tiny", "prompt": [7] * (4096 - room), "max_tokens": -1, "ignore_eos": True}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == room
    assert r.json()["choices"][0]["finish_reason"] == "length"
    chat = {**CHAT, "max_tokens": -1, "stop": [" "], "temperature": 0}
    said = await client.post("/v1/chat/completions", json=chat)
    assert said.status_code == 200, said.text
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 0})
    assert "or -1" in assert_envelope(r, 400, "max_tokens")["message"]
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": -2})
    assert_envelope(r, 400, "max_tokens")


async def test_n_choices_are_independent_and_seeded(client: httpx.AsyncClient) -> None:
    payload = {**CHAT, "max_tokens": 12, "temperature": 1.5, "seed": 11, "n": 3}
    a = (await client.post("/v1/chat/completions", json=payload)).json()
    b = (await client.post("/v1/chat/completions", json=payload)).json()
    texts_a = [c["message"]["content"] for c in a["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert texts_a == [c["message"]["content"] for c in b["choices"]]
    assert len(set(texts_a)) > 1
    assert a["usage"]["completion_tokens"] == 36


async def test_the_sequences_of_one_request_share_its_request_id(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine counts one request's sequences (n choices, several prompts) as one request."""
    seen: list[str] = []
    stream = MlxEngine.stream

    def recording(self: MlxEngine, request: GenerationRequest) -> AsyncIterator[Delta]:
        seen.append(request.request_id)
        return stream(self, request)

    monkeypatch.setattr(MlxEngine, "stream", recording)
    body = {"model": "tiny", "prompt": ["Once upon", "In a"], "max_tokens": 2, "n": 2}
    for _ in range(2):
        assert (await client.post("/v1/completions", json=body)).status_code == 200
    first, second = seen[:4], seen[4:]
    assert len(set(first)) == len(set(second)) == 1 and len(second) == 4
    assert first[0] and second[0] and first[0] != second[0]


async def test_logprobs_report_top_alternatives(client: httpx.AsyncClient) -> None:
    payload = {**CHAT, "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    body = (await client.post("/v1/chat/completions", json=payload)).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for item in content:
        assert item["logprob"] <= 0
        assert len(item["top_logprobs"]) == 2
        # Greedy: the chosen token is the most likely one.
        assert item["logprob"] == max(t["logprob"] for t in item["top_logprobs"])


async def test_inference_keys_guard_v1_when_configured(registry: EngineRegistry) -> None:
    keys = Keys(admin=lambda: "admin", inference=lambda: ("k1", "k2"))
    app = create_app(AppDeps(registry=registry, models=StaticModels(registry), keys=keys))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        err = assert_envelope(await c.get("/v1/models"), 401)
        assert err["message"].startswith("no API key was given for /v1/models; send")
        r = await c.get("/api/v0/models", headers={"Authorization": "Bearer k3"})
        assert assert_envelope(r, 401)["message"].startswith("the API key is not valid for /api/v0")
        for key in ("k2", "admin"):
            r = await c.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
        assert (await c.get("/healthz")).status_code == 200


async def test_generation_feeds_token_and_latency_metrics(client: httpx.AsyncClient) -> None:
    parts = ("time_to_first_token", "request_queue", "request_prefill")

    def histograms(text: str) -> dict[str, float]:
        found = re.findall(r'^lmx_(\w+)_seconds_(sum|count)\{model="tiny"\} (\S+)$', text, re.M)
        return {f"{name}_{kind}": float(v) for name, kind, v in found}

    before = histograms((await client.get("/metrics")).text)
    # Tokens enough that some come apart (a busy machine coalesces a few into one delta).
    body = {**CHAT, "max_tokens": 32, "ignore_eos": True, "stream": True, "n": 2}
    await client.post("/v1/chat/completions", json=body)
    text = (await client.get("/metrics")).text
    after = histograms(text)

    def grew(key: str) -> float:
        assert key in after, f"{key} missing from /metrics"
        return after[key] - before.get(key, 0.0)

    assert grew("inter_token_latency_count") > 0
    assert 'lmx_completion_tokens_total{model="tiny"}' in text
    assert 'lmx_requests_total{route="/v1/chat/completions",status="200"}' in text
    # Each choice's first token is timed once, and its engine-side parts fit inside its TTFT.
    for part in parts:
        assert grew(f"{part}_count") == 2
    ttft, queue, prefill = (grew(f"{part}_sum") for part in parts)
    assert queue >= 0 and prefill > 0
    assert queue + prefill < ttft


async def test_a_generations_end_is_logged_under_its_request_id(client: httpx.AsyncClient) -> None:
    body = {**CHAT, "max_tokens": 3, "temperature": 0, "n": 2}
    with capture_logs(processors=[merge_contextvars]) as logs:
        r = await client.post("/v1/chat/completions", json=body, headers={"x-request-id": "req-7"})
    done = [e for e in logs if e["event"] == "generation_done"]
    assert len(done) == 1, logs
    (end,) = done
    assert end["request_id"] == "req-7" and end["model"] == "tiny"
    assert end["finish_reasons"] == ["length", "length"] and end["completion_tokens"] == 6
    assert end["prompt_tokens"] == 2 * r.json()["usage"]["prompt_tokens"]  # each sequence's
    assert 0 < end["ttft_ms"] <= end["duration_ms"]


async def test_top_p_zero_is_taken_as_openai_takes_it(client: httpx.AsyncClient) -> None:
    # Clients send it for a deterministic answer: the likeliest token alone (not a 400).
    r = await client.post("/v1/chat/completions", json={**CHAT, "top_p": 0, "max_tokens": 2})
    assert r.status_code == 200, r.text


async def test_a_bad_input_items_query_is_a_400_naming_it(client: httpx.AsyncClient) -> None:
    made = await client.post("/v1/responses", json={"model": "tiny", "input": "hi"})
    rid = made.json()["id"]
    for query, param in (("limit=0", "limit"), ("limit=101", "limit"), ("order=up", "order")):
        r = await client.get(f"/v1/responses/{rid}/input_items?{query}")
        assert_envelope(r, 400, param)
    listed = (await client.get(f"/v1/responses/{rid}/input_items?order=asc&limit=100")).json()
    assert [i["content"] for i in listed["data"]] == [[{"type": "input_text", "text": "hi"}]]
    gone = await client.get("/v1/responses/resp_unknown/input_items")
    assert assert_envelope(gone, 404, "response_id")["code"] == "not_found"


@pytest.mark.parametrize(
    ("path", "fields", "param", "says"),
    [
        ("/v1/chat/completions", {"stop": 5}, "stop", "stop: Input should be a valid list"),
        (
            "/v1/chat/completions",
            {"tool_choice": {"type": "x"}},
            "tool_choice",
            "tool_choice.type: Input should be 'function'",
        ),
        ("/v1/completions", {"prompt": {"a": 1}}, "prompt", "prompt: Input should be a valid list"),
        ("/v1/responses", {"input": [5]}, "input", "input[0]: Input should be a valid dictionary"),
    ],
)
async def test_a_value_of_none_of_a_fields_types_is_named_by_the_field_alone(
    client: httpx.AsyncClient, path: str, fields: dict[str, Any], param: str, says: str
) -> None:
    # pydantic puts the union's members in the error's location (`str`, `list[str]`,
    # `NamedToolChoice`): no field the client can find in its request.
    base = {"model": "tiny", "messages": CHAT["messages"], "prompt": "x", "input": "x"}
    r = await client.post(path, json={**base, **fields})
    assert says in assert_envelope(r, 400, param)["message"]


async def test_a_requests_ttl_is_its_models_the_latest_counting(
    client: httpx.AsyncClient, registry: EngineRegistry
) -> None:
    """LM Studio's `ttl`, kept with the engine for the reconciler (which applies it to a model
    loaded on demand: see the planner's cases)."""
    assert registry.snapshot()["tiny"].ttl_s is None
    for path, body, ttl in (
        ("/v1/chat/completions", {**CHAT, "max_tokens": 1}, 120),
        ("/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 1}, 60.5),
        ("/v1/embeddings", {"model": "tiny", "input": "Hi"}, 30),
    ):
        r = await client.post(path, json={**body, "ttl": ttl})
        assert r.status_code == 200 and registry.snapshot()["tiny"].ttl_s == ttl
    await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1})
    assert registry.snapshot()["tiny"].ttl_s == 30  # a request without one leaves it
    r = await client.post("/v1/chat/completions", json={**CHAT, "ttl": 0})
    assert_envelope(r, 400, "ttl")


async def test_a_harmony_model_calls_an_allowed_tool_in_its_own_format(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """gpt-oss's calls, written by the grammar in harmony on a real tokenizer and worker, read
    back by its parser, streamed and not; allowed tools hold it to those. And a schema's
    answer, in its final channel."""
    registry = EngineRegistry(MlxEngine)
    path = harmony_model(tiny_model_dir, tmp_path / "harmony")
    await registry.load(LoadConfig(model_id="h", path=path, prompt_cache_bytes=0))
    app = create_app(AppDeps(registry=registry, models=StaticModels(registry)))
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a"],
        "additionalProperties": False,
    }
    tools = [
        {"type": "function", "function": {"name": name, "parameters": schema, "strict": True}}
        for name in ("add", "sub")
    ]
    ask = {
        "model": "h",
        "messages": [{"role": "user", "content": "Hi"}],
        "tools": tools,
        "max_tokens": 200,
        "temperature": 0,
    }

    async def called(c: httpx.AsyncClient, choice: Any) -> str:
        """The one call's name, the same streamed and not, its arguments the schema's."""
        body = {**ask, "tool_choice": choice}
        r = (await c.post("/v1/chat/completions", json=body)).json()["choices"][0]
        (call,) = r["message"]["tool_calls"]
        assert r["finish_reason"] == "tool_calls"
        assert set(json.loads(call["function"]["arguments"])) == {"a"}
        streamed = await c.post("/v1/chat/completions", json={**body, "stream": True})
        deltas = [e["choices"][0]["delta"] for e in sse_events(streamed.text) if e != "[DONE]"]
        (whole,) = streamed_calls(deltas)
        assert (whole["name"], whole["arguments"]) == (
            call["function"]["name"],
            call["function"]["arguments"],
        )
        return str(whole["name"])

    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            picked = await called(c, "required")
            (other,) = {"add", "sub"} - {picked}
            only = [{"type": "function", "function": {"name": other}}]
            choice = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": only}}
            assert await called(c, choice) == other
            # A schema's answer: in the final channel, which the prompt opens for it.
            rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
            body = {**ask, "tools": None, "response_format": rf}
            r = (await c.post("/v1/chat/completions", json=body)).json()["choices"][0]
            assert set(json.loads(r["message"]["content"])) == {"a"}
        async with registry.acquire("h") as engine:
            chat = ChatCompletionRequest.model_validate(body)
            prompt = engine.tokenizer.decode(chat_prompt(chat, engine, thinking=False))
            assert prompt.endswith("<|channel|>final<|message|>")
    finally:
        await registry.unload("h")


async def test_allowed_tools_the_model_may_pass_over_are_the_only_ones_it_is_shown(
    registry: EngineRegistry,
) -> None:
    """OpenAI's allowed_tools in mode auto: no grammar holds the model to them, so the prompt
    shows it those alone; in mode required a grammar does, and the prompt keeps every tool."""
    tools = [
        {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
        for name in ("get_weather", "lookup_stock")
    ]
    only = [{"type": "function", "function": {"name": "lookup_stock"}}]
    async with registry.acquire("tiny") as engine:

        def shown(mode: str) -> list[str]:
            choice = {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": only}}
            body = ChatCompletionRequest.model_validate(
                {**CHAT, "tools": tools, "tool_choice": choice}
            )
            prompt = engine.tokenizer.decode(chat_prompt(body, engine, thinking=True))
            return [name for name in ("get_weather", "lookup_stock") if name in prompt]

        assert shown("auto") == ["lookup_stock"]
        assert shown("required") == ["get_weather", "lookup_stock"]


async def test_an_answer_may_continue_the_assistants_last_message(
    client: httpx.AsyncClient, registry: EngineRegistry
) -> None:
    # vLLM's continue_final_message (and Anthropic's prefill): the prompt ends inside the
    # assistant's message, not after it with a turn of its own opened.
    said = [*CHAT["messages"], {"role": "assistant", "content": "The answer is"}]
    async with registry.acquire("tiny") as engine:
        tokenizer = engine.tokenizer

        def prompt_of(**fields: Any) -> str:
            body = ChatCompletionRequest.model_validate({**CHAT, "messages": said, **fields})
            return tokenizer.decode(chat_prompt(body, engine, thinking=True))

        continued = prompt_of(continue_final_message=True)
        assert continued.endswith("<|im_start|>assistant\nThe answer is")
        assert prompt_of().endswith("The answer is<|im_end|>\n<|im_start|>assistant\n")
        assert prompt_of(add_generation_prompt=False).endswith("The answer is<|im_end|>\n")
    body = {**CHAT, "messages": said, "continue_final_message": True, "max_tokens": 2}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(
        tokenizer.encode(continued)
    )
    r = await client.post("/v1/chat/completions", json={**CHAT, "continue_final_message": True})
    assert (
        "last message to be the assistant's, not the user's" in assert_envelope(r, 400)["message"]
    )
    # A prefill that leaves a <think> block open: the answer goes on in it, up to its end
    # (which the thinking budget writes here), then the content (it was all content, the
    # budget's `</think>` in it).
    thought = [*CHAT["messages"], {"role": "assistant", "content": "<think>\nhmm"}]
    budget = {"thinking_token_budget": 3, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    body = {**CHAT, "messages": thought, "continue_final_message": True, **budget}
    answer = (await client.post("/v1/chat/completions", json=body)).json()
    message = answer["choices"][0]["message"]
    assert message["reasoning_content"] and "</think>" not in (message["content"] or "")
    assert answer["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    # Anthropic's Messages API continues a last assistant message as its prefill.
    anthropic_body = {"model": "tiny", "max_tokens": 2, "messages": said}
    r = await client.post("/v1/messages", json=anthropic_body)
    assert r.json()["usage"]["input_tokens"] + r.json()["usage"]["cache_read_input_tokens"] == len(
        tokenizer.encode(continued)
    )


async def test_a_messages_max_tokens_is_cut_to_the_room_the_context_leaves(
    client: httpx.AsyncClient, registry: EngineRegistry
) -> None:
    # Claude Code asks for 32,000 tokens whatever the model: its requests must not fail on it.
    async with registry.acquire("tiny") as engine:
        context = engine.context_length

    async def room_after(repeats: int) -> tuple[list[dict[str, str]], int]:
        said = [{"role": "user", "content": "one two three " * repeats}]
        body = {"model": "tiny", "messages": said}
        counted = (await client.post("/v1/messages/count_tokens", json=body)).json()
        return said, context - counted["input_tokens"]

    _, room = await room_after(context // 8)
    _, less = await room_after(context // 8 + 10)  # a repeat's tokens: (room - less) / 10
    long, room = await room_after(context // 8 + 10 * (room - 40) // (room - less))
    assert 0 < room < 100
    body = {"model": "tiny", "max_tokens": 32_000, "messages": long}
    message = (await client.post("/v1/messages", json=body)).json()
    assert 0 < message["usage"]["output_tokens"] <= room
    assert message["stop_reason"] in ("max_tokens", "end_turn")
    # OpenAI's routes answer as OpenAI does: a 400 naming the limit.
    r = await client.post("/v1/chat/completions", json={**body, "stream": False})
    assert assert_envelope(r, 400, "max_tokens")["code"] == "context_length_exceeded"
