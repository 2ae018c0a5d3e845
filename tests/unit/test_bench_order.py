"""The order of the bench's runs in a repeat: each side in each place, and after each other side,
equally often, so that no side gains from where it runs."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import pytest

from bench.run_throughput import run_order


@pytest.mark.parametrize(
    "sides", [["raw", "lmx"], ["again", "raw", "lmx"], ["again", "raw", "lmx", "engine"]]
)
def test_each_side_takes_each_place_equally_often(sides: list[str]) -> None:
    orders = [run_order(sides, rep) for rep in range(2 * len(sides))]
    assert all(sorted(order) == sorted(sides) for order in orders)
    for side in sides:
        places = Counter(order.index(side) for order in orders)
        assert places == dict.fromkeys(range(len(sides)), 2)


@pytest.mark.parametrize("sides", [["raw", "lmx"], ["again", "raw", "lmx"]])
def test_each_side_follows_each_other_side_equally_often(sides: list[str]) -> None:
    orders = [run_order(sides, rep) for rep in range(2 * len(sides))]
    follows = Counter(pair for order in orders for pair in pairwise(order))
    assert len(set(follows.values())) == 1
    assert len(follows) == len(sides) * (len(sides) - 1)


def test_three_sides_run_in_every_order_over_six_repeats() -> None:
    orders = {tuple(run_order(["again", "raw", "lmx"], rep)) for rep in range(6)}
    assert len(orders) == 6
