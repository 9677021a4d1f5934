"""Tests for ``llava_mole.eval.metrics``.

Expected values are worked out by hand from each metric's definition; the arithmetic is in
the comment next to each case.
"""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from llava_mole.eval.metrics import (
    METRICS,
    _parse_number,
    anls,
    closed_accuracy,
    exact_match,
    levenshtein,
    normalize_answer,
    normalize_vqa_answer,
    open_recall,
    pathvqa_score,
    relaxed_accuracy,
    relaxed_accuracy_lenient,
    score_predictions,
    vqa_accuracy,
)

# ---------------------------------------------------------------------------
# normalize_answer / exact_match
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The  Quick, brown fox!", "quick brown fox"),  # lowercase, drop ",", "!", "the"
        ("An apple a day", "apple day"),  # articles removed as whole words
        ("theater", "theater"),  # "the" inside a word is kept
        ("x-ray", "xray"),  # punctuation deleted, not replaced by a space
        ("  \tspaced\n out  ", "spaced out"),  # whitespace collapsed
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_exact_match_single_and_multiple_refs() -> None:
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Paris", ["London", "paris!"]) == 1.0  # matches the 2nd reference
    assert exact_match("Paris", ["London", "Rome"]) == 0.0
    assert exact_match("Paris", ("paris",)) == 1.0  # any sequence of str works


def test_exact_match_empty_prediction() -> None:
    # An empty prediction is scored normally: it only matches a reference that also
    # normalises to "" ("the" -> "" after article removal).
    assert exact_match("", "cat") == 0.0
    assert exact_match("", "the") == 1.0


def test_empty_reference_list_raises() -> None:
    # Documented convention: no ground truth -> ValueError for every metric.
    for metric in METRICS.values():
        with pytest.raises(ValueError, match="at least one reference"):
            metric("anything", [])


# ---------------------------------------------------------------------------
# VQA normalisation and accuracy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("two", "2"),  # number word -> digit
        ("Ten Dogs", "10 dogs"),  # lowercase + number word
        ("none", "0"),  # official table maps "none" to "0"
        ("dont", "don't"),  # contraction restored
        ("couldnt've", "couldn't've"),  # partially written double contraction
        ("its", "its"),  # ordinary word, not turned into "it's"
        ("A dog", "dog"),  # article dropped
        ("1,000", "1000"),  # digit,digit -> punctuation deleted
        ("1,000 red/blue", "1000 redblue"),  # digit,digit switches ALL punct to delete-mode
        ("red,blue", "red blue"),  # no digit comma, no adjacent space -> replaced by space
        ("red, blue", "red blue"),  # "," next to a space -> deleted
        ("black/white", "black white"),  # "/" replaced by a space
        ("yes.", "yes"),  # period not followed by a digit -> removed
        ("3.5", "3.5"),  # period followed by a digit -> kept
        ("1.", "1"),  # trailing period after a digit -> removed
        ("10:30", "10:30"),  # ":" is not in the official punctuation list
        ("it's", "it's"),  # apostrophes survive
        ("yes\n", "yes"),  # newline -> space -> stripped
        ("left\tside", "left side"),  # tab -> space
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(
    ("n_match", "expected"),
    [
        # 10 refs, m of them match. Leave-one-out subset i has m-1 matches if ref i matched
        # and m otherwise; acc_i = min(matches/3, 1); the score is the mean over the 10 subsets.
        (0, 0.0),  # every subset has 0 matches
        (1, 0.3),  # 9 subsets * 1/3 + 1 subset * 0 = 3 -> 3/10
        (2, 0.6),  # 8 * 2/3 + 2 * 1/3 = 16/3 + 2/3 = 6 -> 6/10
        (3, 0.9),  # 7 * 1 + 3 * 2/3 = 9 -> 9/10
        (4, 1.0),  # every subset keeps >= 3 matches
        (10, 1.0),
    ],
)
def test_vqa_accuracy_ten_refs_leave_one_out(n_match: int, expected: float) -> None:
    refs = ["cat"] * n_match + ["dog"] * (10 - n_match)
    assert vqa_accuracy("cat", refs) == pytest.approx(expected)


def test_vqa_accuracy_order_of_refs_does_not_matter() -> None:
    refs = ["dog", "cat", "dog", "dog", "cat", "dog", "dog", "dog", "dog", "dog"]
    assert vqa_accuracy("cat", refs) == pytest.approx(0.6)  # same as 2 matches above


