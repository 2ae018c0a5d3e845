"""LM Studio's own REST API, `/api/v0`, for the clients written against it (Zed's LM Studio
provider, scripts): its model list, which tells each model's kind, architecture, quantization,
state and context lengths, and its chat, text completion and embedding routes, which answer as
/v1's do.

A model's facts come from its files (config.json, the chat template), read again only when they
change.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from lmx import __version__
from lmx.api import v1
from lmx.api.deps import AppDeps
from lmx.api.generation import ChoiceState
from lmx.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ErrorEnvelope,
)
from lmx.api.shortcut import Endpoint
from lmx.errors import ModelNotFound
from lmx.reconciler.status import Listed
from lmx.runtime.store import EMBEDDING_MARKER, is_embedding_model, is_local_source, read_json


def lmstudio_router(prefix: str) -> APIRouter:
    """A router for LM Studio's routes under `prefix`: inference keys, OpenAI's error envelope."""
    return APIRouter(
        prefix=prefix,
        tags=["lmstudio"],
        dependencies=[Depends(v1.inference_access)],
        responses={code: {"model": ErrorEnvelope} for code in (400, 401, 404, 409, 429, 503)},
    )


router = lmstudio_router("/api/v0")

# A model's weights as LM Studio names their type where they are not quantized.
_DTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
_BITS = {"bfloat16": 16, "float16": 16, "float32": 32}


@router.get("/models", response_model=None)
@router.get("/models/", response_model=None)  # not a model named "": the list
async def list_models(deps: v1.Deps) -> JSONResponse:
    """The servable models, each as LM Studio lists it."""
    return JSONResponse({"object": "list", "data": [model_entry(m) for m in deps.models.listed()]})


@router.get("/models/{model:path}", response_model=None)
async def get_model(model: str, deps: v1.Deps) -> JSONResponse:
    listed = deps.models.listed()
    for entry in listed:
        if entry.name == model:
            return JSONResponse(model_entry(entry))
    raise ModelNotFound(model, [m.name for m in listed])


def model_entry(listed: Listed) -> dict[str, Any]:
    """A model as LM Studio's list shows it: `type` llm or embeddings (lmx serves no vision
    models), `compatibility_type` mlx, `quantization` its bits (`4bit`) or its weights' type
    (`bf16`), its `max_context_length` the model's own, `loaded_context_length` the one it is
    loaded with, `capabilities` ["tool_use"] where its chat template takes tools."""
    f = facts(listed.path)
    entry = {
        "id": listed.name,
        "object": "model",
        "type": "embeddings" if f["embedding"] else "llm",
        "publisher": publisher(listed.source),
        "arch": f["arch"],
        "compatibility_type": "mlx",
        "quantization": f["quantization"],
        "state": listed.state,
        "max_context_length": f["context"] or listed.context_length,
        "capabilities": ["tool_use"] if f["tools"] else [],
    }
    if listed.state == "loaded":
        entry["loaded_context_length"] = listed.context_length
    return entry


def publisher(source: str) -> str:
    """Who published the model: a Hub repo's owner; lmx for its built-in models; local for a
    directory of the user's."""
    if source.startswith("builtin:"):
        return "lmx"
    if is_local_source(source):
        return "local"
    return source.split("/", 1)[0]


def facts(path: Path) -> dict[str, Any]:
    """What a model's files say of it: `arch`, `quantization` (LM Studio's name: `4bit`, `bf16`),
    `bits` (per weight), `context` (its own), `tools` (its chat template takes them) and
    `embedding`; read again only when one of them changed."""
    return _facts(path, _stamp(path))


