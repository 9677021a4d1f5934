"""The verdict's rules as data: the contrasts it reads and, per rule, its outcomes.

A :class:`Contrast` is a difference of two settings, named by their verdict *roles*
(:data:`llava_mole.study.settings.Role`); a :class:`Rule` classifies one contrast on one column
(a domain or the macro average) as *above*, *below* or *within* (:func:`classify`) and picks the
first :class:`Outcome` whose signs and conditions on earlier rules hold. The rules prose of the
report (:func:`rules_prose`) is generated from these objects, so what the report says is what
the code does. :mod:`llava_mole.study.verdict` applies them.

**Classification** (replaces the earlier ``2 x max seed std`` margin): with the bootstrap
interval ``[low, high]`` of a contrast (:mod:`llava_mole.study.stats`) and its mean difference
``m``, the contrast is *above* when ``low > 0`` and ``m > 0.01``, *below* when ``high < 0`` and
``m < -0.01``, and *within* otherwise. The 0.01 floor (scores are in [0, 1]) keeps tiny but
precisely measured differences from counting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .results import Difference
from .settings import REGISTRY, Role, by_role

__all__ = [
    "CONTRASTS",
    "MIN_EFFECT",
    "RULES",
    "Condition",
    "Contrast",
    "Outcome",
    "Rule",
    "classify",
    "rules_prose",
]

MIN_EFFECT = 0.01
"""Smallest score difference (scores are in [0, 1]) that can ever count as real."""

Sign = Literal["above", "below", "within"]


@dataclass(frozen=True)
class Contrast:
    """``plus - minus`` of the settings in two roles, under ``key`` in ``results.derived``."""

    key: str
    plus: Role
    minus: Role

    @property
    def formula(self) -> str:
        """``single − mix_lora`` (setting names from the registry)."""
        return f"{by_role(self.plus).name} − {by_role(self.minus).name}"


CONTRASTS: tuple[Contrast, ...] = (
    Contrast("drop", "single", "mixed"),
    Contrast("mole_gain", "method", "mixed"),
    Contrast("x2_gain", "steps_control", "mixed"),
    Contrast("x2_vs_single", "steps_control", "single"),
    Contrast("mole_vs_x2", "method", "steps_control"),
    Contrast("rank_kr_gain", "parameters_control", "mixed"),
    Contrast("rank_kr_vs_mole", "parameters_control", "method"),
)
CONTRAST = {c.key: c for c in CONTRASTS}


@dataclass(frozen=True)
class Condition:
    """An earlier rule's outcome on the same column is (``negate``: is not) one of ``labels``."""

    rule: str
    labels: tuple[str, ...]
    negate: bool = False

    def holds(self, outcomes: dict[str, str]) -> bool:
        """Whether it holds for the labels decided so far."""
        return (outcomes.get(self.rule) in self.labels) != self.negate

    def prose(self, titles: dict[str, str]) -> str:
        """``the Conflict rule gave *conflict*`` / ``... did not give *closes_gap*``."""
        verb = "did not give" if self.negate else "gave"
        labels = " or ".join(f"*{label}*" for label in self.labels)
        return f"the {titles.get(self.rule, self.rule)} rule {verb} {labels}"


@dataclass(frozen=True)
class Outcome:
    """One result of a rule: taken for these signs when every condition holds.

    ``text`` is a template: ``{col}`` the column, ``{a}``/``{b}`` the two settings' means,
    ``{diff}`` the contrast, ``{sdiff}`` signed, ``{neg}`` negated, ``{ci}`` its interval,
    ``{within}`` which spread was resampled, ``{recovered}`` MoLE's recovered share, and the
    role names (``{single}``, ``{mixed}``, ...) the settings' names.
    """

    label: str
    signs: tuple[Sign, ...]
    text: str
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class Rule:
    """One rule of the verdict: a contrast, a precondition and its outcomes (first match)."""

    name: str
    title: str
    contrast: str
    outcomes: tuple[Outcome, ...]
    not_run: str
    requires: tuple[Condition, ...] = ()
    not_applicable: str = ""
    note: str = ""


_WITHIN = "{within}: no conclusion ({ci})"
_CONFLICT = (Condition("conflict", ("conflict",)),)
_REAL = (*_CONFLICT, Condition("undertraining", ("closes_gap",), negate=True))

