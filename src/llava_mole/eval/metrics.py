"""Answer-level evaluation metrics for the LLaVA-MoLE benchmark suite.

Every metric scores *one* prediction against one or more reference answers and returns a
float in ``[0, 1]``. Metrics share the call signature ``metric(pred, refs) -> float`` where
``refs`` is either a single string or a non-empty sequence of strings, so they can be looked up
by name in :data:`METRICS` and applied uniformly by :func:`score_predictions`.

Conventions shared by all metrics:

* ``refs`` given as a ``str`` is treated as a one-element list.
* An empty reference list is a caller error and raises :class:`ValueError` (a question with
  no ground truth cannot be scored; silently returning 0 would bias the means).
* An empty prediction is a valid (usually wrong) answer and is scored normally.

Implemented metrics:

* :func:`exact_match` -- SQuAD-style normalised exact match.
* :func:`vqa_accuracy` -- VQAv2 / TextVQA soft accuracy with the official normalisation.
* :func:`anls` -- DocVQA Average Normalized Levenshtein Similarity (per question).
* :func:`relaxed_accuracy` -- ChartQA relaxed accuracy (5% relative tolerance on numbers).
* :func:`closed_accuracy`, :func:`open_recall`, :func:`pathvqa_score` -- PathVQA-style
  closed (yes/no) accuracy and open-ended token recall.
"""

from __future__ import annotations

import itertools
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "METRICS",
    "anls",
    "closed_accuracy",
    "exact_match",
    "levenshtein",
    "normalize_answer",
    "normalize_vqa_answer",
    "open_recall",
    "pathvqa_score",
    "relaxed_accuracy",
    "score_predictions",
    "vqa_accuracy",
]

References = str | Sequence[str]


def _ref_list(refs: References) -> list[str]:
    """Return ``refs`` as a list of strings, rejecting an empty reference set."""
    if isinstance(refs, str):
        return [refs]
    out = list(refs)
    if not out:
        raise ValueError("refs must contain at least one reference answer")
    for ref in out:
        if not isinstance(ref, str):
            raise TypeError(f"reference answers must be str, got {type(ref).__name__}")
    return out


