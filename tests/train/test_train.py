"""Training with the Trainer subclass on the tiny world: outputs, exact resume, faults."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llava_mole.train.config import ConfigError, load_train_config
from llava_mole.train.run import train
from llava_mole.train.trainer import MoLETrainer, NonFiniteLossError


def base_overrides(world, out, **train_kw) -> list[str]:
    items = [
        f"model.path={world['model']}",
        f"data.mixture={world['mixture']}",
        f"output_dir={out}",
        "adapter.rank=4",
        "adapter.alpha=8",
        "adapter.num_experts=3",
        "train.per_device_batch_size=4",
        "train.learning_rate=0.002",
        "train.logging_steps=1",
        "train.report_to=[none]",
        "train.max_steps=6",
    ]
    items += [f"train.{k}={v}" for k, v in train_kw.items()]
    return items


def logged_losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (run_dir / "logs.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def assert_same_training(run_a, run_b, atol: float) -> None:
    """Two finished runs logged the same losses (rel 1e-5) and saved the same adapter."""
    la, lb = logged_losses(run_a), logged_losses(run_b)
    assert la.keys() == lb.keys() and la
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-5)
    a = load_file(str(run_a / "adapter_model.safetensors"))
    b = load_file(str(run_b / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol), key


def test_config_errors_name_the_key(tiny_world, tmp_path):
    with pytest.raises(ConfigError, match="train.max_stepz: unknown key"):
        load_train_config(None, base_overrides(tiny_world, tmp_path) + ["train.max_stepz=3"])
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        load_train_config(None, base_overrides(tiny_world, tmp_path) + ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="adapter.num_experts"):
        load_train_config(None, base_overrides(tiny_world, tmp_path) + ["adapter.num_experts=0"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_train_config(tmp_path / "nope.yaml")
    cfg = load_train_config(
        None, base_overrides(tiny_world, tmp_path) + ["data.mixture=/nonexistent.yaml"]
    )
    with pytest.raises(ConfigError, match="data.mixture: file not found"):
        train(cfg)


def test_run_outputs_and_exact_resume(tiny_world, tmp_path):
    # Dense routing for steps 0-2: the resumed half must continue from step 3 in top-1 routing.
    dense = {"router_dense_warmup": 0.5}
    full = tmp_path / "full"
    result = train(load_train_config(None, base_overrides(tiny_world, full, save_steps=3, **dense)))
    assert result.completed
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "summary.json",
        "run_config.yaml",
        "training.png",
        "logs.jsonl",
    ):
        assert (full / name).is_file(), name
    summary = json.loads((full / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["tokens_per_s"] > 0
    # The prompt format travels with the adapter (the synthetic world has no system prompt).
    for adapter in (full, full / "checkpoint-6"):
        extra = json.loads((adapter / "adapter_config.json").read_text())["extra"]
        assert extra["prompt"] == {"template": "vicuna_v1", "system": ""}, adapter
    assert set(summary["final"]) >= {
        "lm_loss",
        "balance_loss",
        "expert_load/0",
        "domain_loss/general",
    }

    half = tmp_path / "half"
    first = train(
        load_train_config(
            None, base_overrides(tiny_world, half, save_steps=3, stop_after_steps=3, **dense)
        )
    )
    assert not first.completed and not (half / "adapter_model.safetensors").exists()
    assert (half / "checkpoint-3").is_dir()
    second = train(load_train_config(None, base_overrides(tiny_world, half, save_steps=3, **dense)))
    assert second.completed and second.summary["resumed_from"].endswith("checkpoint-3")

    a = load_file(str(full / "adapter_model.safetensors"))
    b = load_file(str(half / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert logged_losses(full) == logged_losses(half)


def test_other_runs_directory_is_refused(tiny_world, tmp_path):
    out = tmp_path / "run"
    train(
        load_train_config(None, base_overrides(tiny_world, out, save_steps=2, stop_after_steps=2))
    )
    other = base_overrides(tiny_world, out, save_steps=2) + ["adapter.rank=8"]
    with pytest.raises(
        ConfigError, match=r"holds checkpoints of another run \(adapter.rank: 4 there, 8 here\)"
    ):
        train(load_train_config(None, other))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(load_train_config(None, base_overrides(tiny_world, out, save_steps=2, resume=False)))


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_world, tmp_path, monkeypatch):
    original = MoLETrainer.compute_loss

    def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(self, model, inputs, return_outputs, num_items_in_batch)
        return loss * float("nan") if self.state.global_step == 3 else loss

    monkeypatch.setattr(MoLETrainer, "compute_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(
        NonFiniteLossError,
        match=r"at step 4: training stopped; the last good checkpoint .*checkpoint-2 is intact",
    ):
        train(load_train_config(None, base_overrides(tiny_world, out, save_steps=2)))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-2"
    ]
    assert not (out / "adapter_model.safetensors").exists()

    skip_out = tmp_path / "skip"
    result = train(load_train_config(None, base_overrides(tiny_world, skip_out, nan_policy="skip")))
    assert result.completed and result.summary["skipped_steps"] == [4]


def test_activation_checkpointing_gives_same_losses(tiny_world, tmp_path):
    plain = train(
        load_train_config(
            None, base_overrides(tiny_world, tmp_path / "a", max_steps=3) + ["adapter.dropout=0.0"]
        )
    )
    ckpt = train(
        load_train_config(
            None,
            base_overrides(tiny_world, tmp_path / "b", max_steps=3, gradient_checkpointing=True)
            + ["adapter.dropout=0.0"],
        )
    )
    assert_same_training(plain.output_dir, ckpt.output_dir, atol=1e-5)


def test_bf16_mixed_precision_keeps_routers_float32(tiny_world, tmp_path, monkeypatch):
    from llava_mole.adapters import mole as mole_module

    seen = []
    original = mole_module.MoLEMLP.route

    def spy(self, flat, *args):
        logits, routing = original(self, flat, *args)
        seen.append((logits.dtype, routing.probs.dtype, self.router.weight.dtype))
        return logits, routing

    monkeypatch.setattr(mole_module.MoLEMLP, "route", spy)
    result = train(
        load_train_config(
            None, base_overrides(tiny_world, tmp_path / "bf16", max_steps=2, precision="bf16")
        )
    )
    assert result.completed and all(v == v for v in [result.summary["final"]["loss"]])
    assert seen and all(dtypes == (torch.float32,) * 3 for dtypes in seen)


def test_projector_and_router_get_their_own_learning_rates(tiny_world, tmp_path, monkeypatch):
    seen = {}
    original = MoLETrainer.create_optimizer

    def spy(self, model=None):
        optimizer = original(self, model)
        names = {id(p): n for n, p in self.model.named_parameters()}
        seen["groups"] = [
            (group["lr"], [names[id(p)] for p in group["params"]])
            for group in optimizer.param_groups
        ]
        return optimizer

    monkeypatch.setattr(MoLETrainer, "create_optimizer", spy)
    overrides = base_overrides(
        tiny_world, tmp_path / "lrs", max_steps=1, projector_lr=0.001, router_lr=0.0001
    )
    assert train(load_train_config(None, overrides)).completed
    by_lr = dict(seen["groups"])
    assert set(by_lr) == {0.002, 0.001, 0.0001}
    assert by_lr[0.0001] and all(".router." in n for n in by_lr[0.0001])
    assert by_lr[0.001] and all("multi_modal_projector" in n for n in by_lr[0.001])
    assert not any(".router." in n or "multi_modal_projector" in n for n in by_lr[0.002])


def test_exponent_literals_without_a_dot_are_numbers(tiny_world, tmp_path):
    """YAML 1.1 reads `5e-4` as a string; float keys still accept it, other strings stay errors."""
    overrides = base_overrides(tiny_world, tmp_path)
    cfg = load_train_config(None, overrides + ["train.router_lr=5e-4", "train.learning_rate=1E-3"])
    assert cfg.train.router_lr == 5e-4 and cfg.train.learning_rate == 1e-3
    with pytest.raises(ConfigError, match="train.router_lr: expected a number"):
        load_train_config(None, overrides + ["train.router_lr=fast"])


def test_router_dense_warmup_routes_densely_for_the_first_steps(tiny_world, tmp_path, monkeypatch):
    from llava_mole.adapters.mole import MoLEMLP

    seen: list[int] = []  # experts per token of each training forward of block 0
    original = MoLEMLP.route

    def spy(self, flat, *args):
        logits, routing = original(self, flat, *args)
        if self.block_index == 0 and self.training:
            seen.append(routing.experts.shape[-1])
        return logits, routing

    monkeypatch.setattr(MoLEMLP, "route", spy)
    overrides = base_overrides(tiny_world, tmp_path / "dense", max_steps=4, router_dense_warmup=0.5)
    assert train(load_train_config(None, overrides)).completed
    assert seen == [3, 3, 1, 1]


def test_router_dense_warmup_errors(tiny_world, tmp_path):
    overrides = base_overrides(tiny_world, tmp_path)
    with pytest.raises(ConfigError, match=r"train.router_dense_warmup: must be in \[0, 1\]"):
        load_train_config(None, overrides + ["train.router_dense_warmup=1.5"]).validate()
    bad = overrides + ["train.router_dense_warmup=0.2", "adapter.gate_weighting=none"]
    with pytest.raises(ConfigError, match="needs adapter.gate_weighting='prob'"):
        load_train_config(None, bad).validate()


def test_domain_router_trains_evaluates_and_refuses_free_form_prompts(tiny_world, tmp_path):
    from llava_mole.eval.generate import evaluate, predict

    run = tmp_path / "oracle"
    overrides = base_overrides(tiny_world, run, max_steps=2) + ["adapter.router=domain"]
    assert train(load_train_config(None, overrides)).completed
    saved = json.loads((run / "adapter_config.json").read_text())["mole"]
    assert saved["router"] == "domain"
    assert saved["router_domains"] == ["general", "document", "biomedical"]
    assert not any(".router." in k for k in load_file(str(run / "adapter_model.safetensors")))

    result = evaluate(tiny_world["model"], run, tiny_world["mixture"], batch_size=4,
                      max_new_tokens=2, routing=True, progress=False)  # fmt: skip
    assert result["n"] == 18
    for row in result["routing"]["blocks"]:  # every token of a domain on that domain's expert
        expert = result["routing"]["domains"].index(row["domain"])
        for kind in ("text", "image"):
            assert row[kind][expert] == pytest.approx(1.0), (row["block"], kind)
    image = tiny_world["data"] / "scenes" / "images" / "test_00000.png"
    with pytest.raises(ValueError, match="routes by domain label"):
        predict(tiny_world["model"], image, "What is the code?", adapter_dir=run)

    too_few = base_overrides(tiny_world, tmp_path / "few", max_steps=1)
    too_few += ["adapter.router=domain", "adapter.num_experts=2"]
    with pytest.raises(ConfigError, match="adapter.router: .*more domains than experts"):
        train(load_train_config(None, too_few))


def test_a_domain_routed_run_scores_its_dev_split(tiny_world, tmp_path):
    # The dev scorer names each dev sample's domain to the router, as training and evaluation
    # do (it used to crash at the first dev score: the study's routed-by-label setting).
    run = tmp_path / "oracle-dev"
    overrides = base_overrides(tiny_world, run, max_steps=4, dev_per_domain=2, dev_every=2)
    assert train(load_train_config(None, [*overrides, "adapter.router=domain"])).completed
    curve = json.loads((run / "summary.json").read_text())["convergence"]["dev_curve"]
    assert [step for step, _ in curve] == [2, 4]


def test_settings_added_later_do_not_orphan_earlier_runs(tiny_world, tmp_path):
    from llava_mole.train.resume import config_changes

    config = load_train_config(None, base_overrides(tiny_world, tmp_path))
    older = config.to_dict()  # a run_config.yaml written before these settings existed
    del older["adapter"]["router"], older["train"]["router_dense_warmup"]
    assert config_changes(older, config) == []
    changed = load_train_config(None, base_overrides(tiny_world, tmp_path, router_dense_warmup=0.2))
    assert config_changes(older, changed) == [("train.router_dense_warmup", 0.0, 0.2)]
    older["train"]["max_steps"] = 99
    assert [key for key, _, _ in config_changes(older, config)] == ["train.max_steps"]


def test_router_settings_do_not_make_plain_lora_runs_stale(tiny_world, tmp_path):
    from llava_mole.train.resume import config_changes

    lora = ["adapter.type=lora"]
    config = load_train_config(None, base_overrides(tiny_world, tmp_path) + lora)
    saved = config.to_dict()
    routed = base_overrides(tiny_world, tmp_path, router_dense_warmup=0.2) + lora
    routed += ["adapter.num_experts=4", "adapter.balance_coef=0.1"]
    assert config_changes(saved, load_train_config(None, routed)) == []
    # ... but they do for MoLE runs, and a LoRA run asked to become MoLE is stale.
    mole = load_train_config(None, base_overrides(tiny_world, tmp_path, router_dense_warmup=0.2))
    mole_saved = mole.to_dict()
    mole_saved["train"]["router_dense_warmup"] = 0.0
    assert config_changes(mole_saved, mole) == [("train.router_dense_warmup", 0.0, 0.2)]
    assert ("adapter.type", "lora", "mole") in config_changes(saved, mole)


def test_gradient_finiteness_check():
    from llava_mole.train.trainer import _all_finite

    grads = [torch.ones(3, 4), torch.zeros(5), torch.full((2,), 3e38)]  # last: norm overflows
    assert _all_finite(grads)
    for bad in (float("inf"), float("-inf"), float("nan")):
        poisoned = [g.clone() for g in grads]
        poisoned[1][2] = bad
        assert not _all_finite(poisoned), bad
    assert not _all_finite([torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)])


def test_logits_kept_at_loss_positions_only_give_the_same_training(
    tiny_world, tmp_path, monkeypatch
):
    """Training computes logits only where a label follows; losses and adapter must not move."""
    from llava_mole.train.trainer import token_cross_entropy

    kept_shapes = []
    original = token_cross_entropy

    def spy(logits, labels, positions=None):
        kept_shapes.append((logits.shape[1], labels.shape[1]))
        return original(logits, labels, positions)

    monkeypatch.setattr("llava_mole.train.trainer.token_cross_entropy", spy)
    overrides = base_overrides(tiny_world, tmp_path / "kept", max_steps=3)
    kept = train(load_train_config(None, overrides + ["adapter.dropout=0.0"]))
    assert kept_shapes and all(p < t - 1 for p, t in kept_shapes)  # trimmed, not all positions

    monkeypatch.setattr(MoLETrainer, "_takes_logits_to_keep", lambda self, model: False)
    overrides = base_overrides(tiny_world, tmp_path / "full", max_steps=3)
    full = train(load_train_config(None, overrides + ["adapter.dropout=0.0"]))
    assert kept_shapes[-1][0] == kept_shapes[-1][1]  # the full path kept every position
    assert_same_training(kept.output_dir, full.output_dir, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_projector_lr_reaches_each_familys_projector(tmp_path, family):
    """Qwen2-VL's merger sits inside `visual`, Idefics3's is `connector`: both get projector_lr."""
    from transformers import TrainingArguments

    from llava_mole import MoLEConfig, apply_mole
    from llava_mole.adapters.inject import adapter_info
    from tests.models.family_zoo import BY_KEY, build

    model = apply_mole(build(BY_KEY[family]), MoLEConfig(rank=2, num_experts=2))
    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=0.002, use_cpu=True, report_to="none"
    )
    trainer = MoLETrainer(model=model, args=args, projector_lr=0.001, router_lr=0.0001)
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {g["lr"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    projector = set(adapter_info(model).projector)
    assert projector and by_lr[0.001] == projector
    assert by_lr[0.0001] and all(".router." in n for n in by_lr[0.0001])
