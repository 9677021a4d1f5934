"""End to end: a tiny two-domain study (1 seed, all five settings, 4 steps), then resumption.

One study run is shared by the tests of this module (it dominates their time); the resumption
test deletes parts of it and checks that exactly those are redone, leaving it complete again.
"""

from __future__ import annotations

import concurrent.futures as futures
import json
import shutil
from pathlib import Path

import pytest
import torch

from llava_mole.cli import main
from llava_mole.study import runner, settings
from llava_mole.study.compare import StudyConfigError, StudyWorkersError, run_study

from .conftest import write_study

RUN_IDS = {
    "single/general/seed0",
    "single/document/seed0",
    "mix_lora/seed0",
    "mix_mole/seed0",
    "mix_lora_2x/seed0",
    "mix_lora_rank_kr/seed0",
}


@pytest.fixture(scope="module")
def finished(study_world, tmp_path_factory):
    """The study run once: ``(study yaml, out dir, results)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 busy shared cores: one thread avoids oversubscription
    try:
        root = tmp_path_factory.mktemp("study")
        study = write_study(root / "study.yaml", study_world)
        out = root / "out"
        results = run_study(study, out, progress=False).to_json()
        yield study, out, results
    finally:
        torch.set_num_threads(threads)


def _numbers(results: dict) -> dict:
    """Everything in the results that must not depend on when or where a run was done."""
    return {
        "scores": results["scores"],
        "derived": results["derived"],
        "routing": results["routing"],
        "verdict": results["verdict"]["lines"],
        "curves": {r["id"]: r["loss_curve"] for r in results["runs"]},
        "table": results["table"],
    }


def test_compare_writes_a_complete_report(finished):
    _, out, results = finished
    for name in ("report.md", "results.json", "scores.png", "loss_curves.png", "routing.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert {r["id"] for r in results["runs"]} == RUN_IDS
    assert results["settings"] == list(settings.SETTINGS)
    for run in results["runs"]:
        run_dir = Path(run["run_dir"])
        assert (run_dir / "summary.json").is_file() and (run_dir / "eval.json").is_file()
        items = json.loads((run_dir / "item_scores.json").read_text())["domains"]
        for domain, entry in items.items():  # per-item scores average to the domain's score
            assert sum(entry["scores"]) / len(entry["scores"]) == pytest.approx(
                run["scores"][domain]
            )
        assert run["loss_curve"] and run["wall_time_s"] > 0
        expected = [run["domain"]] if run["domain"] else ["general", "document"]
        assert sorted(run["scores"]) == sorted(expected)  # single runs: own domain only
    steps = {r["id"]: r["steps"] for r in results["runs"]}
    assert steps["single/general/seed0"] == 2 and steps["mix_lora_2x/seed0"] == 8
    for setting in settings.SETTINGS:
        for col in ("general", "document", "macro"):
            assert results["scores"][setting][col]["n"] == 1
    routing = results["routing"]["mix_mole"]
    assert routing["experts"] == 3 and len(routing["blocks"]) == 4 * 2
    assert set(results["routing"]) == {"mix_mole"}
    # Intervals from the test items (4 per domain) and seeds, for every contrast.
    assert results["uncertainty"]["items"] == {"general": 4, "document": 4}
    drop = results["derived"]["general"]["drop"]
    assert drop["ci"][0] <= drop["mean"] <= drop["ci"][1]

    report = (out / "report.md").read_text()
    for part in (
        "# LLaVA-MoLE data-conflict study",
        "## Setup",
        "| setting | general | document | macro |",
        "| mix_lora_rank_kr | LoRA r=1, MLP r=3 ",
        "## Drop and recovery",
        "## Verdict",
        "Only one seed",
        "Rules applied:",
        "## Convergence",
        "![scores](scores.png)",
        "![loss curves](loss_curves.png)",
        "![routing](routing.png)",
    ):
        assert part in report, part
    assert results["table"] in report


def test_resumption_redoes_only_what_is_missing(finished, monkeypatch):
    study, out, before = finished
    drop_eval = out / "runs" / "mix_mole" / "seed0" / "eval.json"
    drop_run = out / "runs" / "single" / "document" / "seed0"
    drop_eval.unlink()
    shutil.rmtree(drop_run)
    untouched = {
        p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json") if drop_run not in p.parents
    }

    calls: dict[str, list[str]] = {"train": [], "evaluate": []}
    real_train, real_evaluate = runner.train, runner.evaluate

    def counting_train(config, *args, **kwargs):
        calls["train"].append(str(Path(config.output_dir).relative_to(out / "runs")))
        return real_train(config, *args, **kwargs)

    def counting_evaluate(model_dir, adapter_dir, *args, **kwargs):
        calls["evaluate"].append(str(Path(adapter_dir).relative_to(out / "runs")))
        return real_evaluate(model_dir, adapter_dir, *args, **kwargs)

    monkeypatch.setattr(runner, "train", counting_train)
    monkeypatch.setattr(runner, "evaluate", counting_evaluate)
    after = run_study(study, out, progress=False).to_json()

    assert calls["train"] == ["single/document/seed0"]
    assert sorted(calls["evaluate"]) == ["mix_mole/seed0", "single/document/seed0"]
    for path, mtime in untouched.items():
        assert path.stat().st_mtime_ns == mtime, path
    assert _numbers(after) == _numbers(before)  # each run is deterministic

    # A finished run is never silently reused under a changed config.
    changed = write_study(
        study.with_name("changed.yaml"),
        {"model": Path(before["setup"]["model"]), "mixture": Path(before["setup"]["mixture"])},
        train={"learning_rate": 2.0e-3, "max_steps": 6, "per_device_batch_size": 4},
    )
    calls["train"].clear()
    with pytest.raises(StudyConfigError, match="train.max_steps=2, the study now asks 3"):
        run_study(changed, out, progress=False)
    assert calls["train"] == []


@pytest.mark.slow
def test_parallel_workers_give_identical_runs(finished, study_world, tmp_path):
    _, _, serial = finished
    study = write_study(
        tmp_path / "parallel.yaml", study_world, settings=["mix_lora", "mix_mole"], workers=2
    )
    parallel = run_study(study, tmp_path / "out", progress=False).to_json()
    assert {r["id"] for r in parallel["runs"]} == {"mix_lora/seed0", "mix_mole/seed0"}
    for setting in ("mix_lora", "mix_mole"):
        assert parallel["scores"][setting] == serial["scores"][setting]
    curves = {r["id"]: r["loss_curve"] for r in serial["runs"]}
    for run in parallel["runs"]:
        assert run["loss_curve"] == curves[run["id"]], run["id"]
        assert (Path(run["run_dir"]) / "study.log").stat().st_size > 0  # worker output kept
    assert parallel["routing"] == {"mix_mole": serial["routing"]["mix_mole"]}


class _DeadPool:
    """A process pool whose workers are already gone (as after an OOM kill)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def submit(self, fn, *args):
        future = futures.Future()
        future.set_exception(futures.process.BrokenProcessPool("a child process terminated"))
        return future

    def shutdown(self, wait=True, cancel_futures=False) -> None:
        pass


def test_a_dead_worker_pool_is_one_clear_error(study_world, tmp_path, monkeypatch, capsys):
    study = write_study(tmp_path / "s.yaml", study_world, settings=["mix_lora"], workers=2)
    monkeypatch.setattr(futures, "ProcessPoolExecutor", _DeadPool)
    with pytest.raises(StudyWorkersError, match="worker processes stopped abruptly"):
        run_study(study, tmp_path / "out", progress=False)
    assert "study.log" not in capsys.readouterr().out  # no pointer to a log that was never written
    assert main(["compare", str(study), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error: the study's worker processes stopped abruptly" in err and "Traceback" not in err
