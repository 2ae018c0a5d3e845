"""The OpenAI surface through a real daemon: tools, JSON schema, disconnects, responsiveness."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import Daemon, wait_for
from tests.sse import named_events

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
                "required": ["city"],
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
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad"]},
    },
    "required": ["name", "age", "mood"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60
    ) as sdk:
        yield sdk


def check_call(name: str, arguments: str) -> None:
    args = json.loads(arguments)
    if name == "get_weather":
        assert args["city"] in ("Paris", "Oslo") and set(args) == {"city"}
    else:
        assert name == "add" and set(args) == {"a", "b"}
        assert all(isinstance(v, int) for v in args.values())


def check_person(content: str) -> None:
    person = json.loads(content)
    assert set(person) == {"name", "age", "mood"}
    assert isinstance(person["name"], str) and len(person["name"]) <= 12
    assert isinstance(person["age"], int) and 0 <= person["age"] <= 120
    assert person["mood"] in ("happy", "sad")


@pytest.mark.parametrize("seed", [1, 2])
def test_required_tool_call_parses_and_validates(client: openai.OpenAI, seed: int) -> None:
    r = client.chat.completions.create(
        model="lmx-tiny",
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,
        tool_choice="required",
        max_tokens=300,
        temperature=1.0,
        seed=seed,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id)
        check_call(call.function.name, call.function.arguments)  # type: ignore[union-attr]


def test_named_tool_call_streams_as_tool_call_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="lmx-tiny",
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}},
        max_tokens=300,
        stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    finish, parts = None, 0
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                if tc.function and tc.function.name:
                    entry["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    entry["arguments"] += tc.function.arguments
                    parts += 1
    assert finish == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["add"]
    assert parts > 1, "the arguments stream as the model writes them"
    check_call("add", calls[0]["arguments"])


def test_the_deprecated_functions_api_calls_and_takes_results_back(client: openai.OpenAI) -> None:
    """`functions` and `function_call`, as older apps send them: the answer's call comes back as
    the message's function_call, streamed or not, and a function message's result reaches the
    model as a tool message's does."""
    functions: Any = [TOOLS[0]["function"]]
    ask: Any = {
        "model": "lmx-tiny",
        "messages": ASK,
        "functions": functions,
        "function_call": {"name": "get_weather"},
        "max_tokens": 300,
    }
    choice = client.chat.completions.create(**ask).choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    call = choice.message.function_call
    assert call is not None and call.name == "get_weather"
    check_call(call.name, call.arguments)
    name, arguments, finish = "", "", None
    for chunk in client.chat.completions.create(**ask, stream=True):
        for c in chunk.choices:
            assert c.delta.tool_calls is None
            finish = c.finish_reason or finish
            if c.delta.function_call:
                name += c.delta.function_call.name or ""
                arguments += c.delta.function_call.arguments or ""
    assert (name, finish) == ("get_weather", "function_call")
    check_call(name, arguments)

    def prompt_tokens(*turns: Any) -> int:
        r = client.chat.completions.create(
            model="lmx-tiny", messages=[*ASK, *turns], functions=functions, max_tokens=1
        )
        assert r.usage is not None
        return r.usage.prompt_tokens

    legacy = prompt_tokens(
        {"role": "assistant", "content": None, "function_call": {"name": name, "arguments": "{}"}},
        {"role": "function", "name": name, "content": "Sunny, 21 degrees"},
    )
    called = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": "{}"}}
    tools = prompt_tokens(
        {"role": "assistant", "content": None, "tool_calls": [called]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees"},
    )
    assert legacy == tools > prompt_tokens() + 8  # the result is in the prompt


def test_several_choices_streamed_with_calls_add_up_in_the_sdks_helper(
    client: openai.OpenAI,
) -> None:
    """The stream helper takes each choice's first chunk for its place in the list: each choice
    opens in order, though a call's text is held until its name is written."""
    for seed in range(6):  # which choice writes its call's name first varies with the seed
        with client.chat.completions.stream(
            model="lmx-tiny",
            messages=ASK,  # type: ignore[arg-type]
            tools=TOOLS,
            tool_choice="required",
            n=2,
            parallel_tool_calls=False,
            max_tokens=300,
            seed=seed,
        ) as stream:
            answer = stream.get_final_completion()
        assert [c.index for c in answer.choices] == [0, 1]
        for choice in answer.choices:
            assert choice.message.role == "assistant" and choice.message.content is None
            (call,) = choice.message.tool_calls or ()
            check_call(call.function.name, call.function.arguments)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_allowed_tools_required_calls_only_those_allowed(client: openai.OpenAI, seed: int) -> None:
    """OpenAI's allowed_tools: every tool stays given, the model calls only the allowed ones."""
    allowed: Any = {
        "type": "allowed_tools",
        "allowed_tools": {
            "mode": "required",
            "tools": [{"type": "function", "function": {"name": "add"}}],
        },
    }
    r = client.chat.completions.create(
        model="lmx-tiny",
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,
        tool_choice=allowed,
        max_tokens=300,
        temperature=1.0,
        seed=seed,
    )
    calls = r.choices[0].message.tool_calls or []
    assert r.choices[0].finish_reason == "tool_calls" and calls
    for call in calls:
        check_call(call.function.name, call.function.arguments)  # type: ignore[union-attr]
        assert call.function.name == "add"  # type: ignore[union-attr]
    answer = client.responses.create(
        model="lmx-tiny",
        input=ASK[0]["content"],
        tools=FUNCTION_TOOLS,
        tool_choice={
            "type": "allowed_tools",
            "mode": "required",
            "tools": [{"type": "function", "name": "add"}],
        },
        temperature=1.0,
    )
    assert {o.name for o in answer.output if o.type == "function_call"} == {"add"}
    unknown = allowed["allowed_tools"]["tools"][0] | {"function": {"name": "nope"}}
    with pytest.raises(openai.BadRequestError, match="'nope' is not one of") as info:
        client.chat.completions.create(
            model="lmx-tiny",
            messages=ASK,  # type: ignore[arg-type]
            tools=TOOLS,
            tool_choice={
                "type": "allowed_tools",
                "allowed_tools": {"mode": "auto", "tools": [unknown]},
            },
        )
    assert info.value.body["param"] == "tool_choice.allowed_tools.tools[0].function.name"  # type: ignore[index]


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates(client: openai.OpenAI, stream: bool) -> None:
    fmt: Any = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
    }
    kwargs: dict[str, Any] = {
        "model": "lmx-tiny",
        "messages": [{"role": "user", "content": "Describe someone."}],
        "response_format": fmt,
        "max_tokens": 300,
        "temperature": 0.8,
        "seed": 5,
    }
    if stream:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(**kwargs, stream=True)
            if c.choices
        )
    else:
        r = client.chat.completions.create(**kwargs)
        assert r.choices[0].finish_reason == "stop"
        text = r.choices[0].message.content or ""
    check_person(text)


