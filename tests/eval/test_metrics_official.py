"""The default metrics reproduce the public evaluators case for case, quirks included.

References (read, not vendored): LLaVA ``llava/eval/m4c_evaluator.py`` (EvalAIAnswerProcessor,
TextVQAAccuracyEvaluator), lmms-eval ``lmms_eval/api/metrics.py`` (``anls``) and
``lmms_eval/tasks/chartqa/utils.py`` (``relaxed_correctness``). Every expected value below is
worked out by hand from those definitions (the arithmetic is in the comment) and is what the
reference code returns for the same input.
"""

from __future__ import annotations

import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llava_mole.data.mixture import KNOWN_METRICS, load_mixture
from llava_mole.eval.metrics import (
    ALL_METRICS,
    METRIC_VARIANTS,
    METRICS,
    FewReferencesWarning,
    anls,
    anls_normalized,
    evalai_process_answer,
    relaxed_accuracy,
    relaxed_accuracy_lenient,
    relaxed_correctness,
    score_predictions,
    vqa_accuracy,
    vqa_accuracy_lenient,
)

# ---------------------------------------------------------------------------
# EvalAI answer processor
# ---------------------------------------------------------------------------

EVALAI_CASES = [
    ("he's", "he 's"),  # "'s" is split off before anything else
    ("hes", "he's"),  # contraction table: hes -> he's (so it differs from "he's")
    ("he 's", "he 's"),  # same as "he's"
    ("Im", "im"),  # the table's key is "Im": never matches after lowercasing
    ("I'm", "i'm"),
    ("Ive", "ive"),  # same for "Ive"
    ("dont", "don't"),
    ("somebody'd", "somebodyd"),  # the one entry that maps the other way round
    ("red,blue", "redblue"),  # commas are deleted first, not turned into spaces
    ("1,000 red/blue", "1000 red blue"),  # so the digit-comma rule never fires: "/" -> " "
    ("black / white", "black white"),  # "/" next to a space: deleted; split collapses
    ("a/b c /d", "ab c d"),  # one "/" next to a space -> every "/" deleted
    ("x-ray", "x ray"),  # "-" not next to a space -> replaced by a space
    ("it's", "it 's"),
    ("Yes?", "yes"),  # "?" deleted in the first step
    ('"yes"!', "yes"),
    ("yes.", "yes"),  # period not before a digit: removed
    ("3.5.", "3.5"),  # the first period is before a digit: kept
    ("a.b.", "ab"),  # "a" is an article only as a whole word
    ("." * 35, "..."),  # at most 32 periods removed (sub(..., re.UNICODE) is count=32)
    ("one two three", "1 2 3"),
    ("The ten", "10"),  # article dropped, number word mapped
    ("eleven", "eleven"),  # only none/zero..ten are mapped
    ("10%", "10%"),  # "%" is not in the punctuation list
    ("10:30", "10:30"),  # nor ":"
    ("left\tside\n", "left side"),
    ("  Two  Dogs ", "2 dogs"),
]


@pytest.mark.parametrize(("raw", "expected"), EVALAI_CASES)
def test_evalai_process_answer(raw: str, expected: str) -> None:
    assert evalai_process_answer(raw) == expected


# ---------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------

# (prediction, references, official score, lenient score)
VQA_CASES = [
    ("he 's", ["he's"] * 10, 1.0, 1.0),  # both "he 's"
    ("hes", ["he's"] * 10, 0.0, 1.0),  # "he's" vs "he 's": no match officially
    ("he's", ["hes"] * 10, 0.0, 1.0),
    ("Im", ["I'm"] * 10, 0.0, 1.0),  # "im" vs "i'm"
    ("red,blue", ["red blue"] * 10, 0.0, 1.0),  # "redblue" vs "red blue"
    ("Two.", ["2"] * 5 + ["two"] * 5, 1.0, 1.0),
    # 10 refs, 3 match: 7 subsets keep 3 matches (1.0), 3 keep 2 (2/3): (7 + 2) / 10 = 0.9
    ("dont", ["don't"] * 3 + ["no"] * 7, 0.9, 0.9),
    # 11 refs, 1 match: 10 subsets keep it (1/3), 1 loses it (0): (10/3) / 11 = 10/33
    ("cat", ["cat"] + ["dog"] * 10, 10 / 33, 10 / 33),
]


