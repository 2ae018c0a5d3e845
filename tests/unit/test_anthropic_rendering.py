"""Anthropic's Messages API: how an answer's end reads (stop reason, stop sequence, a call cut
off) and how a stream ends on an error."""

from __future__ import annotations

import pytest

from lmx.api.generation import ChoiceState
from lmx.api.messages import Rendering
from lmx.api.schemas import MessagesRequest
from lmx.errors import GenerationFailed
from lmx.runtime.parsers import Content, ToolCall, make_parser
from tests.sse import named_events

ASK = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}


def _state(finish: str, *, stop: str | None = None, calls: int = 0) -> ChoiceState:
    state = ChoiceState(0, make_parser(tool_parser=None, tools_enabled=False, reasoning=False))
    state.content = ["Hi"]
    state.tool_calls = [ToolCall(f"call_{i}", "f", '{"a": 1') for i in range(calls)]
    state.finish_reason, state.stop = finish, stop
    state.prompt_tokens, state.cached_tokens, state.completion_tokens = 12, 4, 3
    return state


@pytest.mark.parametrize(
    ("finish", "stop", "calls", "reason"),
    [
        ("stop", None, 0, ("end_turn", None)),
        ("stop", "END", 0, ("stop_sequence", "END")),
        ("length", None, 0, ("max_tokens", None)),
        ("tool_calls", None, 1, ("tool_use", None)),
        ("length", None, 1, ("max_tokens", None)),  # a call cut off: not one to run
    ],
)
def test_an_answer_says_why_it_ended(
    finish: str, stop: str | None, calls: int, reason: tuple[str, str | None]
) -> None:
    answer = Rendering(MessagesRequest.model_validate(ASK)).answer(
        _state(finish, stop=stop, calls=calls)
    )
    assert (answer["stop_reason"], answer["stop_sequence"]) == reason
    assert answer["usage"] == {
        "input_tokens": 8,  # less the 4 read from the prompt cache
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 4,
        "output_tokens": 3,
        "output_tokens_details": {"thinking_tokens": 0},
    }
    # A call's arguments cut off do not parse: its input is none, not a wrong one.
    assert all(b["input"] == {} for b in answer["content"] if b["type"] == "tool_use")


def test_a_stream_that_fails_ends_its_open_block_and_says_so() -> None:
    r = Rendering(MessagesRequest.model_validate({**ASK, "stream": True}))
    state = _state("error")
    state.error = "the worker died"
    stream = r.started(state) + r.feed([Content("Hi")]) + r.ended(state)
    assert [e["type"] for e in named_events(stream)] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "error",
    ]
    assert named_events(stream)[-1]["error"] == {"type": "api_error", "message": "the worker died"}
    with pytest.raises(GenerationFailed, match="the worker died"):
        Rendering(MessagesRequest.model_validate(ASK)).answer(state)