@pytest.mark.filterwarnings("ignore::llava_mole.eval.metrics.FewReferencesWarning")
def test_vqa_accuracy_fewer_than_ten_refs() -> None:
    # Documented: with n < 10 refs, acc = min(matches / min(3, n), 1) over all refs.
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(2 / 3)  # 2/3
    assert vqa_accuracy("cat", ["cat"] * 5) == 1.0  # min(5/3, 1)
    # single ref: min(1/1, 1). Was min(1/3, 1) = 1/3, the silent cap issue 17 removes.
    assert vqa_accuracy("cat", "cat") == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0


def test_vqa_accuracy_uses_official_normalisation() -> None:
    # "Two." -> "2"; refs "2"/"two" -> "2": all 10 match -> 1.0
    assert vqa_accuracy("Two.", ["2"] * 5 + ["two"] * 5) == 1.0
    # "dont" -> "don't"; 3 of 10 refs match -> 0.9 (see table above)
    assert vqa_accuracy("dont", ["don't"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    # "The red one" -> "red 1"
    assert vqa_accuracy("The red one", ["red 1"] * 10) == 1.0


def test_vqa_accuracy_empty_prediction() -> None:
    assert vqa_accuracy("", ["cat"] * 10) == 0.0


# ---------------------------------------------------------------------------
# Levenshtein / ANLS
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "dist"),
    [
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("flaw", "lawn", 2),  # -f, +n
        ("", "abc", 3),  # three insertions
        ("abc", "", 3),
        ("same", "same", 0),
        ("hello", "hallo", 1),  # e->a
    ],
)
def test_levenshtein(a: str, b: str, dist: int) -> None:
    assert levenshtein(a, b) == dist


@cache
def _naive_levenshtein(a: str, b: str) -> int:
    """Recursive definition of the edit distance, used as an oracle."""
    if not a or not b:
        return len(a) + len(b)
    return min(
        _naive_levenshtein(a[1:], b) + 1,
        _naive_levenshtein(a, b[1:]) + 1,
        _naive_levenshtein(a[1:], b[1:]) + (a[0] != b[0]),
    )


@given(st.text(alphabet="abc", max_size=7), st.text(alphabet="abc", max_size=7))
def test_levenshtein_matches_recursive_definition(a: str, b: str) -> None:
    assert levenshtein(a, b) == _naive_levenshtein(a, b) == levenshtein(b, a)


def test_anls_hand_worked() -> None:
    # distance 1, max len 5 -> NL = 0.2 < 0.5 -> 1 - 0.2 = 0.8
    assert anls("hello", "hallo") == pytest.approx(0.8)
    # distance 3, max len 3 -> NL = 1.0 >= 0.5 -> 0
    assert anls("abc", "xyz") == 0.0
    # lowercased and stripped -> identical -> NL 0 -> 1
    assert anls("  HELLO ", "hello") == 1.0
    # max over refs: "hallo" gives 0.8, "hello" gives 1.0
    assert anls("hello", ["xyz", "hallo", "hello"]) == 1.0


def test_anls_threshold_boundary() -> None:
    # "ab" vs "ax": distance 1, max len 2 -> NL = 0.5 -> score 0.5, not < 0.5 -> kept
    # (lmms-eval's rule; the earlier "NL < 0.5" rule gave 0 here, see issue 17)
    assert anls("ab", "ax") == pytest.approx(0.5)
    # with threshold 0.6 (compared with the score): 0.5 < 0.6 -> 0
    assert anls("ab", "ax", threshold=0.6) == 0.0
    # "abcd" vs "abcx": NL = 1/4 = 0.25 -> 0.75
    assert anls("abcd", "abcx") == pytest.approx(0.75)


def test_anls_empty_strings() -> None:
    # empty vs "abc": distance 3 / max len 3 = 1.0 -> 0
    assert anls("", "abc") == 0.0
    # both empty: NL defined as 0 -> 1
    assert anls("", "  ") == 1.0


# ---------------------------------------------------------------------------
# ChartQA relaxed accuracy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("12", 12.0),
        ("12%", 12.0),  # percent sign dropped, not divided by 100
        (" 12 % ", 12.0),
        ("1,234.5", 1234.5),  # thousands separator
        ("-3.25", -3.25),
        (".5", 0.5),
        ("1e3", 1000.0),
        ("1,2", None),  # not a thousands grouping
        ("nan", None),
        ("inf", None),
        ("twelve", None),
        ("", None),
        ("%", None),
    ],
)
def test_parse_number(text: str, value: float | None) -> None:
    assert _parse_number(text) == value


# The definition these tests worked out by hand is now `relaxed_accuracy_lenient`; the default
# `relaxed_accuracy` is lmms-eval's (tests/eval/test_metrics_official.py).


