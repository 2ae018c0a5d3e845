"""The worker's prompt cache with the real tiny model and mlx-lm's BatchGenerator: caches taken out
of a batch in gathers equal mlx-lm's own, one by one, and the cache counts what they hold."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import ArraysCache, BatchKVCache, KVCache

from lmx.runtime.mlx_prompt_cache import PromptCache, Taken, _gather, _Own, take_out

MB = 2**20


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    return mlx_lm.load(str(tiny_model_dir))[0]


def batch(model: Any, lengths: list[int], steps: int = 3) -> tuple[Any, list[int]]:
    """A batch decoding prompts of `lengths` (in one prefill), `steps` tokens in."""
    gen = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=8)
    prompts = [[(7 * i + 3 * j) % 200 + 10 for j in range(n)] for i, n in enumerate(lengths)]
    uids = gen.insert(prompts, max_tokens=[64] * len(prompts))
    for _ in range(steps + 1):
        gen.next()
    assert set(gen._generation_batch.uids) == set(uids)
    return gen, uids


def continuation(gen: Any, steps: int = 4) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for _ in range(steps):
        for r in gen.next()[1]:
            out.setdefault(r.uid, []).append(r.token)
    return out


def test_caches_taken_in_gathers_equal_mlx_lms_and_the_rest_decode_on(model: Any) -> None:
    lengths = [20, 22, 21, 9]
    ours, uids = batch(model, lengths)
    theirs, _ = batch(model, lengths)
    leaving = uids[:3]

    taken = take_out(ours, leaving, ours.stream, 64 * MB)
    expected = theirs.remove(leaving, return_prompt_caches=True)

    assert taken.keys() == expected.keys()
    assert len({id(t.buffers) for t in taken.values()}) == 1  # one gather for all three
    for uid, t in taken.items():
        kv, tokens = expected[uid]
        assert t.tokens == list(tokens)
        for a, b in zip(t.cache(), kv, strict=True):
            assert a.offset == b.offset
            assert a.keys.shape == b.keys.shape
            assert mx.array_equal(a.keys, b.keys).item()
            assert mx.array_equal(a.values, b.values).item()
    assert list(ours._generation_batch.uids) == [uids[3]]
    assert continuation(ours) == continuation(theirs)


def test_a_sequence_that_would_mostly_pad_a_gather_gets_one_of_its_own(model: Any) -> None:
    gen, uids = batch(model, [40, 4, 39])
    long1, short, long2 = take_out(gen, uids, gen.stream, 64 * MB).values()
    assert len(long1.tokens) - 40 == len(short.tokens) - 4 == len(long2.tokens) - 39
    assert long1.buffers is long2.buffers
    assert short.buffers is not long1.buffers
    assert short.buffers.nbytes < long1.buffers.nbytes / 4


def test_a_gather_holds_at_most_the_bytes_it_may(model: Any) -> None:
    gen, uids = batch(model, [20, 20, 20, 20])
    taken = take_out(gen, uids, gen.stream, 1)  # too little for two rows: each alone
    assert len({id(t.buffers) for t in taken.values()}) == 4


def test_a_gather_holds_every_layers_keys_and_values_in_one_buffer(model: Any) -> None:
    gen, uids = batch(model, [20, 21])
    first, second = take_out(gen, uids, gen.stream, 64 * MB).values()
    assert first.buffers is second.buffers
    (buffer,) = first.buffers.arrays
    _, heads, _, dims = first.cache()[0].keys.shape
    width = len(second.tokens)  # the longer one's
    assert buffer.shape == (2 * len(model.layers), 2, heads, width, dims)
    assert first.buffers.nbytes == buffer.nbytes


def test_keys_and_values_of_other_shapes_go_in_a_buffer_per_shape() -> None:
    layers = []
    for heads in (2, 2, 4):  # the last layer has more heads; values are narrower than keys
        c = BatchKVCache([0, 0])
        c.update_and_fetch(mx.random.normal((2, heads, 5, 8)), mx.random.normal((2, heads, 5, 6)))
        layers.append(c)
    gather, at = _gather(layers, [0, 1], 5)
    assert sorted(a.shape for a in gather.arrays) == [
        (1, 2, 4, 5, 6),
        (1, 2, 4, 5, 8),
        (2, 2, 2, 5, 6),
        (2, 2, 2, 5, 8),
    ]
    for ours, c in zip(gather.cache(at[1], 3), layers, strict=True):
        assert ours.offset == 3
        assert mx.array_equal(ours.keys, c.keys[1:2, :, 2:5]).item()
        assert mx.array_equal(ours.values, c.values[1:2, :, 2:5]).item()


def test_a_sequence_not_yet_decoding_leaves_with_the_cache_it_came_with(model: Any) -> None:
    gen, uids = batch(model, [12, 14])
    (waiting,) = gen.insert([[5, 6, 7]], max_tokens=[8])
    taken = take_out(gen, [uids[0], waiting], gen.stream, 64 * MB)
    assert list(taken) == [uids[0]]  # the new one has no tokens cached yet
    assert list(gen._generation_batch.uids) == [uids[1]]
    assert continuation(gen)  # the other decodes on


def test_caches_of_another_kind_are_taken_out_one_by_one(model: Any) -> None:
    twins = []
    for _ in range(2):
        gen = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=8, max_kv_size=32)
        uids = gen.insert([[10 + j for j in range(n)] for n in (12, 14)], max_tokens=[64] * 2)
        for _ in range(4):
            gen.next()
        twins.append((gen, uids))
    (ours, uids), (theirs, _) = twins
    assert not isinstance(ours._generation_batch.prompt_cache[0], BatchKVCache)

    taken = take_out(ours, uids, ours.stream, 64 * MB)
    expected = theirs.remove(uids, return_prompt_caches=True)
    assert list(taken) == uids
    assert taken[uids[0]].buffers is not taken[uids[1]].buffers
    for uid, t in taken.items():
        kv, tokens = expected[uid]
        assert t.tokens == list(tokens)
        assert t.buffers.nbytes == sum(c.nbytes for c in t.cache())
        for a, b in zip(t.cache(), kv, strict=True):
            assert type(a) is type(b)
            assert all(mx.array_equal(x, y).item() for x, y in zip(a.state, b.state, strict=True))
    assert len(ours._generation_batch) == 0


def stored(model: Any, cache: PromptCache, lengths: list[int]) -> list[Taken]:
    gen, uids = batch(model, lengths)
    taken = list(take_out(gen, uids, gen.stream, cache.gather_bytes).values())
    mx.eval([a for t in taken for c in t.cache() for a in (c.keys, c.values)])
    cache.store(taken)
    return taken


def test_the_cache_counts_a_gather_while_any_of_its_sequences_is_stored(model: Any) -> None:
    cache = PromptCache(64 * MB, max_entries=3)
    taken = stored(model, cache, [20, 21, 22])
    gather = taken[0].buffers
    assert all(t.buffers is gather for t in taken)
    assert cache.nbytes == gather.nbytes
    del taken
    gc.collect()
    assert len(cache) == 3 and cache.nbytes == gather.nbytes

    later = stored(model, cache, [30, 31])  # the three entries allowed: two of the gather go
    later_bytes = later[0].buffers.nbytes
    assert len(cache) == 3
    assert cache.nbytes == gather.nbytes + later_bytes
    del later
    (last,) = stored(model, cache, [8])  # the gather's last goes, and its buffers with it
    gc.collect()
    assert len(cache) == 3
    assert gather.stored == 0
    assert cache.nbytes == later_bytes + last.buffers.nbytes


def test_the_cache_evicts_until_what_it_holds_fits(model: Any) -> None:
    probe = PromptCache(64 * MB, max_entries=8)
    size = stored(model, probe, [20, 21])[0].buffers.nbytes

    cache = PromptCache(int(size * 2.5), max_entries=8)  # gathers of one sequence at most
    for lengths in ([20, 21], [22, 23], [24, 25]):
        stored(model, cache, lengths)
        gc.collect()
        assert cache.nbytes <= cache.max_bytes
    assert 0 < len(cache) < 6


def test_an_exact_hit_steps_back_one_token_to_feed_it(model: Any) -> None:
    cache = PromptCache(64 * MB, max_entries=4)
    (t,) = stored(model, cache, [16])
    kv, rest = cache.fetch(t.tokens)
    assert kv is not None and rest == t.tokens[-1:]
    assert kv[0].offset == len(t.tokens) - 1
    kv, rest = cache.fetch([*t.tokens, 99, 98])
    assert kv is not None and rest == [99, 98]
    kv, rest = cache.fetch([1, 2, 3])
    assert kv is None and rest == [1, 2, 3]


def test_a_sequence_resumed_from_the_prompt_cache_is_taken_out_whole(model: Any) -> None:
    cache = PromptCache(64 * MB, max_entries=4)
    (first,) = stored(model, cache, [18])
    turn = [*first.tokens, 40, 41, 42]
    twins = []
    for _ in range(2):
        gen = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=8)
        kv, rest = cache.fetch(turn)
        assert kv is not None and len(rest) == 3
        (uid,) = gen.insert(
            [rest], max_tokens=[64], caches=[kv], all_tokens=[turn[: len(turn) - len(rest)]]
        )
        others = gen.insert([[9, 8, 7, 6, 5], [50 + j for j in range(30)]], max_tokens=[64] * 2)
        for _ in range(4):
            gen.next()
        twins.append((gen, [uid, *others]))
    (ours, uids), (theirs, _) = twins

    taken = take_out(ours, uids, ours.stream, 64 * MB)
    expected = theirs.remove(uids, return_prompt_caches=True)
    assert list(taken) == uids and taken[uids[0]].tokens[: len(turn)] == turn
    for uid, t in taken.items():
        kv, tokens = expected[uid]
        assert t.tokens == list(tokens)
        for a, b in zip(t.cache(), kv, strict=True):
            assert a.offset == b.offset == len(tokens)
            assert mx.array_equal(a.keys, b.keys).item()
            assert mx.array_equal(a.values, b.values).item()


def kept(tokens: list[int], trimmable: bool = True) -> Taken:
    """A one-layer cache of `tokens` (their ids as its keys), as a stored sequence's."""
    if not trimmable:  # a state, as a recurrent layer's: it cannot step back
        state = ArraysCache(1)
        state.cache = [mx.array([tokens])]
        return Taken(tokens, _Own([state]))
    kv = KVCache()
    ids = mx.array(tokens, dtype=mx.float32).reshape(1, 1, -1, 1)
    kv.update_and_fetch(ids, ids)
    return Taken(tokens, _Own([kv]))


