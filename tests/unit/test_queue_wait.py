"""A full queue's Retry-After: how long until a place frees, from when the last places were."""

from __future__ import annotations

import pytest

from lmx.runtime.mlx_engine import place_wait_s


@pytest.mark.parametrize(
    ("freed", "wait"),
    [
        ([], 1.0),  # nothing known yet
        ([99.0], 1.0),
        ([40.0, 60.0, 80.0, 100.0], 20.0),  # one every 20 s
        ([10.0, 70.0, 80.0, 100.0], 15.0),  # 10.0 is over a minute old
        ([99.0, 99.2, 99.4, 99.6], 1.0),  # quicker than a second: no sooner than that
        ([0.0, 20.0], 1.0),  # the last is over a minute old: nothing to go by
        ([41.0, 100.0], 59.0),
    ],
)
def test_retry_after_is_the_recent_gap_between_places_freed(
    freed: list[float], wait: float
) -> None:
    assert place_wait_s(freed, now=100.0) == pytest.approx(wait)
