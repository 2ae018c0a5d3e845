"""The statistics of paired ratios (lmx's run over raw's beside it, one mode's block over another's):
their median with a distribution-free interval, the verdict against a target, a sign test, the
spread, and how many pairs a narrower interval would take. A run's report (bench.report), the
pools of several runs (bench.pool, bench.pool_ab) and bench.worker_ab's tables read their pairs
through these.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CONFIDENCE = 0.95
# A median's standard error over a mean's, for normal data: how much wider its interval is.
_MEDIAN_EFFICIENCY = math.sqrt(math.pi / 2)


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The narrowest interval of order statistics (the k-th lowest and k-th highest value) that
    holds the median of the values' distribution with at least `confidence`, for any
    distribution. Raises ValueError when too few values for one (under 6 at 95%)."""
    xs = sorted(values)
    n = len(xs)
    k = 0
    below = 0  # 2^n P(Binomial(n, 1/2) <= k): the chance that at most k values fall below it
    while k < n // 2:
        below += math.comb(n, k)
        if 1 - 2 * below / 2**n < confidence:
            break
        k += 1
    if k == 0:
        raise ValueError(f"{n} values give no {confidence:.0%} interval for a median")
    return xs[k - 1], xs[n - k]


@dataclass(frozen=True)
class Pairs:
    """One ratio's pairs at one concurrency: of one run, or of several pooled."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def geomean(self) -> float:
        return statistics.geometric_mean(self.values) if self.values else math.nan

    @property
    def below_1(self) -> int:
        return sum(v < 1 for v in self.values)

    @property
    def sign_p(self) -> float:
        """Two-sided sign test: the chance of pairs at least this lopsided about 1 if each pair
        were as likely below 1 as above (pairs of exactly 1 left out); nan without pairs."""
        below, above = self.below_1, sum(v > 1 for v in self.values)
        n = below + above
        if not n:
            return math.nan
        tail = sum(math.comb(n, i) for i in range(min(below, above) + 1))
        return min(1.0, 2 * tail / (1 << n))

    @property
    def interval(self) -> tuple[float, float] | None:
        try:
            return median_interval(self.values)
        except ValueError:
            return None

    @property
    def log_sd(self) -> float:
        """The spread of single pairs: the standard deviation of their logarithms."""
        if self.n < 2:
            return math.nan
        return statistics.stdev(math.log(v) for v in self.values)

    def verdict(self, target: float) -> str:
        iv = self.interval
        if iv is None:
            return "too few pairs"
        if iv[0] >= target:
            return "met"
        if iv[1] < target:
            return "not met"
        return "undecided"

    def pairs_for(self, within: float = 0.03) -> int | None:
        """About how many pairs would narrow the interval to ±`within` around the median at this
        spread (normal approximation); None without a spread."""
        if math.isnan(self.log_sd):
            return None
        z = statistics.NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)
        return math.ceil((z * _MEDIAN_EFFICIENCY * self.log_sd / math.log1p(within)) ** 2)

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "median": self.median,
            "interval": self.interval,
            "geomean": self.geomean,
            "below_1": self.below_1,
            "sign_p": self.sign_p,
            "log_sd": self.log_sd,
            "values": list(self.values),
        }


def cell(s: Pairs, digits: int = 2) -> str:
    """`s`'s median and its interval, as the tables show them."""
    if not s.n:
        return "—"
    iv = s.interval
    span = f" [{iv[0]:.{digits}f}–{iv[1]:.{digits}f}]" if iv else " [too few]"
    return f"{s.median:.{digits}f}{span}"
