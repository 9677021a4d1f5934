"""Metrics as the public evaluators compute them, quirks included (the defaults).

Published numbers come from these evaluators, so the defaults reproduce their outputs case for
case (own code, checked against the reference implementations on hand-worked cases):

* :func:`vqa_accuracy` -- the EvalAI answer processor and the TextVQA accuracy of LLaVA's
  ``llava/eval/m4c_evaluator.py`` (``EvalAIAnswerProcessor``, ``TextVQAAccuracyEvaluator``),
  which LLaVA-1.5 uses for TextVQA and whose processor it applies to VQAv2 answers.
* :func:`anls` -- lmms-eval's ``anls`` (``lmms_eval/api/metrics.py``), used by its DocVQA task.
* :func:`relaxed_accuracy` -- lmms-eval's ChartQA ``relaxed_correctness``
  (``lmms_eval/tasks/chartqa/utils.py``), from Pix2Struct / Qwen-VL.

Every quirk is listed in the function's docstring. Where a quirk is arguably wrong, a separately
named variant in :mod:`llava_mole.eval.metrics_lenient` fixes it; scores from the variants are
not comparable with published numbers.
"""

from __future__ import annotations

import re
import warnings

from .answers import References, levenshtein, ref_list

__all__ = [
    "FewReferencesWarning",
    "anls",
    "evalai_process_answer",
    "relaxed_accuracy",
    "relaxed_correctness",
    "vqa_accuracy",
    "vqa_score",
]

# ---------------------------------------------------------------------------
# EvalAI answer processor (m4c_evaluator.py)
# ---------------------------------------------------------------------------

# The processor's contraction table, written as "canonical: spellings mapped to it". Left out,
# because they can never change an output: two identity entries ("let's", "she's") and four
# keys spelt with a capital I ("Id've", "I'dve", "Im", "Ive"): every word is lowercased before
# the lookup, so those never match -- "Im" stays "im" and "I'm" stays "i'm". One entry maps the
# other way round: "somebody'd" becomes "somebodyd".
_CONTRACTION_TABLE = """
ain't: aint | aren't: arent | can't: cant | could've: couldve | couldn't: couldnt
couldn't've: couldn'tve couldnt've | didn't: didnt | doesn't: doesnt | don't: dont
hadn't: hadnt | hadn't've: hadnt've hadn'tve | hasn't: hasnt | haven't: havent | he'd: hed
he'd've: hed've he'dve | he's: hes | how'd: howd | how'll: howll | how's: hows | isn't: isnt
it'd: itd | it'd've: itd've it'dve | it'll: itll | ma'am: maam | mightn't: mightnt
mightn't've: mightnt've mightn'tve | might've: mightve | mustn't: mustnt | must've: mustve
needn't: neednt | not've: notve | o'clock: oclock | oughtn't: oughtnt
'ow's'at: ow's'at 'ows'at 'ow'sat | shan't: shant | she'd've: shed've she'dve
should've: shouldve | shouldn't: shouldnt | shouldn't've: shouldnt've shouldn'tve
somebodyd: somebody'd | somebody'd've: somebodyd've somebody'dve | somebody'll: somebodyll
somebody's: somebodys | someone'd: someoned | someone'd've: someoned've someone'dve
someone'll: someonell | someone's: someones | something'd: somethingd
something'd've: somethingd've something'dve | something'll: somethingll | that's: thats
there'd: thered | there'd've: thered've there'dve | there're: therere | there's: theres
they'd: theyd | they'd've: theyd've they'dve | they'll: theyll | they're: theyre
they've: theyve | 'twas: twas | wasn't: wasnt | we'd've: wed've we'dve | we've: weve
weren't: werent | what'll: whatll | what're: whatre | what's: whats | what've: whatve
when's: whens | where'd: whered | where's: wheres | where've: whereve | who'd: whod
who'd've: whod've who'dve | who'll: wholl | who's: whos | who've: whove | why'll: whyll
why're: whyre | why's: whys | won't: wont | would've: wouldve | wouldn't: wouldnt
wouldn't've: wouldnt've wouldn'tve | y'all: yall | y'all'll: yall'll y'allll
y'all'd've: yall'd've y'alld've y'all'dve | you'd: youd | you'd've: youd've you'dve
you'll: youll | you're: youre | you've: youve
"""


