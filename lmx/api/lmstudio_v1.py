"""LM Studio's native REST API, `/api/v1` (LM Studio 0.4), for the scripts written against it: its
model list, loading a model, and its chat.

`POST /api/v1/chat` takes one message (`input`: text, or LM Studio's message items, joined
into one user message) and a system prompt, and keeps the conversation
unless `store` is false: `previous_response_id` continues it. It runs as the chat completion it
maps to; its answer is LM Studio's output items (reasoning, message) with its stats, and its stream
LM Studio's named events (`chat.start`, `reasoning.delta`, `message.delta`, ..., `chat.end` with
the whole answer). Integrations (MCP servers and plugins, which LM Studio runs) are a 400.

Unloading and downloading are not imperative in lmx: a model's residency and files follow the
desired state (`~/.opta-lmx/config.yaml`, `PATCH /admin/desired`), and those routes say so.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from lmx.api import translated, v1
from lmx.api.generation import Added, ChoiceState
from lmx.api.lmstudio import facts, lmstudio_router, publisher, timings
from lmx.api.response_store import Kept, ResponseStore, item_id
from lmx.api.schemas import (
    ChatCompletionRequest,
    NativeChatRequest,
    NativeLoadRequest,
)
from lmx.api.shortcut import Endpoint
from lmx.errors import PermanentError, RequestError
from lmx.reconciler.status import Listed
from lmx.runtime.parsers import Content, Reasoning

router = lmstudio_router("/api/v1")

# The chat request's fields as the fields of its chat they came from, for a 400 that names the
# latter.
_PARAMS = (
    (re.compile(r"^messages\b.*"), "input"),
    (re.compile(r"^max_(completion_)?tokens$"), "max_output_tokens"),
    (re.compile(r"^repetition_penalty$"), "repeat_penalty"),
    (re.compile(r"^reasoning_effort$"), "reasoning"),
)
# LM Studio's reasoning settings as the chat request's reasoning_effort (None: the model's own).
_EFFORTS = {"off": "none", "low": "low", "medium": "medium", "high": "high", "on": None}


def chat_request(
    body: NativeChatRequest, conversation: Sequence[dict[str, Any]]
) -> ChatCompletionRequest:
    """The chat completion request that answers `body`, after `conversation` (the one it
    continues, its system prompt left out). Raises RequestError naming the field."""
    if body.integrations:
        raise RequestError(
            "integrations (MCP servers and plugins) run in LM Studio, not in lmx: send the tools"
            " to /v1/chat/completions or /v1/responses, and run them in the client",
            param="integrations",
        )
    messages = [{"role": "system", "content": body.system_prompt}] if body.system_prompt else []
    messages += [*conversation, asked(body)]
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "stream": body.stream,
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "repetition_penalty": body.repeat_penalty,
        "reasoning_effort": _EFFORTS[body.reasoning] if body.reasoning else None,
    }
    return translated.chat_request({k: v for k, v in chat.items() if v is not None}, _PARAMS)


def asked(body: NativeChatRequest) -> dict[str, Any]:
    """The user's message `body.input` makes: its text, or its message items' texts one
    paragraph each. Raises RequestError naming an item that is not a message of text."""
    if isinstance(body.input, str):
        return {"role": "user", "content": body.input}
    texts = []
    for j, item in enumerate(body.input):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "image":
            raise RequestError(
                f"input[{j}] is an image: this model takes text only", param=f"input[{j}]"
            )
        if kind != "message":
            raise RequestError(
                f"input[{j}] must be an item of type 'message' (or 'image'), not {kind!r}",
                param=f"input[{j}].type",
            )
        if not isinstance(item.get("content"), str):
            raise RequestError(
                f"input[{j}] needs its content as a string", param=f"input[{j}].content"
            )
        texts.append(item["content"])
    return {"role": "user", "content": "\n\n".join(texts)}


class Rendering:
    """One chat answer as it is generated: LM Studio's output items, stream events and stats."""

    def __init__(
        self,
        body: NativeChatRequest,
        gen: v1.Generation,
        store: ResponseStore,
        conversation: tuple[dict[str, Any], ...],
    ) -> None:
        self.body = body
        self._gen = gen
        self._store = store
        self._conversation = conversation
        self.output: list[dict[str, Any]] = []  # the items, the open one last
        self._open: dict[str, Any] | None = None  # the reasoning or message being streamed
        self._prompt_done = False

    def answer(self, state: ChoiceState) -> dict[str, Any]:
        if state.error is not None:
            raise state.failure()
        self.feed([Reasoning("".join(state.reasoning)), Content("".join(state.content))])
        if not any(item["type"] == "message" for item in self.output):
            self.output.append({"type": "message", "content": ""})
        return self._result(state)

    def started(self, state: ChoiceState) -> bytes:
        return _event("chat.start", model_instance_id=self._gen.model_id) + _event(
            "prompt_processing.start"
        )

    def feed(self, added: list[Added]) -> bytes:
        out = b""
        if not self._prompt_done:  # the first delta: the prompt is read
            self._prompt_done = True
            out += _event("prompt_processing.end")
        for piece in added:
            if isinstance(piece, Reasoning | Content) and piece.text:
                kind = "reasoning" if isinstance(piece, Reasoning) else "message"
                out += self._opened(kind)
                assert self._open is not None
                self._open["content"] += piece.text
                out += _event(f"{kind}.delta", content=piece.text)
        return out

    def ended(self, state: ChoiceState) -> bytes:
        out = self._closed()
        if state.error is not None:
            out += _event("error", error={"type": "internal_error", "message": state.error})
        return out + _event("chat.end", result=self._result(state))

    def _result(self, state: ChoiceState) -> dict[str, Any]:
        """The whole answer, kept for a later request to continue unless `store` is false or
        the generation failed."""
        result: dict[str, Any] = {
            "model_instance_id": self._gen.model_id,
            "output": self.output,
            "stats": self._stats(state),
        }
        if self.body.store and state.error is None:
            rid = item_id("resp")
            question = asked(self.body)
            answer = {"role": "assistant", "content": "".join(state.content)}
            if state.reasoning:
                answer["reasoning_content"] = "".join(state.reasoning)
            # The conversation before shares its messages with the response it continues.
            nbytes = len(orjson.dumps((question, answer)))
            conversation = (*self._conversation, question, answer)
            self._store.keep(
                Kept({"id": rid}, conversation, (), nbytes), self.body.previous_response_id
            )
            result["response_id"] = rid
        return result

    def _stats(self, state: ChoiceState) -> dict[str, Any]:
        ttft_s, seconds = timings(self._gen)
        return {
            "input_tokens": state.prompt_tokens,
            "total_output_tokens": state.completion_tokens,
            "reasoning_output_tokens": state.reasoning_tokens,
            "tokens_per_second": state.completion_tokens / seconds if seconds > 0 else 0.0,
            "time_to_first_token_seconds": round(ttft_s, 3),
        }

    def _opened(self, kind: str) -> bytes:
        if self._open is not None and self._open["type"] == kind:
            return b""
        out = self._closed()
        self._open = {"type": kind, "content": ""}
        self.output.append(self._open)
        return out + _event(f"{kind}.start")

    def _closed(self) -> bytes:
        item, self._open = self._open, None
        return b"" if item is None else _event(f"{item['type']}.end")


