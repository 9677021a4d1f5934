"""Lenient variants of the official metrics: the quirks we consider wrong, fixed.

Scores from these are *not* comparable with published numbers; use them to see how much a
quirk of the official evaluator moves a score (e.g. ``"Im"`` vs ``"I'm"``, ``"12%"`` vs ``"12"``).
Each is registered under its own name (``vqa_accuracy_lenient``, ``anls_normalized``,
``relaxed_accuracy_lenient``); the defaults are in :mod:`llava_mole.eval.metrics_official`.
"""

from __future__ import annotations

import itertools
import re

from .answers import References, levenshtein, normalize_answer, ref_list
from .metrics_official import _warn_few_references, vqa_score

__all__ = [
    "anls_normalized",
    "normalize_vqa_answer",
    "normalize_vqa_answer_lenient",
    "relaxed_accuracy_lenient",
    "vqa_accuracy_lenient",
]

# ---------------------------------------------------------------------------
# VQA-style normalisation with an apostrophe- and case-insensitive contraction table
# ---------------------------------------------------------------------------

# Characters treated as punctuation (the VQA list). The apostrophe, colon, ``*``, ``#``, ``$``,
# ``%``, ``&``, ``^``, ``|`` and ``~`` are not in it and survive; the period is handled separately.
_VQA_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
# A comma between two digits ("1,000") switches punctuation handling to delete-mode.
_VQA_DIGIT_COMMA_RE = re.compile(r"\d,\d")
# A period that is not followed by a digit ("3.5" keeps its period, "yes." and "1." lose it).
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

# Canonical contractions: a word typed without some or all of its apostrophes (e.g. "dont",
# "couldnt've", "im") is mapped to the canonical spelling.
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
# Apostrophe-free spellings that are ordinary English words are left untouched.
_CONTRACTION_EXCLUDED = frozenset(
    {"id", "ill", "its", "hell", "lets", "shed", "shell", "wed", "well", "were", "whore"}
)


def _build_contractions() -> dict[str, str]:
    """Map every apostrophe-dropped variant of each canonical contraction to the canonical."""
    table: dict[str, str] = {}
    for canonical in _CANONICAL_CONTRACTIONS:
        pieces = canonical.split("'")
        for keep in itertools.product((True, False), repeat=len(pieces) - 1):
            if all(keep):
                continue  # the canonical spelling itself
            variant = pieces[0]
            for keep_gap, piece in zip(keep, pieces[1:], strict=True):
                variant += ("'" if keep_gap else "") + piece
            if variant not in _CONTRACTION_EXCLUDED:
                table.setdefault(variant, canonical)
    return table


_VQA_CONTRACTIONS = _build_contractions()
_DETACHED_S_RE = re.compile(r"(?<=\S) 's\b")


def _vqa_process_punctuation(text: str) -> str:
    """Each mark is deleted if it is next to a space or the text has a digit-comma-digit
    (``"1,000"`` -> ``"1000"``), else replaced by a space; then periods not before a digit go."""
    delete_mode = _VQA_DIGIT_COMMA_RE.search(text) is not None
    out = text
    for mark in _VQA_PUNCT:
        if delete_mode or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _VQA_PERIOD_RE.sub("", out)


