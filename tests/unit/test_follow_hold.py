"""How long prompts that follow recent endings wait for the rest of their round."""

from __future__ import annotations

import pytest

from lmx.runtime.mlx_worker import _FOLLOW_GAP_S, _FOLLOW_MAX_S, follow_hold_s


def test_a_round_is_waited_for_until_its_arrivals_pause() -> None:
    # Arrivals 10 ms apart, the endings before them: the gap counts from the latest arrival.
    arrivals = [1.00, 1.01, 1.02]
    assert follow_hold_s(arrivals, 0.99, now=1.02) == pytest.approx(_FOLLOW_GAP_S)
    assert follow_hold_s(arrivals, 0.99, now=1.02 + _FOLLOW_GAP_S + 0.001) == 0.0


def test_endings_after_an_arrival_extend_the_wait_for_their_followers() -> None:
    # One prompt came while the step that ended the rest of its round ran, 30 ms before it
    # ended (H200: an early follower went alone, in a prompt step of its own, its round's other
    # 29 followers in the next). Their followers cannot come before their endings: the wait counts
    # from those.
    assert follow_hold_s([1.00], 1.03, now=1.03) == pytest.approx(_FOLLOW_GAP_S)
    assert follow_hold_s([1.00], 0.98, now=1.03) == pytest.approx(_FOLLOW_GAP_S - 0.03)


def test_no_round_is_waited_for_longer_than_the_most_after_its_first_arrival() -> None:
    arrivals = [1.00, 1.10]
    assert follow_hold_s(arrivals, 1.12, now=1.12) == pytest.approx(_FOLLOW_MAX_S - 0.12)
    assert follow_hold_s(arrivals, 1.12, now=1.00 + _FOLLOW_MAX_S) == 0.0
