"""The study's statistics: seed summaries, the convergence flag and the paired bootstrap.

**Seed summary.** A setting's score on a domain is the mean over its seeds of each run's score
(the mean of per-item scores over the domain's test items); the table shows that mean ± the
sample standard deviation over seeds (``n - 1`` in the denominator; 0 for one seed).

**Paired bootstrap** (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13;
percentile intervals). Two sources of uncertainty are resampled in each replicate ``b``:

* *test items*: for each domain, ``n`` items are drawn with replacement from its ``n`` test
  items (multinomial counts ``c_b`` with ``sum c_b = n``); the **same draw** is used for every
  setting and seed, since all of them answer the same items. A difference between two settings
  is thus computed on the same resampled test set each time (a paired comparison): item
  difficulty, shared by both settings, cancels instead of adding noise.
* *seeds*: for each setting, ``S`` of its ``S`` seeds are drawn with replacement (the same draw
  on every domain, so the macro average pairs domains within seeds as the point estimate
  does). Seeds are resampled independently per setting: runs of two settings with the same seed
  share at most their data order, not their result.

The replicate of setting ``s`` on domain ``d`` is ``mean_j (c_b · x[s, seed_j]) / n``, where
``x[s, k]`` is the vector of per-item scores of the run with seed ``k``; a macro replicate is the
mean of its domain replicates; a difference's replicates are the differences of replicates.
Its ``(1 - confidence)`` percentile interval is ``[q_(α/2), q_(1-α/2)]`` of the ``B``
replicates, ``α = 1 - confidence``. With few seeds the seed part is weak: with ``S = 2`` the
resampled mean takes only three values, and the bootstrap variance of a mean is
``(S - 1) / S`` of the usual ``s² / S``; test items (hundreds per domain) are resampled well.

Every draw comes from a generator seeded with ``(seed, crc32(name))`` of the domain or setting,
so intervals are deterministic and do not change when another setting is added to a study.
"""

from __future__ import annotations

import statistics
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ConvergenceFlag",
    "ScoreSummary",
    "bootstrap_means",
    "convergence_flag",
    "dev_convergence_flag",
    "keyed_rng",
    "percentile_interval",
    "resampling_weights",
    "seed_draws",
    "summarize",
]


@dataclass(frozen=True)
class ScoreSummary:
    """Per-seed scores of one setting on one column (domain or macro) and their statistics.

    Args:
        scores: one score per seed, in seed order.
        n: number of seeds.
        mean: mean over seeds (None without scores).
        std: sample standard deviation over seeds (0 for one seed; None without scores).
        min: lowest seed score.
        max: highest seed score.
    """

    scores: list[float]
    n: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None

    @property
    def known(self) -> bool:
        """Whether there are scores at all."""
        return self.mean is not None

    def to_json(self) -> dict[str, object]:
        """``{"scores", "n", "mean", "std", "min", "max"}``."""
        return dict(self.__dict__)


def summarize(values: Sequence[float]) -> ScoreSummary:
    """Mean, sample standard deviation (0 for one value), min and max of per-seed scores.

    Args:
        values: one score per seed.

    Returns:
        The summary; its statistics are None without values.
    """
    values = [float(v) for v in values]
    if not values:
        return ScoreSummary([], 0, None, None, None, None)
    return ScoreSummary(
        scores=values,
        n=len(values),
        mean=statistics.fmean(values),
        std=statistics.stdev(values) if len(values) > 1 else 0.0,
        min=min(values),
        max=max(values),
    )


@dataclass(frozen=True)
class ConvergenceFlag:
    """Whether a run's loss was still falling at the end (see :func:`convergence_flag`).

    Args:
        converged: False = still improving, True = converged, None = not judged.
        points: logged loss points.
        window: points per window.
        tail_mean: mean loss of the last window.
        previous_mean: mean loss of the window before it.
        relative_drop: ``(previous_mean - tail_mean) / |previous_mean|``.
        rule: ``loss`` (the loss-window rule) or ``dev`` (the run trained to convergence on its
            dev split: :func:`dev_convergence_flag`).
        best_step: with ``dev``, the step of the best dev score (the weights kept).
        stopped_at: with ``dev``, the step early stopping ended the run (None: the budget did).
        lr_cuts: with ``dev``, the steps where a dev plateau cut the learning rate.
    """

    converged: bool | None
    points: int
    window: int
    tail_mean: float | None = None
    previous_mean: float | None = None
    relative_drop: float | None = None
    rule: str = "loss"
    best_step: int | None = None
    stopped_at: int | None = None
    lr_cuts: tuple[int, ...] = ()

    def to_json(self) -> dict[str, object]:
        """The fields as a mapping."""
        return dict(self.__dict__) | {"lr_cuts": list(self.lr_cuts)}


