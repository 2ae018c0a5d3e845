"""The statistics of paired ratios: the median's interval, the verdict, the sign test, the
pairs a narrower interval would take."""

from __future__ import annotations

import math

import pytest

from bench.pairs import Pairs, median_interval


def test_the_median_interval_is_the_widest_needed_order_statistics() -> None:
    # 6 values: the extremes hold the median with 1 - 2/64 = 97%; 5 values reach only 94%.
    assert median_interval([5, 1, 4, 2, 6, 3]) == (1, 6)
    with pytest.raises(ValueError, match="5 values give no 95% interval"):
        median_interval([1, 2, 3, 4, 5])
    # 20 values: the 6th lowest and 6th highest (1 - 2 P(Binomial(20, 1/2) <= 5) = 95.9%; the
    # 7th: 88.5%).
    assert median_interval(range(1, 21)) == (6, 15)
    assert median_interval(range(1, 21), confidence=0.8) == (7, 14)


def test_a_verdict_needs_the_whole_interval_on_one_side_of_the_target() -> None:
    assert Pairs((0.98, 0.99, 1.0, 1.01, 0.97, 0.99)).verdict(0.95) == "met"
    assert Pairs((0.8, 0.82, 0.85, 0.9, 0.81, 0.83)).verdict(0.95) == "not met"
    assert Pairs((0.8, 0.9, 1.0, 1.1, 0.85, 1.2)).verdict(0.95) == "undecided"
    assert Pairs((1.0, 1.0, 1.0)).verdict(0.95) == "too few pairs"


def test_the_pairs_for_a_narrower_interval_grow_with_the_spread() -> None:
    tight, wide = Pairs((0.99, 1.0, 1.01, 1.0)), Pairs((0.8, 1.25, 0.9, 1.1))
    assert tight.pairs_for(0.03) is not None and wide.pairs_for(0.03) is not None
    assert tight.pairs_for(0.03) < 4 < wide.pairs_for(0.03)
    assert Pairs((1.0,)).pairs_for(0.03) is None


def test_the_sign_test_weighs_the_pairs_on_each_side_of_1() -> None:
    # 5 of 6 below 1: a split at least this lopsided, either way, has 2 (1 + 6) / 64 = 21.9%.
    assert Pairs((0.9, 0.9, 0.9, 0.9, 0.9, 1.1)).sign_p == pytest.approx(14 / 64)
    assert Pairs((0.9,) * 10).sign_p == pytest.approx(2 / 1024)
    assert Pairs((0.9, 1.1, 1.0)).sign_p == 1.0  # a pair of exactly 1 counts on neither side
    assert math.isnan(Pairs((1.0, 1.0)).sign_p)
