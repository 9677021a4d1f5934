"""The pilot's arithmetic: seed and item variance, seeds needed, the proposed plan."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llava_mole.study.sizing import Noise, Probe, plan_study, seeds_needed


def test_noise_separates_seed_from_item_variance_on_simulated_runs():
    rng = np.random.default_rng(0)
    seed_means = rng.normal(0.7, 0.05, size=400).clip(0, 1)
    scores = (rng.random((400, 1000)) < seed_means[:, None]).astype(float)
    noise = Noise.from_scores(scores)
    assert noise.item_var == pytest.approx(0.7 * 0.3 / 1000, rel=0.05)
    assert noise.seed_var == pytest.approx(0.05**2, rel=0.2)
    # Pure item noise (every seed the same model): the seed part is ~0.
    same = (rng.random((400, 1000)) < 0.7).astype(float)
    assert Noise.from_scores(same).seed_var < 0.1 * 0.05**2
    with pytest.raises(ValueError, match=">= 2 seeds"):
        Noise.from_scores([[1.0, 0.0]])


def test_seeds_needed_is_the_smallest_count_whose_interval_fits():
    a = Noise(seed_var=0.02**2, item_var=0.0002, mean=0.9)
    b = Noise(seed_var=0.03**2, item_var=0.0002, mean=0.85)
    total = 0.02**2 + 0.03**2 + 0.0004
    n = seeds_needed(a, b, delta=0.05)
    assert 1.96 * math.sqrt(total / n) <= 0.025 < 1.96 * math.sqrt(total / (n - 1))
    assert seeds_needed(a, b, delta=0.001) is None  # beyond 20 seeds
    assert seeds_needed(a, b, delta=1.0) == 2


def test_plan_picks_the_best_lr_per_setting_and_sizes_budget_seeds_and_time():
    rng = np.random.default_rng(1)

    def scores(p: float) -> list[list[float]]:
        return (rng.random((2, 500)) < p).astype(float).tolist()

    probes = [
        Probe("mix_lora", 1e-3, [(100, 0.2), (200, 0.4), (300, 0.5)], 0.05, scores(0.5)),
        Probe("mix_lora", 5e-3, [(100, 0.5), (200, 0.8), (300, 0.85)], 0.05, scores(0.85)),
        Probe("mix_mole", 5e-3, [(100, 0.3), (200, 0.6), (300, 0.9)], 0.08, scores(0.9)),
    ]
    plan = plan_study(probes, delta=0.05, runs=5, workers=2)
    assert plan.lr == {"mix_lora": 5e-3, "mix_mole": 5e-3}
    assert plan.budget_steps == 900  # mix_mole reaches 90% of its best at step 300; x3
    expected = seeds_needed(plan.noise["mix_lora"], plan.noise["mix_mole"], 0.05)
    assert plan.seeds == expected
    assert plan.seconds == pytest.approx(5 * expected * 900 * 0.08 / 2)
    assert any("seeds per setting" in line for line in plan.lines(0.05))
    assert not any("learnt nothing" in line for line in plan.lines(0.05))
    zero = [Probe("mix_lora", 1e-3, [(10, 0.0), (20, 0.0)], 0.1, [[0.0] * 50, [0.0] * 50])]
    assert "learnt nothing" in plan_study(zero, 0.05, runs=1).lines(0.05)[-1]
    with pytest.raises(ValueError, match="no probes"):
        plan_study([], 0.05, runs=1)
