"""The worker's prompt cache: the KV caches of sequences that left the batch, for the next turn of
their conversations, bounded by the bytes it holds.

mlx-lm cuts a sequence's cache out of the batch on its own: two copies per layer, so the 32
sequences ending a round of a 28-layer model are 1792 copies, each launched on its own from the
stepping thread, and each reads the batch's padding, which waits for the step in flight when
sequences left the step before. `take_out` copies the rows of all the sequences leaving together (56
copies, if they fit one gather), placed by their token counts, into one buffer; a sequence's cache
becomes views of its row only when a prompt takes it (a round's end making 1792 views beside the
copies took 8 ms of the stepping thread on an H200 host). One buffer, not one per layer's keys and
values: on MLX's CUDA backend a step takes longer the more buffers are alive. Beside idle arrays as
many and as large as a full prompt cache of per-layer copies holds (512 MiB, about 2000 buffers for
Qwen3-0.6B), mlx-lm's own decode steps took 3% longer on an H200 host, as long as lmx's worker's
then; beside the same bytes in 8 buffers, no longer (bench/README.md, 2026-12-04). A gather's buffer
stays whole while any of its sequences is stored, so `PromptCache` counts its bytes until the last
of them goes, and evicts until that fits its budget.

`PromptCache` finds the longest shared prefix by comparing token arrays, not in mlx-lm's
LRUPromptCache's trie of one dict per token, while every other sequence of the batch waits: with 64
conversations of 4096 tokens stored, the trie took 2.4 ms to store one and 0.6 s to look up a new
conversation that shares their system prompt (2-core CPU; `python -m bench.prompt_cache`).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import (
    BatchKVCache,
    KVCache,
    can_trim_prompt_cache,
    trim_prompt_cache,
)

# A sequence joins a gather while the rows it pads (the others started before it) are at most
# this share of its own; a gather holds at most this share of the cache's budget, so one that
# outlives most of its sequences cannot take all of it.
_PAD_SHARE = 0.25
_GATHER_SHARE = 0.25


class _Buffers(ABC):
    """The arrays stored caches are made of: a gather's rows, or one sequence's own cache."""

    def __init__(self, nbytes: int, trimmable: bool) -> None:
        self.nbytes = nbytes
        self.trimmable = trimmable  # each of its caches can step back to any of its prefixes
        self.stored = 0  # sequences of it in the prompt cache

    @abstractmethod
    def cache(self, row: int, length: int) -> list[Any]:
        """A new cache (one per layer) of the `length` tokens of the sequence at `row`."""


class _Gather(_Buffers):
    """Rows of several sequences' caches, each row's positions at its end: every layer's keys and
    values in one copy per shape (one in all where keys and values are alike), each layer's
    arrays views of it."""

    def __init__(self, parts: list[mx.array]) -> None:
        """`parts`: each layer's keys, then its values, in turn."""
        alike: dict[tuple[tuple[int, ...], mx.Dtype], list[int]] = {}
        for i, a in enumerate(parts):
            alike.setdefault((tuple(a.shape), a.dtype), []).append(i)
        self.arrays: list[mx.array] = []
        self._where: dict[int, tuple[int, int]] = {}  # per part: its array, its index there
        for members in alike.values():
            self._where |= {i: (len(self.arrays), j) for j, i in enumerate(members)}
            self.arrays.append(mx.stack([parts[i] for i in members]))
        super().__init__(sum(a.nbytes for a in self.arrays), trimmable=True)

    def cache(self, row: int, length: int) -> list[Any]:
        layers = []
        for layer in range(len(self._where) // 2):
            kv = KVCache()  # type: ignore[no-untyped-call]
            keys, values = (self._part(2 * layer + i) for i in (0, 1))
            start = keys.shape[2] - length
            kv.keys, kv.values = keys[row : row + 1, :, start:], values[row : row + 1, :, start:]
            kv.offset = length
            layers.append(kv)
        return layers

    def _part(self, i: int) -> mx.array:
        array, index = self._where[i]
        return self.arrays[array][index]


class _Own(_Buffers):
    """One sequence's cache as mlx-lm cut it out of the batch, of any kind."""

    def __init__(self, layers: list[Any]) -> None:
        state: list[tuple[str, Any]] = tree_flatten([c.state for c in layers])  # type: ignore[assignment]
        self.arrays = [a for _, a in state if isinstance(a, mx.array)]
        super().__init__(sum(a.nbytes for a in self.arrays), can_trim_prompt_cache(layers))
        self.layers = layers

    def cache(self, row: int, length: int) -> list[Any]:
        return copy.deepcopy(self.layers)


@dataclass(frozen=True)
class Taken:
    """A sequence's tokens as it left the batch, and where its KV cache is."""

    tokens: list[int]
    buffers: _Buffers
    row: int = 0

    def cache(self) -> list[Any]:
        """A new KV cache of it (one per layer), which leaves the buffers as they are."""
        return self.buffers.cache(self.row, len(self.tokens))


@dataclass(frozen=True)
class _Entry:
    taken: Taken
    ids: np.ndarray  # the tokens, int32

    def usable(self, ids: np.ndarray) -> int:
        """How many of the prompt `ids` it can serve, leaving at least one to feed: 0 if none."""
        shared = _shared(self.ids, ids)
        if self.taken.buffers.trimmable:
            return max(0, min(shared, len(ids) - 1))
        return shared if shared == len(self.ids) < len(ids) else 0


class PromptCache:
    """One model's caches by their tokens, least recently used first; the worker's thread's."""

    def __init__(self, max_bytes: int, max_entries: int) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # by ids.tobytes()
        self._held = 0

    @property
    def gather_bytes(self) -> int:
        """The most bytes one gather may hold."""
        return int(self.max_bytes * _GATHER_SHARE)

    @property
    def nbytes(self) -> int:
        """Bytes its caches hold: every buffer any of them shares, once."""
        return self._held

    def __len__(self) -> int:
        return len(self._entries)

    def fetch(self, tokens: list[int]) -> tuple[list[Any] | None, list[int]]:
        """A copy of the cache sharing the longest usable prefix with `tokens`, and the tokens it
        lacks: at least one, the model's input for the next step. A cache longer than that
        prefix is stepped back to it, if its kind can be (an exact hit steps back one token)."""
        # Most caches differ from a new conversation at its first token: spare it the arrays.
        alike = [(k, e) for k, e in self._entries.items() if tokens[:1] == e.taken.tokens[:1]]
        if not alike:
            return None, tokens
        ids = np.asarray(tokens, dtype=np.int32)
        key, usable = b"", 0
        for k, e in reversed(alike):  # the most recent wins a tie
            n = e.usable(ids)
            if n > usable:
                key, usable = k, n
        if not usable:
            return None, tokens
        self._entries.move_to_end(key)
        e = self._entries[key]
        kv = e.taken.cache()
        if usable < len(e.ids):
            trim_prompt_cache(kv, len(e.ids) - usable)
        return kv, tokens[usable:]

    def store(self, taken: Iterable[Taken]) -> None:
        """Keep `taken`'s caches, evicting the least recently used until what it holds fits. A
        stored cache that the new one can step back to, or with its tokens, goes."""
        for t in taken:
            ids = np.asarray(t.tokens, dtype=np.int32)
            key = ids.tobytes()
            trimmable = t.buffers.trimmable
            for old in [k for k in self._entries if k == key or (trimmable and key.startswith(k))]:
                self._drop(old)
            self._entries[key] = _Entry(t, ids)
            if t.buffers.stored == 0:
                self._held += t.buffers.nbytes
            t.buffers.stored += 1
        while self._entries and (
            len(self._entries) > self.max_entries or self._held > self.max_bytes
        ):
            self._drop(next(iter(self._entries)))

    def _drop(self, key: bytes) -> None:
        buffers = self._entries.pop(key).taken.buffers
        buffers.stored -= 1
        if buffers.stored == 0:
            self._held -= buffers.nbytes


def _shared(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def take_out(gen: Any, uids: Sequence[int], stream: Any, max_gather_bytes: int) -> dict[int, Taken]:
    """Take `uids` out of `gen` (mlx-lm's BatchGenerator); those with tokens in their KV cache
    come back with it, in the order of `uids`.

    The caches are computed in the background on `stream` (the batch's): until then they would
    hold the batch's KV buffers, every sequence's. Decoding sequences whose layers are all
    BatchKVCache go by gathers; the rest (other cache types, prompts partway) one by one."""
    batch: Any = getattr(gen, "_generation_batch", None)  # where mlx-lm keeps the decoding batch
    layers = getattr(batch, "prompt_cache", [])
    by_gather = bool(layers) and all(
        isinstance(c, BatchKVCache) and c.keys is not None for c in layers
    )
    rows = {uid: i for i, uid in enumerate(batch.uids)} if by_gather else {}
    gathered = [rows[u] for u in uids if u in rows]
    rest = [u for u in uids if u not in rows]
    taken: dict[int, Taken] = {}
    arrays: list[mx.array] = []
    # A sequence's cache is the last len(tokens) positions of its row. Reading its padding instead
    # would wait for the step in flight, which computes the padding when sequences left before.
    lengths = {r: len(batch.tokens[r]) for r in gathered}
    with mx.stream(stream):
        for group in _groups(layers, lengths, max_gather_bytes):
            gather, at = _gather(layers, group, lengths[group[0]])
            arrays += gather.arrays
            taken |= {batch.uids[r]: Taken(list(batch.tokens[r]), gather, at[r]) for r in group}
        for uid, (kv, tokens) in gen.extract_cache(rest).items() if rest else ():
            if kv is not None and tokens:
                own = _Own(kv)
                arrays += own.arrays
                taken[uid] = Taken(list(tokens), own)
        if arrays:
            mx.async_eval(arrays)  # type: ignore[no-untyped-call]
        gen.remove(list(uids))
    return {u: taken[u] for u in uids if u in taken}


def _groups(layers: list[Any], lengths: dict[int, int], max_bytes: int) -> list[list[int]]:
    """The rows of `lengths` (row: tokens in its cache) in gathers, longest first, each while
    what it pads and holds stays in bounds."""
    per_token = sum(
        (c.keys.nbytes + c.values.nbytes) // (c.keys.shape[0] * c.keys.shape[2]) for c in layers
    )
    groups: list[list[int]] = []
    for r in sorted(lengths, key=lambda r: -lengths[r]):
        if groups:
            group = groups[-1]
            longest = lengths[group[0]]
            fits = (len(group) + 1) * longest * per_token <= max_bytes
            if fits and longest - lengths[r] <= _PAD_SHARE * lengths[r]:
                group.append(r)
                continue
        groups.append([r])
    return groups


def _gather(layers: list[Any], group: list[int], width: int) -> tuple[_Gather, dict[int, int]]:
    """Every layer's keys and values of `group`'s rows, their last `width` positions, copied into
    one gather, and the row each of them has there."""
    first = min(group)
    # A run of rows is copied as a slice: MLX's gather is several times slower on the CPU.
    if max(group) - first + 1 == len(group):
        rows: slice | mx.array = slice(first, first + len(group))
        at = {r: r - first for r in group}
    else:
        rows = mx.array(group)
        at = {r: j for j, r in enumerate(group)}
    parts = []
    for c in layers:
        span = slice(c._idx - width, c._idx)
        parts += [c.keys[rows, :, span], c.values[rows, :, span]]
    return _Gather(parts), at
