"""The thinking budget: a reasoning block's end is written for the model once the block has
taken its budget, and only then; no step of it waits on the device. A block opens with one token
(`<think>`) or several (gpt-oss's `<|channel|>analysis<|message|>`)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from lmx.runtime.mlx_sampling import thinking_budget
from lmx.runtime.parsers import Thinking, opens_thinking

START, END, VOCAB = 7, 8, 10
THINK = (START,), END
# As gpt-oss's: <|channel|> analysis <|message|> ... <|end|>, its answer after another header.
CHANNEL, ANALYSIS, MESSAGE, FINAL = 5, 6, 9, 3
HARMONY = (CHANNEL, ANALYSIS, MESSAGE), END
PROMPT = [1, 2, 3]


def generate(budget: int, wanted: list[int], *, inside: bool, think: Thinking = THINK) -> list[int]:
    """The tokens a model that would write `wanted` writes under the budget: at each step the
    processor sees the prompt and the tokens so far (as BatchGenerator gives them), and a step
    it forces writes END."""
    process = thinking_budget(budget, think, inside=inside)
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


def test_a_block_opened_by_several_tokens_is_counted_from_its_text() -> None:
    analysis = [CHANNEL, ANALYSIS, MESSAGE]
    final = [1, CHANNEL, FINAL, MESSAGE, 4, 4, 4]
    # Forced after two tokens of its text, whatever the model goes on to write.
    wanted = [*analysis, 4, 4, 4, 4, END, *final]
    assert generate(2, wanted, inside=False, think=HARMONY) == [
        *analysis, 4, 4, END, 4, END, *final
    ]  # fmt: skip
    # Its answer alone, or reasoning ended in the budget: left alone.
    assert generate(1, final, inside=False, think=HARMONY) == final
    short = [*analysis, 4, END, *final]
    assert generate(2, short, inside=False, think=HARMONY) == short
    # A channel token alone opens nothing.
    other = [CHANNEL, 4, MESSAGE, 4]
    assert generate(0, other, inside=False, think=HARMONY) == other


def test_a_second_block_after_the_budget_is_ended_at_once() -> None:
    again = [START, 4, END, 4, START, 4, 4]
    assert generate(3, again, inside=False) == [START, 4, END, 4, START, END, 4]


@pytest.mark.parametrize(
    ("prompt", "think", "inside"),
    [
        ([1, START], THINK, True),
        ([START, 4, END, 1], THINK, False),
        ([START, 4, END, START, 5], THINK, True),
        ([1], THINK, False),
        ([1, CHANNEL, ANALYSIS, MESSAGE], HARMONY, True),
        ([CHANNEL, ANALYSIS, MESSAGE, 4, END, CHANNEL, FINAL, MESSAGE], HARMONY, False),
        ([ANALYSIS, MESSAGE, 4], HARMONY, False),
        ([MESSAGE], HARMONY, False),
    ],
)
def test_a_prompt_opens_the_block_if_its_last_opener_follows_its_last_end(
    prompt: list[int], think: Thinking, inside: bool
) -> None:
    assert opens_thinking(prompt, think) is inside
