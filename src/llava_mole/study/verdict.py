"""The verdict: :data:`~llava_mole.study.rules.RULES` applied to every column, then sentences.

Pure: reads score summaries (:class:`~llava_mole.study.stats.ScoreSummary`) and differences
with intervals (:class:`~llava_mole.study.results.DerivedColumn`), returns a :class:`Verdict`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .results import MACRO, DerivedColumn, Difference
from .rules import CONTRAST, MIN_EFFECT, RULES, Rule, classify, role_names, rules_prose
from .settings import by_role
from .stats import ScoreSummary

__all__ = ["Judgement", "Verdict", "judge_column", "verdict"]


@dataclass(frozen=True)
class Judgement:
    """One rule's outcome on one column.

    Args:
        label: the outcome's label (``not_run`` / ``not_applicable`` when not judged).
        diff: the contrast's mean difference (None when not run).
        ci: its interval (None when not run).
        text: the sentence the report shows.
    """

    label: str
    diff: float | None
    ci: tuple[float, float] | None
    text: str

    def to_json(self) -> dict[str, Any]:
        """``{"label", "diff", "ci", "text"}``."""
        return {
            "label": self.label,
            "diff": self.diff,
            "ci": None if self.ci is None else list(self.ci),
            "text": self.text,
        }


@dataclass
class Verdict:
    """Rule outcomes per column and the plain-language summary."""

    columns: dict[str, dict[str, Judgement]]
    lines: list[str]
    conflict_domains: list[str]
    undertrained_domains: list[str]
    mitigated_domains: list[str]
    rules: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """As in ``results.json``."""
        return {
            "columns": {c: {r: j.to_json() for r, j in v.items()} for c, v in self.columns.items()},
            "lines": list(self.lines),
            "conflict_domains": list(self.conflict_domains),
            "undertrained_domains": list(self.undertrained_domains),
            "mitigated_domains": list(self.mitigated_domains),
            "rules": list(self.rules),
        }


def _fmt(value: float | None, digits: int = 3, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _ci_text(diff: Difference, confidence: float) -> str:
    if diff.low is None or diff.high is None:
        return "no interval"
    return f"{100 * confidence:g}% CI [{diff.low:+.3f}, {diff.high:+.3f}]"


def _fields(
    col: str, diff: Difference, means: tuple[Any, Any], extra: dict[str, str]
) -> dict[str, str]:
    """The template fields of one outcome text."""
    return {
        **extra,
        "col": col,
        "diff": _fmt(diff.mean),
        "sdiff": _fmt(diff.mean, sign=True),
        "neg": _fmt(-diff.mean),
        "a": _fmt(means[0]),
        "b": _fmt(means[1]),
    }


def _judge(
    rule: Rule,
    col: str,
    diff: Difference | None,
    means: tuple[Any, Any],
    decided: dict[str, str],
    extra: dict[str, str],
) -> Judgement:
    """One rule on one column, given the labels of the rules decided before it."""
    names = role_names()
    if diff is None:
        return Judgement("not_run", None, None, rule.not_run.format(**names))
    ci = None if diff.low is None or diff.high is None else (diff.low, diff.high)
    if not all(c.holds(decided) for c in rule.requires):
        return Judgement("not_applicable", diff.mean, ci, rule.not_applicable)
    sign = classify(diff, float(extra["floor"]))
    for outcome in rule.outcomes:
        if sign in outcome.signs and all(c.holds(decided) for c in outcome.when):
            text = outcome.text.format(**names, **_fields(col, diff, means, extra))
            return Judgement(outcome.label, diff.mean, ci, text)
    raise AssertionError(f"rule {rule.name}: no outcome for {sign}")  # pragma: no cover


def judge_column(
    col: str,
    means: Mapping[str, float | None],
    derived: DerivedColumn,
    within: str,
    confidence: float = 0.95,
    floor: float = MIN_EFFECT,
) -> dict[str, Judgement]:
    """Every rule of :data:`RULES` on one column, in order.

    Args:
        col: the column's name (for the texts).
        means: ``{role: mean score}`` of the built-in settings on this column.
        derived: the column's differences with intervals.
        within: what was resampled, for the *within* texts (``within seed spread``).
        confidence: the intervals' coverage (for the texts).
        floor: the smallest difference that counts.

    Returns:
        ``{rule name: judgement}``.
    """
    decided: dict[str, str] = {}
    out: dict[str, Judgement] = {}
    drop = derived.contrasts.get("drop")
    for rule in RULES:
        contrast = CONTRAST[rule.contrast]
        diff = derived.contrasts.get(rule.contrast)
        extra = {"within": within, "floor": str(floor), "recovered": "n/a", "ci": "n/a"}
        if diff is not None:
            extra["ci"] = _ci_text(diff, confidence)
            if drop is not None and drop.mean > 0:
                extra["recovered"] = f"{100 * diff.mean / drop.mean:.0f}%"
        pair = (means.get(contrast.plus), means.get(contrast.minus))
        out[rule.name] = _judge(rule, col, diff, pair, decided, extra)
        decided[rule.name] = out[rule.name].label
    return out


def _names(items: Iterable[str]) -> str:
    items = list(items)
    return ", ".join(items) if items else "none"


def _conflict_lines(judged: dict[str, dict[str, Judgement]], doms: list[str]) -> list[str]:
    """What the conflict, 2x, MoLE and rank-K·r rules found per domain."""
    conflict = [d for d in doms if judged[d]["conflict"].label == "conflict"]
    if not conflict:
        helps = [d for d in doms if judged[d]["conflict"].label == "mixture_helps"]
        text = (
            "No data conflict shows: on every domain plain LoRA on the mixture is within "
            "uncertainty of single-domain LoRA"
        )
        return [text + (f" or better (the mixture helps {_names(helps)})." if helps else ".")]
    drops = ", ".join(f"{d} ({_fmt(judged[d]['conflict'].diff)})" for d in conflict)
    lines = [f"Plain LoRA on the mixture scores below single-domain LoRA on: {drops}."]
    undertrained = [d for d in conflict if judged[d]["undertraining"].label == "closes_gap"]
    real = [d for d in conflict if d not in undertrained]
    if undertrained:
        lines.append(
            f"On {_names(undertrained)} twice the training steps close the gap: it looks "
            "like undertraining, not conflict."
        )
    if real:
        untested = [d for d in real if judged[d]["undertraining"].label == "not_run"]
        lines.append(
            f"Data conflict on {_names(real)}"
            + (f" (2x control not run for {_names(untested)})." if untested else ".")
        )
    lines += [f"{d}: {judged[d]['mole'].text}." for d in real]
    for d in real:
        params = judged[d]["parameters"]
        if judged[d]["mole"].label == "mitigates" and params.label != "not_run":
            lines.append(f"{d}: {params.text}.")
    return lines


def _summary_lines(
    judged: dict[str, dict[str, Judgement]], doms: list[str], still: Sequence[str]
) -> list[str]:
    """MoLE's standing beyond the conflict domains, the macro average and convergence."""

    def having(rule: str, label: str) -> list[str]:
        return [d for d in doms if judged[d][rule].label == label]

    conflict = having("conflict", "conflict")
    lines = []
    if worse := having("mole", "worse"):
        lines.append(f"MoLE is worse than plain LoRA on the mixture on {_names(worse)}.")
    if improves := [d for d in having("mole", "improves") if d not in conflict]:
        lines.append(
            f"MoLE improves on plain LoRA without a conflict to fix on {_names(improves)}."
        )
    if beats := having("mole_vs_2x", "better"):
        lines.append(f"MoLE beats plain LoRA trained on 2x the steps on {_names(beats)}.")
    macro = judged[MACRO]
    if macro["mole"].label != "not_run":
        lines.append(f"Macro average: {macro['conflict'].text}; {macro['mole'].text}.")
    if still:
        shown = _names(list(still)[:5]) + (", ..." if len(still) > 5 else "")
        lines.append(
            f"{len(still)} run(s) were still improving at the end ({shown}): differences may "
            "reflect undertraining; train longer before trusting them."
        )
    return lines


