"""The paired bootstrap against cases with a known answer (exact, analytic, coverage)."""

from __future__ import annotations

import numpy as np
import pytest

from llava_mole.study.assemble import bootstrap_replicates, item_matrices
from llava_mole.study.config import BootstrapSection
from llava_mole.study.results import DomainItems, RunOutput
from llava_mole.study.stats import (
    bootstrap_means,
    keyed_rng,
    percentile_interval,
    resampling_weights,
    seed_draws,
)


def test_seed_resampling_of_two_seeds_has_its_exact_distribution():
    # Two runs, one "item" each: the mean of 2 seeds drawn with replacement is x0, (x0+x1)/2
    # or x1 with probabilities 1/4, 1/2, 1/4.
    items = np.array([[0.2], [0.6]])
    b = 40_000
    reps = bootstrap_means(items, np.ones((b, 1)), seed_draws(2, b, keyed_rng(0, "s")))
    values, counts = np.unique(np.round(reps, 12), return_counts=True)
    assert values.tolist() == [0.2, 0.4, 0.6]
    assert counts / b == pytest.approx([0.25, 0.5, 0.25], abs=0.01)


def test_paired_item_resampling_matches_the_analytic_standard_error():
    # Settings a and b agree on 490 of 500 items; a is right and b wrong on the other 10. The
    # paired difference of means has mean 0.02 and bootstrap standard error
    # sqrt(var_pop(d) / n) = sqrt(0.02 * 0.98 / 500) = 0.00626; unpaired it would be ~0.029.
    n, b = 500, 20_000
    rng = np.random.default_rng(1)
    shared = (rng.random(n) < 0.6).astype(float)
    a, bb = shared.copy(), shared.copy()
    a[:10], bb[:10] = 1.0, 0.0
    weights = resampling_weights(n, b, keyed_rng(0, "items"))
    one = np.zeros((b, 1), dtype=int)
    diff = bootstrap_means(a[None], weights, one) - bootstrap_means(bb[None], weights, one)
    assert diff.mean() == pytest.approx(0.02, abs=0.0005)
    assert diff.std() == pytest.approx(np.sqrt(0.02 * 0.98 / n), rel=0.05)
    low, high = percentile_interval(diff, 0.95)
    assert 0.006 < low < 0.010 and 0.030 < high < 0.034
    assert (weights.sum(axis=1) == pytest.approx(1.0)) and weights.shape == (b, n)


def test_percentile_interval_covers_the_true_mean_of_bernoulli_data():
    # 400 synthetic test sets of 300 Bernoulli(0.7) items: the 95% interval of the mean score
    # must contain 0.7 in about 95% of them (3 standard errors of the coverage: 0.92-0.98).
    rng = np.random.default_rng(7)
    n, b, trials = 300, 1000, 400
    weights = resampling_weights(n, b, keyed_rng(3, "coverage"))
    one = np.zeros((b, 1), dtype=int)
    covered = 0
    for _ in range(trials):
        x = (rng.random(n) < 0.7).astype(float)
        low, high = percentile_interval(bootstrap_means(x[None], weights, one), 0.95)
        covered += low <= 0.7 <= high
    assert 0.92 <= covered / trials <= 0.98


def _run(setting: str, seed: int, scores: list[float], ids: list[str]) -> RunOutput:
    return RunOutput(
        id=f"{setting}/seed{seed}",
        setting=setting,
        base=setting,
        domain=None,
        seed=seed,
        run_dir="/r",
        adapter={"type": "lora"},
        max_steps=1,
        batch_size=1,
        summary={},
        eval={"per_domain": {"d": {"score": float(np.mean(scores)), "n": len(scores)}}},
        items={"d": DomainItems(ids, scores)},
    )


def test_items_are_aligned_by_id_and_draws_do_not_depend_on_other_settings():
    ids = [f"i{k}" for k in range(6)]
    x = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    shuffled = [5, 3, 1, 0, 2, 4]
    records = [
        _run("a", 0, x, ids),
        _run("b", 0, [x[k] for k in shuffled], [ids[k] for k in shuffled]),
    ]
    matrices, items = item_matrices(records, ["a", "b"], ["d"])
    assert items == {"d": 6}
    np.testing.assert_array_equal(matrices["a"]["d"], matrices["b"]["d"])
    config = BootstrapSection(samples=500)
    reps = bootstrap_replicates(matrices, ["d"], config)
    np.testing.assert_array_equal(reps["a"]["d"], reps["b"]["d"])  # paired: same items drawn
    again = bootstrap_replicates({"a": matrices["a"]}, ["d"], config)
    np.testing.assert_array_equal(again["a"]["d"], reps["a"]["d"])  # deterministic, keyed
    # Disagreeing item ids: only seeds are resampled on that domain.
    records[1] = _run("b", 0, x, [f"j{k}" for k in range(6)])
    matrices, items = item_matrices(records, ["a", "b"], ["d"])
    assert items == {"d": 0} and matrices["a"]["d"].shape == (1, 1)