def served(cache: PromptCache, tokens: list[int]) -> tuple[list[int] | None, list[int]]:
    """The tokens of what `cache` serves for `tokens` (None: nothing), and the rest to feed."""
    kv, rest = cache.fetch(tokens)
    if kv is None:
        return None, rest
    (layer,) = kv
    assert layer.offset == len(tokens) - len(rest)
    return layer.keys[0, 0, : layer.offset, 0].astype(mx.int32).tolist(), rest


def test_a_stored_prefix_serves_a_longer_prompt_whole() -> None:
    cache = PromptCache(MB, max_entries=4)
    cache.store([kept([1, 2, 3, 4])])
    assert served(cache, [1, 2, 3, 4, 5, 6]) == ([1, 2, 3, 4], [5, 6])
    assert served(cache, [9, 2, 3, 4, 5]) == (None, [9, 2, 3, 4, 5])


def test_a_longer_cache_steps_back_to_the_prefix_it_shares() -> None:
    cache = PromptCache(MB, max_entries=4)
    cache.store([kept([1, 2, 3, 4, 5, 6])])
    assert served(cache, [1, 2, 3, 7, 8]) == ([1, 2, 3], [7, 8])
    assert served(cache, [1, 2, 3]) == ([1, 2], [3])  # a prompt it extends: all but its last
    assert served(cache, [1, 2, 3, 4, 5, 6]) == ([1, 2, 3, 4, 5], [6])  # it is whole still


