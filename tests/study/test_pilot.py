"""`compare --plan`: the probes run as study runs and size the study from their numbers."""

from __future__ import annotations

import json

import pytest
import torch

from llava_mole.study.config import load_study
from llava_mole.study.pilot import PilotSettings, pilot_study, run_pilot

from .conftest import write_study


def test_the_pilot_probes_each_setting_and_proposes_a_plan(study_world, tmp_path, capsys):
    study = load_study(write_study(tmp_path / "study.yaml", study_world))
    pilot = PilotSettings(
        settings=("mix_lora", "mix_mole"),
        learning_rates=(2e-3,),
        steps=4,
        dev_per_domain=2,
        evals=2,
    )
    probes, names = pilot_study(study, pilot)
    assert probes.settings == [] and probes.seeds == [0, 1]
    assert {e.base for e in probes.extra_settings} == {"mix_lora", "mix_mole"}
    assert all(
        e.train["dev_per_domain"] == 2 and e.train["dev_every"] == 2 for e in probes.extra_settings
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plan = run_pilot(study, tmp_path / "out", pilot, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert plan.lr == {"mix_lora": 2e-3, "mix_mole": 2e-3}
    assert plan.budget_steps in (6, 12)  # 3 x the step (2 or 4) that reached 90% of the best
    assert set(plan.noise) == {"mix_lora", "mix_mole"} and plan.seconds > 0
    record = json.loads((tmp_path / "out" / "pilot" / "plan.json").read_text())
    assert record["budget_steps"] == plan.budget_steps and len(record["probes"]) == 2
    assert all([s for s, _ in p["dev_curve"]] == [2, 4] for p in record["probes"])
    assert any("estimated wall time" in line for line in plan.lines(pilot.delta))


def test_pilot_settings_refuse_one_seed():
    with pytest.raises(ValueError, match="at least 2 seeds"):
        PilotSettings(seeds=(0,))
