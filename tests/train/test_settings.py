"""Every numeric training setting is range-checked where the config is read, and applied."""

from __future__ import annotations

import pytest

from llava_mole.cli import main
from llava_mole.train.config import ConfigError, load_train_config
from llava_mole.train.run import train
from llava_mole.train.trainer import MoLETrainer, NonFiniteLossError
from tests.train.test_train import base_overrides

BASE = ["model.path=m", "data.mixture=x.yaml", "output_dir=o"]


@pytest.mark.parametrize(
    "setting,match",
    [
        ("data.max_length=0", "data.max_length: must be >= 1"),
        ("train.save_steps=-5", "train.save_steps: must be >= 0"),
        ("train.stop_after_steps=-3", "train.stop_after_steps: must be >= 0"),
        ("train.max_grad_norm=-1", r"train.max_grad_norm: must be > 0 .*null turns clipping off"),
        ("train.max_grad_norm=0", "train.max_grad_norm: must be > 0"),
        ("train.save_total_limit=-1", "train.save_total_limit: must be >= 1"),
        ("train.collapse_window=0", "train.collapse_window: must be >= 1"),
        ("train.collapse_threshold=1.5", r"train.collapse_threshold: must be in \[0, 1\)"),
        ("train.max_skipped_share=2", r"train.max_skipped_share: must be in \[0, 1\]"),
        ("train.weight_decay=-0.1", "train.weight_decay: must be >= 0"),
        ("train.router_lr=0", "train.router_lr: must be > 0"),
        ("train.dev_decay_factor=1.0", r"train.dev_decay_factor: must be in \(0, 1\)"),
        ("train.dev_decay_factor=0", r"train.dev_decay_factor: must be in \(0, 1\)"),
        ("train.dev_decays=-1", "train.dev_decays: must be >= 0"),
        ("train.dev_smooth=0", "train.dev_smooth: must be >= 1"),
        ("train.dev_patience=0", "train.dev_patience: must be >= 1"),
        ("train.dev_every=0", "train.dev_every: must be >= 1"),
        ("train.dev_hold=1", r"train.dev_hold: must be in \[0, 1\)"),
        ("train.dev_hold=-0.1", r"train.dev_hold: must be in \[0, 1\)"),
        ("adapter.shared_rank=-1", "shared_rank: must be an integer >= 0"),
        ("train.num_workers=-1", "train.num_workers: must be >= 0"),
        ("adapter.mlp_targets=[nope]", "'nope' is not one of"),
    ],
)
def test_out_of_range_settings_are_refused(setting, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config(None, [*BASE, setting])


@pytest.mark.parametrize(
    "setting,shown",
    [
        ("train.dev_decay_factor=1.5", "train.dev_decay_factor: must be in (0, 1) (got 1.5)"),
        ("train.dev_smooth=0", "train.dev_smooth: must be >= 1 (got 0)"),
        ("train.dev_decays=-2", "train.dev_decays: must be >= 0 (got -2)"),
        ("train.dev_hold=1.5", "train.dev_hold: must be in [0, 1) (got 1.5)"),
    ],
)
def test_the_cli_refuses_an_out_of_range_rule_setting_in_one_line(tmp_path, capsys, setting, shown):
    (tmp_path / "c.yaml").write_text("{}\n")
    argv = ["train", str(tmp_path / "c.yaml")]
    for item in [*BASE[:2], f"output_dir={tmp_path / 'o'}", setting]:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"llava-mole train: error: {shown}"
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_null_turns_clipping_off_explicitly():
    assert load_train_config(None, [*BASE, "train.max_grad_norm=null"]).train.max_grad_norm is None


def test_max_length_is_applied(tiny_world, tmp_path):
    # 5 tokens cannot hold the image tokens: every sample is dropped (it used to be ignored).
    with pytest.raises(ConfigError, match="no usable training samples"):
        train(
            load_train_config(
                None, base_overrides(tiny_world, tmp_path / "r") + ["data.max_length=5"]
            )
        )


def test_nan_skip_fails_when_most_steps_were_skipped(tiny_world, tmp_path, monkeypatch):
    original = MoLETrainer.compute_loss

    def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(self, model, inputs, return_outputs, num_items_in_batch)
        return loss if self.state.global_step == 0 else loss * float("nan")

    monkeypatch.setattr(MoLETrainer, "compute_loss", poisoned)
    out = tmp_path / "skip"
    with pytest.raises(NonFiniteLossError, match=r"skipped 5 of 6 steps .*max_skipped_share=0.25"):
        train(load_train_config(None, base_overrides(tiny_world, out, nan_policy="skip")))
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize(
    "args,match",
    [
        (["--samples-per-domain", "-5"], "--samples-per-domain: must be >= 1"),
        (["--test-per-domain", "0"], "--test-per-domain: must be >= 1"),
        (["--num-classes", "1"], "--num-classes: must be >= 2"),
    ],
)
def test_make_data_ranges(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as exit_info:
        main(["make-data", str(tmp_path / "d"), *args])
    assert exit_info.value.code == 2
    assert f"argument {match}" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