def verdict(
    scores: Mapping[str, Mapping[str, ScoreSummary]],
    derived: Mapping[str, DerivedColumn],
    domains: Sequence[str],
    seeds: int,
    items: Mapping[str, int] | None = None,
    still_improving: Sequence[str] = (),
    confidence: float = 0.95,
    samples: int = 2000,
    floor: float = MIN_EFFECT,
) -> Verdict:
    """Apply :data:`~llava_mole.study.rules.RULES` to every domain and the macro average.

    Args:
        scores: ``{setting: {column: summary}}``; the built-in settings are read by role,
            others are ignored.
        derived: ``{column: differences with intervals}``.
        domains: the domains, in order.
        seeds: seeds per setting (1: no seed spread in the intervals).
        items: test items resampled per domain (0 or missing: seeds only).
        still_improving: ids of runs flagged as still improving.
        confidence: the intervals' coverage.
        samples: bootstrap replicates (for the rules prose).
        floor: the smallest difference that counts.

    Returns:
        The verdict.
    """
    items = items or {}
    doms = list(domains)
    judged = {}
    for col in [*doms, MACRO]:
        with_items = all(items.get(d, 0) > 0 for d in (doms if col == MACRO else [col]))
        within = "within seed and test-item spread" if with_items else "within seed spread"
        means = {}
        for role in ("single", "mixed", "method", "steps_control", "parameters_control"):
            stat = scores.get(by_role(role).name, {}).get(col)  # type: ignore[arg-type]
            means[role] = stat.mean if stat is not None else None
        judged[col] = judge_column(col, means, derived[col], within, confidence, floor)
    return Verdict(
        columns=judged,
        lines=_lines(scores, judged, doms, seeds, still_improving),
        conflict_domains=[d for d in doms if judged[d]["conflict"].label == "conflict"],
        undertrained_domains=[
            d
            for d in doms
            if judged[d]["conflict"].label == "conflict"
            and judged[d]["undertraining"].label == "closes_gap"
        ],
        mitigated_domains=[d for d in doms if judged[d]["mole"].label == "mitigates"],
        rules=rules_prose(confidence, samples),
    )


def _lines(
    scores: Mapping[str, Mapping[str, ScoreSummary]],
    judged: dict[str, dict[str, Judgement]],
    doms: list[str],
    seeds: int,
    still: Sequence[str],
) -> list[str]:
    """The verdict's sentences: caveats first, then the findings."""
    lines: list[str] = []
    if seeds < 2:
        lines.append(
            "Only one seed: there is no estimate of seed spread, so the intervals below cover "
            "test-item sampling only. Treat it as anecdotal; use >= 3 seeds."
        )
    means = [s.mean for per in scores.values() for s in per.values() if s.mean is not None]
    if means and max(means) < 0.05:
        lines.append(
            "Every setting scores below 0.05: the task was not learnt, so nothing here is "
            "evidence either way."
        )
    if judged[doms[0]]["conflict"].label == "not_run":
        names = role_names()
        lines.append(
            f"{names['single']} or {names['mixed']} was not run: the conflict question cannot "
            "be answered."
        )
    else:
        lines += _conflict_lines(judged, doms)
    return lines + _summary_lines(judged, doms, still)