def normalize_vqa_answer(s: str) -> str:
    """A VQA-style normaliser (not the official one: see `evalai_process_answer`).

    1. Newlines and tabs become spaces; the ends are stripped.
    2. Punctuation (``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``): deleted when next to a space
       or when the answer contains a digit-comma-digit pattern, replaced by a space otherwise
       (so ``"red,blue"`` -> ``"red blue"``, where the EvalAI processor gives ``"redblue"``); a
       period is removed unless a digit follows it (no limit on how many).
    3. Lowercase; number words ``none``/``zero`` .. ``ten`` become digits; the articles are
       dropped; apostrophe-less contractions are restored from a generated table (``"dont"`` ->
       ``"don't"``, ``"im"`` -> ``"i'm"``, ``"ive"`` -> ``"i've"``; ordinary words such as
       ``"its"`` and ``"well"`` are kept); whitespace is collapsed. ``"it's"`` stays whole.
    """
    s = s.replace("\n", " ").replace("\t", " ").strip()
    words = []
    for word in _vqa_process_punctuation(s).lower().split():
        word = _VQA_NUMBER_WORDS.get(word, word)
        if word not in _VQA_ARTICLES:
            words.append(_VQA_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer_lenient(s: str) -> str:
    """`normalize_vqa_answer`, then a detached ``'s`` is joined to its word (``"he 's"`` ->
    ``"he's"``), so ``he's`` / ``hes`` / ``he 's`` and ``Im`` / ``I'm`` normalise alike."""
    return _DETACHED_S_RE.sub("'s", normalize_vqa_answer(s))


def vqa_accuracy_lenient(pred: str, refs: References, *, dataset: str | None = None) -> float:
    """`vqa_accuracy` with :func:`normalize_vqa_answer_lenient` instead of the EvalAI processor.

    Same soft score (`vqa_score`: leave-one-out over 10+ answers, ``min(1, m / min(3, n))``
    below) and the same once-per-dataset warning for fewer than 10 references. Fixes the
    processor's quirks: contractions match with or without apostrophes and in any case
    (``"Im"`` = ``"I'm"``, ``"hes"`` = ``"he's"`` = ``"he 's"``), commas between letters separate
    words, and every trailing period goes. Raises :class:`ValueError` for an empty list.
    """
    processed = [normalize_vqa_answer_lenient(r) for r in ref_list(refs)]
    if len(processed) < 10:
        _warn_few_references(dataset, len(processed))
    return vqa_score(normalize_vqa_answer_lenient(pred), processed)


# ---------------------------------------------------------------------------
# ANLS with the divisor taken from the compared strings
# ---------------------------------------------------------------------------


def anls_normalized(pred: str, refs: References, threshold: float = 0.5) -> float:
    """`anls` with ``NL = d / max(len(gt), len(det))`` over the *normalised* strings.

    Same normalisation (lowercase, whitespace collapsed), distance and threshold rule
    (``s = 1 - min NL``, 0 when ``s < threshold``) as lmms-eval's ``anls``; only the divisor
    differs, so whitespace around or inside an answer no longer inflates the score of a near
    miss (``"acme corp   "`` vs ``"acme corpx"`` scores 1 - 1/10, not 1 - 1/12). Raises
    :class:`ValueError` for an empty reference list.
    """
    det = " ".join(pred.lower().split())
    values = []
    for ref in ref_list(refs):
        gt = " ".join(ref.lower().split())
        length = max(len(gt), len(det))
        values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    score = 1 - min(values)
    return 0.0 if score < threshold else float(score)


# ---------------------------------------------------------------------------
# Relaxed accuracy with symmetric number parsing
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


def relaxed_accuracy_lenient(pred: str, refs: References, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy without lmms-eval's parsing quirks.

    Numbers are parsed by :func:`_parse_number` (surrounding spaces, thousands commas; ``%`` is
    dropped, so ``"12%"`` = ``"12"``; no ``nan``/``inf``). If both sides are numbers the answer is
    correct when ``|pred - ref| <= tolerance * |ref|`` (so a reference of ``0`` needs an exact
    ``0``, ``"0.0"`` included); otherwise on normalised exact match (:func:`normalize_answer`:
    ``"Yes."`` = ``"yes"``). The score is the max over references. Raises :class:`ValueError` for
    an empty reference list.
    """
    pred_num = _parse_number(pred)
    pred_norm = normalize_answer(pred)
    for ref in ref_list(refs):
        ref_num = _parse_number(ref)
        if pred_num is not None and ref_num is not None:
            if abs(pred_num - ref_num) <= tolerance * abs(ref_num):
                return 1.0
        elif pred_norm == normalize_answer(ref):
            return 1.0
    return 0.0