_event = translated.sse_event


@router.post("/chat", response_model=None)
async def chat(body: NativeChatRequest, deps: v1.Deps) -> Any:
    conversation = deps.chats.continued(body.previous_response_id)
    try:
        gen, states = await v1.start_chat(chat_request(body, conversation), deps)
    except RequestError as exc:
        raise translated.renamed(exc, _PARAMS) from None
    rendering = Rendering(body, gen, deps.chats, conversation)
    return await v1.rendered(gen, states[0], rendering, body.stream)


@router.get("/models", response_model=None)
async def list_models(deps: v1.Deps) -> JSONResponse:
    """Every model lmx may serve, as LM Studio's native list shows it."""
    return JSONResponse({"models": [model_entry(m) for m in deps.models.listed()]})


@router.post("/models/load", response_model=None)
async def load(body: NativeLoadRequest, deps: v1.Deps) -> JSONResponse:
    """The model loaded, if it was not (as a request for it would load it: a downloaded model
    with jit on, or a resident one that idled out), within the daemon's ready timeout."""
    started = time.perf_counter()
    model_id = await deps.models.ensure_ready(body.model)
    entry = next(
        (model_entry(m) for m in deps.models.listed() if m.name == body.model), {"type": "llm"}
    )
    return JSONResponse(
        {
            "type": entry["type"],
            "instance_id": model_id,
            "load_time_seconds": round(time.perf_counter() - started, 3),
            "status": "loaded",
        }
    )


@router.post("/models/unload", response_model=None)
@router.post("/models/download", response_model=None)
@router.get("/models/download/status", response_model=None)
@router.get("/models/download/status/{job_id}", response_model=None)
async def not_imperative() -> JSONResponse:
    raise PermanentError(
        "lmx keeps its models as its desired state says (~/.opta-lmx/config.yaml, or PATCH"
        " /admin/desired): set a model's want to downloaded, resident, pinned or absent there"
    )


def model_entry(listed: Listed) -> dict[str, Any]:
    """A model as LM Studio's native list shows it."""
    f = facts(listed.path)
    bits = f["bits"]
    entry: dict[str, Any] = {
        "type": "embedding" if f["embedding"] else "llm",
        "publisher": publisher(listed.source),
        "key": listed.name,
        "display_name": listed.name.rsplit("/", 1)[-1],
        "quantization": {"name": f["quantization"], "bits_per_weight": bits},
        "size_bytes": _size(listed.path),
        "params_string": None,
        "loaded_instances": (
            [{"id": listed.model_id, "config": {"context_length": listed.context_length}}]
            if listed.state == "loaded"
            else []
        ),
        "max_context_length": f["context"] or listed.context_length,
        "format": "mlx",
    }
    if not f["embedding"]:
        entry["architecture"] = f["arch"]
        entry["capabilities"] = {"vision": False, "trained_for_tool_use": f["tools"]}
        entry["description"] = None
    return entry


def _size(path: Path) -> int:
    """The bytes of a model's files (0 where it has none yet)."""
    try:
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    except OSError:
        return 0


# Its chat is a generation route (lmx.api.app counts and shortcuts it as it does /v1's).
GENERATION: dict[str, tuple[type[BaseModel], Endpoint]] = {
    "/api/v1/chat": (NativeChatRequest, chat)
}