@pytest.mark.filterwarnings("ignore::llava_mole.eval.metrics.FewReferencesWarning")
@pytest.mark.parametrize(("pred", "refs", "official", "lenient"), VQA_CASES)
def test_vqa_accuracy_quirks_and_lenient_variant(pred, refs, official, lenient) -> None:
    assert vqa_accuracy(pred, refs) == pytest.approx(official)
    assert vqa_accuracy_lenient(pred, refs) == pytest.approx(lenient)


def test_vqa_accuracy_is_bitwise_the_reference_sum() -> None:
    # 10 refs, 2 match: the reference sums 2 * (1/3) + 8 * (2/3) in ref order, then / 10.
    refs = ["cat", "dog", "cat"] + ["dog"] * 7
    expected = 0.0
    for hit in (1, 0, 1, 0, 0, 0, 0, 0, 0, 0):
        expected += min(1, float(2 - hit) / 3)
    assert vqa_accuracy("cat", refs) == expected / 10  # exact float equality


def test_vqa_accuracy_few_references_rule_and_warning() -> None:
    with pytest.warns(FewReferencesWarning, match="'pathvqa-like'") as caught:
        # single reference: min(1, 1 / min(3, 1)) = 1 (leave-one-out would give 0)
        assert vqa_accuracy("Cat.", ["cat"], dataset="pathvqa-like") == 1.0
        assert vqa_accuracy("dog", ["cat"], dataset="pathvqa-like") == 0.0
        # two references, one match: 1 / min(3, 2) = 0.5
        assert vqa_accuracy("cat", ["cat", "dog"], dataset="pathvqa-like") == 0.5
    assert len(caught) == 1  # once per dataset name
    with pytest.warns(FewReferencesWarning, match="'other-set'"):
        vqa_accuracy("cat", ["cat"], dataset="other-set")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ten references: no warning
        assert vqa_accuracy("cat", ["cat"] * 10, dataset="full-set") == 1.0


def test_score_predictions_names_the_domain_in_the_warning() -> None:
    records = [{"id": "0", "domain": "medical-x", "prediction": "yes", "reference": ["yes"]}]
    with pytest.warns(FewReferencesWarning, match="'medical-x'"):
        out = score_predictions(records, {"medical-x": "vqa_accuracy"})
    assert out["per_domain"]["medical-x"]["score"] == 1.0


# ---------------------------------------------------------------------------
# ANLS
# ---------------------------------------------------------------------------

# (prediction, references, official score, normalized-divisor score)
ANLS_CASES = [
    ("acme  corp", ["ACME Corp"], 1.0, 1.0),  # whitespace collapsed, lowercased: identical
    ("acme\tcorp\n", ["acme corp"], 1.0, 1.0),  # tabs and newlines too
    # d("acme corp", "acme corpx") = 1; divisor max(len("ACME CORP   "), len("ACME CORPX")) = 12
    ("acme corpx", ["acme corp   "], 1 - 1 / 12, 1 - 1 / 10),
    # trailing spaces in the prediction count in the divisor too: max(5, 8) = 8
    ("hallo   ", ["hello"], 1 - 1 / 8, 1 - 1 / 5),
    # "ßßßß".upper() == "SSSSSSSS": d = 4, divisor 8 -> NL 0.5 -> 0.5 kept; 4/4 -> 0
    ("ßßßß", ["ssss"], 0.5, 0.0),
    ("ab", ["ax"], 0.5, 0.5),  # NL = 0.5: score 0.5 is not < 0.5, kept
    ("abc", ["abd"], 1 - 1 / 3, 1 - 1 / 3),
    ("abc", ["xyz"], 0.0, 0.0),  # NL = 1 -> 0 < 0.5 -> 0
    ("hello", ["xyz", "hallo", "hello"], 1.0, 1.0),  # 1 - min NL over refs
    ("", [""], 1.0, 1.0),  # both empty: NL defined as 0
    ("", ["abc"], 0.0, 0.0),
]


@pytest.mark.parametrize(("pred", "refs", "official", "normalized"), ANLS_CASES)
def test_anls_quirks_and_normalized_variant(pred, refs, official, normalized) -> None:
    assert anls(pred, refs) == pytest.approx(official)
    assert anls_normalized(pred, refs) == pytest.approx(normalized)