def test_relaxed_accuracy_lenient_numeric() -> None:
    # |10.4 - 10| = 0.4 <= 0.05 * 10 = 0.5 -> correct
    assert relaxed_accuracy_lenient("10.4", "10") == 1.0
    # |10.6 - 10| = 0.6 > 0.5 -> wrong
    assert relaxed_accuracy_lenient("10.6", "10") == 0.0
    # |-10.4 - (-10)| = 0.4 <= 0.05 * |-10| = 0.5
    assert relaxed_accuracy_lenient("-10.4", "-10") == 1.0
    # "12%" -> 12 and "12" -> 12: difference 0
    assert relaxed_accuracy_lenient("12%", "12") == 1.0
    assert relaxed_accuracy_lenient("12", "12%") == 1.0
    # "1,000" -> 1000 vs 1040: |40| <= 50
    assert relaxed_accuracy_lenient("1,000", "1040") == 1.0
    # tolerance override: |10.6 - 10| = 0.6 <= 0.1 * 10 = 1.0
    assert relaxed_accuracy_lenient("10.6", "10", tolerance=0.1) == 1.0


def test_relaxed_accuracy_lenient_zero_reference_needs_exact() -> None:
    # tolerance * |0| = 0, so only an exact 0 counts
    assert relaxed_accuracy_lenient("0", "0") == 1.0
    assert relaxed_accuracy_lenient("0.0", "0") == 1.0
    assert relaxed_accuracy_lenient("0.01", "0") == 0.0


def test_relaxed_accuracy_lenient_text_falls_back_to_exact_match() -> None:
    assert relaxed_accuracy_lenient("Yes.", "yes") == 1.0  # normalised exact match
    assert relaxed_accuracy_lenient("red", "blue") == 0.0
    assert relaxed_accuracy_lenient("10", "ten") == 0.0  # only one side numeric -> string compare
    assert relaxed_accuracy_lenient("", "10") == 0.0  # empty prediction


def test_relaxed_accuracy_lenient_multiple_refs() -> None:
    # 20 is outside 5% of 10 but equals the second reference
    assert relaxed_accuracy_lenient("20", ["10", "20"]) == 1.0
    assert relaxed_accuracy_lenient("blue", ["10", "Blue"]) == 1.0


# ---------------------------------------------------------------------------
# PathVQA-style scoring
# ---------------------------------------------------------------------------


def test_closed_accuracy() -> None:
    assert closed_accuracy("Yes, it is.", "yes") == 1.0  # first yes/no token: "yes"
    assert closed_accuracy("No", "Yes") == 0.0
    assert closed_accuracy("no. yes", "no") == 1.0  # the FIRST yes/no word decides
    assert closed_accuracy("I think so", "yes") == 0.0  # no yes/no word -> 0
    assert closed_accuracy("", "no") == 0.0  # empty prediction -> 0


def test_closed_accuracy_requires_yes_no_reference() -> None:
    with pytest.raises(ValueError, match="yes/no"):
        closed_accuracy("yes", "tumor")


def test_open_recall() -> None:
    # ref tokens {tumor, cell, nuclei}; prediction contains cell and nuclei -> 2/3
    assert open_recall("cell nuclei are visible", "tumor cell nuclei") == pytest.approx(2 / 3)
    # after normalisation "The Nuclei." -> "nuclei": 1/1
    assert open_recall("The Nuclei.", "nuclei") == 1.0
    # multiset recall: ref has "cell" twice, prediction once -> 1/2
    assert open_recall("cell", "cell cell") == pytest.approx(0.5)
    assert open_recall("", "tumor") == 0.0  # empty prediction
    # reference empty after normalisation: 1 iff prediction is empty too
    assert open_recall("", "the") == 1.0
    assert open_recall("tumor", "the") == 0.0


def test_pathvqa_score_dispatch() -> None:
    assert pathvqa_score("Yes, there is.", "yes") == 1.0  # closed branch
    assert pathvqa_score("no", "yes") == 0.0  # closed branch
    # open branch: 2 of 3 reference tokens present
    assert pathvqa_score("cell nuclei", "tumor cell nuclei") == pytest.approx(2 / 3)
    # "yes" as an open answer to a non-yes/no reference simply has no overlap
    assert pathvqa_score("yes", "tumor") == 0.0
    # several refs: max(closed=0, open=1)
    assert pathvqa_score("tumor", ["yes", "tumor"]) == 1.0


# ---------------------------------------------------------------------------
# Registry and aggregation
# ---------------------------------------------------------------------------