def convergence_flag(
    curve: Sequence[Sequence[float]], tail: float = 0.2, tolerance: float = 0.02
) -> ConvergenceFlag:
    """Whether a run's loss was still falling at the end.

    The last ``tail`` share of the logged points (at least one) is compared with the window of
    the same length just before it; the run is *still improving* when the mean loss of the last
    window is more than ``tolerance`` (relative) below the previous window's.

    Args:
        curve: ``[[step, loss], ...]`` as in ``summary.json``.
        tail: share of logged points in the final window.
        tolerance: relative drop that still counts as converged.

    Returns:
        The flag; ``converged`` is None with fewer than 4 points or too few for two windows.
    """
    losses = [float(point[1]) for point in curve if point[1] is not None]
    window = max(1, round(tail * len(losses)))
    if len(losses) < max(4, 2 * window):
        return ConvergenceFlag(None, len(losses), window)
    last = statistics.fmean(losses[-window:])
    previous = statistics.fmean(losses[-2 * window : -window])
    drop = (previous - last) / abs(previous) if previous != 0 else 0.0
    return ConvergenceFlag(drop <= tolerance, len(losses), window, last, previous, drop)


def dev_convergence_flag(convergence: dict) -> ConvergenceFlag:
    """The flag of a run trained to convergence (``summary.json["convergence"]``, see
    :mod:`llava_mole.train.convergence`): converged when early stopping ended it, still
    improving when it used its whole budget."""
    curve = convergence.get("dev_curve") or []
    stopped = convergence.get("converged_at")
    return ConvergenceFlag(
        converged=stopped is not None,
        points=len(curve),
        window=int(convergence.get("rule", {}).get("patience", 0)),
        tail_mean=float(convergence["best_dev_score"]) if curve else None,
        rule="dev",
        best_step=convergence.get("best_step"),
        stopped_at=stopped,
        lr_cuts=tuple(int(step) for step in convergence.get("lr_decayed_at") or ()),
    )


# ---- bootstrap ------------------------------------------------------------------------------


def keyed_rng(seed: int, key: str) -> np.random.Generator:
    """A generator seeded by ``(seed, crc32(key))``: one independent stream per name."""
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def resampling_weights(items: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    """Item weights of ``samples`` bootstrap resamples of ``items`` test items.

    Args:
        items: number of test items ``n`` (>= 1).
        samples: replicates ``B``.
        rng: the domain's generator.

    Returns:
        ``(B, n)`` float array: how often each item was drawn, divided by ``n`` (rows sum to 1),
        so ``weights @ x`` is the resampled mean of the per-item scores ``x``.
    """
    counts = rng.multinomial(items, np.full(items, 1.0 / items), size=samples)
    return counts / float(items)


def seed_draws(seeds: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    """``(B, S)`` indices of the seeds drawn, with replacement, in each replicate."""
    return rng.integers(0, seeds, size=(samples, seeds))


def bootstrap_means(items: np.ndarray, weights: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Bootstrap replicates of a setting's mean score over seeds on one domain.

    Args:
        items: ``(S, n)`` per-item scores of the setting's run with each seed.
        weights: ``(B, n)`` item weights (:func:`resampling_weights`), shared by every setting.
        draws: ``(B, S)`` seed indices (:func:`seed_draws`) of this setting.

    Returns:
        ``(B,)``: replicate ``b`` is ``mean_j weights[b] · items[draws[b, j]]``.
    """
    run_means = items @ weights.T  # (S, B): each run's score on each resampled test set
    return run_means[draws, np.arange(draws.shape[0])[:, None]].mean(axis=1)


def percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    """The percentile interval ``[q_(α/2), q_(1-α/2)]``, ``α = 1 - confidence``."""
    alpha = 1.0 - confidence
    low, high = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
