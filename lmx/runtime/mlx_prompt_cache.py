"""The worker's prompt cache: the KV caches of sequences that left the batch, for the next turn of
their conversations, bounded by the bytes it holds.

mlx-lm cuts a sequence's cache out of the batch on its own: two copies per layer, so the 32
sequences ending a round of a 28-layer model are 1792 copies, each launched on its own from the
stepping thread, and each reads the batch's padding, which waits for the step in flight when
sequences left the step before. `take_out` copies the rows of all the sequences leaving together
in one gather per layer (56 copies, if they fit one gather) and gives each of them views into it,
placed by its token count. Those views share their gather's buffers, which stay whole until the
last of them is dropped, so `PromptCache` counts a gather's bytes while any of its sequences is
stored, and evicts until that fits its budget.

`PromptCache` finds the longest shared prefix by comparing token arrays, not in mlx-lm's
LRUPromptCache's trie of one dict per token: storing a 4096-token sequence there took 2.3 ms of
the stepping thread (2-core CPU), evicting a 32k-token one up to 0.24 s, while every other
sequence of the batch waited.
"""

from __future__ import annotations

import copy
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


class _Buffers:
    """The arrays a stored cache's views share: a gather's, or the cache's own."""

    __slots__ = ("nbytes", "stored")

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.stored = 0  # sequences of it in the prompt cache


@dataclass(frozen=True)
class Taken:
    """A sequence's tokens and KV cache (one per layer) as it left the batch."""

    tokens: list[int]
    cache: list[Any]
    buffers: _Buffers


@dataclass(frozen=True)
class _Entry:
    taken: Taken
    ids: np.ndarray  # the tokens, int32
    trimmable: bool  # can step back to any prefix of its tokens

    def usable(self, ids: np.ndarray) -> int:
        """How many of the prompt `ids` it can serve, leaving at least one to feed: 0 if none."""
        shared = _shared(self.ids, ids)
        if self.trimmable:
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
        ids = np.asarray(tokens, dtype=np.int32)
        key, usable = b"", 0
        for k, e in reversed(self._entries.items()):  # the most recent wins a tie
            n = e.usable(ids)
            if n > usable:
                key, usable = k, n
        if not usable:
            return None, tokens
        self._entries.move_to_end(key)
        e = self._entries[key]
        kv = copy.deepcopy(e.taken.cache)
        if usable < len(e.ids):
            trim_prompt_cache(kv, len(e.ids) - usable)
        return kv, tokens[usable:]

    def store(self, taken: Iterable[Taken]) -> None:
        """Keep `taken`'s caches, evicting the least recently used until what it holds fits. A
        stored cache that the new one can step back to, or with its tokens, goes."""
        for t in taken:
            ids = np.asarray(t.tokens, dtype=np.int32)
            key = ids.tobytes()
            trimmable = can_trim_prompt_cache(t.cache)
            for old in [k for k in self._entries if k == key or (trimmable and key.startswith(k))]:
                self._drop(old)
            self._entries[key] = _Entry(t, ids, trimmable)
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
    if n == 0 or a[0] != b[0]:  # most entries differ at once: spare the array compare
        return 0
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
            caches = _gather(layers, group, lengths, arrays)
            taken |= {batch.uids[r]: Taken(list(batch.tokens[r]), *c) for r, c in caches.items()}
        for uid, (kv, tokens) in gen.extract_cache(rest).items() if rest else ():
            if kv is not None and tokens:
                state: list[tuple[str, Any]] = tree_flatten([c.state for c in kv])  # type: ignore[assignment]
                own = [a for _, a in state if isinstance(a, mx.array)]
                arrays += own
                taken[uid] = Taken(list(tokens), kv, _Buffers(sum(a.nbytes for a in own)))
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


def _gather(
    layers: list[Any], group: list[int], lengths: dict[int, int], arrays: list[mx.array]
) -> dict[int, tuple[list[Any], _Buffers]]:
    """One copy per layer's keys and values of `group`'s rows (added to `arrays`), and each
    row's cache: views of them."""
    first = min(group)
    # A run of rows is copied as a slice: MLX's gather is several times slower on the CPU.
    if max(group) - first + 1 == len(group):
        rows: slice | mx.array = slice(first, first + len(group))
        at = {r: r - first for r in group}
    else:
        rows = mx.array(group)
        at = {r: j for j, r in enumerate(group)}
    longest = lengths[group[0]]
    caches: dict[int, list[Any]] = {r: [] for r in group}
    nbytes = 0
    for c in layers:
        span = slice(c._idx - longest, c._idx)
        keys = mx.array(c.keys[rows, :, span])  # a copy, even of a view that is contiguous
        values = mx.array(c.values[rows, :, span])
        arrays += (keys, values)
        nbytes += keys.nbytes + values.nbytes
        # One split for all the rows' views: half the time of a slice each (28 layers, 32 rows)
        row_keys = mx.split(keys, len(group), axis=0)
        row_values = mx.split(values, len(group), axis=0)
        for r in group:
            kv = KVCache()  # type: ignore[no-untyped-call]
            kv.keys, kv.values, kv.offset = row_keys[at[r]], row_values[at[r]], lengths[r]
            if lengths[r] < longest:
                kv.keys = kv.keys[:, :, longest - lengths[r] :]
                kv.values = kv.values[:, :, longest - lengths[r] :]
            caches[r].append(kv)
    buffers = _Buffers(nbytes)
    return {r: (kv, buffers) for r, kv in caches.items()}
