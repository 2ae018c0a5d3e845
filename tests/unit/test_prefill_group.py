"""How many waiting prompts the worker prefills in one step."""

from __future__ import annotations

from lmx.runtime.mlx_worker import prefill_group

CHUNK = 2048


def test_short_prompts_fill_the_batch() -> None:
    assert prefill_group([64] * 40, CHUNK, max_batch=32) == 32
    assert prefill_group([64] * 12, CHUNK, max_batch=32) == 12


def test_long_prompts_keep_the_usual_group_of_eight() -> None:
    assert prefill_group([5000] * 20, CHUNK, max_batch=32) == 8
    assert prefill_group([2048] * 9, CHUNK, max_batch=32) == 8


def test_a_long_prompt_pads_the_group_so_it_stops_there() -> None:
    # Eight shorts always go; the ninth member is a long one: 9 x 2048 > 8 x 2048.
    assert prefill_group([100] * 8 + [2048] + [100] * 10, CHUNK, max_batch=32) == 8
    # Sixteen of 1024 tokens pad to exactly eight chunks.
    assert prefill_group([1024] * 20, CHUNK, max_batch=32) == 16


def test_bounds() -> None:
    assert prefill_group([], CHUNK, max_batch=32) == 8  # nobody waits: the usual group
    assert prefill_group([64] * 40, CHUNK, max_batch=4) == 4
    assert prefill_group([64], CHUNK, max_batch=1) == 1
