"""Is one setting's seed spread really larger than another's? The variance-ratio interval.

The study's goal "MoLE's seed std is no larger than mixed LoRA's" is judged on a few seeds, and
a sample standard deviation from 3 seeds is itself very uncertain. This module says whether an
observed difference of spread is resolved.

**The interval** (the classical F interval for a ratio of variances; e.g. Casella & Berger,
*Statistical Inference*, 2002, §9.2). For ``n_a`` and ``n_b`` seed scores with sample
variances ``s_a²`` and ``s_b²``, drawn from normal distributions of variances ``σ_a²`` and
``σ_b²``, ``(s_a² / σ_a²) / (s_b² / σ_b²)`` follows an F distribution with
``(n_a - 1, n_b - 1)`` degrees of freedom. Hence the ``confidence`` interval of the std ratio
``ρ = σ_a / σ_b`` is

    [ r / sqrt(F_(1-α/2)),  r / sqrt(F_(α/2)) ],   r = s_a / s_b,  α = 1 - confidence.

With 3 + 3 seeds ``F_0.975(2, 2) = 39``, so the interval spans a factor of 39 around ``r``: an
observed ratio must exceed about 6.25 (or fall below 1/6.25) to be resolved at 95%.

The F quantiles are Monte-Carlo quantiles of 200,000 draws from a generator keyed by the
degrees of freedom (deterministic; relative error about 1% in the 2.5% tails). Seed scores
that are bimodal (a seed that fails) are not normal; the interval is then a guide, not exact.

**Seeds needed**: the smallest ``n`` seeds per setting (up to :data:`MAX_SEEDS`) for which an
observed ratio ``r`` would give an interval that excludes 1.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .stats import keyed_rng

__all__ = ["MAX_SEEDS", "SpreadRatio", "f_quantiles", "seeds_to_resolve", "spread_ratio"]

MAX_SEEDS = 30
_DRAWS = 200_000


@functools.cache
def f_quantiles(dfn: int, dfd: int, confidence: float) -> tuple[float, float]:
    """``(F_(α/2), F_(1-α/2))`` of the F distribution with ``(dfn, dfd)`` degrees of freedom."""
    if dfn < 1 or dfd < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got ({dfn}, {dfd})")
    draws = keyed_rng(0, f"F({dfn},{dfd})").f(dfn, dfd, size=_DRAWS)
    alpha = 1.0 - confidence
    low, high = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class SpreadRatio:
    """Seed std of setting A over setting B's, with its interval.

    Args:
        std_a: sample std of A's seed scores.
        std_b: sample std of B's seed scores.
        seeds: ``(n_a, n_b)``.
        low: lower end of the std ratio's interval (``None`` when ``std_b`` is 0).
        high: upper end (``math.inf`` when undefined).
        confidence: the interval's confidence.
        seeds_needed: seeds per setting that would resolve the observed ratio (``None``: it is
            resolved already, is 1 or undefined, or needs more than :data:`MAX_SEEDS`).
    """

    std_a: float
    std_b: float
    seeds: tuple[int, int]
    low: float | None
    high: float
    confidence: float
    seeds_needed: int | None

    @property
    def ratio(self) -> float | None:
        """``std_a / std_b`` (``None`` when ``std_b`` is 0)."""
        return self.std_a / self.std_b if self.std_b > 0 else None

    @property
    def verdict(self) -> Literal["larger", "smaller", "unresolved"]:
        """Whether A's spread is larger or smaller than B's beyond the interval."""
        if self.low is not None and self.low > 1.0:
            return "larger"
        if self.high < 1.0:
            return "smaller"
        return "unresolved"


def seeds_to_resolve(ratio: float, confidence: float) -> int | None:
    """Smallest seeds per setting whose interval around ``ratio`` excludes 1 (or ``None``)."""
    if ratio <= 0 or ratio == 1.0 or not math.isfinite(ratio):
        return None
    for n in range(2, MAX_SEEDS + 1):
        low, high = f_quantiles(n - 1, n - 1, confidence)
        if ratio / math.sqrt(high) > 1.0 or ratio / math.sqrt(low) < 1.0:
            return n
    return None


def spread_ratio(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> SpreadRatio:
    """Compare the seed spread of scores ``a`` with that of ``b`` (each >= 2 seeds).

    Returns:
        The :class:`SpreadRatio`; when ``b``'s spread is 0 the ratio and its lower end are
        undefined (``None``) and the verdict is ``unresolved``.
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a spread needs >= 2 seeds per setting, got {len(a)} and {len(b)}")
    std_a, std_b = statistics.stdev(a), statistics.stdev(b)
    seeds = (len(a), len(b))
    if std_b == 0:
        return SpreadRatio(std_a, std_b, seeds, None, math.inf, confidence, None)
    r = std_a / std_b
    f_low, f_high = f_quantiles(seeds[0] - 1, seeds[1] - 1, confidence)
    low, high = r / math.sqrt(f_high), r / math.sqrt(f_low)
    resolved = low > 1.0 or high < 1.0
    needed = None if resolved else seeds_to_resolve(r, confidence)
    return SpreadRatio(std_a, std_b, seeds, low, high, confidence, needed)