def test_registry_keys() -> None:
    assert set(METRICS) == {"exact_match", "vqa_accuracy", "anls", "relaxed_accuracy", "pathvqa"}
    assert METRICS["pathvqa"] is pathvqa_score


def _rec(i: int, domain: str, pred: str, ref: str | list[str]) -> dict[str, object]:
    return {"id": str(i), "domain": domain, "prediction": pred, "reference": ref}


def test_score_predictions_macro_vs_micro() -> None:
    records = [
        _rec(0, "general", "Paris", "paris"),  # exact_match 1
        _rec(1, "general", "Rome", "paris"),  # exact_match 0
        _rec(2, "general", "Oslo", ["oslo", "OSLO"]),  # exact_match 1
        _rec(3, "doc", "hallo", "hello"),  # anls 0.8
    ]
    out = score_predictions(records, {"general": "exact_match", "doc": "anls", "x": "pathvqa"})
    assert out["per_domain"]["general"] == {
        "metric": "exact_match",
        "score": pytest.approx(2 / 3),  # (1 + 0 + 1) / 3
        "n": 3,
    }
    assert out["per_domain"]["doc"] == {"metric": "anls", "score": pytest.approx(0.8), "n": 1}
    assert "x" not in out["per_domain"]  # mapped domain without records is omitted
    assert list(out["per_domain"]) == ["general", "doc"]  # order of first appearance
    # macro: (2/3 + 0.8) / 2 = 0.7333...; micro: (1 + 0 + 1 + 0.8) / 4 = 0.7
    assert out["overall"]["macro"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert out["overall"]["micro"] == pytest.approx(0.7)
    assert out["overall"]["n"] == 4


def test_score_predictions_all_metrics_run() -> None:
    records = [
        _rec(0, "vqa", "two", ["2"] * 10),  # 1.0
        _rec(1, "chart", "10.4", "10"),  # 1.0
        _rec(2, "path", "no", "yes"),  # 0.0
    ]
    out = score_predictions(
        records, {"vqa": "vqa_accuracy", "chart": "relaxed_accuracy", "path": "pathvqa"}
    )
    assert [d["score"] for d in out["per_domain"].values()] == [1.0, 1.0, 0.0]
    assert out["overall"]["macro"] == pytest.approx(2 / 3)  # each domain has n=1
    assert out["overall"]["micro"] == pytest.approx(2 / 3)


def test_score_predictions_empty_records() -> None:
    # Documented: no records -> empty per_domain and zero scores.
    out = score_predictions([], {"general": "exact_match"})
    assert out == {"per_domain": {}, "overall": {"macro": 0.0, "micro": 0.0, "n": 0}}


def test_score_predictions_unknown_metric() -> None:
    with pytest.raises(ValueError, match="bleu"):
        score_predictions([_rec(0, "general", "a", "a")], {"general": "bleu"})


def test_score_predictions_unmapped_domain() -> None:
    with pytest.raises(ValueError, match="medical"):
        score_predictions([_rec(0, "medical", "a", "a")], {"general": "exact_match"})


def test_score_predictions_missing_field() -> None:
    with pytest.raises(KeyError, match="reference"):
        score_predictions([{"id": "0", "domain": "g", "prediction": "a"}], {"g": "exact_match"})


# ---------------------------------------------------------------------------
# Properties shared by all metrics
# ---------------------------------------------------------------------------

_answers = st.text(max_size=30)


def _is_nan_or_inf(text: str) -> bool:
    try:
        value = float(text.rstrip("%") if text.endswith("%") else text)
    except ValueError:
        return False
    return value != value or value in (float("inf"), float("-inf"))


@given(_answers, st.lists(_answers, min_size=1, max_size=12))
def test_scores_are_in_unit_interval(pred: str, refs: list[str]) -> None:
    for name, metric in METRICS.items():
        score = metric(pred, refs)
        assert 0.0 <= score <= 1.0, name


@given(_answers)
def test_identical_answer_scores_one(answer: str) -> None:
    # lmms-eval's relaxed correctness scores "nan" / "inf" 0 even against themselves
    # (tests/eval/test_metrics_official.py); every other answer matches itself.
    assume(not _is_nan_or_inf(answer))
    assert exact_match(answer, answer) == 1.0
    assert anls(answer, answer) == 1.0
    assert relaxed_accuracy(answer, answer) == 1.0
    assert pathvqa_score(answer, answer) == 1.0
    assert vqa_accuracy(answer, [answer] * 10) == 1.0


@given(_answers)
def test_normalisers_are_idempotent(answer: str) -> None:
    once = normalize_answer(answer)
    assert normalize_answer(once) == once
