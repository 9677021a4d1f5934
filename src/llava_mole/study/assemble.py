"""From finished runs to :class:`~llava_mole.study.results.StudyResults`.

:func:`build_results` reads each run's summary and evaluation (:class:`RunOutput`), summarises
scores over seeds (:mod:`.stats`), computes every contrast of :data:`.rules.CONTRASTS` with a
paired-bootstrap interval (:func:`bootstrap_replicates`, :func:`derive`) and applies the
verdict (:mod:`.verdict`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..eval.collapse import MissingAnswer
from .render import render_table
from .results import (
    MACRO,
    DerivedColumn,
    Difference,
    RunOutput,
    RunResult,
    SettingScores,
    SettingSetup,
    StudyResults,
    StudySetup,
    Uncertainty,
)
from .routing import routing_summary
from .rules import CONTRASTS, classify
from .settings import by_role
from .stats import (
    bootstrap_means,
    convergence_flag,
    dev_convergence_flag,
    keyed_rng,
    percentile_interval,
    resampling_weights,
    seed_draws,
    summarize,
)
from .verdict import verdict

if TYPE_CHECKING:
    from .config import BootstrapSection, StudyConfig

__all__ = ["bootstrap_replicates", "build_results", "derive", "item_matrices"]

Replicates = dict[str, dict[str, np.ndarray]]
"""``{setting: {column: (B,) replicates}}``."""


def run_result(record: RunOutput, domains: Sequence[str], tail: float, tol: float) -> RunResult:
    """What the report shows of one run."""
    summary, ev = record.summary, record.eval
    curve = summary.get("loss_curve") or []
    per_domain = ev.get("per_domain", {})
    warnings = list(summary.get("router_warnings") or []) + list(ev.get("warnings") or [])
    return RunResult(
        id=record.id,
        setting=record.setting,
        base=record.base,
        domain=record.domain,
        seed=record.seed,
        run_dir=record.run_dir,
        adapter=record.adapter,
        max_steps=record.max_steps,
        steps=summary.get("steps"),
        batch_size=record.batch_size,
        loss_curve=curve,
        final_loss=curve[-1][1] if curve else summary.get("final", {}).get("loss"),
        convergence=(
            dev_convergence_flag(summary["convergence"])
            if summary.get("convergence")
            else convergence_flag(curve, tail, tol)
        ),
        wall_time_s=summary.get("wall_time_s"),
        tokens_per_s=summary.get("tokens_per_s"),
        trainable_parameters=summary.get("trainable_parameters"),
        scores={d: per_domain[d]["score"] for d in domains if d in per_domain},
        eval_n={d: per_domain[d]["n"] for d in domains if d in per_domain},
        eval_wall_time_s=ev.get("wall_time_s"),
        warnings=warnings,
        dev_curve=(summary.get("convergence") or {}).get("dev_curve") or [],
        missing_answers={w: what for w in warnings if (what := MissingAnswer.what_of(w))},
    )


def _counts_for(run: RunResult | RunOutput, domain: str) -> bool:
    """A per-domain run only counts for its own domain."""
    return run.domain is None or run.domain == domain


def setting_scores(
    runs: Sequence[RunResult], setting: str, domains: Sequence[str]
) -> SettingScores:
    """Per-domain and macro (mean over domains, per seed) summaries of one setting."""
    mine = [r for r in runs if r.setting == setting]
    seeds = sorted({r.seed for r in mine})
    per_seed: dict[int, dict[str, float]] = {s: {} for s in seeds}
    for run in mine:
        for d, score in run.scores.items():
            if _counts_for(run, d):
                per_seed[run.seed][d] = score
    columns = {d: summarize([per_seed[s][d] for s in seeds if d in per_seed[s]]) for d in domains}
    complete = [s for s in seeds if all(d in per_seed[s] for d in domains)]
    columns[MACRO] = summarize(
        [statistics.fmean(per_seed[s][d] for d in domains) for s in complete]
    )
    return SettingScores(columns, seeds, complete)


def item_matrices(
    records: Sequence[RunOutput], settings: Sequence[str], domains: Sequence[str]
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, int]]:
    """Per-item scores as ``(seeds, items)`` matrices, items aligned by id across runs.

    Where a run of the domain lacks per-item scores, or runs disagree on the item ids, the
    domain falls back to one "item" per run, its score: only seeds are resampled there.

    Returns:
        ``({setting: {domain: (S, n) array, rows in seed order}}, {domain: n, 0 = seeds only})``.
    """
    out: dict[str, dict[str, np.ndarray]] = {s: {} for s in settings}
    items: dict[str, int] = {}
    for d in domains:
        runs = [r for r in records if r.setting in out and _counts_for(r, d)]
        found = [r.items.get(d) if r.items else None for r in runs]
        ids = sorted(found[0].ids) if found and found[0] is not None else None
        aligned = ids is not None and all(f is not None and sorted(f.ids) == ids for f in found)
        rows: dict[str, list[tuple[int, list[float]]]] = {}
        for run, f in zip(runs, found):
            if aligned and f is not None:
                by_id = dict(zip(f.ids, f.scores))
                row = [by_id[i] for i in ids]  # type: ignore[union-attr]
            else:
                row = [float(run.eval.get("per_domain", {}).get(d, {}).get("score", math.nan))]
            rows.setdefault(run.setting, []).append((run.seed, row))
        for setting, seeded in rows.items():
            out[setting][d] = np.array([row for _, row in sorted(seeded)], dtype=float)
        items[d] = len(ids) if aligned and ids else 0
    return out, items


def bootstrap_replicates(
    matrices: Mapping[str, Mapping[str, np.ndarray]],
    domains: Sequence[str],
    config: BootstrapSection,
) -> Replicates:
    """Paired bootstrap replicates of every setting's score (see :mod:`.stats`).

    One item draw per domain is shared by all settings; one seed draw per setting is shared by
    all domains. The macro replicate is the mean of the domain replicates.

    Args:
        matrices: from :func:`item_matrices`.
        domains: the domains.
        config: replicates and seed.

    Returns:
        ``{setting: {column: (B,) array}}`` (a column is missing where a seed is missing).
    """
    b = config.samples
    weights = {}
    for d in domains:
        n = next((m[d].shape[1] for m in matrices.values() if d in m), 1)
        weights[d] = resampling_weights(n, b, keyed_rng(config.seed, f"items/{d}"))
    out: Replicates = {}
    for setting, per_domain in matrices.items():
        seeds = max((m.shape[0] for m in per_domain.values()), default=0)
        if seeds == 0:
            continue
        draws = seed_draws(seeds, b, keyed_rng(config.seed, f"seeds/{setting}"))
        reps = {
            d: bootstrap_means(m, weights[d], draws)
            for d, m in per_domain.items()
            if m.shape[0] == seeds and not np.isnan(m).any()
        }
        if all(d in reps for d in domains):
            reps[MACRO] = np.mean([reps[d] for d in domains], axis=0)
        out[setting] = reps
    return out


def _difference(
    a: str, b: str, col: str, scores: Mapping[str, SettingScores], reps: Replicates, conf: float
) -> Difference | None:
    """``a - b`` on ``col``: seed means, combined seed spread and the bootstrap interval."""
    if a not in scores or b not in scores:
        return None
    sa, sb = scores[a].columns[col], scores[b].columns[col]
    if sa.mean is None or sb.mean is None:
        return None
    spread = math.hypot(sa.std or 0.0, sb.std or 0.0)
    ra, rb = reps.get(a, {}).get(col), reps.get(b, {}).get(col)
    if ra is None or rb is None:
        return Difference(sa.mean - sb.mean, spread)
    low, high = percentile_interval(ra - rb, conf)
    return Difference(sa.mean - sb.mean, spread, low, high)


def _recovered_ci(col: str, reps: Replicates, conf: float) -> tuple[float, float] | None:
    """Interval of ``mole_gain / drop`` over the replicates with a positive drop.

    Only computed where the drop itself is shown (*above*, :func:`.rules.classify`): a ratio
    whose denominator may be zero has no useful interval.
    """
    single, mixed, method = (by_role(r).name for r in ("single", "mixed", "method"))
    try:
        drop = reps[single][col] - reps[mixed][col]
        gain = reps[method][col] - reps[mixed][col]
    except KeyError:
        return None
    positive = drop > 0
    if positive.mean() < 0.5:
        return None
    return percentile_interval(gain[positive] / drop[positive], conf)


def derive(
    scores: Mapping[str, SettingScores],
    reps: Replicates,
    domains: Sequence[str],
    extras: Sequence[str] = (),
    confidence: float = 0.95,
) -> dict[str, DerivedColumn]:
    """Every contrast of :data:`~.rules.CONTRASTS` (and each extra vs the mixed baseline)."""
    mixed = by_role("mixed").name
    out = {}
    for col in [*domains, MACRO]:
        contrasts = {
            c.key: _difference(
                by_role(c.plus).name, by_role(c.minus).name, col, scores, reps, confidence
            )
            for c in CONTRASTS
        }
        drop, gain = contrasts["drop"], contrasts["mole_gain"]
        recovered = gain.mean / drop.mean if drop and gain and drop.mean > 0 else None
        out[col] = DerivedColumn(
            contrasts=contrasts,
            recovered=recovered,
            recovered_ci=(
                _recovered_ci(col, reps, confidence)
                if recovered is not None and drop is not None and classify(drop) == "above"
                else None
            ),
            extra_vs_mix_lora={
                e: _difference(e, mixed, col, scores, reps, confidence)
                for e in extras
                if e in scores
            },
        )
    return out


def _train_samples(records: Sequence[RunOutput]) -> int | None:
    """Distinct training samples of one run of a setting (its first run's ``summary.json``)."""
    per_domain = records[0].summary.get("data", {}).get("per_domain") if records else None
    return int(sum(per_domain.values())) if per_domain else None


def _setup(
    study: StudyConfig, runs: Sequence[RunResult], records: Sequence[RunOutput]
) -> StudySetup:
    per_setting = {}
    for setting in study.all_settings:
        mine = [r for r in runs if r.setting == setting]
        if not mine:
            continue
        samples = _train_samples([r for r in records if r.setting == setting])
        batch = mine[0].batch_size
        epochs = mine[0].max_steps * batch / samples if samples and batch else None
        walls = [r.wall_time_s for r in mine if r.wall_time_s is not None]
        speeds = [r.tokens_per_s for r in mine if r.tokens_per_s is not None]
        per_setting[setting] = SettingSetup(
            base=mine[0].base,
            adapter=mine[0].adapter,
            max_steps=mine[0].max_steps,
            batch_size=mine[0].batch_size,
            trainable_parameters=mine[0].trainable_parameters,
            runs=len(mine),
            mean_wall_time_s=statistics.fmean(walls) if walls else None,
            mean_tokens_per_s=statistics.fmean(speeds) if speeds else None,
            train_samples=samples,
            epochs=epochs,
        )
    adapter = study.shared_adapter()
    return StudySetup(
        model=str(study.model),
        mixture=str(study.mixture),
        domains=list(study.domains),
        seeds=list(study.seeds),
        single_steps=study.single_steps,
        learning_rate=study.train.get("learning_rate"),
        max_steps=study.train.get("max_steps"),
        router_dense_warmup=study.train.get("router_dense_warmup", 0.0),
        rank=adapter["rank"],
        alpha=adapter["alpha"],
        num_experts=adapter["num_experts"],
        eval={
            "split": study.eval.split,
            "limit": study.eval.limit,
            "max_new_tokens": study.eval.max_new_tokens or _eval_default("max_new_tokens"),
        },
        convergence={"tail": study.convergence.tail, "tolerance": study.convergence.tolerance},
        settings=per_setting,
    )


def build_results(study: StudyConfig, records: Sequence[RunOutput]) -> StudyResults:
    """Everything the report shows (``to_json()`` is ``results.json``).

    Args:
        study: the study.
        records: one per finished run (:func:`llava_mole.study.runner.collect_runs`).

    Returns:
        The typed results, verdict and main table included.
    """
    domains = list(study.domains)
    conv, boot = study.convergence, study.bootstrap
    runs = [run_result(r, domains, conv.tail, conv.tolerance) for r in records]
    settings = [s for s in study.all_settings if any(r.setting == s for r in runs)]
    scores = {s: setting_scores(runs, s, domains) for s in settings}
    matrices, items = item_matrices(records, settings, domains)
    reps = bootstrap_replicates(matrices, domains, boot)
    extras = [e.name for e in study.extra_settings]
    derived = derive(scores, reps, domains, extras, boot.confidence)
    routing = {}
    for setting in settings:
        mole = [r for r in records if r.setting == setting and r.adapter["type"] == "mole"]
        if mole:
            routing[setting] = routing_summary([(r.seed, r.eval.get("routing")) for r in mole])
    results = StudyResults(
        study=study.to_dict(),
        setup=_setup(study, runs, records),
        domains=domains,
        settings=settings,
        scores=scores,
        derived=derived,
        uncertainty=Uncertainty(boot.samples, boot.confidence, boot.seed, items),
        runs=runs,
        routing=routing,
        verdict=None,
    )
    results.verdict = verdict(
        {s: v.columns for s, v in scores.items()},
        derived,
        domains,
        len(study.seeds),
        items,
        results.still_improving,
        boot.confidence,
        boot.samples,
    )
    results.table = render_table(results)
    return results


def _eval_default(name: str) -> object:
    """The evaluation's own default of `name` (imported here: the report side stays light)."""
    from ..eval.settings import EVAL_DEFAULTS

    return getattr(EVAL_DEFAULTS, name)