def test_invalid_schema_is_a_400_naming_the_field(client: openai.OpenAI) -> None:
    bad: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="lmx-tiny", messages=ASK, response_format=bad)  # type: ignore[arg-type]
    assert info.value.param == "response_format.json_schema.schema"  # type: ignore[attr-defined]


def _in_flight(daemon: Daemon, model: str = "lmx-tiny") -> float:
    """The model's requests that the daemon holds, its engine's and those it still builds."""
    return _metric(daemon, "lmx_in_flight", model)


def _metric(daemon: Daemon, name: str, model: str = "lmx-tiny") -> float:
    text = httpx.get(daemon.url + "/metrics", timeout=5).text
    m = re.search(rf'^{name}\{{model="{model}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_client_disconnect_frees_the_slot(daemon: Daemon) -> None:
    body = {
        "model": "lmx-tiny",
        "messages": ASK,
        "max_tokens": 3000,
        "stream": True,
        "ignore_eos": True,
    }
    rid = {"x-request-id": "req-left-early"}
    with (
        httpx.Client(base_url=daemon.url, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=rid) as r,
    ):
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
        assert _in_flight(daemon) == 1
    # The response was closed mid-stream: the sequence must leave the batch.
    wait_for(lambda: _in_flight(daemon), lambda v: v == 0, timeout_s=10)
    # And the log says so, under the request's id.

    done = wait_for(lambda: _generations_done(daemon, "req-left-early"), bool, timeout_s=10)
    assert len(done) == 1 and done[0]["finish_reasons"] == ["cancelled"], done


def _generations_done(daemon: Daemon, request_id: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in daemon.log().splitlines() if request_id in line]
    return [e for e in lines if e["event"] == "generation_done"]


def test_a_client_that_leaves_a_request_answered_at_its_end_frees_the_slot(
    daemon: Daemon,
) -> None:
    # Not streamed: the answer comes only at the end, ~3800 tokens (seconds) away.
    body = {"model": "lmx-tiny", "messages": ASK, "max_tokens": 3800, "ignore_eos": True}
    rid = {"x-request-id": "req-gave-up"}
    with (
        httpx.Client(base_url=daemon.url, timeout=httpx.Timeout(30, read=0.5)) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post("/v1/chat/completions", json=body, headers=rid)
    wait_for(lambda: _in_flight(daemon), lambda v: v == 0, timeout_s=10)
    done = wait_for(lambda: _generations_done(daemon, "req-gave-up"), bool, timeout_s=10)
    assert done[0]["finish_reasons"] == ["cancelled"], done


def test_a_client_that_gives_up_on_an_embedding_frees_the_slot(daemon: Daemon) -> None:
    # 256 texts of ~800 tokens: tens of seconds of rows on the 2-core CPU.
    body = {"model": "lmx-tiny", "input": ["word " * 400] * 256}
    with (
        httpx.Client(base_url=daemon.url, timeout=httpx.Timeout(30, read=0.5)) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post("/v1/embeddings", json=body)
    wait_for(lambda: _in_flight(daemon), lambda v: v == 0, timeout_s=10)
    r = httpx.post(daemon.url + "/v1/embeddings", json={"model": "lmx-tiny", "input": "hi"})
    assert r.status_code == 200 and len(r.json()["data"]) == 1


def test_a_worker_that_dies_under_a_request_answered_at_its_end_is_a_500_saying_so(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory(tmp_path / "dies")
    pid = httpx.get(d.url + "/admin/status", timeout=5).json()["models"]["lmx-tiny"]["pid"]
    body = {"model": "lmx-tiny", "messages": ASK, "max_tokens": 3800, "ignore_eos": True}

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=d.url, timeout=60) as http:
            steps = _metric(d, "lmx_engine_steps_total")
            answer = asyncio.create_task(http.post("/v1/chat/completions", json=body))
            # Its steps have begun: the worker has it.
            more = partial(_metric, d, "lmx_engine_steps_total")
            await asyncio.to_thread(wait_for, more, lambda v: v > steps + 1, 20)
            os.kill(pid, signal.SIGKILL)
            return await answer

    r = asyncio.run(scenario())
    assert r.status_code == 500, r.text
    assert r.json()["error"]["code"] == "generation_failed"
    assert "worker process exited unexpectedly (killed by SIGKILL)" in r.json()["error"]["message"]
    assert "x-request-id" in r.headers and "Traceback" not in d.log()


def test_healthz_answers_fast_while_16_streams_generate(daemon: Daemon) -> None:
    async def scenario() -> list[float]:
        body = {"model": "lmx-tiny", "messages": ASK, "max_tokens": 400, "ignore_eos": True}
        async with httpx.AsyncClient(base_url=daemon.url, timeout=120) as http:

            async def one_stream() -> int:
                n = 0
                async with http.stream(
                    "POST", "/v1/chat/completions", json={**body, "stream": True}
                ) as r:
                    async for _ in r.aiter_lines():
                        n += 1
                return n

            streams = [asyncio.create_task(one_stream()) for _ in range(16)]
            await asyncio.sleep(0.5)
            latencies = []
            for _ in range(10):
                t0 = time.perf_counter()
                assert (await http.get("/healthz")).status_code == 200
                latencies.append(time.perf_counter() - t0)
                await asyncio.sleep(0.05)
            busy = not all(s.done() for s in streams)
            counts = await asyncio.gather(*streams)
            assert busy and all(c > 400 for c in counts)
            return latencies

    latencies = asyncio.run(scenario())
    # Generous bound for a shared 2-core CI machine; the event loop must never wait on MLX.
    assert sorted(latencies)[len(latencies) // 2] < 0.25, latencies


def test_full_queue_answers_429_and_a_queued_stream_has_begun_and_leaves_when_its_client_does(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    home = tmp_path / "q"
    home.mkdir()
    (home / "config.yaml").write_text(
        "models:\n  m:\n    source: builtin:tiny\n    want: pinned\n"
        "    engine: {max_batch: 1, max_queue: 1}\n"
    )
    d = daemon_factory(home)
    body = {"model": "m", "messages": ASK, "max_tokens": 3000, "stream": True, "ignore_eos": True}

    seen: list[list[object]] = [[], []]  # per holder: its status, then its lines

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=d.url, timeout=60) as http:

            async def hold(seen: list[object]) -> None:
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    seen.append(r.status_code)
                    async for line in r.aiter_lines():
                        seen.append(line)

            holders = [asyncio.create_task(hold(s)) for s in seen]
            try:
                # One request has the batch's one place, one waits for it: the queue (1) is full.
                depth = partial(_metric, d, "lmx_queue_depth", "m")
                await asyncio.to_thread(wait_for, depth, lambda v: v == 1, 20)
                answer = await http.post("/v1/chat/completions", json={**body, "stream": False})

                # The waiting one's answer has begun, its headers out before any token of it.
                def began() -> bool:  # both answered, one of them with tokens
                    return all(seen) and any(len(s) > 1 for s in seen)

                await asyncio.to_thread(wait_for, began, bool, 20)
                assert sorted(len(s) > 1 for s in seen) == [False, True], seen
                assert [s[0] for s in seen] == [200, 200]
                # Its client gives up waiting: its place is free at once, the other still going.
                waiting, going = sorted(holders, key=lambda h: len(seen[holders.index(h)]))
                waiting.cancel()
                await asyncio.to_thread(wait_for, depth, lambda v: v == 0, 10)
                assert not going.done()
                return answer
            finally:
                for h in holders:
                    h.cancel()
                await asyncio.gather(*holders, return_exceptions=True)

    r = asyncio.run(scenario())
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    # As OpenAI answers a request-rate limit (the SDK raises RateLimitError on the status).
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert "too many requests queued" in error["message"]


def test_lm_studio_clients_list_the_models_and_talk_to_them_at_api_v0(daemon: Daemon) -> None:
    """Zed's LM Studio provider and scripts written for LM Studio use its own REST API."""
    api = daemon.url + "/api/v0"
    listed = httpx.get(api + "/models", timeout=10).json()
    tiny = next(m for m in listed["data"] if m["id"] == "lmx-tiny")
    assert tiny | {"max_context_length": 0, "loaded_context_length": 0} == {
        "id": "lmx-tiny",
        "object": "model",
        "type": "llm",
        "publisher": "lmx",
        "arch": "qwen3",
        "compatibility_type": "mlx",
        "quantization": "f32",
        "state": "loaded",
        "max_context_length": 0,
        "loaded_context_length": 0,
        "capabilities": ["tool_use"],
    }
    assert tiny["loaded_context_length"] <= tiny["max_context_length"]
    assert httpx.get(api + "/models/lmx-tiny", timeout=10).json() == tiny
    missing = httpx.get(api + "/models/nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    client = openai.OpenAI(base_url=api, api_key="unused", max_retries=0, timeout=60)
    ask: Any = {"model": "lmx-tiny", "messages": ASK, "max_tokens": 6, "temperature": 0}
    whole = client.chat.completions.create(**ask)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**ask, stream=True)
        if c.choices
    )
    assert whole.choices[0].message.content == streamed and whole.usage is not None
    text = client.completions.create(model="lmx-tiny", prompt="one two", max_tokens=3)
    assert text.usage is not None and text.usage.completion_tokens == 3
    # As LM Studio answers there: how fast, why it stopped, the model's facts, the runtime's.
    for extra in (whole.model_extra, text.model_extra):
        assert extra is not None
        stats = extra["stats"]
        assert stats["stop_reason"] == "maxPredictedTokensReached"
        assert stats["tokens_per_second"] > 0 and stats["time_to_first_token"] > 0
        assert stats["generation_time"] > 0
        assert extra["model_info"] == {
            "arch": "qwen3",
            "quant": "f32",
            "format": "mlx",
            "context_length": tiny["loaded_context_length"],
        }
        assert extra["runtime"]["name"] == "lmx" and extra["runtime"]["supported_formats"] == [
            "mlx"
        ]


def test_lm_studio_scripts_list_load_and_chat_at_api_v1(daemon: Daemon) -> None:
    """LM Studio 0.4's native REST API: its model list, load, and its chat, which keeps the
    conversation for the next request to continue."""
    api = daemon.url + "/api/v1"
    tiny = next(
        m for m in httpx.get(api + "/models", timeout=10).json()["models"] if m["key"] == "lmx-tiny"
    )
    assert (tiny["type"], tiny["publisher"], tiny["format"], tiny["architecture"]) == (
        "llm",
        "lmx",
        "mlx",
        "qwen3",
    )
    assert tiny["quantization"] == {"name": "f32", "bits_per_weight": 32}
    assert tiny["capabilities"] == {"vision": False, "trained_for_tool_use": True}
    (instance,) = tiny["loaded_instances"]
    assert instance["id"] == "lmx-tiny" and instance["config"]["context_length"] > 0
    assert tiny["size_bytes"] > 0
    loaded = httpx.post(api + "/models/load", json={"model": "lmx-tiny"}, timeout=30).json()
    assert (loaded["instance_id"], loaded["status"], loaded["type"]) == (
        "lmx-tiny",
        "loaded",
        "llm",
    )

    ask = {"model": "lmx-tiny", "input": "one two", "max_output_tokens": 6, "temperature": 0}
    first = httpx.post(api + "/chat", json=ask, timeout=60).json()
    assert first["model_instance_id"] == "lmx-tiny"
    said = "".join(item["content"] for item in first["output"] if item["type"] == "message")
    stats = first["stats"]
    assert stats["total_output_tokens"] == 6 and stats["input_tokens"] > 0
    assert stats["tokens_per_second"] > 0 and stats["time_to_first_token_seconds"] > 0
    # Streamed: LM Studio's events in order, adding up to the answer, which ends the stream.
    r = httpx.post(api + "/chat", json={**ask, "stream": True, "store": False}, timeout=60)
    events = named_events(r.content)
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["chat.start", "prompt_processing.start", "prompt_processing.end"]
    assert kinds[-1] == "chat.end" and "error" not in kinds
    streamed = "".join(e["content"] for e in events if e["type"] == "message.delta")
    result = events[-1]["result"]
    assert (
        streamed
        == said
        == "".join(i["content"] for i in result["output"] if i["type"] == "message")
    )
    assert "response_id" not in result  # store: false
    for kind in ("reasoning", "message"):  # each item opened and closed around its deltas
        if f"{kind}.delta" in kinds:
            assert kinds.index(f"{kind}.start") < kinds.index(f"{kind}.delta")
            assert kinds.index(f"{kind}.end") > len(kinds) - 1 - kinds[::-1].index(f"{kind}.delta")
    # Continued: the prompt holds the first exchange and the new input.
    more = {**ask, "input": "three", "previous_response_id": first["response_id"]}
    second = httpx.post(api + "/chat", json=more, timeout=60).json()
    assert second["stats"]["input_tokens"] > stats["input_tokens"] + stats["total_output_tokens"]
    assert second["response_id"] != first["response_id"]
    # What lmx cannot do is a 4xx naming the field or saying why.
    for change, status, says in (
        ({"previous_response_id": "resp_nope"}, 400, "previous_response_id"),
        ({"integrations": ["mcp/playwright"]}, 400, "integrations"),
        ({"reasoning": "sometimes"}, 400, "reasoning"),
    ):
        r = httpx.post(api + "/chat", json={**ask, **change}, timeout=60)
        assert r.status_code == status and says in r.text, r.text
    unload = httpx.post(api + "/models/unload", json={"instance_id": "lmx-tiny"}, timeout=10)
    assert unload.status_code == 409 and "desired" in unload.json()["error"]["message"]
    for path in ("/models/download/status", "/models/download/status/job_1"):  # was a 404
        r = httpx.get(api + path, timeout=10)
        assert r.status_code == 409 and "desired" in r.json()["error"]["message"]


def test_metrics_count_engine_steps_and_lmx_overhead_per_model(
    daemon: Daemon, client: openai.OpenAI
) -> None:
    client.completions.create(model="lmx-tiny", prompt="one two", max_tokens=8, temperature=0)
    text = httpx.get(daemon.url + "/metrics", timeout=5).text

    def counter(name: str) -> float:
        m = re.search(rf'^{name}_total\{{model="lmx-tiny"\}} (\S+)$', text, re.M)
        assert m, f"{name} missing from /metrics"
        return float(m.group(1))

    assert counter("lmx_engine_steps") >= 8
    assert 1 <= counter("lmx_engine_prefill_steps") < counter("lmx_engine_steps")
    assert 0 < counter("lmx_engine_overhead_seconds") < counter("lmx_engine_step_seconds")
    # What an alert watches: the config file's validity and each model's conditions.
    assert re.search(r"^lmx_config_valid 1\.0$", text, re.M)
    for condition, value in (("Ready", "1.0"), ("Quarantined", "0.0")):
        line = f'lmx_model_condition{{condition="{condition}",model="lmx-tiny"}} {value}'
        assert line in text.splitlines(), line


# A value each, which the grammar then leaves the model no choice in: the model's markers as text.
MARKED = {"a": "</tool_call>", "b": "<think>", "c": "x</think>y", "d": "<|im_end|>"}
MARKUP: dict[str, Any] = {
    "type": "object",
    "properties": {k: {"enum": [v]} for k, v in MARKED.items()},
    "required": list(MARKED),
    "additionalProperties": False,
}


def test_markers_text_in_a_constrained_answer_is_its_text(client: openai.OpenAI) -> None:
    # It failed mid-generation (llguidance wrote the text as the marker's token); and on this
    # reasoning model, the answer's "<think>" opened reasoning.
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "m", "schema": MARKUP}}
    r = client.chat.completions.create(
        model="lmx-tiny",
        messages=ASK,
        response_format=fmt,
        max_tokens=300,
        seed=3,  # type: ignore[arg-type]
    )
    message = r.choices[0].message
    assert json.loads(message.content or "") == MARKED
    assert not (message.model_extra or {}).get("reasoning_content")
    tool: Any = {"type": "function", "function": {"name": "tag", "parameters": MARKUP}}
    r = client.chat.completions.create(
        model="lmx-tiny",
        messages=ASK,  # type: ignore[arg-type]
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "tag"}},
        max_tokens=300,
        seed=3,
    )
    (call,) = r.choices[0].message.tool_calls or []
    assert json.loads(call.function.arguments) == MARKED  # type: ignore[union-attr]