# ---------------------------------------------------------------------------
# Generic normalised exact match (SQuAD convention)
# ---------------------------------------------------------------------------

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_ARTICLES_RE = re.compile(r"\b(?:a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Normalise a free-form answer the way the SQuAD evaluation script does.

    Steps, in order: lowercase; delete every ASCII punctuation character (``string.punctuation``,
    deleted rather than replaced by a space, so ``"x-ray"`` becomes ``"xray"``); remove the
    articles ``a``, ``an`` and ``the`` as whole words; collapse runs of whitespace to one space
    and strip the ends.

    Reference: https://rajpurkar.github.io/SQuAD-explorer/ (official v1.1 evaluation script).
    """
    s = s.lower().translate(_PUNCT_TABLE)
    s = _ARTICLES_RE.sub(" ", s)
    return " ".join(s.split())


def exact_match(pred: str, refs: References) -> float:
    """Normalised exact match: 1.0 if ``pred`` equals any reference after normalisation.

    ``EM = max_r [normalize_answer(pred) == normalize_answer(r)]`` using
    :func:`normalize_answer`. Raises :class:`ValueError` for an empty reference list.

    Reference: https://rajpurkar.github.io/SQuAD-explorer/
    """
    target = normalize_answer(pred)
    return float(any(normalize_answer(r) == target for r in _ref_list(refs)))


# ---------------------------------------------------------------------------
# VQAv2 / TextVQA accuracy
# ---------------------------------------------------------------------------

# Characters the official VQA evaluation treats as punctuation. Note that the apostrophe,
# colon, ``*``, ``#``, ``$``, ``%``, ``&``, ``^``, ``|`` and ``~`` are *not* in the official list
# and therefore survive normalisation; the period is handled separately.
_VQA_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
# A comma between two digits ("1,000") switches punctuation handling to delete-mode.
_VQA_DIGIT_COMMA_RE = re.compile(r"\d,\d")
# The official period regex is written as a lookbehind but (because of a typo) behaves as
# "a period that is not followed by a digit"; we reproduce the effective behaviour, so
# "3.5" keeps its period while "yes." and "1." lose theirs.
_VQA_PERIOD_RE = re.compile(r"\.(?!\d)")
_VQA_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_VQA_ARTICLES = frozenset({"a", "an", "the"})

# Canonical contractions. Following the official VQA convention, a word typed without some or
# all of its apostrophes (e.g. "dont", "couldnt've") is mapped to the canonical spelling.
_CANONICAL_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he'll he's how'd how'll how's i'd i'd've i'll i'm i've isn't "
    "it'd it'd've it'll it's let's ma'am mightn't mightn't've might've mustn't must've needn't "
    "not've o'clock oughtn't shan't she'd she'd've she'll she's should've shouldn't "
    "shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll something's that'll that's "
    "there'd there'd've there're there's they'd they'd've they'll they're they've 'twas "
    "wasn't we'd we'd've we'll we're we've weren't what'll what're what's what've when's "
    "where'd where's where've who'd who'd've who'll who're who's who've why'll why're why's "
    "won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll "
    "you're you've"
).split()
# Apostrophe-free spellings that are ordinary English words are left untouched
# ("its", "well", "were", ...), as in the official table.
_CONTRACTION_EXCLUDED = frozenset(
    {"id", "ill", "its", "hell", "lets", "shed", "shell", "wed", "well", "were", "whore"}
)


def _build_contractions() -> dict[str, str]:
    """Map every apostrophe-dropped variant of each canonical contraction to the canonical."""
    table: dict[str, str] = {}
    for canonical in _CANONICAL_CONTRACTIONS:
        pieces = canonical.split("'")
        n_gaps = len(pieces) - 1
        for keep in itertools.product((True, False), repeat=n_gaps):
            if all(keep):
                continue  # the canonical spelling itself
            variant = pieces[0]
            for keep_gap, piece in zip(keep, pieces[1:], strict=True):
                variant += ("'" if keep_gap else "") + piece
            if variant not in _CONTRACTION_EXCLUDED:
                table.setdefault(variant, canonical)
    return table


_VQA_CONTRACTIONS = _build_contractions()


def _vqa_process_punctuation(text: str) -> str:
    """Official VQA punctuation step.

    Each punctuation mark is *deleted* if it is adjacent to a space in the input or if the
    input contains a digit-comma-digit pattern (``"1,000"`` -> ``"1000"``); otherwise it is
    *replaced by a space* (``"black/white"`` -> ``"black white"``). Finally, periods not
    followed by a digit are deleted.
    """
    delete_mode = _VQA_DIGIT_COMMA_RE.search(text) is not None
    out = text
    for mark in _VQA_PUNCT:
        if delete_mode or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _VQA_PERIOD_RE.sub("", out)


def _vqa_process_digits_articles(text: str) -> str:
    """Official VQA word step: lowercase, number words -> digits, drop articles, contractions."""
    words = []
    for word in text.lower().split():
        word = _VQA_NUMBER_WORDS.get(word, word)
        if word not in _VQA_ARTICLES:
            words.append(_VQA_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(s: str) -> str:
    """Normalise an answer with the official VQA evaluation rules.

    1. Newlines and tabs become spaces; the ends are stripped.
    2. Punctuation (see :func:`_vqa_process_punctuation`): marks from the official list are
       deleted when next to a space or when the answer contains a digit-comma-digit pattern,
       and replaced by a space otherwise; a period is removed unless a digit follows it.
    3. Lowercase; number words ``none``/``zero`` .. ``ten`` become digits (``"two"`` -> ``"2"``);
       the articles ``a``/``an``/``the`` are dropped; apostrophe-less contractions are
       restored (``"dont"`` -> ``"don't"``); whitespace is collapsed.

    Reference: https://visualqa.org/evaluation.html
    """
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_process_digits_articles(_vqa_process_punctuation(s))


def vqa_accuracy(pred: str, refs: References) -> float:
    """VQAv2 / TextVQA soft accuracy for one question.

    Prediction and references are normalised with :func:`normalize_vqa_answer` (the official
    evaluation normalises the human answers at dataset-build time; normalising them here keeps
    the metric idempotent on raw annotations). With ``m`` matching references:

    * ``len(refs) >= 10`` (the official setting with 10 human answers): average over the
      leave-one-out subsets, ``acc = mean_i min(m_{-i} / 3, 1)`` where ``m_{-i}`` counts the
      matches among all references except the ``i``-th.
    * fewer references: ``acc = min(m / 3, 1)`` over all references. Note that this means a
      single matching reference scores only ``1/3``; use :func:`exact_match` for datasets with
      one reference answer.

    Raises :class:`ValueError` for an empty reference list.

    Reference: https://visualqa.org/evaluation.html
    """
    ref_list = _ref_list(refs)
    target = normalize_vqa_answer(pred)
    hits = [normalize_vqa_answer(r) == target for r in ref_list]
    total = sum(hits)
    if len(ref_list) < 10:
        return min(total / 3.0, 1.0)
    return sum(min((total - hit) / 3.0, 1.0) for hit in hits) / len(hits)


# ---------------------------------------------------------------------------
# DocVQA ANLS
# ---------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Levenshtein edit distance (unit-cost insertions, deletions and substitutions).

    Classic two-row dynamic programme, ``O(len(a) * len(b))`` time and ``O(min)`` memory.

    Reference: https://en.wikipedia.org/wiki/Levenshtein_distance
    """
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(
                min(
                    previous[j] + 1,  # delete char_a
                    current[j - 1] + 1,  # insert char_b
                    previous[j - 1] + (char_a != char_b),  # substitute / match
                )
            )
        previous = current
    return previous[-1]


def anls(pred: str, refs: References, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one DocVQA question.

    Strings are lowercased and stripped of leading/trailing whitespace. For each reference
    ``r``: ``NL = levenshtein(pred, r) / max(len(pred), len(r))`` (``NL = 0`` when both are
    empty) and ``s(r) = 1 - NL`` if ``NL < threshold`` else ``0``. The question score is
    ``max_r s(r)``; the dataset ANLS is the mean of these scores. Raises :class:`ValueError`
    for an empty reference list.

    Reference: https://arxiv.org/abs/1905.13648 (ST-VQA, where ANLS is defined) and
    https://arxiv.org/abs/2007.00398 (DocVQA).
    """
    p = pred.strip().lower()
    best = 0.0
    for ref in _ref_list(refs):
        r = ref.strip().lower()
        longest = max(len(p), len(r))
        nl = levenshtein(p, r) / longest if longest else 0.0
        if nl < threshold:
            best = max(best, 1.0 - nl)
    return best


# ---------------------------------------------------------------------------
# ChartQA relaxed accuracy
# ---------------------------------------------------------------------------

_NUMBER_RE = re.compile(
    r"[+-]?(?:\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
)


def _parse_number(text: str) -> float | None:
    """Parse ``text`` as a number, allowing surrounding spaces, thousands commas and a ``%``.

    ``"12%"`` parses as ``12.0`` (the percent sign is dropped, not divided by 100), and
    ``"1,234.5"`` as ``1234.5``. Returns ``None`` for anything else (including ``nan``/``inf``).
    """
    s = text.strip()
    if s.endswith("%"):
        s = s[:-1].rstrip()
    if not _NUMBER_RE.fullmatch(s):
        return None
    return float(s.replace(",", ""))


def relaxed_accuracy(pred: str, refs: References, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy for one question.

    If both the prediction and a reference parse as numbers (see :func:`_parse_number`), the
    answer is correct when ``|pred - ref| <= tolerance * |ref|`` (so a reference of ``0``
    requires an exact ``0``). Otherwise the answer is correct on normalised exact match
    (:func:`normalize_answer`). The score is the max over references. Raises
    :class:`ValueError` for an empty reference list.

    Unlike the Pix2Struct reference implementation, ``"12%"`` is read as ``12`` rather than
    ``0.12``, so ``"12%"`` and ``"12"`` are both accepted for a reference of ``12``.

    Reference: https://arxiv.org/abs/2203.10244 (ChartQA, Sec. 5).
    """
    pred_num = _parse_number(pred)
    pred_norm = normalize_answer(pred)
    for ref in _ref_list(refs):
        ref_num = _parse_number(ref)
        if pred_num is not None and ref_num is not None:
            if abs(pred_num - ref_num) <= tolerance * abs(ref_num):
                return 1.0
        elif pred_norm == normalize_answer(ref):
            return 1.0
    return 0.0


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
    for ref in _ref_list(refs):
        if normalize_answer(ref) in _YES_NO:
            score = closed_accuracy(pred, ref)
        else:
            score = open_recall(pred, ref)
        best = max(best, score)
    return best


# ---------------------------------------------------------------------------
# Registry and aggregation
# ---------------------------------------------------------------------------

METRICS: dict[str, Callable[[str, str | list[str]], float]] = {
    "exact_match": exact_match,
    "vqa_accuracy": vqa_accuracy,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
    "pathvqa": pathvqa_score,
}
"""Metric name -> ``metric(pred, refs) -> float`` (default thresholds/tolerances)."""


def score_predictions(
    records: Iterable[Mapping[str, Any]], metric_by_domain: Mapping[str, str]
) -> dict[str, Any]:
    """Score prediction records per domain and aggregate them.

    Each record is a mapping with keys ``id``, ``domain``, ``prediction`` and ``reference``
    (a string or a list of strings). The record is scored with the metric named by
    ``metric_by_domain[record["domain"]]`` (a key of :data:`METRICS`).

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
        if name not in METRICS:
            raise ValueError(
                f"unknown metric {name!r} for domain {domain!r}; known metrics: {sorted(METRICS)}"
            )

    scores_by_domain: dict[str, list[float]] = {}
    for record in records:
        missing = [k for k in ("id", "domain", "prediction", "reference") if k not in record]
        if missing:
            raise KeyError(f"record {record.get('id', '?')!r} is missing field(s) {missing}")
        domain = record["domain"]
        if domain not in metric_by_domain:
            raise ValueError(f"no metric assigned to domain {domain!r} (record {record['id']!r})")
        metric = METRICS[metric_by_domain[domain]]
        scores_by_domain.setdefault(domain, []).append(
            float(metric(record["prediction"], record["reference"]))
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