def _parse_contraction_table(table: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in table.replace("\n", " | ").split("|"):
        if entry.strip():
            canonical, spellings = entry.split(": ")
            out.update(dict.fromkeys(spellings.split(), canonical.strip()))
    return out


EVALAI_CONTRACTIONS: dict[str, str] = _parse_contraction_table(_CONTRACTION_TABLE)
"""Word -> replacement, applied word by word after lowercasing (114 effective entries)."""

EVALAI_NUMBERS: dict[str, str] = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
}
EVALAI_NUMBERS["none"] = "0"
EVALAI_ARTICLES = frozenset({"a", "an", "the"})
EVALAI_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-")
EVALAI_PUNCTUATION += (">", "<", "@", "`", ",", "?", "!")
# A comma between digits switches every mark to deletion. The processor removes all commas
# before this check, so it never fires; it is kept so the step matches the reference exactly.
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d),+(?=\d)")
# The reference writes ``(?!<=\d)(\.)(?!\d)``: the first group is a lookahead for the text
# "<=digit", always true in front of a ".", so the pattern means "a period not followed by a
# digit". It is applied with ``sub("", text, re.UNICODE)``: the third positional argument of
# ``Pattern.sub`` is ``count``, so at most re.UNICODE == 32 periods are removed.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _evalai_punctuation(text: str) -> str:
    """Punctuation step: delete or blank each mark, then strip up to 32 periods."""
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in EVALAI_PUNCTUATION:
        # The decision looks at the step's *input*, for each mark on its own.
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_STRIP_COUNT)