def test_a_tools_schema_is_checked_whatever_the_tool_choice(client: openai.OpenAI) -> None:
    bad: Any = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="lmx-tiny", messages=ASK, tools=[bad])  # type: ignore[arg-type]
    assert info.value.param == "tools[0].function.parameters"  # type: ignore[attr-defined]


def test_a_streamed_call_opens_with_the_role_null_content_and_the_call(daemon: Daemon) -> None:
    body = {
        "model": "lmx-tiny",
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": "required",
        "max_tokens": 300,
        "stream": True,
    }
    with httpx.Client(base_url=daemon.url, timeout=60) as http:
        text = http.post("/v1/chat/completions", json=body).text
    chunks = [json.loads(x[6:]) for x in text.splitlines() if x.startswith("data: {")]
    first = chunks[0]["choices"][0]["delta"]
    assert (first["role"], first["content"]) == ("assistant", None) and first["tool_calls"]
    assert all("content" not in c["choices"][0]["delta"] for c in chunks[1:] if c["choices"])


def test_embeddings_through_the_sdk_as_floats_base64_and_fewer_dimensions(
    client: openai.OpenAI,
) -> None:
    texts = ["The quick brown fox", "hi", "The quick brown fox"]
    default = client.embeddings.create(model="lmx-tiny", input=texts)  # the SDK asks for base64
    floats = client.embeddings.create(model="lmx-tiny", input=texts, encoding_format="float")
    assert [d.index for d in default.data] == [0, 1, 2]
    vectors = np.array([d.embedding for d in floats.data])
    np.testing.assert_allclose([d.embedding for d in default.data], vectors, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert (vectors[0] == vectors[2]).all() and not (vectors[0] == vectors[1]).all()
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 3
    assert floats.model == "lmx-tiny"
    alone = client.embeddings.create(model="lmx-tiny", input=texts[1], encoding_format="float")
    np.testing.assert_allclose(alone.data[0].embedding, vectors[1], atol=1e-6)
    short = client.embeddings.create(model="lmx-tiny", input=texts[0], dimensions=8)
    head = vectors[0][:8]
    np.testing.assert_allclose(short.data[0].embedding, head / np.linalg.norm(head), atol=1e-5)


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"input": ""}, "input", "input 0 is empty"),
        ({"input": []}, "input", "input is empty"),
        ({"input": ["ok", ""]}, "input", "input 1 is empty"),
        ({"input": ["x"] * 2049}, "input", "at most 2048"),
        ({"input": [[10**9]]}, "input", "outside the model's vocabulary"),
        ({"input": "word " * 5000}, "input", "maximum context length"),
        ({"input": "x", "dimensions": 100000}, "dimensions", "more than this model's"),
        ({"input": "x", "encoding_format": "fp16"}, "encoding_format", "float"),
        ({"input": [1, "a"]}, "input", "a text, a list of texts"),
    ],
)
def test_a_bad_embedding_request_is_a_400_naming_the_field(
    daemon: Daemon, body: dict[str, Any], param: str, says: str
) -> None:
    r = httpx.post(daemon.url + "/v1/embeddings", json={"model": "lmx-tiny", **body}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error


FUNCTION_TOOLS: list[Any] = [{"type": "function", **t["function"]} for t in TOOLS]


def test_a_response_through_the_sdk_runs_as_a_chat_and_says_where_it_stopped(
    client: openai.OpenAI,
) -> None:
    r = client.responses.create(
        model="lmx-tiny", input="Say hello", max_output_tokens=6, temperature=0
    )
    assert (r.status, r.incomplete_details and r.incomplete_details.reason) == (
        "incomplete",
        "max_output_tokens",
    )
    assert [o.type for o in r.output] == ["message"] and r.output_text
    assert r.usage is not None and r.usage.output_tokens == 6
    assert r.usage.total_tokens == r.usage.input_tokens + 6
    chat = client.chat.completions.create(
        model="lmx-tiny",
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=6,
        temperature=0,
    )
    assert r.output_text == chat.choices[0].message.content
    # The output text's logprobs, as include asks, with top_logprobs alternatives each.
    ask: Any = {"model": "lmx-tiny", "input": "Say hello", "max_output_tokens": 6, "temperature": 0}
    lp = client.responses.create(**ask, include=["message.output_text.logprobs"], top_logprobs=2)
    part: Any = lp.output[0].content[0]  # type: ignore[union-attr]
    assert part.text == r.output_text and len(part.logprobs) == 6 and lp.top_logprobs == 2
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in part.logprobs)
    with client.responses.stream(**ask, include=["message.output_text.logprobs"]) as stream:
        events = list(stream)
    streamed = [t for e in events if e.type == "response.output_text.delta" for t in e.logprobs]
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert [t.token for t in streamed] == [t.token for t in done.logprobs]
    assert [t.token for t in streamed] == [t.token for t in part.logprobs]
    # Instructions are the system message.
    told = client.responses.create(
        model="lmx-tiny", input="Say hello", instructions="Be brief.", max_output_tokens=2
    )
    assert told.usage is not None and told.usage.input_tokens > r.usage.input_tokens


