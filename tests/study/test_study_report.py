"""Pure tests of the study's numbers: statistics, verdict rules, convergence flag, report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from llava_mole.study.assemble import bootstrap_replicates, build_results, derive
from llava_mole.study.config import BootstrapSection
from llava_mole.study.render import render_report
from llava_mole.study.results import RunOutput, SettingScores
from llava_mole.study.stats import convergence_flag, summarize
from llava_mole.study.verdict import verdict

DOMAINS = ["general", "document"]


def table(**settings: dict[str, list[float]]) -> tuple[dict, dict]:
    """``({setting: {column: summary}}, {column: differences})`` from per-seed lists.

    Macro = mean over domains per seed. There are no per-item scores here, so the intervals
    come from resampling seeds only (each run is one "item": its score).
    """
    scores, matrices = {}, {}
    for setting, per_domain in settings.items():
        cols = {d: summarize(v) for d, v in per_domain.items()}
        seeds = list(zip(*(per_domain[d] for d in DOMAINS)))
        cols["macro"] = summarize([sum(s) / len(s) for s in seeds])
        scores[setting] = SettingScores(cols, list(range(len(seeds))))
        matrices[setting] = {d: np.array(v, dtype=float)[:, None] for d, v in per_domain.items()}
    reps = bootstrap_replicates(matrices, DOMAINS, BootstrapSection())
    return {s: v.columns for s, v in scores.items()}, derive(scores, reps, DOMAINS)


# A clear conflict on `general` (0.90 -> 0.61), nothing on `document` (noisy, tiny differences).
CLEAR = dict(
    single={"general": [0.90, 0.91, 0.89], "document": [0.50, 0.60, 0.55]},
    mix_lora={"general": [0.60, 0.62, 0.61], "document": [0.52, 0.58, 0.50]},
    mix_mole={"general": [0.85, 0.86, 0.84], "document": [0.55, 0.57, 0.52]},
    mix_lora_2x={"general": [0.65, 0.66, 0.64], "document": [0.55, 0.60, 0.50]},
    mix_lora_rank_kr={"general": [0.66, 0.64, 0.65], "document": [0.52, 0.56, 0.51]},
)


def test_summarize_uses_sample_std_and_zero_for_one_seed():
    s = summarize([0.5, 0.7, 0.6])
    assert s.mean == pytest.approx(0.6) and s.std == pytest.approx(0.1)
    assert (s.min, s.max, s.n) == (0.5, 0.7, 3)
    assert summarize([0.4]).std == 0.0
    assert summarize([]).mean is None


def test_verdict_conflict_and_mitigation_clear():
    v = verdict(*table(**CLEAR), DOMAINS, seeds=3)
    assert v.conflict_domains == ["general"]
    assert v.mitigated_domains == ["general"]
    general, document = v.columns["general"], v.columns["document"]
    assert general["conflict"].label == "conflict"
    assert general["conflict"].diff == pytest.approx(0.29)
    assert general["undertraining"].label == "gap_remains"
    assert general["mole"].label == "mitigates"
    assert "recovering 83% of the drop" in general["mole"].text  # 0.24 / 0.29
    assert general["parameters"].label == "beyond_parameters"
    assert general["mole_vs_2x"].label == "better"
    assert document["conflict"].label == "within_spread"
    assert "within seed spread: no conclusion" in document["conflict"].text
    text = " ".join(v.lines)
    assert "Data conflict on general." in text
    assert "MoLE mitigates the conflict" in text
    assert "routing adds more than the extra parameters" in text
    assert "one seed" not in text


def test_verdict_everything_within_spread_says_so_plainly():
    noisy = dict(
        single={"general": [0.50, 0.70, 0.60], "document": [0.40, 0.60, 0.50]},
        mix_lora={"general": [0.45, 0.65, 0.55], "document": [0.42, 0.62, 0.52]},
        mix_mole={"general": [0.50, 0.70, 0.58], "document": [0.40, 0.61, 0.50]},
        mix_lora_2x={"general": [0.48, 0.68, 0.58], "document": [0.41, 0.60, 0.49]},
        mix_lora_rank_kr={"general": [0.47, 0.66, 0.57], "document": [0.40, 0.62, 0.51]},
    )
    v = verdict(*table(**noisy), DOMAINS, seeds=3)
    assert v.conflict_domains == [] and v.mitigated_domains == []
    for col in ("general", "document", "macro"):
        assert v.columns[col]["conflict"].label == "within_spread"
        assert v.columns[col]["mole"].label == "within_spread"
        assert v.columns[col]["parameters"].label == "not_applicable"
    assert v.lines[0].startswith("No data conflict shows")
    assert "mitigates" not in " ".join(v.lines)


def test_verdict_2x_closing_the_gap_means_undertraining():
    closes = dict(CLEAR, mix_lora_2x={"general": [0.90, 0.89, 0.90], "document": [0.5, 0.6, 0.5]})
    v = verdict(*table(**closes), DOMAINS, seeds=3)
    general = v.columns["general"]
    assert general["conflict"].label == "conflict"
    assert general["undertraining"].label == "closes_gap"
    assert v.undertrained_domains == ["general"]
    assert v.mitigated_domains == []  # a gain over an undertrained baseline is not mitigation
    assert general["mole"].label == "improves"
    assert "looks like undertraining, not conflict" in " ".join(v.lines)
    assert "Data conflict on" not in " ".join(v.lines)


def test_verdict_rank_kr_explains_the_gain_by_parameters():
    params = dict(
        CLEAR, mix_lora_rank_kr={"general": [0.86, 0.85, 0.84], "document": [0.5, 0.6, 0.5]}
    )
    v = verdict(*table(**params), DOMAINS, seeds=3)
    general = v.columns["general"]
    assert general["mole"].label == "mitigates"
    assert general["parameters"].label == "explained_by_parameters"
    assert "explained by parameters, not routing" in " ".join(v.lines)


def test_verdict_one_seed_and_untrained_caveats():
    one = {s: {d: v[:1] for d, v in per.items()} for s, per in CLEAR.items()}
    v = verdict(*table(**one), DOMAINS, seeds=1, still_improving=["mix_lora/seed0"])
    assert "Only one seed" in v.lines[0]
    assert any("still improving" in line for line in v.lines)
    zeros = {s: {d: [0.0] for d in DOMAINS} for s in CLEAR}
    v = verdict(*table(**zeros), DOMAINS, seeds=1)
    assert any("task was not learnt" in line for line in v.lines)
    assert v.conflict_domains == []
    partial = {s: CLEAR[s] for s in ("single", "mix_lora")}
    v = verdict(*table(**partial), DOMAINS, seeds=3)
    assert v.columns["general"]["mole"].label == "not_run"
    assert v.conflict_domains == ["general"]


def test_convergence_flag_on_synthetic_curves():
    falling = [[s, 2.0 - s / 100] for s in range(1, 101)]  # still dropping linearly
    flag = convergence_flag(falling, tail=0.2, tolerance=0.02)
    assert flag.converged is False and flag.window == 20
    assert flag.relative_drop == pytest.approx((1.295 - 1.095) / 1.295)
    plateau = [[s, 1.0 + math.exp(-s / 10)] for s in range(1, 201)]
    assert convergence_flag(plateau, 0.2, 0.02).converged is True
    noisy_flat = [[s, 1.0 + 0.01 * (-1) ** s] for s in range(1, 51)]
    assert convergence_flag(noisy_flat, 0.2, 0.02).converged is True
    assert convergence_flag(falling[:3], 0.2, 0.02).converged is None
    assert convergence_flag([], 0.2, 0.02).converged is None
    # A looser tolerance accepts the same falling curve.
    assert convergence_flag(falling, 0.2, 0.5).converged is True


def _fake_records(domains: list[str], seeds: list[int]) -> list[dict]:
    """Finished-run records as ``collect_runs`` returns them, with made-up numbers."""
    base = {"single": 0.9, "mix_lora": 0.6, "mix_mole": 0.85, "mix_lora_2x": 0.65}
    base["mix_lora_rank_kr"] = 0.64
    records = []
    for setting, score in base.items():
        targets = [[d] for d in domains] if setting == "single" else [domains]
        for target in targets:
            for seed in seeds:
                curve = [[s, 3.0 / s + 0.01 * seed] for s in range(1, 21)]
                routing = None
                if setting == "mix_mole":
                    routing = {
                        "experts": 3,
                        "domains": domains,
                        "blocks": [
                            {
                                "block": b,
                                "domain": d,
                                "text": [0.4, 0.3, 0.3],
                                # Each domain has its own expert, under a seed-dependent
                                # numbering (expert labels are arbitrary per run).
                                "image": [1.0 if k == (i + seed) % 3 else 0.0 for k in range(3)],
                                "text_tokens": 100,
                                "image_tokens": 64,
                            }
                            for b in range(4)
                            for i, d in enumerate(domains)
                        ],
                    }
                records.append(
                    {
                        "id": f"{setting}/{target[0] if setting == 'single' else ''}/seed{seed}",
                        "setting": setting,
                        "base": setting,
                        "domain": target[0] if setting == "single" else None,
                        "seed": seed,
                        "run_dir": f"/runs/{setting}/seed{seed}",
                        "adapter": {
                            "type": "mole" if setting == "mix_mole" else "lora",
                            "rank": 3 if setting == "mix_lora_rank_kr" else 1,
                            "alpha": 2.0,
                            "num_experts": 3 if setting == "mix_mole" else 1,
                        },
                        "max_steps": 20,
                        "batch_size": 4,
                        "summary": {
                            "steps": 20,
                            "loss_curve": curve,
                            "final": {"loss": curve[-1][1]},
                            "wall_time_s": 1.5,
                            "tokens_per_s": 100.0,
                            "trainable_parameters": 1000,
                            "data": {"per_domain": {d: 40 for d in target}},
                        },
                        "eval": {
                            "per_domain": {
                                d: {"metric": "exact_match", "score": score + 0.01 * seed, "n": 4}
                                for d in target
                            },
                            "routing": routing,
                            "wall_time_s": 0.5,
                        },
                    }
                )
    return records


def test_report_and_plots_from_hand_made_runs(tmp_path: Path):
    from llava_mole.study.config import StudyConfig
    from llava_mole.study.plots import plot_all

    domains = ["general", "document", "biomedical"]
    study = StudyConfig(
        path=None, model=Path("/m"), mixture=Path("/mix.yaml"), domains=domains, seeds=[0, 1, 2]
    )
    results = build_results(study, [RunOutput(**r) for r in _fake_records(domains, [0, 1, 2])])
    assert results.settings == list(study.settings)
    assert results.scores["single"].columns["general"].scores == pytest.approx([0.9, 0.91, 0.92])
    assert results.scores["mix_lora"].columns["macro"].mean == pytest.approx(0.61)
    drop = results.derived["general"].contrasts["drop"]
    assert drop.mean == pytest.approx(0.3) and drop.spread == pytest.approx(math.hypot(0.01, 0.01))
    assert results.derived["general"].recovered == pytest.approx(0.25 / 0.3)
    assert results.verdict.mitigated_domains == domains
    routing = results.routing["mix_mole"]
    assert routing["seeds"] == 3 and len(routing["blocks"]) == 12
    # Separation within each seed (1.0), not of shares averaged over seeds (which would be 0).
    assert routing["separation"][0]["image"] == pytest.approx(1.0)
    assert routing["separation_per_seed"][0]["image"] == pytest.approx([1.0, 1.0, 1.0])
    assert routing["shown_seed"] == 0
    assert [b["image"] for b in routing["blocks"] if b["block"] == 0] == [
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
    ]
    assert routing["separation"][0]["text"] == pytest.approx(0.0)
    assert results.still_improving  # 3/s is still falling fast at step 20

    results.plots = {k: p.name for k, p in plot_all(results.to_json(), tmp_path).items()}
    for name in ("scores.png", "loss_curves.png", "routing.png"):
        assert (tmp_path / name).stat().st_size > 5000, name
    report = render_report(results)
    for part in (
        "# LLaVA-MoLE data-conflict study",
        "| single | 0.910 ± 0.010 | 0.910 ± 0.010 | 0.910 ± 0.010 | 0.910 ± 0.010 |",
        "| general | +0.300 ± 0.014 | +0.250 ± 0.014 | 83% |",
        "## Verdict",
        "Rules applied:",
        "## Convergence",
        "![routing](routing.png)",
        "| 0 | image | E0 100% | E1 100% | E2 100% | 1.00 |",
        "- MoLE routing: top-1 from the first step (the paper's recipe)",
        # 20 steps x 4 samples over 120 samples = 0.67 epochs: 2x the steps see 1.5x the samples.
        "- `mix_lora_2x` sees 1.50× the distinct training samples of `mix_lora` (120 available",
        "| mix_lora | LoRA r=1 α=2 | 20 | 4 | 0.7 | 1,000 |",
        "## Seed stability",
        "| mix_mole | 3 | 0.010 | 0.850–0.870 | 0.010 (general) |",
        "- `mix_mole`: macro seed std 0.010, no larger than mixed LoRA's (0.010); std ratio 1.00, "
        "95% interval [0.16, 6.24]: not resolved with 3 + 3 seeds.",
        "with 3 + 3 seeds a std ratio must exceed 6.3 to be resolved at 95%.",
    ):
        assert part in report, part
    json.dumps(results.to_json())  # JSON-serialisable as written to results.json

    # A study whose MoLE runs started with dense routing says so in its setup.
    study.train["router_dense_warmup"] = 0.2
    report = render_report(
        build_results(study, [RunOutput(**r) for r in _fake_records(domains, [0, 1, 2])])
    )
    assert "dense (every expert, weighted by its router probability) for the first 20%" in report
    assert "(`train.router_dense_warmup = 0.2`)" in report


def test_report_names_the_2x_control_by_what_it_doubled():
    from llava_mole.study.config import StudyConfig

    domains = ["general", "document"]
    study = StudyConfig(
        path=None, model=Path("/m"), mixture=Path("/mix.yaml"), domains=domains, seeds=[0, 1]
    )

    def report(samples_2x: int, steps: int) -> str:
        records = _fake_records(domains, [0, 1])
        for r in records:
            r["max_steps"] = r["summary"]["steps"] = steps  # >= 1 epoch over 80 samples
            if r["setting"] == "mix_lora_2x":
                r["summary"]["data"]["per_domain"] = {d: samples_2x for d in domains}
        return render_report(build_results(study, [RunOutput(**r) for r in records]))

    doubled = report(80, 40)
    assert "- `mix_lora_2x` is a **2× samples** control: twice the steps of `mix_lora` over " in (
        doubled
    )
    assert "160 distinct training samples instead of 80 (2.00×" in doubled
    same = report(40, 40)
    assert "- `mix_lora_2x` is a **2× steps** control: twice the steps of `mix_lora` over " in same
    assert "give its datasets a smaller `take` for a 2× samples control" in same


def _three_seed_report(score, keep=lambda record: True) -> str:
    """The report of a 2-domain, 3-seed fake study; ``score(record, domain index)`` or None."""
    from llava_mole.study.config import StudyConfig

    domains = ["general", "document"]
    study = StudyConfig(
        path=None, model=Path("/m"), mixture=Path("/mix.yaml"), domains=domains, seeds=[0, 1, 2]
    )
    records = [r for r in _fake_records(domains, [0, 1, 2]) if keep(r)]
    for r in records:
        for i, d in enumerate(r["eval"]["per_domain"].values()):
            value = score(r, i)
            d["score"] = d["score"] if value is None else value
    return render_report(build_results(study, [RunOutput(**r) for r in records]))


def test_seed_stability_flags_a_mole_spread_larger_than_mixed_lora():
    def collapsed(r, _):  # MoLE's seed 1 collapses
        return (0.2 if r["seed"] == 1 else 0.85) if r["setting"] == "mix_mole" else None

    report = _three_seed_report(collapsed)
    assert "- `mix_mole`: macro seed std 0.375, larger than mixed LoRA's (0.010); std ratio " in (
        report
    )
    assert "larger beyond the interval." in report
    assert "| mix_mole | 3 | 0.375 | 0.200–0.850 |" in report
    # The macro score of every seed, in seed order (what the std is computed from).
    assert "| setting | seed 0 | seed 1 | seed 2 |" in report
    assert "| mix_mole | 0.850 | 0.200 | 0.850 |" in report


def test_per_seed_scores_mark_a_seed_without_every_domain():
    def lost(r):  # single's seed 1 lost its document run: that seed has no macro score
        return not (r["setting"] == "single" and r["domain"] == "document" and r["seed"] == 1)

    report = _three_seed_report(lambda r, i: 0.5 + 0.1 * r["seed"] + 0.01 * i, keep=lost)
    assert "| mix_lora | 0.505 | 0.605 | 0.705 |" in report
    assert "| single | 0.500 | – | 0.700 |" in report  # each single run scores its domain only


def test_loss_limits_ignore_the_first_logged_losses_and_outliers():
    from llava_mole.study.plots import loss_limits

    # A first logged loss of 12 (as right after initialisation) and one spike of 9 must not
    # set the axis: the rest of the curve lies in [1.0, 1.5].
    curve = [[0, 12.0]] + [[s, 1.5 - 0.005 * s] for s in range(1, 101)]
    curve[50][1] = 9.0
    bottom, top = loss_limits([curve])
    assert 0.9 < bottom < 1.05 and 1.45 < top < 1.6
    assert loss_limits([]) is None
    flat = loss_limits([[[1, 2.0], [2, 2.0], [3, 2.0]]])
    assert flat is not None and flat[0] < 2.0 < flat[1]


def test_rules_prose_is_generated_from_the_rules():
    from llava_mole.study.rules import RULES, rules_prose
    from llava_mole.study.settings import REGISTRY

    prose = rules_prose(0.9, 500)
    assert "90% paired-bootstrap percentile interval (500 replicates" in prose[0]
    by_title = {r.title: text for r in RULES for text in prose if f"**{r.title}.**" in text}
    assert len(by_title) == len(RULES)
    for rule in RULES:
        for outcome in rule.outcomes:
            assert f"*{outcome.label}*" in by_title[rule.title], (rule.name, outcome.label)
    assert all(f"`{s.name}` = {s.summary}" in " ".join(prose) for s in REGISTRY)
    conflict = by_title["Conflict"]
    assert "`single − mix_lora`" in conflict and "*conflict* if it is *above*" in conflict


def test_runs_trained_to_convergence_and_silent_failures_reach_the_report(tmp_path: Path):
    from llava_mole.study.config import StudyConfig
    from llava_mole.study.stats import dev_convergence_flag

    domains = ["general", "document", "biomedical"]
    records = _fake_records(domains, [0, 1])
    mole = [r for r in records if r["setting"] == "mix_mole"]
    # One MoLE run stopped early on its dev split, the other used its whole budget.
    mole[0]["summary"]["convergence"] = {
        "best_step": 12, "best_dev_score": 0.81, "converged_at": 16,
        "dev_curve": [[4, 0.5], [8, 0.7], [12, 0.81], [16, 0.8]], "rule": {"patience": 1},
    }  # fmt: skip
    lora = next(r for r in records if r["setting"] == "mix_lora")
    lora["summary"]["convergence"] = {
        "best_step": 8, "best_dev_score": 0.7, "converged_at": 16, "lr_decayed_at": [12],
        "dev_curve": [[4, 0.5], [8, 0.7], [12, 0.6], [16, 0.65]], "rule": {"patience": 1},
    }  # fmt: skip
    mole[1]["summary"]["convergence"] = {
        "best_step": 20, "best_dev_score": 0.9, "converged_at": None,
        "dev_curve": [[10, 0.8], [20, 0.9]], "rule": {"patience": 3},
    }  # fmt: skip
    mole[1]["eval"]["warnings"] = ["answer collapse on document: 91% of 4 predictions are 'a b'"]
    study = StudyConfig(
        path=None, model=Path("/m"), mixture=Path("/mix.yaml"), domains=domains, seeds=[0, 1]
    )
    results = build_results(study, [RunOutput(**r) for r in records])
    flags = {r.id: r.convergence for r in results.runs if r.setting == "mix_mole"}
    assert [(f.rule, f.converged, f.best_step, f.stopped_at) for f in flags.values()] == [
        ("dev", True, 12, 16),
        ("dev", False, 20, None),
    ]
    assert mole[1]["id"] in results.still_improving and mole[0]["id"] not in results.still_improving
    report = render_report(results)
    assert f"- `{mole[0]['id']}`: converged at step 16 (best dev score 0.810 at step 12)" in report
    assert (
        f"- `{lora['id']}`: converged at step 16 (best dev score 0.700 at step 8; learning "
        "rate cut at step 12)" in report
    )
    assert "a dev plateau first cuts the learning rate" in report
    assert (
        f"- `{mole[1]['id']}`: used its budget of 20 steps, best dev score 0.900 at step 20"
        in report
    )
    assert "## Silent failures" in report
    assert f"- `{mole[1]['id']}`: answer collapse on document: 91% of 4 predictions" in report
    assert dev_convergence_flag({"dev_curve": [], "converged_at": None}).points == 0

    # Their dev curves are in results.json and drawn (dev_curves.png, linked from the report).
    from llava_mole.study.plots import plot_all

    assert results.runs[[r.id for r in results.runs].index(mole[0]["id"])].dev_curve[-1] == [
        16,
        0.8,
    ]
    results.plots = {k: p.name for k, p in plot_all(results.to_json(), tmp_path).items()}
    assert (tmp_path / "dev_curves.png").stat().st_size > 5000
    assert "![dev curves](dev_curves.png)" in render_report(results)


def test_a_missing_answer_single_domain_runs_share_is_listed_once_a_runs_own_per_run():
    from llava_mole.eval.collapse import MissingAnswer
    from llava_mole.study.config import StudyConfig

    domains = ["count", "order"]
    records = _fake_records(domains, [0, 1])
    orange = MissingAnswer("order", "orange", share=0.02, reference_share=0.14, n=500).message()
    three = MissingAnswer("count", "three", share=0.03, reference_share=0.24, n=500).message()
    by_id = {r["id"]: r for r in records}
    for run_id in ("single/order/seed0", "mix_lora//seed1", "mix_mole//seed0"):
        by_id[run_id]["eval"]["warnings"] = [orange]  # the base never says orange
    by_id["mix_mole//seed1"]["eval"]["warnings"] = [three]  # one seed never learnt three
    study = StudyConfig(
        path=None, model=Path("/m"), mixture=Path("/mix.yaml"), domains=domains, seeds=[0, 1]
    )
    lines = render_report(build_results(study, [RunOutput(**r) for r in records])).splitlines()
    section = lines[lines.index("## Silent failures") + 2 :]
    section = section[: section.index("")]
    assert section == [
        f"- `mix_mole//seed1`: {three}",
        "- missing answer on order: 'orange', in 3 run(s), single-domain ones too (a limit of "
        "the base or the data, not of mixing): `single/order/seed0`, `mix_lora//seed1`, "
        "`mix_mole//seed0`",
    ]
    assert MissingAnswer.what_of(three) == "missing answer on count: 'three'"
    assert MissingAnswer.what_of("dead expert 0 in block 1: 0.3% of tokens") is None
