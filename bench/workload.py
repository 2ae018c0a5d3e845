"""What one measurement point sends: N closed-loop streams of fixed-length requests.

Owns the workload's shape and its prompts (token ids drawn from a fixed seed), so that the raw
ceiling (bench.raw) and lmx over HTTP (bench.loadgen) get exactly the same requests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Prompts = list[list[list[int]]]  # [stream][request] -> token ids


@dataclass(frozen=True)
class Workload:
    """`concurrency` streams, each sending `requests_per_stream` requests one after another."""

    concurrency: int
    requests_per_stream: int
    prompt_tokens: int
    output_tokens: int

    @property
    def requests(self) -> int:
        return self.concurrency * self.requests_per_stream

    @classmethod
    def sized(
        cls,
        concurrency: int,
        prompt_tokens: int,
        output_tokens: int,
        min_requests: int = 16,
        rounds: int = 2,
    ) -> Workload:
        """At least `rounds` requests per stream (two or more, so slots are refilled),
        `min_requests` in all."""
        per_stream = max(2, rounds, math.ceil(min_requests / concurrency))
        return cls(concurrency, per_stream, prompt_tokens, output_tokens)


def make_prompts(workload: Workload, token_ids: Sequence[int], seed: int) -> Prompts:
    """Random prompts of exactly `prompt_tokens` ids each; distinct prompts defeat prompt caches."""
    rng = np.random.default_rng(seed)
    pool = np.asarray(token_ids, dtype=np.int64)
    ids = rng.choice(pool, size=(workload.requests, workload.prompt_tokens))
    rows: list[list[int]] = ids.tolist()
    n = workload.requests_per_stream
    return [rows[s * n : (s + 1) * n] for s in range(workload.concurrency)]