RULES: tuple[Rule, ...] = (
    Rule(
        "conflict",
        "Conflict",
        "drop",
        (
            Outcome(
                "conflict",
                ("above",),
                "data conflict: mixing costs {col} {diff} ({single} {a} vs {mixed} {b}, {ci})",
            ),
            Outcome("mixture_helps", ("below",), "no conflict: the mixture helps {col} by {neg}"),
            Outcome(
                "within_spread",
                ("within",),
                "{single} vs {mixed} {sdiff}: " + _WITHIN + "; no conflict shown",
            ),
        ),
        "{single} or {mixed} not run: no conflict test",
        note="*conflict*: mixing the domains costs this domain accuracy.",
    ),
    Rule(
        "undertraining",
        "2x control",
        "x2_vs_single",
        (
            Outcome(
                "gap_remains",
                ("below",),
                "{steps} stays {neg} below {single} ({ci}): twice the steps do not close the "
                "gap, consistent with conflict",
            ),
            Outcome(
                "closes_gap",
                ("above", "within"),
                "{steps} reaches {a} vs {single} {b}: 2x closes the gap, so the gap looks like "
                "undertraining, not conflict",
            ),
        ),
        "{steps} not run: undertraining untested",
        requires=_CONFLICT,
        not_applicable="no conflict to explain",
        note="*closes_gap*: the gap looks like undertraining, not conflict.",
    ),
    Rule(
        "mole",
        "MoLE",
        "mole_gain",
        (
            Outcome(
                "mitigates",
                ("above",),
                "MoLE mitigates the conflict: {sdiff} over {mixed} ({ci}), recovering "
                "{recovered} of the drop",
                when=_REAL,
            ),
            Outcome(
                "improves",
                ("above",),
                "MoLE improves on {mixed} by {diff}, but 2x closes the gap too: this may be "
                "faster learning, not conflict mitigation",
                when=_CONFLICT,
            ),
            Outcome("improves", ("above",), "MoLE improves on {mixed} by {diff} ({ci})"),
            Outcome("worse", ("below",), "MoLE is worse than {mixed} by {neg} ({ci})"),
            Outcome("within_spread", ("within",), "MoLE vs {mixed} {sdiff}: " + _WITHIN),
        ),
        "{method} or {mixed} not run",
        note="`recovered = ({method} − {mixed}) / ({single} − {mixed})`; where the drop is "
        "*above*, its interval is the percentile interval of the replicates' ratios.",
    ),
    Rule(
        "mole_vs_2x",
        "MoLE vs 2x",
        "mole_vs_x2",
        (
            Outcome("better", ("above",), "MoLE beats plain LoRA with 2x the steps by {diff}"),
            Outcome("worse", ("below",), "plain LoRA with 2x the steps beats MoLE by {neg}"),
            Outcome("within_spread", ("within",), "MoLE vs {steps} {sdiff}: " + _WITHIN),
        ),
        "{method} or {steps} not run",
    ),
    Rule(
        "parameters",
        "Rank-K·r control",
        "rank_kr_vs_mole",
        (
            Outcome(
                "beyond_parameters",
                ("below",),
                "rank-K·r LoRA stays {neg} below MoLE ({ci}): routing adds more than the extra "
                "parameters",
            ),
            Outcome(
                "explained_by_parameters",
                ("above", "within"),
                "rank-K·r LoRA reaches {a} vs MoLE {b}: the gain is explained by parameters, "
                "not routing",
            ),
        ),
        "{params} or {method} not run",
        requires=(Condition("mole", ("mitigates", "improves")),),
        not_applicable="no MoLE gain to explain",
        note="*explained_by_parameters*: a plain LoRA with MoLE's MLP parameter count does as "
        "well, so routing is not needed for the gain.",
    ),
)


def classify(diff: Difference, floor: float = MIN_EFFECT) -> Sign:
    """*above*, *below* or *within* (see the module docstring)."""
    if diff.low is not None and diff.low > 0 and diff.mean > floor:
        return "above"
    if diff.high is not None and diff.high < 0 and diff.mean < -floor:
        return "below"
    return "within"


def role_names() -> dict[str, str]:
    """Template fields of the roles: ``{single}`` etc. -> the setting names."""
    keys = {
        "single": "single",
        "mixed": "mixed",
        "method": "method",
        "steps": "steps_control",
        "params": "parameters_control",
    }
    return {field: by_role(role).name for field, role in keys.items()}  # type: ignore[arg-type]


_SIGNS = {
    ("above",): "it is *above*",
    ("below",): "it is *below*",
    ("within",): "it is *within*",
    ("above", "within"): "it is not *below*",
}


def _rule_prose(rule: Rule, names: dict[str, str]) -> str:
    contrast = CONTRAST[rule.contrast]
    titles = {r.name: r.title for r in RULES}
    parts = []
    for outcome in rule.outcomes:
        when = "".join(f" and {c.prose(titles)}" for c in outcome.when)
        parts.append(f"*{outcome.label}* if {_SIGNS[outcome.signs]}{when}")
    text = (
        f"**{rule.title}.** Per column (domain or macro), `{contrast.formula}`: "
        + "; else ".join(parts)
    )
    if rule.requires:
        needs = " and ".join(c.prose(titles) for c in rule.requires)
        text += f". Judged only where {needs} (else *not_applicable*)"
    text += "." + (f" {rule.note}" if rule.note else "")
    return text.format(**names) if "{" in text else text


def rules_prose(confidence: float, samples: int) -> list[str]:
    """The report's numbered rules, generated from :data:`RULES`.

    Args:
        confidence: the intervals' coverage.
        samples: bootstrap replicates.

    Returns:
        One markdown paragraph per rule, the uncertainty rule first and the caveats last.
    """
    names = role_names()
    level = f"{100 * confidence:g}%"
    first = (
        f"**Uncertainty.** Every difference has a {level} paired-bootstrap percentile interval "
        f"({samples} replicates; test items resampled within each domain, the same draw for "
        "every setting; seeds resampled per setting). A difference is *above* when its whole "
        f"interval is above 0 and it exceeds {MIN_EFFECT}, *below* when its whole interval is "
        f"below 0 and it is below −{MIN_EFFECT}, else *within* (no conclusion). This replaces "
        "the earlier margin of 2 x the larger seed standard deviation."
    )
    caveat = (
        "**Caveats.** With one seed the intervals cover test-item sampling only, not seed "
        "variation (usually the larger part); with 2 seeds the seed part is weak (the resampled "
        "mean of 2 seeds takes 3 values); runs still improving at the end make every comparison "
        "suspect of undertraining; scores near zero everywhere mean the task was not learnt."
    )
    settings = "; ".join(f"`{s.name}` = {s.summary}" for s in REGISTRY)
    return [first, *(_rule_prose(r, names) for r in RULES), f"**Settings.** {settings}.", caveat]