def test_anls_threshold_compares_the_score() -> None:
    # "abcd" vs "abxy": NL 0.5, score 0.5; a 0.6 threshold drops it, 0.4 keeps it
    assert anls("abcd", "abxy", threshold=0.6) == 0.0
    assert anls("abcd", "abxy", threshold=0.4) == pytest.approx(0.5)


# ---------------------------------------------------------------------------
# ChartQA relaxed correctness
# ---------------------------------------------------------------------------

# (prediction, target, official, lenient)
RELAXED_CASES = [
    ("0.12", "12%", True, False),  # "12%" is 0.12
    ("12%", "0.12", True, False),
    ("12%", "12", False, True),  # 0.12 vs 12
    ("12", "12%", False, True),
    ("12 %", "0.12", True, False),  # rstrip("%") leaves "12 ", float() accepts it
    ("12%%", "0.12", True, False),  # rstrip removes every trailing "%"
    ("12% ", "0.12", False, False),  # does not end with "%": float("12% ") fails -> strings
    ("0", "0", True, True),  # zero target is falsy: string comparison, equal
    ("0.0", "0", False, True),  # zero target: strings "0.0" != "0"
    ("0", "0.0", False, True),
    ("0.01", "0", False, False),
    ("0%", "0", False, True),  # lenient: 0 (percent dropped) == 0
    (" 5 ", "5", True, True),  # float() strips whitespace
    ("1e3", "1000", True, True),
    ("1_000", "1000", True, True),  # float() accepts underscores; lenient: "_" deleted
    ("+5", "5", True, True),
    ("5.", "5", True, True),
    ("1,000", "1040", False, True),  # float() rejects commas; lenient reads 1000 (4% off)
    ("1,000", "1,000", True, True),  # strings equal
    ("nan", "nan", False, True),  # nan target is truthy, the ratio is nan: never correct
    ("inf", "inf", False, True),  # inf - inf = nan (lenient: not numbers, equal strings)
    ("inf", "5", False, False),
    ("5", "inf", False, False),  # |5 - inf| / inf = nan
    ("1.04", "1", True, True),  # 0.040000000000000036 <= 0.05
    ("1.05", "1", False, False),  # |1.05 - 1| = 0.050000000000000044 > 0.05 (floating point)
    ("10.4", "10", True, True),
    ("Yes", "yes", True, True),  # strings compared lowercased
    ("yes ", "yes", False, True),  # but not stripped
    ("Yes.", "yes", False, True),
    ("10", "ten", False, False),
]


@pytest.mark.parametrize(("pred", "target", "official", "lenient"), RELAXED_CASES)
def test_relaxed_correctness_quirks_and_lenient_variant(pred, target, official, lenient) -> None:
    assert relaxed_correctness(pred, target) is official
    assert relaxed_accuracy(pred, target) == float(official)
    assert relaxed_accuracy_lenient(pred, target) == float(lenient)


def test_relaxed_accuracy_max_over_references() -> None:
    assert relaxed_accuracy("20", ["10", "20"]) == 1.0
    assert relaxed_accuracy("0.12", ["5", "12%"]) == 1.0
    assert relaxed_accuracy("20", ["10", "30"]) == 0.0


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


def test_registry_defaults_and_variants() -> None:
    assert tuple(METRICS) == KNOWN_METRICS  # the defaults, one place
    assert set(METRIC_VARIANTS) == {
        "vqa_accuracy_lenient",
        "anls_normalized",
        "relaxed_accuracy_lenient",
    }
    assert ALL_METRICS == {**METRICS, **METRIC_VARIANTS}


def test_mixture_accepts_every_registered_metric(tmp_path) -> None:
    lines = [f"  - {{domain: d{i}, test: t.json, metric: {m}}}" for i, m in enumerate(ALL_METRICS)]
    path = tmp_path / "mix.yaml"
    path.write_text("datasets:\n" + "\n".join(lines) + "\n", encoding="utf-8")
    assert list(load_mixture(path).metrics.values()) == list(ALL_METRICS)


@pytest.mark.filterwarnings("ignore::llava_mole.eval.metrics.FewReferencesWarning")
@given(st.text(max_size=20), st.lists(st.text(max_size=20), min_size=1, max_size=11))
def test_variants_are_in_unit_interval(pred: str, refs: list[str]) -> None:
    for name, metric in ALL_METRICS.items():
        assert 0.0 <= metric(pred, refs) <= 1.0, name
