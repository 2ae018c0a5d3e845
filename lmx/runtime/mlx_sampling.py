"""Per-request samplers and logits processors for mlx-lm's BatchGenerator.

Called in the engine's worker process when a request joins the batch. Each sequence gets its own
sampler (own seed) and processors, so one request's parameters never leak into another's.
Greedy requests get no sampler: the batch then samples them in one argmax.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_repetition_penalty

from lmx.runtime.engine import SamplingParams
from lmx.runtime.parsers import Thinking

Sampler = Callable[[mx.array], mx.array]
Processor = Callable[[mx.array, mx.array], mx.array]

_REPETITION_CONTEXT = 64


def make_sampler(p: SamplingParams) -> Sampler | None:
    """A seeded sampler for `p`, or None for greedy decoding (temperature 0)."""
    if p.temperature <= 0:
        return None
    seed = p.seed if p.seed is not None else random.getrandbits(62)
    inv_temp = 1.0 / p.temperature
    filters: list[Callable[[mx.array], mx.array]] = []
    if p.top_p == 0:  # OpenAI takes 0: the smallest set, the likeliest token alone
        filters.append(lambda x: apply_top_k(x, 1))
    elif p.top_p < 1:
        filters.append(lambda x: apply_top_p(x, p.top_p))
    if p.min_p > 0:
        filters.append(lambda x: apply_min_p(x, p.min_p))
    if p.top_k > 0:
        filters.append(lambda x: apply_top_k(x, p.top_k))
    step = 0

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal step
        for f in filters:
            logprobs = f(logprobs)
        # A fresh key per step from (seed, step): reproducible, and no growing chain of splits.
        key = mx.random.key((seed * 1_000_003 + step) % 2**62)
        step += 1
        return mx.random.categorical(logprobs * inv_temp, key=key)

    return sample


def _penalties(p: SamplingParams) -> Processor:
    """OpenAI presence/frequency penalties over the tokens generated so far (not the prompt)."""
    generated = 0

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        nonlocal generated
        n, generated = generated, generated + 1
        if n == 0:
            return logits
        counts = mx.zeros((logits.shape[-1],), dtype=logits.dtype).at[tokens[-n:]].add(1)
        return logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)

    return process


def _suppress_until(ids: Sequence[int], min_tokens: int) -> Processor:
    """Forbid the end-of-sequence tokens until `min_tokens` have been generated."""
    generated = 0
    index = mx.array(list(ids))

    def process(_tokens: mx.array, logits: mx.array) -> mx.array:
        nonlocal generated
        generated += 1
        if generated > min_tokens:
            return logits
        return logits.at[:, index].add(-mx.inf)

    return process


def thinking_budget(budget: int, think: Thinking, *, inside: bool) -> Processor:
    """Write the `think` block's end for the model once the block has taken `budget` tokens,
    counted from the first block the answer opens; `inside`: the prompt opened it. Until the
    answer could have spent that many tokens the processor does nothing; after, where the blocks
    opened and whether the last is still open is read off the tokens on the device, no step
    waiting."""
    opens, end = think
    k = len(opens)
    pattern = mx.array(list(opens))
    generated = 0
    forced: mx.array | None = None

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        nonlocal generated, forced
        n, generated = generated, generated + 1
        if n < budget or not (inside or n >= k):  # the block cannot have taken the budget yet
            return logits
        made = tokens[-n:] if n else tokens[:0]
        last_end = mx.max(mx.where(made == end, mx.arange(n), -1)) if n else mx.array(-1)
        # Where each block's text begins: after each opener the answer wrote (and at its start
        # where the prompt opened one).
        first, last = (mx.array(0), mx.array(0)) if inside else (mx.array(n + 1), mx.array(-1))
        if n >= k:
            at = mx.stack([made[j : n - k + 1 + j] == pattern[j] for j in range(k)]).all(axis=0)
            begins = mx.arange(k, n + 1)
            first = mx.minimum(first, mx.min(mx.where(at, begins, n + 1)))
            last = mx.maximum(last, mx.max(mx.where(at, begins, -1)))
        over = (last > last_end) & (n - first >= budget)
        if forced is None:
            vocab = mx.arange(logits.shape[-1])
            forced = mx.where(vocab == end, 0.0, -mx.inf).astype(logits.dtype)
        return mx.where(over, forced, logits)

    return process


def make_processors(p: SamplingParams, eos_ids: Sequence[int]) -> list[Processor]:
    procs: list[Processor] = []
    if p.logit_bias:
        index = mx.array(list(p.logit_bias.keys()))
        values = mx.array(list(p.logit_bias.values()))
        procs.append(lambda _t, logits: logits.at[:, index].add(values))
    if p.repetition_penalty != 1.0:
        procs.append(make_repetition_penalty(p.repetition_penalty, _REPETITION_CONTEXT))
    if p.presence_penalty or p.frequency_penalty:
        procs.append(_penalties(p))
    stoppers = [*eos_ids, *p.stop_token_ids]
    if p.min_tokens > 0 and stoppers and not p.ignore_eos:
        procs.append(_suppress_until(stoppers, p.min_tokens))
    return procs
