"""Sizing a study from a pilot: how many seeds resolve a difference, which learning rate, what
budget, how long.

A pilot runs short probes (a few learning rates for single-domain LoRA, mixed LoRA and mixed
MoLE, two seeds each) and scores every test item. Two sources of noise then set how many seeds
a study needs to tell a difference ``delta`` between two settings apart:

- items: a run's accuracy on ``n`` test items of per-item success rate ``p`` has variance
  ``p (1 - p) / n`` (binomial), estimated as the mean over seeds of ``a_s (1 - a_s) / n``;
- seeds: what is left of the variance of the seed means ``a_1..a_S`` once the item part is
  taken out, ``sigma2_seed = max(0, var(a_s) - item_var)`` (method of moments, ``var`` with
  ``S - 1`` in the denominator).

With ``S`` seeds per setting, the difference of two settings' mean accuracies has variance
``v(S) = (sigma2_seed_A + sigma2_seed_B) / S + (item_A + item_B) / S`` (the item parts shrink
with seeds too, as each seed is scored on the items again, which is conservative for paired
items). The study resolves ``delta`` when the half width of a two-sided interval,
``z * sqrt(v(S))``, is at most ``delta / 2``: then a true difference of ``delta`` lies outside
an interval around zero. :func:`seeds_needed` returns the smallest such ``S`` (at least 2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Noise", "Probe", "StudyPlan", "plan_study", "seeds_needed"]


@dataclass(frozen=True)
class Noise:
    """Seed and item variance of one setting's accuracy (see the module docstring)."""

    seed_var: float
    item_var: float
    mean: float

    @classmethod
    def from_scores(cls, scores: Sequence[Sequence[float]]) -> Noise:
        """From per-item scores in [0, 1], one row per seed (>= 2 seeds, equal items)."""
        table = np.asarray(scores, dtype=np.float64)
        if table.ndim != 2 or table.shape[0] < 2 or table.shape[1] < 1:
            raise ValueError(f"need per-item scores of >= 2 seeds, got shape {table.shape}")
        means = table.mean(axis=1)
        item_var = float(np.mean(means * (1 - means) / table.shape[1]))
        seed_var = max(0.0, float(np.var(means, ddof=1)) - item_var)
        return cls(seed_var, item_var, float(means.mean()))


def seeds_needed(a: Noise, b: Noise, delta: float, z: float = 1.96, most: int = 20) -> int | None:
    """Smallest seed count per setting that resolves a difference `delta` (None: > `most`)."""
    if delta <= 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    total = a.seed_var + b.seed_var + a.item_var + b.item_var
    for seeds in range(2, most + 1):
        if z * math.sqrt(total / seeds) <= delta / 2:
            return seeds
    return None


@dataclass(frozen=True)
class Probe:
    """One short pilot run of a setting at a learning rate.

    Attributes:
        setting: The study setting probed (e.g. ``single``, ``mix_lora``, ``mix_mole``).
        lr: Its learning rate.
        curve: ``(step, dev score)`` pairs of the run, ascending steps.
        seconds_per_step: Measured training speed.
        scores: Per-item test scores of each seed (rows: seeds).
    """

    setting: str
    lr: float
    curve: Sequence[tuple[int, float]]
    seconds_per_step: float
    scores: Sequence[Sequence[float]]


@dataclass(frozen=True)
class StudyPlan:
    """What the pilot proposes."""

    lr: dict[str, float]
    budget_steps: int
    seeds: int | None
    seconds: float
    noise: dict[str, Noise]

    def lines(self, delta: float) -> list[str]:
        seeds = f"{self.seeds}" if self.seeds else "more than 20 (the difference is too small)"
        return [
            "learning rate: " + ", ".join(f"{k} {v:g}" for k, v in self.lr.items()),
            f"budget: {self.budget_steps} steps per run (training stops earlier at convergence)",
            f"seeds per setting to resolve a difference of {delta:.3f}: {seeds}",
            "seed / item spread: "
            + ", ".join(
                f"{k} {math.sqrt(n.seed_var):.3f} / {math.sqrt(n.item_var):.3f}"
                for k, n in self.noise.items()
            ),
            f"estimated wall time: {self.seconds / 60:.0f} min",
        ] + (
            [
                "warning: the probes learnt nothing (test scores near 0): give them more steps "
                "(--plan-steps) before trusting this plan"
            ]
            if all(n.mean < 0.01 for n in self.noise.values())
            else []
        )


def _steps_to(curve: Sequence[tuple[int, float]], share: float) -> int:
    """First step whose dev score reaches `share` of the curve's best."""
    best = max(v for _, v in curve)
    return next(step for step, v in curve if v >= share * best)


def plan_study(
    probes: Sequence[Probe],
    delta: float,
    runs: int,
    workers: int = 1,
    headroom: float = 3.0,
) -> StudyPlan:
    """Proposes learning rates, a budget and a seed count from the pilot's probes.

    Per setting the learning rate with the best final dev score wins. The budget is
    ``headroom`` times the steps the slowest winning probe took to reach 90% of its best dev
    score (runs stop at convergence before it; the cap only bounds a run that keeps improving).
    Seeds: :func:`seeds_needed` for every pair of settings, the largest. Wall time: every run
    at the budget, at the slowest measured speed, over `workers` parallel processes.

    Args:
        probes: The pilot's runs (at least one per setting).
        delta: The smallest difference the study must resolve.
        runs: Training runs of the study per seed.
        workers: Parallel training processes.
        headroom: Budget as a multiple of the steps to 90%.
    """
    if not probes:
        raise ValueError("the pilot has no probes")
    best: dict[str, Probe] = {}
    for p in probes:
        if p.setting not in best or p.curve[-1][1] > best[p.setting].curve[-1][1]:
            best[p.setting] = p
    budget = int(math.ceil(headroom * max(_steps_to(p.curve, 0.9) for p in best.values())))
    noise = {k: Noise.from_scores(p.scores) for k, p in best.items()}
    needed = [
        seeds_needed(noise[a], noise[b], delta)
        for i, a in enumerate(noise)
        for b in list(noise)[i + 1 :]
    ]
    seeds = None if any(n is None for n in needed) else max(needed, default=2)
    speed = max(p.seconds_per_step for p in best.values())
    seconds = runs * (seeds or 20) * budget * speed / max(1, workers)
    return StudyPlan({k: p.lr for k, p in best.items()}, budget, seeds, seconds, noise)


def noise_table(noise: Mapping[str, Noise]) -> list[tuple[str, float, float, float]]:
    """``(setting, mean, seed std, item std)`` rows, for a report."""
    return [(k, n.mean, math.sqrt(n.seed_var), math.sqrt(n.item_var)) for k, n in noise.items()]
