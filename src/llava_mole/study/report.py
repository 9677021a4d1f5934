"""Numbers, verdict and markdown report of a data-conflict study.

Everything here is pure: :func:`build_results` turns the finished runs (their ``summary.json``
and ``eval.json``) into the ``results.json`` structure, :func:`verdict` applies the documented
decision rules (:data:`RULES`) to per-setting score statistics and :func:`render_report` writes
``report.md`` from the results alone.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .compare import StudyConfig

__all__ = [
    "MIN_EFFECT",
    "RULES",
    "build_results",
    "convergence_flag",
    "difference",
    "margin",
    "render_report",
    "render_table",
    "summarize",
    "verdict",
]

MIN_EFFECT = 0.01
"""Smallest score difference (scores are in [0, 1]) that can ever count as real."""

MACRO = "macro"

RULES: tuple[str, ...] = (
    "**Margin.** Two settings differ only if their mean scores differ by more than "
    "`margin = max(2 x the larger of their two seed standard deviations, 0.01)`. A smaller "
    "difference is reported as *within seed spread: no conclusion*.",
    "**Conflict.** Domain d shows a data conflict if `single - mix_lora > margin`. If "
    "`mix_lora - single > margin`, the mixture helps d instead.",
    "**2x control.** For a conflict, if `mix_lora_2x >= single - margin`, plain LoRA with twice "
    "the samples closes the gap: the gap looks like undertraining, not conflict.",
    "**MoLE.** MoLE mitigates a conflict on d if `mix_mole - mix_lora > margin`; "
    "`recovered = (mix_mole - mix_lora) / (single - mix_lora)` (only when the drop is positive). "
    "MoLE is worse if `mix_lora - mix_mole > margin`. It beats the 2x control if "
    "`mix_mole - mix_lora_2x > margin`.",
    "**Rank-K·r control.** When MoLE beats mix_lora, the gain is explained by parameters if "
    "`mix_lora_rank_kr >= mix_mole - margin` (MoLE's MLP parameter count, no routing); otherwise "
    "routing adds something parameters alone do not.",
    "**Caveats.** With one seed there is no spread estimate (the margin is only the 0.01 "
    "floor); runs still improving at the end make every comparison suspect of undertraining; "
    "scores near zero everywhere mean the task was not learnt and nothing can be concluded.",
)


# ---- statistics -----------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min and max of per-seed scores.

    Args:
        values: one score per seed.

    Returns:
        ``{"scores", "n", "mean", "std", "min", "max"}``; statistics are None without values.
    """
    values = [float(v) for v in values]
    if not values:
        return {"scores": [], "n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {
        "scores": values,
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def _ok(*stats: dict[str, Any] | None) -> bool:
    return all(s is not None and s.get("mean") is not None for s in stats)


def difference(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """``a - b`` of two score summaries, with the combined spread ``sqrt(std_a² + std_b²)``.

    Args:
        a: summary (:func:`summarize`) of the first setting.
        b: summary of the second setting.

    Returns:
        ``{"mean", "spread"}`` or None when either side has no scores.
    """
    if not _ok(a, b):
        return None
    assert a is not None and b is not None
    return {"mean": a["mean"] - b["mean"], "spread": math.hypot(a["std"], b["std"])}


def margin(a: dict[str, Any], b: dict[str, Any], floor: float = MIN_EFFECT) -> float:
    """The smallest difference between two settings that counts (rule **Margin**).

    Args:
        a: summary of one setting.
        b: summary of the other.
        floor: the minimum margin.

    Returns:
        ``max(2 * max(std_a, std_b), floor)``.
    """
    return max(2.0 * max(a["std"], b["std"]), floor)


def convergence_flag(
    curve: Sequence[Sequence[float]], tail: float = 0.2, tolerance: float = 0.02
) -> dict[str, Any]:
    """Whether a run's loss was still falling at the end.

    The last ``tail`` share of the logged points (at least one) is compared with the window of
    the same length just before it; the run is *still improving* when the mean loss of the last
    window is more than ``tolerance`` (relative) below the previous window's.

    Args:
        curve: ``[[step, loss], ...]`` as in ``summary.json``.
        tail: share of logged points in the final window.
        tolerance: relative drop that still counts as converged.

    Returns:
        ``{"converged", "points", "window", "tail_mean", "previous_mean", "relative_drop"}``;
        ``converged`` is None when there are fewer than 4 points or too few for two windows.
    """
    losses = [float(point[1]) for point in curve if point[1] is not None]
    window = max(1, round(tail * len(losses)))
    out: dict[str, Any] = {
        "converged": None,
        "points": len(losses),
        "window": window,
        "tail_mean": None,
        "previous_mean": None,
        "relative_drop": None,
    }
    if len(losses) < max(4, 2 * window):
        return out
    last = statistics.fmean(losses[-window:])
    previous = statistics.fmean(losses[-2 * window : -window])
    drop = (previous - last) / abs(previous) if previous != 0 else 0.0
    out.update(
        converged=drop <= tolerance, tail_mean=last, previous_mean=previous, relative_drop=drop
    )
    return out


# ---- verdict -------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _compare(
    a: dict[str, Any] | None, b: dict[str, Any] | None, floor: float
) -> tuple[float, float] | None:
    """``(a.mean - b.mean, margin)`` or None when a side is missing."""
    if not _ok(a, b):
        return None
    assert a is not None and b is not None
    return a["mean"] - b["mean"], margin(a, b, floor)


def _judge_column(
    col: dict[str, dict[str, Any] | None], name: str, floor: float
) -> dict[str, dict[str, Any]]:
    """The rule outcomes for one domain (or the macro average).

    Args:
        col: ``{setting: summary}`` for this column (missing settings: None or absent).
        name: the column's name (for the texts).
        floor: the minimum margin.

    Returns:
        ``{"conflict", "undertraining", "mole", "mole_vs_2x", "parameters"}``, each
        ``{"label", "diff", "margin", "text"}``.
    """
    single, mix, mole = col.get("single"), col.get("mix_lora"), col.get("mix_mole")
    x2, kr = col.get("mix_lora_2x"), col.get("mix_lora_rank_kr")

    def item(label: str, cmp: tuple[float, float] | None, text: str) -> dict[str, Any]:
        return {
            "label": label,
            "diff": None if cmp is None else cmp[0],
            "margin": None if cmp is None else cmp[1],
            "text": text,
        }

    out: dict[str, dict[str, Any]] = {}
    cmp = _compare(single, mix, floor)
    if cmp is None:
        out["conflict"] = item("not_run", None, "single or mix_lora not run: no conflict test")
    else:
        drop, m = cmp
        if drop > m:
            label = "conflict"
            text = (
                f"data conflict: mixing costs {name} {_fmt(drop)} "
                f"(single {_fmt(single['mean'])} vs mix_lora {_fmt(mix['mean'])}, "
                f"margin {_fmt(m)})"
            )
        elif -drop > m:
            label = "mixture_helps"
            text = f"no conflict: the mixture helps {name} by {_fmt(-drop)} (margin {_fmt(m)})"
        else:
            label = "within_spread"
            text = (
                f"single vs mix_lora {_fmt(drop, sign=True)}: within seed spread: no "
                f"conclusion (margin {_fmt(m)}); no conflict shown"
            )
        out["conflict"] = item(label, cmp, text)
    conflict = out["conflict"]["label"] == "conflict"

    cmp = _compare(x2, single, floor)
    if cmp is None:
        out["undertraining"] = item("not_run", None, "mix_lora_2x not run: undertraining untested")
    elif not conflict:
        out["undertraining"] = item("not_applicable", cmp, "no conflict to explain")
    elif cmp[0] >= -cmp[1]:
        out["undertraining"] = item(
            "closes_gap",
            cmp,
            f"mix_lora_2x reaches {_fmt(x2['mean'])} vs single {_fmt(single['mean'])}: 2x closes "
            "the gap, so the gap looks like undertraining, not conflict",
        )
    else:
        out["undertraining"] = item(
            "gap_remains",
            cmp,
            f"mix_lora_2x stays {_fmt(-cmp[0])} below single (margin {_fmt(cmp[1])}): twice the "
            "samples do not close the gap, consistent with conflict",
        )
    real_conflict = conflict and out["undertraining"]["label"] != "closes_gap"

    cmp = _compare(mole, mix, floor)
    if cmp is None:
        out["mole"] = item("not_run", None, "mix_mole or mix_lora not run")
    else:
        gain, m = cmp
        if gain > m:
            if real_conflict:
                drop = out["conflict"]["diff"]
                label = "mitigates"
                text = (
                    f"MoLE mitigates the conflict: {_fmt(gain, sign=True)} over mix_lora, "
                    f"recovering {100 * gain / drop:.0f}% of the drop"
                )
            elif conflict:
                label = "improves"
                text = (
                    f"MoLE improves on mix_lora by {_fmt(gain)}, but 2x closes the gap too: "
                    "this may be faster learning, not conflict mitigation"
                )
            else:
                label, text = "improves", f"MoLE improves on mix_lora by {_fmt(gain)}"
        elif -gain > m:
            label, text = "worse", f"MoLE is worse than mix_lora by {_fmt(-gain)}"
        else:
            label = "within_spread"
            text = (
                f"MoLE vs mix_lora {_fmt(gain, sign=True)}: within seed spread: no conclusion "
                f"(margin {_fmt(m)})"
            )
        out["mole"] = item(label, cmp, text)
    mole_gain = out["mole"]["label"] in ("mitigates", "improves")

    cmp = _compare(mole, x2, floor)
    if cmp is None:
        out["mole_vs_2x"] = item("not_run", None, "mix_mole or mix_lora_2x not run")
    elif cmp[0] > cmp[1]:
        out["mole_vs_2x"] = item(
            "better", cmp, f"MoLE beats plain LoRA with 2x the samples by {_fmt(cmp[0])}"
        )
    elif -cmp[0] > cmp[1]:
        out["mole_vs_2x"] = item(
            "worse", cmp, f"plain LoRA with 2x the samples beats MoLE by {_fmt(-cmp[0])}"
        )
    else:
        out["mole_vs_2x"] = item(
            "within_spread",
            cmp,
            f"MoLE vs mix_lora_2x {_fmt(cmp[0], sign=True)}: within seed spread: no conclusion "
            f"(margin {_fmt(cmp[1])})",
        )

    cmp = _compare(kr, mole, floor)
    if cmp is None:
        out["parameters"] = item("not_run", None, "mix_lora_rank_kr or mix_mole not run")
    elif not mole_gain:
        out["parameters"] = item("not_applicable", cmp, "no MoLE gain to explain")
    elif cmp[0] >= -cmp[1]:
        out["parameters"] = item(
            "explained_by_parameters",
            cmp,
            f"rank-K·r LoRA reaches {_fmt(kr['mean'])} vs MoLE {_fmt(mole['mean'])}: the gain is "
            "explained by parameters, not routing",
        )
    else:
        out["parameters"] = item(
            "beyond_parameters",
            cmp,
            f"rank-K·r LoRA stays {_fmt(-cmp[0])} below MoLE: routing adds more than the extra "
            "parameters",
        )
    return out


def _names(items: Iterable[str]) -> str:
    items = list(items)
    return ", ".join(items) if items else "none"


def verdict(
    scores: dict[str, dict[str, dict[str, Any] | None]],
    domains: Sequence[str],
    seeds: int,
    still_improving: Sequence[str] = (),
    floor: float = MIN_EFFECT,
) -> dict[str, Any]:
    """Apply :data:`RULES` to per-setting score summaries.

    Args:
        scores: ``{setting: {domain or "macro": summary}}`` (:func:`summarize` dicts); the
            built-in setting names are looked up, others are ignored.
        domains: the domains, in order.
        seeds: seeds per setting (1: no spread estimate).
        still_improving: ids of runs flagged as still improving.
        floor: the minimum margin.

    Returns:
        ``{"columns": {column: rule outcomes}, "lines": [plain-language sentences],
        "conflict_domains", "undertrained_domains", "mitigated_domains", "rules"}``.
    """
    columns = list(domains) + [MACRO]
    judged = {
        c: _judge_column({s: scores.get(s, {}).get(c) for s in scores}, c, floor) for c in columns
    }
    doms = list(domains)

    def having(rule: str, label: str) -> list[str]:
        return [d for d in doms if judged[d][rule]["label"] == label]

    conflict = having("conflict", "conflict")
    undertrained = [d for d in conflict if judged[d]["undertraining"]["label"] == "closes_gap"]
    real = [d for d in conflict if d not in undertrained]
    mitigated = [d for d in real if judged[d]["mole"]["label"] == "mitigates"]
    lines: list[str] = []
    if seeds < 2:
        lines.append(
            "Only one seed: there is no estimate of seed spread, so every difference below is "
            "tested against the 0.01 floor only. Treat it as anecdotal; use >= 3 seeds."
        )
    means = [
        s["mean"]
        for per in scores.values()
        for s in per.values()
        if s is not None and s.get("mean") is not None
    ]
    if means and max(means) < 0.05:
        lines.append(
            "Every setting scores below 0.05: the task was not learnt, so nothing here is "
            "evidence either way."
        )
    if judged[doms[0]]["conflict"]["label"] == "not_run":
        lines.append("single or mix_lora was not run: the conflict question cannot be answered.")
    elif not conflict:
        helps = having("conflict", "mixture_helps")
        text = (
            "No data conflict shows: on every domain plain LoRA on the mixture is within seed "
            "spread of single-domain LoRA"
        )
        text += f" or better (the mixture helps {_names(helps)})." if helps else "."
        lines.append(text)
    else:
        drops = ", ".join(
            f"{d} ({_fmt(judged[d]['conflict']['diff'], sign=False)})" for d in conflict
        )
        lines.append(f"Plain LoRA on the mixture scores below single-domain LoRA on: {drops}.")
        if undertrained:
            lines.append(
                f"On {_names(undertrained)} twice the training samples close the gap: it looks "
                "like undertraining, not conflict."
            )
        if real:
            untested = [d for d in real if judged[d]["undertraining"]["label"] == "not_run"]
            lines.append(
                f"Data conflict on {_names(real)}"
                + (f" (2x control not run for {_names(untested)})." if untested else ".")
            )
        for d in real:
            lines.append(f"{d}: {judged[d]['mole']['text']}.")
        for d in mitigated:
            params = judged[d]["parameters"]
            if params["label"] in ("explained_by_parameters", "beyond_parameters"):
                lines.append(f"{d}: {params['text']}.")
    worse = having("mole", "worse")
    if worse:
        lines.append(f"MoLE is worse than plain LoRA on the mixture on {_names(worse)}.")
    improves = [d for d in having("mole", "improves") if d not in conflict]
    if improves:
        lines.append(
            f"MoLE improves on plain LoRA without a conflict to fix on {_names(improves)}."
        )
    beats = having("mole_vs_2x", "better")
    if beats:
        lines.append(f"MoLE beats plain LoRA trained on 2x the samples on {_names(beats)}.")
    macro = judged[MACRO]
    if macro["mole"]["label"] != "not_run":
        lines.append(f"Macro average: {macro['conflict']['text']}; {macro['mole']['text']}.")
    if still_improving:
        lines.append(
            f"{len(still_improving)} run(s) were still improving at the end "
            f"({_names(list(still_improving)[:5])}{', ...' if len(still_improving) > 5 else ''}): "
            "differences may reflect undertraining; train longer before trusting them."
        )
    return {
        "columns": judged,
        "lines": lines,
        "conflict_domains": conflict,
        "undertrained_domains": undertrained,
        "mitigated_domains": mitigated,
        "rules": list(RULES),
    }


# ---- results -------------------------------------------------------------------------------


# Token kinds of a routing picture (see ``eval.generate``): ``answer`` is a subset of ``text``.
PICTURE_KINDS = ("text", "image", "answer")


def _routing_recipe(dense_warmup: float) -> str:
    """The setup line that says how MoLE's routers were trained."""
    if not dense_warmup:
        return "- MoLE routing: top-1 from the first step (the paper's recipe)"
    return (
        f"- MoLE routing: dense (every expert, weighted by its router probability) for the first "
        f"{dense_warmup:.0%} of the steps, then top-1 (`train.router_dense_warmup = "
        f"{dense_warmup:g}`); plain LoRA has no router"
    )


def _separation(blocks: list[dict[str, Any]], block: int, kind: str) -> float | None:
    """Mean pairwise total-variation distance of the domains' expert shares in one block."""
    rows = [b[kind] for b in blocks if b["block"] == block and b.get(kind) is not None]
    pairs = [
        0.5 * sum(abs(x - y) for x, y in zip(p, q))
        for i, p in enumerate(rows)
        for q in rows[i + 1 :]
    ]
    return statistics.fmean(pairs) if pairs else None


def _routing_summary(evals: list[tuple[int, dict[str, Any] | None]]) -> dict[str, Any] | None:
    """The routing picture of one MoLE setting over its seeds.

    Expert numbering is arbitrary in each run (expert 0 of one seed has nothing to do with
    expert 0 of another), so shares are never averaged over seeds: the cells show the first
    seed's routing, and the separation is computed within each seed, then averaged.

    Args:
        evals: ``(seed, routing statistics or None)`` of each run of the setting.
    """
    pictures = sorted(((seed, e) for seed, e in evals if e), key=lambda item: item[0])
    if not pictures:
        return None
    shown_seed, shown = pictures[0]
    experts = shown["experts"]
    blocks = []
    for entry in sorted(
        shown["blocks"], key=lambda b: (b["block"], shown["domains"].index(b["domain"]))
    ):
        blocks.append(
            {
                "block": entry["block"],
                "domain": entry["domain"],
                **{kind: entry.get(kind) for kind in PICTURE_KINDS},
                **{f"{k}_tokens": entry.get(f"{k}_tokens", 0) for k in PICTURE_KINDS},
            }
        )
    separation = []
    per_seed = []
    for block in sorted({b["block"] for b in blocks}):
        row: dict[str, Any] = {"block": block}
        seed_row: dict[str, Any] = {"block": block}
        for kind in PICTURE_KINDS:
            values = [_separation(p["blocks"], block, kind) for _, p in pictures]
            values = [v for v in values if v is not None]
            row[kind] = statistics.fmean(values) if values else None
            seed_row[kind] = values or None
        separation.append(row)
        per_seed.append(seed_row)
    return {
        "experts": experts,
        "domains": list(shown["domains"]),
        "seeds": len(pictures),
        "shown_seed": shown_seed,
        "blocks": blocks,
        # Mean over seeds of each seed's mean pairwise total-variation distance between the
        # domains' expert shares per block: 0 = every domain uses the experts alike, 1 = domains
        # use disjoint experts.
        "separation": separation,
        "separation_per_seed": per_seed,
    }


def _run_record(record: dict[str, Any], domains: list[str], tail: float, tol: float) -> dict:
    summary, ev = record["summary"], record["eval"]
    curve = summary.get("loss_curve") or []
    flag = convergence_flag(curve, tail, tol)
    final = summary.get("final", {}).get("loss")
    per_domain = ev.get("per_domain", {})
    return {
        "id": record["id"],
        "setting": record["setting"],
        "base": record["base"],
        "domain": record["domain"],
        "seed": record["seed"],
        "run_dir": record["run_dir"],
        "adapter": record["adapter"],
        "max_steps": record["max_steps"],
        "steps": summary.get("steps"),
        "batch_size": record.get("batch_size"),
        "loss_curve": curve,
        "final_loss": curve[-1][1] if curve else final,
        "convergence": flag,
        "converged": flag["converged"],
        "wall_time_s": summary.get("wall_time_s"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "trainable_parameters": summary.get("trainable_parameters"),
        "scores": {d: per_domain[d]["score"] for d in domains if d in per_domain},
        "eval_n": {d: per_domain[d]["n"] for d in domains if d in per_domain},
        "eval_wall_time_s": ev.get("wall_time_s"),
    }


def _setting_scores(runs: list[dict[str, Any]], setting: str, domains: list[str]) -> dict:
    """Per-domain and macro summaries of one setting over seeds."""
    mine = [r for r in runs if r["setting"] == setting]
    seeds = sorted({r["seed"] for r in mine})
    per_seed: dict[int, dict[str, float]] = {s: {} for s in seeds}
    for run in mine:
        for d, score in run["scores"].items():
            # A single-domain run only counts for its own domain.
            if run["domain"] is None or run["domain"] == d:
                per_seed[run["seed"]][d] = score
    out: dict[str, Any] = {}
    for d in domains:
        out[d] = summarize([per_seed[s][d] for s in seeds if d in per_seed[s]])
    macro = [
        statistics.fmean(per_seed[s][d] for d in domains)
        for s in seeds
        if all(d in per_seed[s] for d in domains)
    ]
    out[MACRO] = summarize(macro)
    out["seeds"] = seeds
    return out


def _setup(study: StudyConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    per_setting = {}
    for setting in study.all_settings:
        mine = [r for r in runs if r["setting"] == setting]
        if not mine:
            continue
        first = mine[0]
        walls = [r["wall_time_s"] for r in mine if r["wall_time_s"] is not None]
        speeds = [r["tokens_per_s"] for r in mine if r["tokens_per_s"] is not None]
        per_setting[setting] = {
            "base": first["base"],
            "adapter": first["adapter"],
            "max_steps": first["max_steps"],
            "batch_size": first["batch_size"],
            "trainable_parameters": first["trainable_parameters"],
            "runs": len(mine),
            "mean_wall_time_s": statistics.fmean(walls) if walls else None,
            "mean_tokens_per_s": statistics.fmean(speeds) if speeds else None,
        }
    adapter = study.shared_adapter()
    return {
        "model": str(study.model),
        "mixture": str(study.mixture),
        "domains": list(study.domains),
        "seeds": list(study.seeds),
        "single_steps": study.single_steps,
        "learning_rate": study.train.get("learning_rate"),
        "max_steps": study.train.get("max_steps"),
        "router_dense_warmup": study.train.get("router_dense_warmup", 0.0),
        "rank": adapter["rank"],
        "alpha": adapter["alpha"],
        "num_experts": adapter["num_experts"],
        "eval": {
            "split": study.eval.split,
            "limit": study.eval.limit,
            "max_new_tokens": study.eval.max_new_tokens,
        },
        "convergence": {"tail": study.convergence.tail, "tolerance": study.convergence.tolerance},
        "settings": per_setting,
    }


def build_results(study: StudyConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the report shows, as one JSON-friendly dict (``results.json``).

    Args:
        study: the study.
        records: one per run, from :func:`llava_mole.study.compare.collect_runs`.

    Returns:
        ``{"setup", "domains", "settings", "scores", "derived", "runs", "still_improving",
        "routing", "verdict", "table", "study"}``.
    """
    domains = list(study.domains)
    tail, tol = study.convergence.tail, study.convergence.tolerance
    runs = [_run_record(r, domains, tail, tol) for r in records]
    settings = [s for s in study.all_settings if any(r["setting"] == s for r in runs)]
    scores = {s: _setting_scores(runs, s, domains) for s in settings}

    derived: dict[str, Any] = {}
    for col in domains + [MACRO]:
        get = {s: scores[s][col] for s in settings}
        drop = difference(get.get("single"), get.get("mix_lora"))
        gain = difference(get.get("mix_mole"), get.get("mix_lora"))
        derived[col] = {
            "drop": drop,
            "mole_gain": gain,
            "recovered": (
                gain["mean"] / drop["mean"] if drop and gain and drop["mean"] > 0 else None
            ),
            "x2_gain": difference(get.get("mix_lora_2x"), get.get("mix_lora")),
            "x2_vs_single": difference(get.get("mix_lora_2x"), get.get("single")),
            "mole_vs_x2": difference(get.get("mix_mole"), get.get("mix_lora_2x")),
            "rank_kr_gain": difference(get.get("mix_lora_rank_kr"), get.get("mix_lora")),
            "rank_kr_vs_mole": difference(get.get("mix_lora_rank_kr"), get.get("mix_mole")),
            "extra_vs_mix_lora": {
                e.name: difference(get.get(e.name), get.get("mix_lora"))
                for e in study.extra_settings
                if e.name in get
            },
        }

    routing = {}
    for setting in settings:
        mole_runs = [
            r for r in records if r["setting"] == setting and r["adapter"]["type"] == "mole"
        ]
        if mole_runs:
            routing[setting] = _routing_summary(
                [(r["seed"], r["eval"].get("routing")) for r in mole_runs]
            )

    still = [r["id"] for r in runs if r["converged"] is False]
    results: dict[str, Any] = {
        "study": study.to_dict(),
        "setup": _setup(study, runs),
        "domains": domains,
        "settings": settings,
        "scores": scores,
        "derived": derived,
        "runs": runs,
        "still_improving": still,
        "not_judged": [r["id"] for r in runs if r["converged"] is None],
        "routing": routing,
        "verdict": verdict(
            {s: {c: scores[s][c] for c in domains + [MACRO]} for s in settings},
            domains,
            len(study.seeds),
            still,
        ),
    }
    results["table"] = render_table(results)
    return results


# ---- markdown ------------------------------------------------------------------------------


def _cell(stat: dict[str, Any] | None) -> str:
    if not _ok(stat):
        return "–"
    assert stat is not None
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def _diff_cell(diff: dict[str, Any] | None) -> str:
    if diff is None:
        return "–"
    return f"{diff['mean']:+.3f} ± {diff['spread']:.3f}"


def render_table(results: dict[str, Any]) -> str:
    """The main table: rows = settings, columns = domains + macro, cells ``mean ± std``.

    Args:
        results: as returned by :func:`build_results`.

    Returns:
        A markdown table.
    """
    columns = results["domains"] + [MACRO]
    lines = [
        "| setting | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for setting in results["settings"]:
        cells = [_cell(results["scores"][setting][c]) for c in columns]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _derived_table(results: dict[str, Any]) -> str:
    header = (
        "| | drop = single − mix_lora | MoLE gain = mix_mole − mix_lora | recovered "
        "| mix_lora_2x − single | rank-K·r − mix_mole |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for col in results["domains"] + [MACRO]:
        d = results["derived"][col]
        recovered = "–" if d["recovered"] is None else f"{100 * d['recovered']:.0f}%"
        lines.append(
            f"| {col} | {_diff_cell(d['drop'])} | {_diff_cell(d['mole_gain'])} | {recovered} "
            f"| {_diff_cell(d['x2_vs_single'])} | {_diff_cell(d['rank_kr_vs_mole'])} |"
        )
    return "\n".join(lines)


def _setup_table(results: dict[str, Any]) -> str:
    lines = [
        "| setting | adapter | steps | batch | trainable params | runs | s/run | tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in results["setup"]["settings"].items():
        a = s["adapter"]
        mlp_rank = a.get("mlp_rank")
        mlp = f", MLP r={mlp_rank}" if mlp_rank not in (None, a["rank"]) else ""
        kind = (
            f"MoLE K={a['num_experts']} r={a['rank']} α={a['alpha']:g}"
            if a["type"] == "mole"
            else f"LoRA r={a['rank']}{mlp} α={a['alpha']:g}"
        )
        params = "–" if s["trainable_parameters"] is None else f"{s['trainable_parameters']:,}"
        wall = "–" if s["mean_wall_time_s"] is None else f"{s['mean_wall_time_s']:.1f}"
        speed = "–" if s["mean_tokens_per_s"] is None else f"{s['mean_tokens_per_s']:.0f}"
        lines.append(
            f"| {name} | {kind} | {s['max_steps']} | {s['batch_size']} | {params} | {s['runs']} "
            f"| {wall} | {speed} |"
        )
    return "\n".join(lines)


def _routing_section(results: dict[str, Any]) -> list[str]:
    out = ["## Routing", ""]
    if not results["routing"]:
        return out + ["No MoLE runs in this study.", ""]
    if "routing.png" in results.get("plots", {}).values():
        out += ["![routing](routing.png)", ""]
    for setting, picture in results["routing"].items():
        if picture is None:
            out += [f"{setting}: no routing statistics recorded.", ""]
            continue
        shown = picture.get("shown_seed")
        out += [
            f"**{setting}** ({picture['experts']} experts). Cells: the expert most used by the "
            f"domain's tokens and its share, in the run with seed {shown} (expert numbers are "
            "arbitrary in each run, so shares are not averaged over seeds). Token kinds: image, "
            "text (all text tokens) and answer (the text positions that predict the reference "
            "answer, where the domain-specific mapping is produced). *Separation*: mean "
            "pairwise total-variation distance between the domains' expert shares (0 = all "
            "domains routed alike, 1 = disjoint experts), computed in each run and averaged "
            f"over the {picture['seeds']} seed(s).",
            "",
            "| block | tokens | " + " | ".join(picture["domains"]) + " | separation |",
            "|---|---|" + "---|" * len(picture["domains"]) + "---:|",
        ]
        for sep in picture["separation"]:
            for kind in ("image", "text", "answer"):
                if sep.get(kind) is None and kind == "answer":
                    continue  # older results, or no answer positions recorded
                cells = []
                for domain in picture["domains"]:
                    entry = next(
                        b
                        for b in picture["blocks"]
                        if b["block"] == sep["block"] and b["domain"] == domain
                    )
                    shares = entry.get(kind)
                    if shares is None:
                        cells.append("–")
                    else:
                        top = max(range(len(shares)), key=shares.__getitem__)
                        cells.append(f"E{top} {100 * shares[top]:.0f}%")
                out.append(
                    f"| {sep['block']} | {kind} | "
                    + " | ".join(cells)
                    + f" | {_fmt(sep[kind], 2)} |"
                )
        out.append("")
    return out


def render_report(results: dict[str, Any]) -> str:
    """``report.md``: setup, main table, drop/recovery table, convergence, plots, verdict.

    Args:
        results: as returned by :func:`build_results` (with ``plots`` added by the study).

    Returns:
        The markdown text.
    """
    setup = results["setup"]
    plots = results.get("plots", {})
    lines = [
        "# LLaVA-MoLE data-conflict study",
        "",
        "## Setup",
        "",
        f"- model: `{setup['model']}`",
        f"- mixture: `{setup['mixture']}`; domains: {', '.join(setup['domains'])}",
        f"- seeds: {setup['seeds']} (cells are mean ± sample std over seeds)",
        f"- single-domain steps: {setup['single_steps']}; learning rate: {setup['learning_rate']}",
    ]
    lines += [
        f"- shared adapter: rank r = {setup['rank']}, alpha = {setup['alpha']:g}, experts "
        f"K = {setup['num_experts']}; mixture steps: {setup['max_steps']}",
        _routing_recipe(setup.get("router_dense_warmup") or 0.0),
        f"- evaluation: {setup['eval']['split']} split, limit {setup['eval']['limit']} per "
        f"domain, {setup['eval']['max_new_tokens']} new tokens",
        "",
        _setup_table(results),
        "",
        "## Scores",
        "",
        results["table"],
        "",
    ]
    if "scores.png" in plots.values():
        lines += ["![scores](scores.png)", ""]
    lines += [
        "## Drop and recovery",
        "",
        "Differences of means ± combined spread `sqrt(std_a² + std_b²)`.",
        "",
        _derived_table(results),
        "",
        "## Verdict",
        "",
    ]
    lines += [f"- {line}" for line in results["verdict"]["lines"]]
    lines += ["", "Per domain:", ""]
    for col, judged in results["verdict"]["columns"].items():
        texts = [
            judged[rule]["text"]
            for rule in ("conflict", "undertraining", "mole", "mole_vs_2x", "parameters")
            if judged[rule]["label"] not in ("not_run", "not_applicable")
        ]
        lines.append(f"- **{col}**: " + ("; ".join(texts) if texts else "nothing to compare") + ".")
    lines += ["", "Rules applied:", ""]
    lines += [f"{i}. {rule}" for i, rule in enumerate(results["verdict"]["rules"], 1)]
    conv = setup["convergence"]
    lines += [
        "",
        "## Convergence",
        "",
        f"A run is *still improving* when its mean loss over the last {100 * conv['tail']:.0f}% "
        f"of logged steps is more than {100 * conv['tolerance']:.1f}% below the mean of the "
        "window before.",
        "",
    ]
    by_id = {r["id"]: r for r in results["runs"]}
    if results["still_improving"]:
        for run_id in results["still_improving"]:
            c = by_id[run_id]["convergence"]
            lines.append(
                f"- `{run_id}`: last-window loss {c['tail_mean']:.4f}, "
                f"{100 * c['relative_drop']:.1f}% below the window before"
            )
    else:
        lines.append("- no judged run was still improving at the end.")
    if results["not_judged"]:
        lines.append(
            f"- not judged (fewer than 4 logged loss points): {len(results['not_judged'])} run(s)"
        )
    if "loss_curves.png" in plots.values():
        lines += ["", "![loss curves](loss_curves.png)"]
    lines += [""] + _routing_section(results)
    return "\n".join(lines).rstrip() + "\n"
