"""The one fake: engines at the `Engine` boundary, with fault injection.

`FakeEngines` is an `EngineFactory`. Each engine "holds" the bytes its model directory's
safetensors header declares, in a `FakeMemory` ledger that stands for the process's memory: the
MemoryProbe reads MLX's counters and the RSS from it, as it reads them from MLX and psutil in the
daemon. Faults are set per model id: loads that fail N times or always, loads that hang, unloads
that keep (or return late) their memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmx.runtime.engine import (
    Delta,
    Embeddings,
    EngineState,
    EngineStats,
    GenerationRequest,
    LoadConfig,
)
from lmx.runtime.memory import MemoryProbe
from lmx.runtime.sampling import SamplingDefaults
from lmx.runtime.store import safetensors_weight_bytes

MiB = 2**20
GiB = 2**30


def make_model_dir(path: Path, weights_bytes: int) -> Path:
    """A model directory whose safetensors header declares `weights_bytes` of tensors.

    The data itself is not written: estimates read headers only, and fake engines never read it.
    """
    path.mkdir(parents=True, exist_ok=True)
    header = json.dumps(
        {"w": {"dtype": "U8", "shape": [weights_bytes], "data_offsets": [0, weights_bytes]}}
    ).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    (path / "config.json").write_text(json.dumps({"model_type": "fake"}))
    return path


class FakeMemory:
    """The process's memory as the fakes see it: a baseline plus what each engine holds."""

    def __init__(self, baseline_bytes: int = 200 * MiB) -> None:
        self.baseline_bytes = baseline_bytes
        self._held: dict[int, int] = {}
        self._lock = threading.Lock()

    def hold(self, key: int, n: int) -> None:
        with self._lock:
            self._held[key] = n

    def free(self, key: int) -> None:
        with self._lock:
            self._held.pop(key, None)

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(self._held.values())

    def counters(self) -> tuple[int, int]:
        return self.held_bytes, 0

    def rss(self) -> int:
        return self.baseline_bytes + self.held_bytes

    def probe(self) -> MemoryProbe:
        return MemoryProbe(self.counters, rss=self.rss, trim=lambda: None)


@dataclass
class Faults:
    fail_loads: int = 0  # the next N loads raise
    always_fail: bool = False
    hang: threading.Event | None = None  # load blocks until this is set (bounded by hang_s)
    hang_s: float = 10.0
    keep_memory_on_unload: bool = False  # a leak: unload does not give the bytes back
    return_memory_after_s: float | None = None  # ... or gives them back this much later
    load_s: float = 0.0


class FakeTokenizer:
    def __init__(self) -> None:
        self.eos_token_ids: frozenset[int] = frozenset({0})
        self.tool_parser: str | None = None
        self.reasoning = False
        self.thinking = None
        self.marker_ids: Mapping[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 256 + 1 for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i - 1) for i in ids)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> list[int]:
        return self.encode("".join(str(m.get("content", "")) for m in messages))


class FakeEngine:
    def __init__(self, config: LoadConfig, factory: FakeEngines) -> None:
        self.config = config
        self._factory = factory
        self._state = EngineState.UNLOADED
        self._bytes = 0
        self.served = 0  # streams that ran to their end
        self.queued = 0  # sequences it says wait for a place in its batch
        self.on_failure: Callable[[str], None] = lambda _reason: None
        self.sampling_defaults = SamplingDefaults()

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def pid(self) -> int | None:
        return None  # runs in the test's process

    def crash(self, reason: str = "injected crash") -> None:
        """Fail on its own, as a worker process that died would: memory gone, registry told."""
        self._state = EngineState.FAILED
        self._factory.memory.free(id(self))
        self.on_failure(reason)

    @property
    def tokenizer(self) -> FakeTokenizer:
        return FakeTokenizer()

    @property
    def context_length(self) -> int:
        return self.config.context_length or 4096

    def load(self) -> None:
        f = self._factory.faults_for(self.config.model_id)
        self._state = EngineState.LOADING
        self._factory.record("load", self.config.model_id)
        if f.hang is not None:
            f.hang.wait(f.hang_s)
        if f.load_s:
            time.sleep(f.load_s)
        if f.always_fail or f.fail_loads > 0:
            f.fail_loads = max(0, f.fail_loads - 1)
            self._state = EngineState.FAILED
            raise RuntimeError(f"injected load failure for {self.config.model_id}")
        self._bytes = safetensors_weight_bytes(self.config.path / "model.safetensors")
        self._factory.memory.hold(id(self), self._bytes)
        self._state = EngineState.READY

    def unload(self) -> None:
        f = self._factory.faults_for(self.config.model_id)
        self._factory.record("unload", self.config.model_id)
        self._state = EngineState.UNLOADED
        if f.return_memory_after_s is not None:
            timer = threading.Timer(f.return_memory_after_s, self._factory.memory.free, [id(self)])
            timer.daemon = True
            timer.start()
        elif not f.keep_memory_on_unload:
            self._factory.memory.free(id(self))

    def stats(self) -> EngineStats:
        return EngineStats(0, self.queued, 0, self._bytes, 0, 0, 0, served=self.served)

    def resident_bytes(self) -> int:
        return self._bytes if self._state is EngineState.READY else 0

    def hold(self, request_id: str, places: int) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()  # no queue to hold places in

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        for tok in request.prompt_tokens[: request.params.max_tokens]:
            await asyncio.sleep(0)
            yield Delta(text=chr(tok), token_ids=(tok,))
        self.served += 1
        yield Delta(text="", finish_reason="stop")

    async def embed(self, inputs: Sequence[Sequence[int]], request_id: str = "") -> Embeddings:
        """Each input's vector of length 1 from its length, sum and ends: equal inputs, equal
        vectors; most others differ."""
        rows = [[len(r), sum(r) % 97 + 1, r[0] + 1, r[-1] + 1] for r in inputs]
        vectors = [[x / math.hypot(*row) for x in row] for row in rows]
        data = struct.pack(f"<{4 * len(rows)}f", *(x for v in vectors for x in v))
        return Embeddings(data, len(rows), 4, sum(len(r) for r in inputs))


@dataclass
class FakeEngines:
    """An EngineFactory of fake engines sharing one memory ledger; records every load/unload."""

    memory: FakeMemory = field(default_factory=FakeMemory)
    faults: dict[str, Faults] = field(default_factory=dict)
    history: list[tuple[str, str]] = field(default_factory=list)
    engines: list[FakeEngine] = field(default_factory=list)

    def __call__(self, config: LoadConfig) -> FakeEngine:
        engine = FakeEngine(config, self)
        self.engines.append(engine)
        return engine

    def faults_for(self, model_id: str) -> Faults:
        return self.faults.setdefault(model_id, Faults())

    def record(self, what: str, model_id: str) -> None:
        self.history.append((what, model_id))

    def count(self, what: str, model_id: str) -> int:
        return self.history.count((what, model_id))