def evalai_process_answer(answer: str) -> str:
    """Normalise one answer exactly as ``EvalAIAnswerProcessor.__call__`` does.

    Steps and their quirks, in order:

    1. Lowercase; delete every ``,`` and ``?``; replace ``'s`` by `` 's`` (so ``"he's"`` becomes
       ``"he 's"`` -- equal to ``"he 's"`` but *not* to ``"hes"``, which step 4 maps to
       ``"he's"``); strip. Deleting commas first means ``"red,blue"`` becomes ``"redblue"`` and
       ``"1,000"`` ``"1000"``.
    2. Newlines and tabs become spaces; strip.
    3. Punctuation, for each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` separately: if the
       mark is next to a space anywhere in the text it is deleted everywhere, otherwise replaced
       by a space everywhere (``"black/white"`` -> ``"black white"``, ``"a - b"`` -> ``"a  b"``).
       ``' : % $ & * # ^ | ~`` and ``.`` are not in the list. Then periods not followed by a
       digit are removed, at most 32 of them (the ``count=re.UNICODE`` slip): ``"3.5"`` keeps its
       period, ``"yes."`` loses it, 35 dots leave 3.
    4. Lowercase and split on whitespace; number words ``none zero one .. ten`` become digits
       (only these: ``"eleven"`` stays); the articles ``a an the`` are dropped; each word found
       in :data:`EVALAI_CONTRACTIONS` is replaced (``"dont"`` -> ``"don't"``; the table's
       capitalised keys never match, so ``"Im"`` stays ``"im"`` and ``"Ive"`` ``"ive"``); words
       are joined with single spaces.

    Not idempotent (``"hes"`` -> ``"he's"`` -> ``"he 's"``); like the reference, it is applied once
    to the prediction and once to each reference.
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _evalai_punctuation(text)
    words = []
    for word in text.lower().split():
        word = EVALAI_NUMBERS.get(word, word)
        if word not in EVALAI_ARTICLES:
            words.append(EVALAI_CONTRACTIONS.get(word, word))
    return " ".join(words)


# ---------------------------------------------------------------------------
# VQA accuracy (TextVQAAccuracyEvaluator)
# ---------------------------------------------------------------------------


class FewReferencesWarning(UserWarning):
    """`vqa_accuracy` was given a sample with fewer than 10 reference answers."""


_WARNED_DATASETS: set[str | None] = set()


def _warn_few_references(dataset: str | None, n: int) -> None:
    """Warn once per dataset name that the official 10-answer protocol does not apply."""
    if dataset in _WARNED_DATASETS:
        return
    _WARNED_DATASETS.add(dataset)
    name = "an unnamed dataset" if dataset is None else f"dataset {dataset!r}"
    warnings.warn(
        f"vqa_accuracy on {name}: a sample has {n} reference answer(s), the official metric "
        f"expects 10; such samples score min(1, matches / min(3, n)) (1 for a match of a single "
        f"answer), which is not comparable with published VQAv2/TextVQA numbers",
        FewReferencesWarning,
        stacklevel=3,
    )


def vqa_score(pred: str, refs: list[str]) -> float:
    """Soft VQA score of an already processed prediction against processed references.

    With ``n >= 10`` references (the official setting), exactly ``TextVQAAccuracyEvaluator``:
    leave each reference out in turn, count the matches ``m_-i`` among the others and average
    ``min(1, m_-i / 3)`` over the ``n`` subsets (summed in reference order, as the reference
    does). A prediction matching none scores 0; with 10 refs, 1/2/3/4+ matches give
    0.3/0.6/0.9/1.0.

    With ``1 <= n < 10`` the reference has no answer (it asserts ``n == 10``), and leave-one-out
    over ``n`` answers would score a correct single-answer prediction 0 (its only reference
    left out, no others). We use ``min(1, m / min(3, n))``: the VQA rule "3 agreeing humans make
    an answer fully correct", with the threshold capped at the number of humans there are. So a
    single reference scores like an EvalAI-normalised exact match (the earlier ``min(1, m/3)``
    capped it silently at 1/3), 2 references give 0, 1/2 or 1, and 3..9 references ``min(1,
    m/3)``.
    """
    hits = [ref == pred for ref in refs]
    matches = sum(hits)
    if len(refs) < 10:
        return min(1.0, matches / min(3, len(refs)))
    total = 0.0
    for hit in hits:
        total += min(1, float(matches - hit) / 3)
    return total / len(refs)


def vqa_accuracy(pred: str, refs: References, *, dataset: str | None = None) -> float:
    """VQAv2 / TextVQA accuracy of one prediction, as LLaVA's ``m4c_evaluator.py`` computes it.

    ``vqa_score(evalai_process_answer(pred), [evalai_process_answer(r) for r in refs])``: both
    sides go through :func:`evalai_process_answer` (quirks listed there) and the soft score is
    :func:`vqa_score` (leave-one-out over the 10 human answers). Fewer than 10 references are
    outside the official protocol: the first such sample of each ``dataset`` name emits one
    :class:`FewReferencesWarning`; see :func:`vqa_score` for how they are scored.

    Raises :class:`ValueError` for an empty reference list.

    Reference: ``llava/eval/m4c_evaluator.py`` (``TextVQAAccuracyEvaluator``), LLaVA, commit
    c121f04; https://visualqa.org/evaluation.html.
    """
    processed = [evalai_process_answer(r) for r in ref_list(refs)]
    if len(processed) < 10:
        _warn_few_references(dataset, len(processed))
    return vqa_score(evalai_process_answer(pred), processed)


# ---------------------------------------------------------------------------
# ANLS (lmms-eval)
# ---------------------------------------------------------------------------


def anls(pred: str, refs: References, threshold: float = 0.5) -> float:
    """ANLS of one DocVQA prediction, exactly as lmms-eval's ``anls`` computes it.

    For each reference ``r``: both strings are lowercased and their whitespace collapsed
    (``" ".join(s.strip().lower().split())``: tabs, newlines, repeated and surrounding spaces all
    become single spaces or vanish), ``d`` is the Levenshtein distance of the two normalised
    strings, and ``NL(r) = d / max(len(r.upper()), len(pred.upper()))`` (0 when both raw strings
    are empty). The score is ``s = 1 - min_r NL(r)``, set to 0 when ``s < threshold``.

    Quirks reproduced:

    * The divisor uses the *raw* strings (before stripping and collapsing whitespace), upper-cased:
      extra whitespace lengthens it and so raises the score of a near miss (``"acme corp   "`` vs
      ``"acme corpx"``: 1 - 1/12 instead of 1 - 1/10), and ``"ß".upper() == "SS"`` counts two.
    * The threshold keeps ``s == 0.5`` (``NL = 0.5`` scores 0.5; the ST-VQA paper's
      ``NL < 0.5`` rule would give 0); ``threshold`` compares with the score, not with ``NL``.
    * Lowercasing can lengthen a string (``"İ".lower()`` has 2 code points), so ``NL > 1`` is
      possible; such scores fall below the threshold and become 0.

    Raises :class:`ValueError` for an empty reference list.

    Reference: lmms-eval ``lmms_eval/api/metrics.py`` (``anls``, from Qwen-VL's
    ``infographicsvqa_eval.py``); https://arxiv.org/abs/2007.00398 (DocVQA).
    """
    det = " ".join(pred.lower().split())
    values = []
    for ref in ref_list(refs):
        gt = " ".join(ref.lower().split())
        length = max(len(ref.upper()), len(pred.upper()))
        values.append(0.0 if length == 0 else float(levenshtein(gt, det)) / float(length))
    score = 1 - min(values)
    return 0.0 if score < threshold else float(score)


# ---------------------------------------------------------------------------
# ChartQA relaxed correctness (lmms-eval)
# ---------------------------------------------------------------------------


def _chartqa_float(text: str) -> float | None:
    """lmms-eval's ``_to_float``: Python ``float()``, with a trailing ``%`` meaning / 100."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(pred: str, target: str, max_relative_change: float = 0.05) -> bool:
    """lmms-eval's ChartQA ``relaxed_correctness`` for one prediction and one target.

    If the prediction parses as a number and the target parses as a number that is *truthy*
    (not 0), the answer is correct when ``abs(p - t) / abs(t) <= max_relative_change``.
    Otherwise it is correct when ``pred.lower() == target.lower()``.

    Parsing is Python ``float()`` on the raw string, except that a string ending in ``%`` is
    ``float(text.rstrip("%")) / 100``. Quirks reproduced:

    * ``%``: ``"12%"`` is 0.12, so ``"12%"`` vs ``"0.12"`` is correct and ``"12%"`` vs ``"12"`` is
      not; ``"12%%"`` is 0.12 too; ``"12% "`` (space after the sign) is not a number.
    * ``float()`` accepts surrounding whitespace (``" 5 "``), exponents (``"1e3"``), underscores
      (``"1_000"``), ``"+5"``, ``".5"``, ``"5."``, non-ASCII digits, and ``"nan"``/``"inf"``;
      it rejects thousands commas (``"1,000"`` is compared as a string) and ``""``.
    * Zero target: ``0`` is falsy, so a target of ``0`` (or ``"0%"``, ``"0.0"``, ``"1e-400"``)
      is compared as a string: ``"0"`` vs ``"0"`` is correct, ``"0.0"`` vs ``"0"`` is not.
    * ``nan`` or ``inf`` targets are truthy and never correct (the ratio is ``nan``); a ``nan``
      or infinite prediction is never correct against a finite target.
    * The ratio is computed as written, in floating point: ``"1.05"`` vs ``"1"`` gives
      0.050000000000000044 and is *not* correct.
    * The string fallback lowercases but does not strip: ``"yes "`` and ``"Yes."`` are wrong
      for ``"yes"``.

    Reference: lmms-eval ``lmms_eval/tasks/chartqa/utils.py`` (from Qwen-VL / Pix2Struct);
    https://arxiv.org/abs/2203.10244 (ChartQA, Sec. 5.1).
    """
    p = _chartqa_float(pred)
    t = _chartqa_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return pred.lower() == target.lower()


def relaxed_accuracy(pred: str, refs: References, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy: 1.0 if :func:`relaxed_correctness` holds for any reference.

    lmms-eval scores one target per question; with several references (e.g. the ``label`` list
    of HuggingFaceM4/ChartQA) the score is the max over them, so one reference gives exactly
    lmms-eval's number. Raises :class:`ValueError` for an empty reference list.
    """
    return float(any(relaxed_correctness(pred, r, tolerance) for r in ref_list(refs)))