def test_a_response_calls_function_tools_and_takes_their_output_back(
    client: openai.OpenAI,
) -> None:
    r = client.responses.create(
        model="lmx-tiny", input=ASK[0]["content"], tools=FUNCTION_TOOLS, tool_choice="required"
    )
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and calls
    for call in calls:
        check_call(call.name, call.arguments)
        assert call.call_id and call.status == "completed"
    follow = client.responses.create(
        model="lmx-tiny",
        input=[
            {"role": "user", "content": ASK[0]["content"]},
            *[
                {
                    "type": "function_call",
                    "call_id": c.call_id,
                    "name": c.name,
                    "arguments": c.arguments,
                }
                for c in calls
            ],
            *[
                {"type": "function_call_output", "call_id": c.call_id, "output": "sunny"}
                for c in calls
            ],
        ],
        tools=FUNCTION_TOOLS,
        tool_choice="none",
        max_output_tokens=4,
    )
    assert [o.type for o in follow.output] == ["message"]


def test_a_streamed_response_sends_its_events_in_order_and_they_add_up(
    client: openai.OpenAI,
) -> None:
    events = list(
        client.responses.create(
            model="lmx-tiny", input="Say hello", max_output_tokens=8, temperature=0, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    assert text == done.text == events[-1].response.output_text
    whole = client.responses.create(
        model="lmx-tiny", input="Say hello", max_output_tokens=8, temperature=0
    )
    assert whole.output_text == text

    called = list(
        client.responses.create(
            model="lmx-tiny",
            input=ASK[0]["content"],
            tools=FUNCTION_TOOLS,
            tool_choice={"type": "function", "name": "get_weather"},
            stream=True,
        )
    )
    kinds = [e.type for e in called]
    deltas = [e.delta for e in called if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 1, "the arguments stream as the model writes them"
    assert kinds[2:-1] == [
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * len(deltas),
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert kinds[-1] == "response.completed"
    done = next(e for e in called if e.type == "response.function_call_arguments.done")
    assert "".join(deltas) == done.arguments and isinstance(json.loads(done.arguments), dict)


def test_a_response_calls_a_custom_tool_with_text_and_takes_its_output_back(
    client: openai.OpenAI,
) -> None:
    """Codex's freeform tools (apply_patch): a custom tool's call holds text, not JSON."""
    tool: Any = {"type": "custom", "name": "apply_patch", "description": "Edit files."}
    ask: Any = {
        "model": "lmx-tiny",
        "input": "Add a file.",
        "tools": [tool],
        "tool_choice": {"type": "custom", "name": "apply_patch"},
        "max_output_tokens": 24,
        "temperature": 0,
    }
    events = list(client.responses.create(**ask, stream=True))
    done = next(e for e in events if e.type == "response.custom_tool_call_input.done")
    item = events[-1].response.output[-1]
    assert item.type == "custom_tool_call" and item.name == "apply_patch"
    assert isinstance(item.input, str) and item.input == done.input and item.call_id
    r = client.responses.create(**ask)
    assert [(o.type, o.input) for o in r.output if o.type == "custom_tool_call"] == [
        ("custom_tool_call", item.input)
    ]
    follow = client.responses.create(
        model="lmx-tiny",
        input=[
            {"role": "user", "content": "Add a file."},
            {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "x"},
            {"type": "custom_tool_call_output", "call_id": "c1", "output": "Done!"},
        ],
        tools=[tool],
        tool_choice="none",
        max_output_tokens=4,
    )
    assert [o.type for o in follow.output] == ["message"]


def test_a_chat_calls_a_custom_tool_with_text_streamed_or_whole(client: openai.OpenAI) -> None:
    """OpenAI's custom tools on chat completions: the call holds text, as the SDK reads it."""
    tool: Any = {"type": "custom", "custom": {"name": "apply_patch", "description": "Edit."}}
    ask: Any = {
        "model": "lmx-tiny",
        "messages": [{"role": "user", "content": "Add a file."}],
        "tools": [tool],
        "tool_choice": {"type": "custom", "custom": {"name": "apply_patch"}},
        "max_tokens": 24,
        "temperature": 0,
    }
    r = client.chat.completions.create(**ask)
    (call,) = r.choices[0].message.tool_calls or []
    assert call.type == "custom" and call.custom.name == "apply_patch" and call.id
    assert isinstance(call.custom.input, str)  # random weights: cut by max_tokens, or whole
    assert r.choices[0].finish_reason in ("tool_calls", "length")
    # Streamed: its id and name first, then its input a piece at a time (as OpenAI streams it,
    # in deltas the SDK keeps as they came).
    pieces: list[Any] = []
    for chunk in client.chat.completions.create(**ask, stream=True):
        for c in chunk.choices:
            pieces += [t.model_dump() for t in c.delta.tool_calls or ()]
    assert pieces[0]["type"] == "custom" and pieces[0]["id"]
    assert pieces[0]["custom"]["name"] == "apply_patch"
    assert "".join(p["custom"]["input"] for p in pieces) == call.custom.input
    # Sent back, the call and its output make the next turn.
    follow = client.chat.completions.create(
        model="lmx-tiny",
        messages=[
            *ask["messages"],
            {"role": "assistant", "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "Done!"},
        ],
        tools=[tool],
        tool_choice="none",
        max_tokens=4,
    )
    assert follow.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{**ask, "tools": [{"type": "custom", "custom": {}}]})
    assert info.value.body["param"] == "tools[0].custom.name"  # type: ignore[index]


def test_a_response_calls_the_local_shell_with_an_action_the_sdk_reads(
    client: openai.OpenAI,
) -> None:
    r = client.responses.create(
        model="lmx-tiny",
        input="List the files.",
        tools=[{"type": "local_shell"}],
        tool_choice="required",
        max_output_tokens=64,
        temperature=0,
    )
    (call,) = [o for o in r.output if o.type == "local_shell_call"]
    assert call.action.type == "exec" and all(isinstance(c, str) for c in call.action.command)
    assert call.call_id and call.status in ("completed", "incomplete")


def test_a_response_continues_from_its_id_as_from_its_whole_conversation(
    client: openai.OpenAI,
) -> None:
    ask = {"model": "lmx-tiny", "max_output_tokens": 6, "temperature": 0}
    first = client.responses.create(**ask, input="Say hello")
    assert first.store is True
    assert client.responses.retrieve(first.id).output_text == first.output_text
    then = client.responses.create(**ask, input="Again", previous_response_id=first.id)
    assert then.previous_response_id == first.id
    whole = client.responses.create(
        **ask,
        store=False,
        input=[
            {"role": "user", "content": "Say hello"},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "Again"},
        ],
    )
    assert then.usage is not None and whole.usage is not None
    assert (then.output_text, then.usage.input_tokens) == (
        whole.output_text,
        whole.usage.input_tokens,
    )
    # A streamed response is kept as well, once it completes.
    streamed = list(
        client.responses.create(**ask, input="Once more", previous_response_id=then.id, stream=True)
    )[-1].response
    assert streamed.usage is not None
    last = client.responses.create(**ask, input="Last", previous_response_id=streamed.id)
    assert last.usage is not None
    assert last.usage.input_tokens > streamed.usage.input_tokens + streamed.usage.output_tokens


def test_an_agent_loop_sends_only_the_tool_outputs_after_the_first_turn(
    client: openai.OpenAI,
) -> None:
    ask: dict[str, Any] = {"model": "lmx-tiny", "tools": FUNCTION_TOOLS, "temperature": 0}
    r = client.responses.create(**ask, input=ASK[0]["content"], tool_choice="required")
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls
    outputs: list[Any] = [
        {"type": "function_call_output", "call_id": c.call_id, "output": "sunny"} for c in calls
    ]
    chained = client.responses.create(
        **ask, tool_choice="none", max_output_tokens=4, previous_response_id=r.id, input=outputs
    )
    # The same turn, the conversation sent whole: the first turn's output items echoed back.
    echoed = [o.model_dump(exclude_none=True) for o in r.output if o.type != "reasoning"]
    whole = client.responses.create(
        **ask,
        tool_choice="none",
        max_output_tokens=4,
        input=[{"role": "user", "content": ASK[0]["content"]}, *echoed, *outputs],
    )
    assert chained.usage is not None and whole.usage is not None
    assert chained.usage.input_tokens == whole.usage.input_tokens
    assert chained.output_text == whole.output_text


def test_a_kept_responses_input_items_list_through_the_sdk(client: openai.OpenAI) -> None:
    ask = {"model": "lmx-tiny", "max_output_tokens": 2}
    first = client.responses.create(**ask, input="Say hello")
    (said,) = client.responses.input_items.list(first.id)
    assert said.type == "message" and said.id.startswith("msg_")
    given: list[Any] = [{"role": "user", "content": f"turn {i}"} for i in range(5)]
    then = client.responses.create(**ask, input=given, previous_response_id=first.id)
    # Pages of two, newest first (OpenAI's default), fetched one after another by the SDK.
    listed = list(client.responses.input_items.list(then.id, limit=2))
    texts = [i.content[0].text for i in listed if i.type == "message"]
    assert texts == [f"turn {i}" for i in reversed(range(5))]
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_unknown")


def test_a_response_not_stored_or_deleted_is_neither_continued_nor_fetched(
    client: openai.OpenAI,
) -> None:
    ask = {"model": "lmx-tiny", "max_output_tokens": 2}
    unstored = client.responses.create(**ask, input="Say hello", store=False)
    assert unstored.store is False
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**ask, input="Again", previous_response_id=unstored.id)
    assert caught.value.code == "previous_response_not_found"
    assert caught.value.param == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    kept = client.responses.create(**ask, input="Say hello")
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(kept.id)


def test_a_conversation_longer_than_the_context_loses_its_first_turns_if_asked(
    client: openai.OpenAI,
) -> None:
    turn = [
        {"role": "user", "content": "count " * 150},
        {"role": "assistant", "content": "and more " * 150},
    ]
    last = {"role": "user", "content": "Say hello"}
    ask: dict[str, Any] = {"model": "lmx-tiny", "max_output_tokens": 8, "temperature": 0}
    long = [*turn * 16, last]
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**ask, input=long)
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "input")
    r = client.responses.create(**ask, input=long, truncation="auto")
    assert r.truncation == "auto" and r.status == "incomplete" and r.usage is not None

    def prompt_tokens(turns: int) -> int:
        alone = client.responses.create(**ask, input=[*turn * turns, last], store=False)
        assert alone.usage is not None
        return alone.usage.input_tokens

    per_turn = prompt_tokens(2) - prompt_tokens(1)
    # As many of the last turns as fit, with room for the answer: one more would not.
    room = 4096 - 8
    assert room - per_turn < r.usage.input_tokens <= room
    assert (r.usage.input_tokens - prompt_tokens(1)) % per_turn == 0