def test_the_longest_usable_prefix_wins_and_the_most_recent_a_tie() -> None:
    cache = PromptCache(MB, max_entries=4)
    cache.store([kept([1, 2, 3]), kept([5, 6, 7, 8, 9]), kept([1, 2, 3, 4, 5, 6])])
    assert len(cache) == 2  # [1, 2, 3] can be had from the longer one, which replaced it
    assert served(cache, [1, 2, 3, 4, 5, 6, 7]) == ([1, 2, 3, 4, 5, 6], [7])
    cache.store([kept([1, 2, 9, 9])])  # as good for [1, 2, 8] as [1, 2, 3, 4, 5, 6], newer
    (layer,) = cache.fetch([1, 2, 8])[0] or []
    assert layer.keys[0, 0, :4, 0].tolist() == [1, 2, 9, 9] and layer.offset == 2


def test_a_cache_that_cannot_step_back_serves_only_prompts_it_is_a_prefix_of() -> None:
    cache = PromptCache(MB, max_entries=4)
    cache.store([kept([1, 2, 3], trimmable=False)])
    kv, rest = cache.fetch([1, 2, 3, 4])
    assert kv is not None and rest == [4]
    assert cache.fetch([1, 2, 3]) == (None, [1, 2, 3])
    assert cache.fetch([1, 2, 7, 8]) == (None, [1, 2, 7, 8])
    cache.store([kept([1, 2, 3, 4], trimmable=False)])
    assert len(cache) == 2  # it cannot stand in for the shorter one


