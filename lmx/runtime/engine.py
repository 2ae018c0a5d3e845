"""The engine boundary: what the reconciler and the API may ask of a loaded model.

`Engine` is the protocol; `lmx.runtime.mlx_engine` is the real implementation and tests put fakes
here (and only here) for fault injection. Values crossing this boundary are frozen dataclasses.
Nothing in this module touches MLX.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from lmx.errors import RequestError
from lmx.runtime.parsers import Thinking
from lmx.runtime.sampling import SamplingDefaults


class EngineState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    UNLOADED = "unloaded"
    FAILED = "failed"


@dataclass(frozen=True)
class LoadConfig:
    """How to load one model. Derived from the spec; a request never changes it."""

    model_id: str
    path: Path
    max_batch: int = 16
    context_length: int | None = None
    max_queue: int = 256
    prefill_step: int = 2048
    prompt_cache_bytes: int = 512 * 2**20
    tool_parser: str | None = None
    reasoning_parser: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters; each sequence in a batch keeps its own."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    # Also each prompt token's logprob given those before it (the first has none), with the
    # `top_logprobs` likeliest: a legacy completion's `echo` with `logprobs` (scoring, evals).
    prompt_logprobs: bool = False
    # The most tokens the model's reasoning may take before its end is written for it (None: no
    # limit): a `<think>` block's `</think>`, gpt-oss's analysis message's `<|end|>`.
    thinking_budget: int | None = None


@dataclass(frozen=True)
class Constraint:
    """Constrained decoding: a llguidance grammar (JSON schema, lark, regex) the output must match."""

    grammar: str


@dataclass(frozen=True)
class GenerationRequest:
    prompt_tokens: Sequence[int]
    params: SamplingParams = SamplingParams()
    constraint: Constraint | None = None
    # The client request this sequence is part of: the sequences of one (its n choices, its
    # prompts) share it and count as one request where arrivals and endings are predicted; ""
    # makes the sequence a request of its own.
    request_id: str = ""


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class Delta:
    """A piece of one sequence's output. The last one has `finish_reason` set."""

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    retryable: bool = False  # an error of a model unloaded under it (not failed): ask again
    stop: str | None = None  # on a "stop" finish: the stop string that ended it, if one did
    # On a sequence's first token: seconds it waited in the engine before its prefill began, and
    # seconds from then to the first token.
    queue_s: float | None = None
    prefill_s: float | None = None
    # On a sequence's first delta, where asked for: its prompt's tokens after the first.
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Embeddings:
    """One vector of length 1 per input: `count` rows of `dimensions` float32, little-endian."""

    vectors: bytes
    count: int
    dimensions: int
    prompt_tokens: int


@dataclass(frozen=True)
class EngineStats:
    in_flight: int  # sequences the engine holds: decoding, waiting, or on their way in
    queued: int  # of those, the ones past the batch's places (max_batch), waiting for one
    active: int  # sequences the worker has
    resident_bytes: int
    prompt_cache_bytes: int
    steps: int
    generated_tokens: int
    prefill_steps: int = 0  # steps that also did prompt work: extra forward passes for the batch
    step_s: float = 0.0  # time in decode/prefill steps since the load
    overhead_s: float = 0.0  # the stepping thread's own work between steps since then
    served: int = 0  # sequences that ended well (stop, length) since the load


class DeltaStream(Protocol):
    """One sequence's deltas (`Engine.stream`), the last with its `finish_reason`. Closing it
    before then cancels the sequence; closing it again does nothing."""

    def __aiter__(self) -> AsyncIterator[Delta]: ...

    async def __anext__(self) -> Delta: ...

    async def aclose(self) -> None: ...


class Tokenizer(Protocol):
    """The part of a tokenizer the API needs."""

    eos_token_ids: frozenset[int]
    tool_parser: str | None  # a key of lmx.runtime.parsers.TOOL_PARSERS, or None
    reasoning: bool  # the model writes <think>…</think>
    thinking: Thinking | None  # its reasoning block's tokens, where they are tokens of their own
    marker_ids: Mapping[str, int]  # markup tokens (<tool_call>…) a grammar must emit as one token

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> list[int]: ...


class Engine(Protocol):
    """One loaded model. `load`/`unload` block and must run on a worker thread; `stream` is async.

    Implementations keep their MLX calls off the event loop (the MLX engine: in a process of its
    own) and never block it.
    """

    config: LoadConfig
    # Set by the registry; called (from any thread) when a loaded engine fails on its own.
    on_failure: Callable[[str], None]
    # The model's own (from its files), read by `load`.
    sampling_defaults: SamplingDefaults

    @property
    def state(self) -> EngineState: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def context_length(self) -> int: ...

    @property
    def pid(self) -> int | None:
        """The process serving this model, if it runs in one of its own."""

    def load(self) -> None:
        """Load weights and start the worker. Raises on failure; blocking."""

    def unload(self) -> None:
        """Stop the worker, free weights and caches. Idempotent; blocking."""

    def stats(self) -> EngineStats: ...

    def resident_bytes(self) -> int:
        """Bytes this model holds now: weights + KV caches + prompt cache."""

    def hold(self, request_id: str, places: int) -> AbstractContextManager[None]:
        """Take `places` in the model's queue for the request `request_id` as it arrives, while
        its prompt is still being built: its streams (or its embedding) fill them as they start,
        so a request that arrived later, whose prompt was quicker to build, cannot take them
        first. Raises QueueFull if fewer are free (none are taken for a request that asks more
        than the queue has at all: a 429 would be retried); those left when the block exits are
        freed.
        """

    def stream(self, request: GenerationRequest) -> DeltaStream:
        """Generate: `request` checked and queued when called (raising QueueFull when the
        model's queue is full, RequestError for a bad request), so that an answer can commit to
        success before its first token; closing the stream (client gone) removes the sequence
        at the next step.

        Takes one of the places `request.request_id` holds, else a free one.
        """

    async def embed(self, inputs: Sequence[Sequence[int]], request_id: str = "") -> Embeddings:
        """One vector per input (token ids) from the model's last hidden states, pooled as the
        model says (lmx.runtime.mlx_embedding). Queued with the model's generation requests, in
        a place `request_id` holds or a free one.

        Raises QueueFull, RequestError for a bad input or a model that cannot embed,
        GenerationFailed when the computation fails.
        """


EngineFactory = Callable[[LoadConfig], Engine]


def context_exceeded(limit: int, n_prompt: int, max_tokens: int, param: str) -> RequestError:
    """The error for a prompt and completion longer than the model's context, OpenAI's words."""
    return RequestError(
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} in the "
        "completion).",
        param=param,
        code="context_length_exceeded",
    )
