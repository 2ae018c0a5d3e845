"""The thinking budget: a `<think>` block's end is written for the model once the block has
taken its budget, and only then; no step of it waits on the device."""

from __future__ import annotations

import mlx.core as mx
import pytest

from lmx.runtime.mlx_sampling import opens_thinking, thinking_budget

START, END, VOCAB = 7, 8, 10
PROMPT = [1, 2, 3]


def generate(budget: int, wanted: list[int], *, inside: bool) -> list[int]:
    """The tokens a model that would write `wanted` writes under the budget: at each step the
    processor sees the prompt and the tokens so far (as BatchGenerator gives them), and a step
    it forces writes END."""
    process = thinking_budget(budget, (START, END), inside=inside)
    made: list[int] = []
    for want in wanted:
        logits = process(mx.array(PROMPT + made), mx.zeros((1, VOCAB)))
        allowed = [i for i in range(VOCAB) if logits[0, i].item() > -mx.inf]
        assert allowed in ([END], list(range(VOCAB)))  # forced to END, or left alone
        made.append(END if allowed == [END] else want)
    return made


def test_the_blocks_end_comes_once_it_has_taken_its_budget() -> None:
    assert generate(2, [5, START, 4, 4, 4, 4, 4], inside=False) == [5, START, 4, 4, END, 4, 4]
    assert generate(3, [4, 4, 4, 4, 4], inside=True) == [4, 4, 4, END, 4]
    assert generate(0, [4, 4], inside=True) == [END, 4]
    assert generate(0, [4, START, 4, 4], inside=False) == [4, START, END, 4]


def test_a_block_that_ends_in_its_budget_or_never_opens_is_left_alone() -> None:
    assert generate(3, [START, 4, END, 4, 4, 4, 4], inside=False) == [START, 4, END, 4, 4, 4, 4]
    assert generate(1, [4, 4, 4, 4], inside=False) == [4, 4, 4, 4]
    assert generate(2, [4, END, 4, 4, 4], inside=True) == [4, END, 4, 4, 4]


@pytest.mark.parametrize(
    ("prompt", "inside"),
    [
        ([1, START], True),
        ([START, 4, END, 1], False),
        ([START, 4, END, START, 5], True),
        ([1], False),
    ],
)
def test_a_prompt_opens_the_block_if_its_last_think_tag_opens_one(
    prompt: list[int], inside: bool
) -> None:
    assert opens_thinking(prompt, (START, END)) is inside
