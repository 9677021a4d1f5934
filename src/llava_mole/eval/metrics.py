"""Answer-level evaluation metrics: the single registry of metric names.

Every metric scores *one* prediction against one or more reference answers and returns a
float in ``[0, 1]``. Metrics share the call signature ``metric(pred, refs) -> float`` where
``refs`` is either a single string or a non-empty sequence of strings, so they can be looked up
by name and applied uniformly by :func:`score_predictions`. A mixture names one metric per
domain (``metric:`` in the YAML, one of :data:`ALL_METRICS`).

Conventions shared by all metrics:

* ``refs`` given as a ``str`` is treated as a one-element list.
* An empty reference list is a caller error and raises :class:`ValueError` (a question with
  no ground truth cannot be scored; silently returning 0 would bias the means).
* An empty prediction is a valid (usually wrong) answer and is scored normally.

Default metrics (:data:`METRICS`), identical to the public evaluators that published numbers
come from (quirks included, see :mod:`llava_mole.eval.metrics_official`):

* ``exact_match`` -- :func:`exact_match`, SQuAD-style normalised exact match.
* ``vqa_accuracy`` -- :func:`vqa_accuracy`, LLaVA's ``m4c_evaluator.py`` (EvalAI answer
  processor + TextVQA leave-one-out accuracy) for VQAv2 / TextVQA.
* ``anls`` -- :func:`anls`, lmms-eval's DocVQA ANLS.
* ``relaxed_accuracy`` -- :func:`relaxed_accuracy`, lmms-eval's ChartQA relaxed correctness.
* ``pathvqa`` -- :func:`pathvqa_score`: :func:`closed_accuracy` for yes/no references,
  :func:`open_recall` otherwise.

Lenient variants (:data:`METRIC_VARIANTS`, see :mod:`llava_mole.eval.metrics_lenient`), not
comparable with published numbers: ``vqa_accuracy_lenient``, ``anls_normalized``,
``relaxed_accuracy_lenient``.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .answers import References, levenshtein, normalize_answer, ref_list
from .metrics_lenient import (
    _parse_number,
    anls_normalized,
    normalize_vqa_answer,
    relaxed_accuracy_lenient,
    vqa_accuracy_lenient,
)
from .metrics_official import (
    FewReferencesWarning,
    anls,
    evalai_process_answer,
    relaxed_accuracy,
    relaxed_correctness,
    vqa_accuracy,
)

__all__ = [
    "ALL_METRICS",
    "METRICS",
    "METRIC_VARIANTS",
    "FewReferencesWarning",
    "anls",
    "anls_normalized",
    "closed_accuracy",
    "evalai_process_answer",
    "exact_match",
    "levenshtein",
    "metric_for",
    "normalize_answer",
    "normalize_vqa_answer",
    "open_recall",
    "pathvqa_score",
    "relaxed_accuracy",
    "relaxed_accuracy_lenient",
    "relaxed_correctness",
    "score_predictions",
    "vqa_accuracy",
    "vqa_accuracy_lenient",
]

# Kept importable from here (they moved to the modules above).
_ = (_parse_number, levenshtein, normalize_vqa_answer)
_ref_list = ref_list


def exact_match(pred: str, refs: References) -> float:
    """Normalised exact match: 1.0 if ``pred`` equals any reference after normalisation.

    ``EM = max_r [normalize_answer(pred) == normalize_answer(r)]`` using
    :func:`normalize_answer`. Raises :class:`ValueError` for an empty reference list.

    Reference: https://rajpurkar.github.io/SQuAD-explorer/
    """
    target = normalize_answer(pred)
    return float(any(normalize_answer(r) == target for r in ref_list(refs)))


# ---------------------------------------------------------------------------
# PathVQA-style closed / open scoring
# ---------------------------------------------------------------------------

_YES_NO = frozenset({"yes", "no"})


def closed_accuracy(pred: str, ref: str) -> float:
    """Closed-question (yes/no) accuracy.

    The reference must normalise (:func:`normalize_answer`) to ``"yes"`` or ``"no"``, otherwise
    :class:`ValueError` is raised. The prediction's answer is its *first* token that is
    ``yes`` or ``no`` after normalisation (so ``"Yes, it is."`` answers yes and
    ``"No. Yes"`` answers no); a prediction without such a token scores 0.

    Reference: https://arxiv.org/abs/2003.10286 (PathVQA) and the LLaVA-Med evaluation
    protocol, https://github.com/microsoft/LLaVA-Med.
    """
    target = normalize_answer(ref)
    if target not in _YES_NO:
        raise ValueError(f"closed_accuracy needs a yes/no reference, got {ref!r}")
    for token in normalize_answer(pred).split():
        if token in _YES_NO:
            return float(token == target)
    return 0.0


def open_recall(pred: str, ref: str) -> float:
    """Open-question token recall: fraction of reference tokens found in the prediction.

    Both strings are normalised with :func:`normalize_answer` and split on whitespace.
    ``recall = |ref_tokens ∩ pred_tokens| / |ref_tokens|`` with multiset (clipped-count)
    intersection, so a reference token repeated twice needs two occurrences in the
    prediction. If the reference has no tokens after normalisation the score is 1.0 when the
    prediction has none either and 0.0 otherwise.

    Reference: https://arxiv.org/abs/2003.10286 (PathVQA) and the LLaVA-Med evaluation
    protocol, https://github.com/microsoft/LLaVA-Med.
    """
    ref_tokens = Counter(normalize_answer(ref).split())
    pred_tokens = Counter(normalize_answer(pred).split())
    n_ref = sum(ref_tokens.values())
    if n_ref == 0:
        return float(not pred_tokens)
    return sum((ref_tokens & pred_tokens).values()) / n_ref


def pathvqa_score(pred: str, refs: References) -> float:
    """PathVQA score: closed accuracy for yes/no references, open recall otherwise.

    Each reference is dispatched on its own: if it normalises to ``yes``/``no`` it is scored
    with :func:`closed_accuracy`, otherwise with :func:`open_recall`; the result is the max
    over references. Raises :class:`ValueError` for an empty reference list.

    Reference: https://arxiv.org/abs/2003.10286
    """
    best = 0.0
    for ref in ref_list(refs):
        if normalize_answer(ref) in _YES_NO:
            score = closed_accuracy(pred, ref)
        else:
            score = open_recall(pred, ref)
        best = max(best, score)
    return best


# ---------------------------------------------------------------------------
# Registry and aggregation
# ---------------------------------------------------------------------------

Metric = Callable[..., float]

METRICS: dict[str, Metric] = {
    "exact_match": exact_match,
    "vqa_accuracy": vqa_accuracy,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
    "pathvqa": pathvqa_score,
}
"""Default metric name -> ``metric(pred, refs) -> float`` (official definitions)."""

METRIC_VARIANTS: dict[str, Metric] = {
    "vqa_accuracy_lenient": vqa_accuracy_lenient,
    "anls_normalized": anls_normalized,
    "relaxed_accuracy_lenient": relaxed_accuracy_lenient,
}
"""Lenient variants, each fixing quirks of the official metric it is named after."""

ALL_METRICS: dict[str, Metric] = {**METRICS, **METRIC_VARIANTS}
"""Every metric name a mixture may give a domain."""


def metric_for(name: str, dataset: str | None = None) -> Callable[[str, References], float]:
    """The metric called ``name``, with ``dataset`` bound where the metric takes it (it names
    the dataset in `vqa_accuracy`'s few-references warning).

    Raises:
        ValueError: Unknown metric name.
    """
    if name not in ALL_METRICS:
        raise ValueError(f"unknown metric {name!r}; known metrics: {sorted(ALL_METRICS)}")
    fn = ALL_METRICS[name]
    if "dataset" in inspect.signature(fn).parameters:
        return lambda pred, refs: fn(pred, refs, dataset=dataset)
    return fn


def score_predictions(
    records: Iterable[Mapping[str, Any]], metric_by_domain: Mapping[str, str]
) -> dict[str, Any]:
    """Score prediction records per domain and aggregate them.

    Each record is a mapping with keys ``id``, ``domain``, ``prediction`` and ``reference``
    (a string or a list of strings). The record is scored with the metric named by
    ``metric_by_domain[record["domain"]]`` (a key of :data:`ALL_METRICS`); the domain name is
    the dataset name of `vqa_accuracy`'s once-per-dataset warning about fewer than 10 answers.

    Returns::

        {
            "per_domain": {domain: {"metric": name, "score": mean, "n": count}},
            "overall": {"macro": mean of domain scores,
                        "micro": mean over all samples,
                        "n": total count},
        }

    Domains are listed in order of first appearance; domains in ``metric_by_domain`` without
    records are omitted. With no records at all, ``macro`` and ``micro`` are ``0.0`` and
    ``n`` is 0.

    Raises :class:`ValueError` if ``metric_by_domain`` names an unknown metric (checked up
    front, for every domain) or if a record's domain has no metric assigned, and
    :class:`KeyError` if a record lacks a required field.

    ``macro`` weights every domain equally; ``micro`` weights every sample equally, so large
    domains dominate it.

    Reference: https://scikit-learn.org/stable/modules/model_evaluation.html (macro vs micro
    averaging).
    """
    for domain, name in metric_by_domain.items():
        if name not in ALL_METRICS:
            raise ValueError(
                f"unknown metric {name!r} for domain {domain!r}; "
                f"known metrics: {sorted(ALL_METRICS)}"
            )
    metrics = {d: metric_for(name, dataset=d) for d, name in metric_by_domain.items()}

    scores_by_domain: dict[str, list[float]] = {}
    for record in records:
        missing = [k for k in ("id", "domain", "prediction", "reference") if k not in record]
        if missing:
            raise KeyError(f"record {record.get('id', '?')!r} is missing field(s) {missing}")
        domain = record["domain"]
        if domain not in metric_by_domain:
            raise ValueError(f"no metric assigned to domain {domain!r} (record {record['id']!r})")
        scores_by_domain.setdefault(domain, []).append(
            float(metrics[domain](record["prediction"], record["reference"]))
        )

    per_domain = {
        domain: {
            "metric": metric_by_domain[domain],
            "score": sum(scores) / len(scores),
            "n": len(scores),
        }
        for domain, scores in scores_by_domain.items()
    }
    all_scores = [s for scores in scores_by_domain.values() for s in scores]
    n_total = len(all_scores)
    macro = sum(d["score"] for d in per_domain.values()) / len(per_domain) if per_domain else 0.0
    micro = sum(all_scores) / n_total if n_total else 0.0
    return {"per_domain": per_domain, "overall": {"macro": macro, "micro": micro, "n": n_total}}
