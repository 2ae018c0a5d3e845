"""What the APIs served over the chat completions path share (lmx.api.responses, OpenAI's Responses;
lmx.api.messages, Anthropic's Messages): the chat request one of their requests becomes, with its
errors naming the API's own fields, and the events of a streamed answer.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import orjson
from pydantic import ValidationError

from lmx.api.generation import Added, ChoiceState
from lmx.api.schemas import ChatCompletionRequest, param_of
from lmx.errors import RequestError
from lmx.runtime.engine import Delta

# Chat fields (patterns) and the API's fields they came from.
Names = Sequence[tuple[re.Pattern[str], str]]


def sse_event(kind: str, **fields: Any) -> bytes:
    """A server-sent event named `kind`, its data the fields and the kind as `type` (as the
    Messages API's and LM Studio's streams send them)."""
    data = orjson.dumps({"type": kind, **fields})
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def unseen(kind: str) -> str:
    """What an image or a file (`kind`) a tool gave back reads as: lmx serves text models, and a
    400 would end an agent's session, whose history keeps it."""
    article = "an" if kind[0] in "aeiou" else "a"
    return f"[{article} {kind} the tool gave back, not shown: this model reads text only]"


def chat_request(chat: dict[str, Any], names: Names) -> ChatCompletionRequest:
    """`chat` validated as a chat completion request; a RequestError naming the API's field."""
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = param_of(tuple(first["loc"]))
        raise renamed(
            RequestError(f"{param or 'body'}: {first['msg']}", param=param), names
        ) from None


def renamed(exc: RequestError, names: Names) -> RequestError:
    """`exc`, raised for the chat request another API's request runs as, naming that API's field
    (in its message too, where it starts with the field)."""
    if exc.param is None:
        return exc
    param = exc.param
    for chat, other in names:
        param = chat.sub(other, param)
    message = str(exc)
    if message.startswith(exc.param + ":"):
        message = param + message[len(exc.param) :]
    return RequestError(message, param=param, code=exc.code)


class Rendering(Protocol):
    """One answer as it is generated, in the API's stream events."""

    def answer(self, state: ChoiceState) -> dict[str, Any]:
        """The whole answer, once `state` absorbed the last delta."""

    def started(self, state: ChoiceState) -> bytes:
        """The stream's first events, before any delta (`state` has absorbed none)."""

    def feed(self, added: list[Added]) -> bytes:
        """The events for what `added` adds to the answer."""

    def ended(self, state: ChoiceState) -> bytes:
        """The stream's last events, once `state` absorbed the last delta (or an error)."""


async def stream_events(
    rendering: Rendering, deltas: AsyncIterator[tuple[int, Delta]], state: ChoiceState
) -> AsyncIterator[bytes]:
    """A streamed answer's events, from its deltas."""
    yield rendering.started(state)
    async for _, delta in deltas:
        added = state.absorb(delta)
        events = rendering.feed(added) if state.error is None else b""
        if state.finish_reason is not None:
            events += rendering.ended(state)
        if events:
            yield events
        if state.finish_reason is not None:
            return
