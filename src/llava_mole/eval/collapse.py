"""Silent failures a score alone hides: answer collapse, missing answers and dead experts.

A run can fail without any error: a MoLE seed that answers the same two words for 91% of a
domain's test samples scores near zero there while its loss stays flat and no router warning
fires (issue 18). These checks turn such runs into named findings.

Answer collapse
    For one domain with predictions ``p_i`` and references ``r_i`` (normalised: lower case,
    single spaces), let ``s_p = max_a #{i: p_i = a} / n`` be the share of the most frequent
    prediction and ``s_r`` the same share over the references. The domain has collapsed when
    ``s_p >= min_share`` and ``s_p >= ratio * s_r``: most answers are one string, far more
    often than the data gives that reason to. A domain whose references are mostly one answer
    (a yes/no set with 80% "yes") is not flagged for predicting it.
Missing answer
    The opposite failure: a common answer the run (almost) never gives. With ``q_a`` the
    share of the domain's references that are ``a`` and ``s_a`` its share of the predictions,
    ``a`` is missing when ``q_a >= min_reference_share`` and ``s_a < ratio * q_a``. A
    skills-world MoLE seed never learnt "three" shapes: it is the reference of 24% of the
    count items and 2% of its predictions (it says "two"), which the dominant-answer check
    does not see (its most frequent answer has 45% of the predictions).
Expert health
    For a MoLE block with ``K`` experts and token shares ``f_1..f_K`` (summing to 1), expert
    ``k`` is *dead* when ``f_k < dead_share / K`` (under a tenth of its fair share by default)
    and *monopolising* when ``f_k >= 1 - 1 / (2K)`` (0.75 at K=2, 0.83 at K=3, 0.88 at K=4):
    the router then sends nearly every token to one expert, which is plain LoRA at K times
    the parameters. (LLaVA-MoLE, arXiv 2401.16160, balances with an auxiliary loss for this.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "AnswerCollapse",
    "ExpertFinding",
    "MissingAnswer",
    "answer_collapse",
    "evaluation_warnings",
    "expert_findings",
    "missing_answers",
]


@dataclass(frozen=True)
class _AnswerFinding:
    """A finding about one answer of one domain's predictions.

    Attributes:
        domain: The domain.
        answer: The (normalised) answer.
        share: Its share of the domain's predictions.
        reference_share: For a collapse, the share of the most frequent reference answer; for a
            missing answer, the answer's own share of the references.
        n: Items looked at.
    """

    domain: str
    answer: str
    share: float
    reference_share: float
    n: int

    def message(self, run: str = "") -> str:
        """One line naming the finding (and the run, if given)."""
        return (f"{run}: " if run else "") + self.describe()

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class AnswerCollapse(_AnswerFinding):
    """A domain whose predictions are mostly one answer (``answer``, the dominant prediction)."""

    def describe(self) -> str:
        return (
            f"answer collapse on {self.domain}: {self.share:.0%} of {self.n} predictions "
            f"are {self.answer!r} (the most frequent reference is {self.reference_share:.0%})"
        )


@dataclass(frozen=True)
class MissingAnswer(_AnswerFinding):
    """A common reference answer of one domain that the run (almost) never predicts."""

    def describe(self) -> str:
        return (
            f"{self.what}{_MISSING_SPLIT}{self.reference_share:.0%} of {self.n} items but "
            f"{self.share:.0%} of the predictions"
        )

    @property
    def what(self) -> str:
        """The finding without its shares: the same in every run that misses this answer."""
        return f"missing answer on {self.domain}: {self.answer!r}"

    @staticmethod
    def what_of(line: str) -> str | None:
        """:attr:`what` of a :meth:`message` line (None for another finding's line)."""
        head, split, _ = line.partition(_MISSING_SPLIT)
        return head if split and head.startswith("missing answer on ") else None


_MISSING_SPLIT = " is the reference of "


@dataclass(frozen=True)
class ExpertFinding:
    """An expert of one MoLE block that gets (almost) no tokens, or (almost) all of them."""

    block: int
    expert: int
    share: float
    kind: Literal["dead", "monopolising"]

    def message(self, run: str = "") -> str:
        where = f"{run}: " if run else ""
        return f"{where}{self.kind} expert {self.expert} in block {self.block}: {self.share:.1%} of tokens"


def _normalise(text: str) -> str:
    return " ".join(str(text).lower().split())


def answer_collapse(
    domain: str,
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    min_share: float = 0.5,
    ratio: float = 2.0,
    min_items: int = 10,
) -> AnswerCollapse | None:
    """The collapse of one domain's predictions, or None (see the module docstring).

    Args:
        domain: Domain name (for the finding).
        predictions: One prediction per test item.
        references: The reference answer of each item (the first, if several).
        min_share: Smallest dominant-prediction share flagged.
        ratio: How many times the most frequent reference's share it must reach.
        min_items: Fewer predictions than this are never flagged (too few to tell).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(predictions)
    if n < min_items:
        return None
    answer, count = Counter(_normalise(p) for p in predictions).most_common(1)[0]
    reference_share = Counter(_normalise(r) for r in references).most_common(1)[0][1] / n
    share = count / n
    if share >= min_share and share >= ratio * reference_share:
        return AnswerCollapse(domain, answer, share, reference_share, n)
    return None


def missing_answers(
    domain: str,
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    min_reference_share: float = 0.1,
    ratio: float = 0.25,
    min_items: int = 40,
) -> list[MissingAnswer]:
    """The common answers of one domain the predictions (almost) never give (module docstring).

    Args:
        domain: Domain name (for the findings).
        predictions: One prediction per test item.
        references: The reference answer of each item (the first, if several).
        min_reference_share: Only answers at least this common among the references.
        ratio: Flagged when predicted less than this fraction as often as it is the reference.
        min_items: Fewer items than this are never flagged (too few to tell).

    Returns:
        The findings, most common reference answer first.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(predictions)
    if n < min_items:
        return []
    predicted = Counter(_normalise(p) for p in predictions)
    found = []
    for answer, count in Counter(_normalise(r) for r in references).most_common():
        reference_share, share = count / n, predicted[answer] / n
        if reference_share >= min_reference_share and share < ratio * reference_share:
            found.append(MissingAnswer(domain, answer, share, reference_share, n))
    return found


def expert_findings(
    loads: Sequence[Sequence[float]], *, dead_share: float = 0.1
) -> list[ExpertFinding]:
    """Dead and monopolising experts of every block (see the module docstring).

    Args:
        loads: Per block, the share of tokens each expert received (rows sum to ~1).
        dead_share: An expert is dead below this fraction of its fair share ``1/K``.

    Returns:
        The findings, by block then expert; empty for K = 1 or a healthy router.
    """
    found: list[ExpertFinding] = []
    for block, row in enumerate(loads):
        k = len(row)
        if k < 2:
            continue
        total = float(sum(row)) or 1.0
        for expert, value in enumerate(row):
            share = float(value) / total
            if share < dead_share / k:
                found.append(ExpertFinding(block, expert, share, "dead"))
            elif share >= 1 - 1 / (2 * k):
                found.append(ExpertFinding(block, expert, share, "monopolising"))
    return found


def evaluation_warnings(
    records: Sequence[dict], routing_counts: dict[int, Any] | None = None
) -> list[str]:
    """One line per finding of an evaluation: each domain's answer collapse and missing answers
    (from the prediction records: ``domain``, ``prediction``, ``reference``), and the dead or monopolising
    experts of each block (from the routing counts, ``block -> (domains, kinds, K)`` tensors,
    as ``capture_routing`` collects them)."""
    by_domain: dict[str, tuple[list[str], list[str]]] = {}
    for r in records:
        ref = r["reference"][0] if isinstance(r["reference"], list | tuple) else r["reference"]
        preds, refs = by_domain.setdefault(r["domain"], ([], []))
        preds.append(str(r["prediction"]))
        refs.append(str(ref))
    lines = []
    for domain, (preds, refs) in by_domain.items():
        found = answer_collapse(domain, preds, refs)
        if found is not None:
            lines.append(found.message())
        lines += [m.message() for m in missing_answers(domain, preds, refs)]
    if routing_counts:
        loads = [routing_counts[b].sum(dim=(0, 1)).tolist() for b in sorted(routing_counts)]
        lines += [f.message() for f in expert_findings(loads)]
    return lines