def test_a_response_in_a_json_schema_validates(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model="lmx-tiny",
        input="A person, please.",
        text={
            "format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}
        },
    )
    check_person(r.output_text)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": []}, "input"),
        ({"input": [{"type": "web_search_call"}]}, "input[0].type"),
        ({"input": [{"role": "critic", "content": "x"}]}, "input[0].role"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input[0].content[0].type",
        ),
        (
            {"input": [{"type": "function_call", "name": "add", "arguments": "{}"}]},
            "input[0].call_id",
        ),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "x", "tool_choice": {"type": "allowed_tools"}}, "tool_choice"),
        ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"input": "x", "text": {"format": "json"}}, "text.format"),
        ({"input": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "reasoning": {"effort": "max"}}, "reasoning.effort"),
        # Refused by the chat path it runs as, naming the Responses field all the same.
        ({"input": "x", "max_output_tokens": 100_000}, "max_output_tokens"),
        ({"input": "count " * 5000}, "input"),
        (
            {"input": "x", "tools": [{"type": "function", "name": "f", "parameters": []}]},
            "tools[0].parameters",
        ),
        (
            {
                "input": "x",
                "tools": FUNCTION_TOOLS,
                "tool_choice": {"type": "function", "name": ""},
            },
            "tool_choice.name",
        ),
        (
            {"input": "x", "text": {"format": {"type": "json_schema", "name": "p"}}},
            "text.format.schema",
        ),
    ],
)
def test_a_bad_response_request_is_a_400_naming_the_field(
    daemon: Daemon, body: dict[str, Any], param: str
) -> None:
    r = httpx.post(daemon.url + "/v1/responses", json={"model": "lmx-tiny", **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_kept_responses_and_lm_studio_chats_are_continued_after_a_restart(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    home = tmp_path / "kept"
    ask: Any = {"model": "lmx-tiny", "max_output_tokens": 3, "temperature": 0}

    def sdk(d: Daemon) -> openai.OpenAI:
        return openai.OpenAI(base_url=d.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def chat(d: Daemon, **fields: Any) -> dict[str, Any]:
        r = httpx.post(d.url + "/api/v1/chat", json={**ask, **fields}, timeout=60)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    before = daemon_factory(home)
    first = sdk(before).responses.create(**ask, input="Hello there")
    said = chat(before, input="Hello there")
    assert before.stop() == 0

    after = daemon_factory(home)
    client = sdk(after)
    assert client.responses.retrieve(first.id).output_text == first.output_text
    # Each continued with the conversation before it: a longer prompt than the turn alone.
    alone = client.responses.create(**ask, input="And again")
    on = client.responses.create(**ask, input="And again", previous_response_id=first.id)
    assert alone.usage is not None and on.usage is not None
    assert on.usage.input_tokens > alone.usage.input_tokens
    chat_alone = chat(after, input="And again")["stats"]["input_tokens"]
    chat_on = chat(after, input="And again", previous_response_id=said["response_id"])
    assert chat_on["stats"]["input_tokens"] > chat_alone
