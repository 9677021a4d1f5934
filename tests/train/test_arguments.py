"""``train:`` -> MoLETrainingArguments: our names, the MoLE settings, pass-through Trainer fields."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from llava_mole import MoLEConfig, apply_mole
from llava_mole.adapters.state import get_state
from llava_mole.cli import main
from llava_mole.train.arguments import MoLETrainingArguments, training_arguments
from llava_mole.train.callbacks import DenseRoutingWarmup
from llava_mole.train.config import MOLE_SETTINGS, ConfigError, TrainConfig, load_train_config

BASE = ["model.path=m", "data.mixture=x.yaml", "output_dir=o"]


def args_for(*overrides: str) -> MoLETrainingArguments:
    return training_arguments(load_train_config(None, [*BASE, *overrides]), has_cuda=False)


def test_our_names_and_recipe_defaults_reach_the_trainer_fields():
    args = args_for(
        "train.per_device_batch_size=3",
        "train.gradient_accumulation=2",
        "train.lr_scheduler=linear",
        "train.epochs=2",
        "train.save_steps=0",
        "train.max_grad_norm=null",
        "train.report_to=none",
    )
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (3, 2)
    assert (args.lr_scheduler_type, args.num_train_epochs) == ("linear", 2.0)
    assert args.save_strategy == "no" and args.max_grad_norm == 0.0
    assert args.report_to == [] or args.report_to == "none" or args.report_to == ["none"]
    assert args.remove_unused_columns is False and args.label_names == ["labels"]
    assert args.learning_rate == 2e-4  # the recipe's default, not transformers' 5e-5


def test_any_trainer_field_passes_through_from_yaml_and_set(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("train:\n  optim: sgd\n  adam_beta2: 0.95\n  lr_scheduler_kwargs: {}\n")
    config = load_train_config(path, [*BASE, "train.torch_compile=false", "train.seed=3"])
    assert config.train.trainer_args == {
        "optim": "sgd",
        "adam_beta2": 0.95,
        "lr_scheduler_kwargs": {},
        "torch_compile": False,
    }
    args = training_arguments(config, has_cuda=False)
    assert (args.optim, args.adam_beta2, args.seed, args.data_seed) == ("sgd", 0.95, 3, 3)
    # Written back under train: (run_config.yaml), so a resumed run sees the same settings.
    assert config.to_dict()["train"]["optim"] == "sgd"
    saved = tmp_path / "run_config.yaml"
    saved.write_text(config.to_yaml())
    assert load_train_config(saved) == config


@pytest.mark.parametrize(
    "setting,message",
    [
        ("train.optimm=sgd", r"^train.optimm: unknown key \(did you mean 'optim'\?\)$"),
        (
            "train.lerning_rate=1",
            r"^train.lerning_rate: unknown key \(did you mean 'learning_rate'",
        ),
        ("train.bf16=true", r"^train.bf16: set train.precision instead$"),
        ("train.num_train_epochs=2", r"^train.num_train_epochs: set train.epochs instead$"),
        ("train.label_names=[x]", r"^train.label_names: set by this recipe"),
        ("train.adam_beta2=high", r"^train.adam_beta2: expected a number \(got 'high'\)$"),
        ("train.report_to=wandbb", r"^train.report_to: unknown logger 'wandbb' .*'wandb'"),
    ],
)
def test_bad_trainer_keys_are_one_line(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, [*BASE, setting])


def test_cli_reports_a_bad_trainer_key_in_one_line_with_status_2(tmp_path, capsys):
    path = tmp_path / "t.yaml"
    path.write_text("model: {path: m}\ndata: {mixture: x.yaml}\noutput_dir: o\n")
    assert main(["train", str(path), "--set", "train.optimm=sgd"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("llava-mole train: error: train.optimm: unknown key (did you mean 'optim'?)")


def test_mole_settings_are_trainer_arguments_with_the_same_defaults():
    args_fields = {f.name: f.default for f in dataclasses.fields(MoLETrainingArguments)}
    section = TrainConfig().train
    for name in MOLE_SETTINGS:
        assert args_fields[name] == getattr(section, name), name
    args = args_for("train.router_lr=1e-4", "train.nan_policy=skip", "train.collapse_window=3")
    assert (args.router_lr, args.nan_policy, args.collapse_window) == (1e-4, "skip", 3)


def test_adapter_section_is_mole_config():
    config = load_train_config(None, [*BASE, "adapter.type=lora", "adapter.alpha=2e1"])
    assert isinstance(config.adapter, MoLEConfig)
    assert (config.adapter.mode, config.adapter.type, config.adapter.alpha) == (
        "lora",
        "lora",
        20.0,
    )
    assert config.to_dict()["adapter"]["type"] == "lora"
    with pytest.raises(ConfigError, match=r"^adapter.extra: not a setting"):
        load_train_config(None, [*BASE, "adapter.extra={a: 1}"])
    with pytest.raises(ConfigError, match=r"^adapter.top_k: must be <= num_experts \(2\)"):
        load_train_config(None, [*BASE, "adapter.num_experts=2", "adapter.top_k=3"])


def test_dense_warmup_callback_follows_the_step_counter(llava):
    model = apply_mole(llava, MoLEConfig(rank=2, num_experts=2))
    warmup = DenseRoutingWarmup(0.5)
    for step, dense in [(0, True), (4, True), (5, False), (9, False)]:
        state = SimpleNamespace(global_step=step, max_steps=10)
        warmup.on_step_begin(None, state, None, model=model)
        assert get_state(model).dense_routing is dense, step
    DenseRoutingWarmup(0.0).on_step_begin(
        None, SimpleNamespace(global_step=0, max_steps=10), None, model=model
    )
    assert get_state(model).dense_routing is False
