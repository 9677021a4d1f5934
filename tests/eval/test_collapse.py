"""Answer-distribution collapse and expert health: the silent failures named."""

from __future__ import annotations

import pytest

from llava_mole.eval.collapse import (
    answer_collapse,
    evaluation_warnings,
    expert_findings,
    missing_answers,
)


def test_a_domain_answering_one_string_is_named_with_its_share():
    references = [f"word{i % 20}" for i in range(100)]
    predictions = ["Alpha  Bravo"] * 91 + references[:9]
    found = answer_collapse("document", predictions, references)
    assert found is not None
    assert (found.answer, found.share, found.reference_share, found.n) == (
        "alpha bravo",
        0.91,
        0.05,
        100,
    )
    assert "document" in found.message("mix_mole seed 1") and "91%" in found.message()


def test_skewed_references_and_healthy_or_tiny_domains_are_not_flagged():
    yes_no = ["yes"] * 80 + ["no"] * 20
    assert (
        answer_collapse("vqa", ["yes"] * 100, yes_no) is None
    )  # the data is skewed, not the model
    varied = [f"a{i % 7}" for i in range(70)]
    assert answer_collapse("general", varied, varied) is None
    assert answer_collapse("general", ["x"] * 5, [str(i) for i in range(5)]) is None  # too few
    # The boundary: exactly min_share and exactly ratio x the reference share is flagged.
    refs = [f"r{i % 4}" for i in range(40)]  # top reference share 0.25
    assert answer_collapse("d", ["z"] * 20 + refs[:20], refs) is not None
    assert answer_collapse("d", ["z"] * 19 + refs[:21], refs) is None
    with pytest.raises(ValueError, match="3 predictions for 2 references"):
        answer_collapse("d", ["a", "b", "c"], ["a", "b"])


def _count_domain(three_said: int) -> tuple[list[str], list[str]]:
    """125 one, 107 two, 121 three, 125 four (references); ``three_said`` of the threes right,
    the rest answered "two"."""
    refs = ["one"] * 125 + ["two"] * 107 + ["three"] * 121 + ["four"] * 125
    preds = ["one"] * 125 + ["two"] * 107 + ["three"] * three_said + ["two"] * (121 - three_said)
    preds += ["four"] * 125
    return preds, refs


def test_a_common_answer_the_run_never_gives_is_named_with_both_shares():
    preds, refs = _count_domain(three_said=10)  # the skills-world MoLE seed that never said it
    assert answer_collapse("count", preds, refs) is None  # its top answer has 48%: not a collapse
    (found,) = missing_answers("count", preds, refs)
    assert (found.answer, found.n) == ("three", 478)
    assert found.reference_share == pytest.approx(121 / 478) and found.share == pytest.approx(
        10 / 478
    )
    message = found.message("mix_mole/seed2")
    assert message == (
        "mix_mole/seed2: missing answer on count: 'three' is the reference of 25% of 478 items "
        "but 2% of the predictions"
    )
    records = [{"domain": "count", "prediction": p, "reference": [r]} for p, r in zip(preds, refs)]
    assert evaluation_warnings(records) == [found.message()]


def test_answers_given_often_enough_rare_ones_and_small_domains_are_not_missing():
    assert missing_answers("count", *_count_domain(three_said=105)) == []  # a healthy seed
    # The boundary: predicted exactly ratio x its reference share is not missing, one less is.
    refs = ["a"] * 40 + ["b"] * 40  # each 50% of the references
    assert missing_answers("d", ["a"] * 70 + ["b"] * 10, refs) == []  # b at 12.5% = 0.25 x 50%
    assert [m.answer for m in missing_answers("d", ["a"] * 71 + ["b"] * 9, refs)] == ["b"]
    # Open answers, each under 10% of the references, are never flagged however wrong.
    varied = [f"w{i % 20}" for i in range(100)]
    assert missing_answers("vqa", ["x"] * 100, varied) == []
    assert missing_answers("d", ["a"] * 39, ["b"] * 39) == []  # fewer than 40 items
    with pytest.raises(ValueError, match="3 predictions for 2 references"):
        missing_answers("d", ["a", "b", "c"], ["a", "b"])


def test_dead_and_monopolising_experts_per_block():
    loads = [
        [0.34, 0.33, 0.33],  # healthy
        [0.90, 0.08, 0.02],  # expert 0 monopolises (>= 0.833), expert 2 is dead (< 0.0333)
        [0.5, 0.5, 0.0],  # expert 2 dead
    ]
    found = [(f.block, f.expert, f.kind) for f in expert_findings(loads)]
    assert found == [(1, 0, "monopolising"), (1, 2, "dead"), (2, 2, "dead")]
    assert expert_findings([[1.0]]) == []  # K = 1 is plain LoRA
    assert (
        expert_findings([[0.74, 0.26]]) == []
        and expert_findings([[0.75, 0.25]])[0].kind == "monopolising"
    )
    assert "block 1" in expert_findings(loads)[0].message("run a")


def test_evaluation_warnings_name_collapsed_domains_and_dead_experts():
    import torch

    from llava_mole.eval.collapse import evaluation_warnings

    records = [
        {"domain": "general", "prediction": "kilo", "reference": [f"w{i % 12}", "x"]}
        for i in range(24)
    ] + [
        {"domain": "document", "prediction": f"w{i % 12}", "reference": f"w{i % 12}"}
        for i in range(24)
    ]
    counts = {0: torch.tensor([[[5.0, 5.0, 0.0]], [[4.0, 6.0, 0.0]]]), 1: torch.ones(2, 1, 3)}
    lines = evaluation_warnings(records, counts)
    assert lines == [
        "answer collapse on general: 100% of 24 predictions are 'kilo' (the most frequent reference is 8%)",
        "dead expert 2 in block 0: 0.0% of tokens",
    ]
    assert evaluation_warnings(records[24:]) == []


def test_evaluate_reports_each_collapsed_domain_in_its_results(tiny_world, tmp_path, monkeypatch):
    from llava_mole.eval import generation
    from llava_mole.eval.evaluation import evaluate
    from llava_mole.toy.synthetic import make_data

    world = make_data(tmp_path / "world", samples_per_domain=2, test_per_domain=12)  # >= 10 each

    def one_answer(model, processor, prompts, images, **kwargs):
        calls.append(len(prompts))
        return ["alpha"] * len(prompts)  # the decoding stub: every answer is one word

    calls: list[int] = []
    monkeypatch.setattr(generation, "generate_answers", one_answer)
    result = evaluate(
        tiny_world["model"], mixture=world / "mixture.yaml", out=tmp_path / "r.json", progress=False
    )
    assert calls and result["n"] == 36
    assert [line.split(":")[0] for line in result["warnings"]] == [
        f"answer collapse on {d}" for d in ("general", "document", "biomedical")
    ]
    written = __import__("json").loads((tmp_path / "r.json").read_text())
    assert written["warnings"] == result["warnings"]
