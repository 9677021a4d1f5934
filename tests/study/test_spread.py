"""The variance-ratio interval behind the report's seed-stability verdict."""

from __future__ import annotations

import math

import pytest

from llava_mole.study.spread import f_quantiles, seeds_to_resolve, spread_ratio


@pytest.mark.parametrize(
    ("df", "upper"),  # F_0.975(df, df) from standard tables
    [(2, 39.00), (4, 9.605), (9, 4.026)],
)
def test_f_quantiles_match_the_tables(df, upper):
    low, high = f_quantiles(df, df, 0.95)
    assert high == pytest.approx(upper, rel=0.02)
    assert low == pytest.approx(1 / upper, rel=0.02)  # F_α/2(d, d) = 1 / F_1-α/2(d, d)


def test_f_quantiles_refuse_zero_degrees_of_freedom():
    with pytest.raises(ValueError, match="degrees of freedom must be >= 1"):
        f_quantiles(0, 2, 0.95)


def test_a_collapsed_seed_is_a_larger_spread_beyond_the_interval():
    spread = spread_ratio([0.2, 0.85, 0.85], [0.85, 0.86, 0.87])
    assert spread.ratio == pytest.approx(37.53, abs=0.01)
    assert spread.low == pytest.approx(37.53 / math.sqrt(39.0), rel=0.02)
    assert spread.verdict == "larger" and spread.seeds_needed is None


def test_three_seeds_cannot_resolve_a_fivefold_ratio_but_four_can():
    # skills at the 3000 cap: MoLE 0.046 against mixed LoRA 0.011 was read as "larger".
    larger = spread_ratio([0.60, 0.70, 0.65], [0.66, 0.67, 0.68])
    assert larger.ratio == pytest.approx(5.0)
    assert larger.low < 1.0 < larger.high
    assert larger.verdict == "unresolved" and larger.seeds_needed == 4
    smaller = spread_ratio([0.66, 0.67, 0.68], [0.60, 0.70, 0.65])
    assert smaller.verdict == "unresolved" and smaller.high == pytest.approx(
        1 / larger.low, rel=0.02
    )
    ten = [0.6, 0.7, 0.65, 0.62, 0.68] * 2
    steady = [0.66, 0.67, 0.68, 0.665, 0.675] * 2
    assert spread_ratio(ten, steady).verdict == "larger"
    assert spread_ratio(steady, ten).verdict == "smaller"


def test_seeds_to_resolve_grows_as_the_ratio_nears_one():
    needed = [seeds_to_resolve(r, 0.95) for r in (8.0, 4.0, 2.0, 1.5)]
    assert needed[0] == 3 and needed == sorted(needed)
    assert seeds_to_resolve(1.0, 0.95) is None
    assert seeds_to_resolve(1.05, 0.95) is None  # beyond MAX_SEEDS
    assert seeds_to_resolve(0.25, 0.95) == seeds_to_resolve(4.0, 0.95)


def test_no_ratio_when_the_reference_spread_is_zero():
    spread = spread_ratio([0.6, 0.7], [0.8, 0.8])
    assert spread.ratio is None and spread.low is None and spread.verdict == "unresolved"
    with pytest.raises(ValueError, match=">= 2 seeds per setting"):
        spread_ratio([0.6], [0.8, 0.8])