def _stamp(path: Path) -> tuple[float, ...]:
    """When each file `_facts` reads last changed (0: there is none)."""
    out = []
    for name in ("config.json", "tokenizer_config.json", "chat_template.jinja", EMBEDDING_MARKER):
        try:
            out.append((path / name).stat().st_mtime)
        except OSError:
            out.append(0.0)
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _facts(path: Path, stamp: tuple[float, ...]) -> dict[str, Any]:
    """What a model's files say of it, as they were when `stamp` was taken."""
    config = read_json(path / "config.json")
    text = config.get("text_config")  # a multimodal model's language model
    if isinstance(text, dict):
        config = {**text, **config}
    quant = config.get("quantization") or config.get("quantization_config")
    bits = quant.get("bits") if isinstance(quant, dict) else None
    dtype = config.get("torch_dtype") or config.get("dtype")
    template = read_json(path / "tokenizer_config.json").get("chat_template")
    jinja = path / "chat_template.jinja"
    if not isinstance(template, str | list) and jinja.is_file():
        template = jinja.read_text(encoding="utf-8", errors="replace")
    context = config.get("max_position_embeddings")
    return {
        "arch": config.get("model_type") if isinstance(config.get("model_type"), str) else None,
        "quantization": f"{bits}bit" if isinstance(bits, int) else _DTYPES.get(str(dtype)),
        "bits": bits if isinstance(bits, int) else _BITS.get(str(dtype)),
        "context": context if isinstance(context, int) and context > 0 else None,
        "tools": "tools" in json.dumps(template) if template else False,
        "embedding": is_embedding_model(path),
    }


# LM Studio's reasons an answer stopped, by its finish reason (a stop string: stopStringFound).
_STOP_REASONS = {
    "stop": "eosFound",
    "length": "maxPredictedTokensReached",
    "tool_calls": "toolCalls",
}


async def chat_completions(body: ChatCompletionRequest, deps: v1.Deps) -> Any:
    """/v1's, with LM Studio's stats, model_info and runtime in an answer not streamed."""
    return await v1.answer_chat(body, deps, functools.partial(_stats, deps))


async def completions(body: CompletionRequest, deps: v1.Deps) -> Any:
    """/v1's, with LM Studio's stats, model_info and runtime in an answer not streamed."""
    return await v1.answer_completion(body, deps, functools.partial(_stats, deps))


def timings(gen: v1.Generation) -> tuple[float, float]:
    """A generation's time to its first token, and from then to now (seconds), as LM Studio's
    stats count them."""
    ttft_s = gen.ttft_s or 0.0
    return ttft_s, time.perf_counter() - gen.started_s - ttft_s


def _stats(deps: AppDeps, gen: v1.Generation, states: list[ChoiceState]) -> dict[str, Any]:
    """What LM Studio adds to an answer: how fast it came (its tokens over the time from the
    first to the last), why its first choice stopped, the model's facts and lmx's."""
    ttft_s, seconds = timings(gen)
    tokens = sum(s.completion_tokens for s in states)
    first = states[0]
    stop = "stopStringFound" if first.stop else _STOP_REASONS.get(first.finish_reason or "")
    entry = next((model_entry(m) for m in deps.models.listed() if m.name == gen.model_id), {})
    return {
        "stats": {
            "tokens_per_second": round(tokens / seconds, 3) if seconds > 0 else 0.0,
            "time_to_first_token": round(ttft_s, 3),
            "generation_time": seconds,  # unrounded: a short answer's last tokens come at once
            "stop_reason": stop or "failed",
        },
        "model_info": {
            "arch": entry.get("arch"),
            "quant": entry.get("quantization"),
            "format": "mlx",
            "context_length": entry.get("loaded_context_length"),
        },
        "runtime": {"name": "lmx", "version": __version__, "supported_formats": ["mlx"]},
    }


# Its generation routes answer as /v1's (lmx.api.app counts and shortcuts them as it does those).
GENERATION: dict[str, tuple[type[BaseModel], Endpoint]] = {
    "/api/v0/chat/completions": (ChatCompletionRequest, chat_completions),
    "/api/v0/completions": (CompletionRequest, completions),
}
SHORTCUTS: dict[str, tuple[type[BaseModel], Endpoint]] = {
    **GENERATION,
    "/api/v0/embeddings": (EmbeddingRequest, v1.embeddings),
}
for _path, (_, _endpoint) in SHORTCUTS.items():
    router.add_api_route(
        _path.removeprefix(router.prefix), _endpoint, methods=["POST"], response_model=None
    )