def test_the_least_recently_used_goes_first_and_a_fetch_uses_it() -> None:
    cache = PromptCache(MB, max_entries=2)
    cache.store([kept([1, 2, 3]), kept([4, 5, 6])])
    assert served(cache, [1, 2, 3, 9])[0] == [1, 2, 3]
    cache.store([kept([7, 8, 9])])
    assert served(cache, [4, 5, 6, 9]) == (None, [4, 5, 6, 9])
    assert served(cache, [1, 2, 3, 9])[0] == [1, 2, 3]
    assert len(cache) == 2 and cache.nbytes == 2 * kept([1, 2, 3]).buffers.nbytes


def test_a_fetched_cache_is_a_copy() -> None:
    cache = PromptCache(MB, max_entries=2)
    cache.store([kept([1, 2, 3, 4])])
    kv, _ = cache.fetch([1, 2, 3, 4])
    assert kv is not None
    kv[0].update_and_fetch(*[mx.full((1, 1, 5, 1), 9.0)] * 2)
    assert served(cache, [1, 2, 3, 4]) == ([1, 2, 3], [4])


def test_a_cache_fetched_from_a_gather_leaves_the_gather_as_it_was(model: Any) -> None:
    cache = PromptCache(64 * MB, max_entries=4)
    first, second = stored(model, cache, [12, 14])
    assert first.buffers is second.buffers
    before = [mx.array(a) for c in second.cache() for a in (c.keys, c.values)]
    kv, rest = cache.fetch([*second.tokens, 5])
    assert kv is not None and rest == [5]
    for c in kv:  # as a batch that took it in would, for the tokens it adds
        c.update_and_fetch(*[mx.zeros((1, *c.keys.shape[1:2], 3, c.keys.shape[3]))] * 2)
    after = [a for c in second.cache() for a in (c.keys, c.values)]
    assert all(mx.array_equal(a, b).item() for a, b in zip(before, after, strict=True))
