"""``llava-mole train``: one YAML in, an adapter directory out.

Output directory layout::

    run_config.yaml          the resolved config (written first; used to recognise the run)
    checkpoint-N/            adapter + optimizer/scheduler/RNG/trainer state (atomic)
    logs.jsonl               one JSON record per logging step
    runs/                    TensorBoard events
    adapter_config.json      final adapter (save_adapter format) ...
    adapter_model.safetensors
    summary.json             steps, tokens, wall time, tokens/s, final losses, expert load
    training.png             loss curves and expert load
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..adapters.inject import AdapterError, apply_mole, count_trainable
from ..adapters.io import atomic_write_bytes
from ..adapters.mole import MoLEMLP
from ..data.collate import DataCollator, ModalityLengthGroupedSampler
from ..data.mixture import build_datasets
from ..data.templates import prompt_format
from ..models.loading import load_model_and_processor
from .callbacks import JsonlLogger, RouterCollapseMonitor, StopAfterSteps
from .config import ConfigError, TrainConfig, load_train_config
from .plots import plot_training, read_log
from .trainer import MoLETrainer, latest_checkpoint, warmup_steps_value

logger = logging.getLogger("llava_mole.train")

RUN_CONFIG = "run_config.yaml"
SUMMARY = "summary.json"
# Settings that may change between an interrupted run and its resumption.
RESUME_FREE_KEYS = frozenset(
    {
        "train.resume",
        "train.stop_after_steps",
        "train.logging_steps",
        "train.save_steps",
        "train.save_total_limit",
        "train.num_workers",
        "train.report_to",
        "train.collapse_threshold",
        "train.collapse_window",
        "adapter.dispatch",
    }
)
# Settings a plain-LoRA adapter (``adapter.type: lora``) has no use for: changing them does
# not change what such a run trains, so they never make it stale.
MOLE_ONLY_KEYS = frozenset(
    {
        "adapter.num_experts",
        "adapter.top_k",
        "adapter.normalize_top_k",
        "adapter.balance_coef",
        "adapter.router_z_coef",
        "adapter.gate_weighting",
        "adapter.balance_loss",
        "adapter.router",
        "train.router_lr",
        "train.router_dense_warmup",
    }
)


@dataclass
class TrainResult:
    """Where a run wrote its files and what it measured."""

    output_dir: Path
    summary: dict[str, Any]
    completed: bool


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def _check_output_dir(config: TrainConfig) -> Path | None:
    """Decide whether to resume; refuse another run's directory. Returns the checkpoint."""
    out = Path(config.output_dir)
    checkpoint = latest_checkpoint(out) if out.is_dir() else None
    resume = config.train.resume
    if isinstance(resume, str) and resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"train.resume: checkpoint not found: {path}")
        checkpoint = path
    saved = out / RUN_CONFIG
    if checkpoint is None:
        return None
    if resume is False:
        raise ConfigError(
            f"output_dir {out} already holds checkpoints ({checkpoint.name}); use a new output_dir "
            "or set train.resume=auto to continue that run"
        )
    if saved.is_file():
        changes = config_changes(yaml.safe_load(saved.read_text()) or {}, config)
        if changes:
            key, before, now = changes[0]
            raise ConfigError(
                f"output_dir {out} holds checkpoints of another run ({key}: {before!r} "
                f"there, {now!r} here); use a new output_dir"
            )
    return checkpoint


def config_changes(
    saved: dict[str, Any], config: TrainConfig, ignore: frozenset[str] = RESUME_FREE_KEYS
) -> list[tuple[str, Any, Any]]:
    """The settings in which ``config`` differs from a run's saved ``run_config.yaml``.

    A key the saved file lacks (written before that setting existed) counts as its default,
    so adding a setting does not orphan earlier runs; router and expert settings
    (:data:`MOLE_ONLY_KEYS`) do not count when both are plain-LoRA runs.

    Args:
        saved: the parsed ``run_config.yaml``.
        config: the configuration asked for now.
        ignore: dotted keys that may differ.

    Returns:
        ``(dotted key, saved value, value now)`` for each difference, sorted by key.
    """
    defaults = _flatten(TrainConfig().to_dict())
    before, now = _flatten(saved), _flatten(config.to_dict())
    if before.get("adapter.type", defaults["adapter.type"]) == now["adapter.type"] == "lora":
        ignore = ignore | MOLE_ONLY_KEYS
    changes = []
    for key in sorted(set(before) | set(now)):
        old = before.get(key, defaults.get(key))
        if key not in ignore and old != now.get(key):
            changes.append((key, old, now.get(key)))
    return changes


def _training_arguments(config: TrainConfig, has_cuda: bool):
    from transformers import TrainingArguments

    t = config.train
    kwargs: dict[str, Any] = dict(
        output_dir=config.output_dir,
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=warmup_steps_value(t.warmup_ratio),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=False,
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps if t.save_steps > 0 else 500,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        use_cpu=not has_cuda,
        ddp_find_unused_parameters=False,
        # gloo only for a multi-process CPU launch (torchrun); set in a single process it asks
        # for a process group that does not exist.
        ddp_backend="gloo" if not has_cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        remove_unused_columns=False,
        label_names=["labels"],
        report_to=[r for r in t.report_to if r != "none"] or "none",
        dataloader_num_workers=t.num_workers,
        deepspeed=t.deepspeed,
        fsdp=t.fsdp or "",
        fsdp_config=t.fsdp_config,
        disable_tqdm=False,
        save_only_model=False,
    )
    if t.gradient_checkpointing:
        kwargs["activation_checkpointing"] = True
        kwargs["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    return TrainingArguments(**kwargs)


def _zero3_leaf(config: TrainConfig) -> None:
    if not config.train.deepspeed:
        return
    try:
        stage = (
            json.loads(Path(config.train.deepspeed).read_text())
            .get("zero_optimization", {})
            .get("stage")
        )
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"train.deepspeed: cannot read {config.train.deepspeed} ({err})"
        ) from None
    return stage


def train(config: TrainConfig | str | Path, overrides: list[str] | None = None) -> TrainResult:
    """Fine-tune a model with a MoLE or LoRA adapter as described by ``config``.

    Args:
        config: a :class:`TrainConfig` or the path of a training YAML.
        overrides: ``dotted.key=value`` strings applied on top of the YAML.

    Returns:
        A :class:`TrainResult`; ``completed`` is False when ``stop_after_steps`` ended the run
        early (resume by running the same command again).
    """
    from transformers import set_seed

    if not isinstance(config, TrainConfig):
        config = load_train_config(config, overrides)
    elif overrides:
        raise ValueError("overrides are only applied to a config path")
    if not Path(config.data.mixture).is_file():
        raise ConfigError(
            f"data.mixture: file not found: {config.data.mixture} (run `llava-mole make-data`?)"
        )
    checkpoint = _check_output_dir(config)
    out = Path(config.output_dir)
    if checkpoint is None and (out / SUMMARY).is_file() and config.train.resume is not False:
        summary = json.loads((out / SUMMARY).read_text())
        logger.info("%s: run already complete", out)
        return TrainResult(out, summary, True)

    set_seed(config.train.seed)
    model, processor = load_model_and_processor(
        config.model.path,
        config.model.dtype,
        config.model.trust_remote_code,
        config.model.attn_implementation,
    )
    mole_config = config.adapter.to_mole_config()
    try:
        apply_mole(model, mole_config)
    except AdapterError as err:
        raise ConfigError(f"model.path {config.model.path}: {err}") from None
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()  # fp32 master weights; autocast runs the math in bf16
    stage = _zero3_leaf(config)
    if stage == 3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [MoLEMLP])

    dataset, report = build_datasets(
        config.data.mixture,
        processor,
        split=config.data.split,
        seed=config.train.seed,
        strict=config.data.strict,
    )
    if config.data.max_length is not None:
        dataset.max_length = config.data.max_length
    if mole_config.router == "domain":
        # Expert i serves the mixture's i-th domain; the adapter file records the names.
        mole_config.router_domains = tuple(dataset.domains)
        try:
            mole_config.validate()
        except ValueError as err:
            raise ConfigError(
                f"adapter.router: {err} (the mixture has {len(dataset.domains)} domains)"
            ) from None
    print(report.summary(), flush=True)
    if len(dataset) == 0:
        raise ConfigError(f"data.mixture {config.data.mixture}: no usable training samples")

    has_cuda = torch.cuda.is_available()
    args = _training_arguments(config, has_cuda)
    out.mkdir(parents=True, exist_ok=True)
    if args.process_index == 0:
        atomic_write_bytes(out / RUN_CONFIG, config.to_yaml().encode())

    monitor = RouterCollapseMonitor(config.train.collapse_threshold, config.train.collapse_window)
    stopper = StopAfterSteps(config.train.stop_after_steps)
    trainer = MoLETrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollator.from_processor(processor, loss_positions=True),
        domains=list(dataset.domains),
        projector_lr=config.train.projector_lr,
        router_lr=config.train.router_lr,
        router_dense_warmup=config.train.router_dense_warmup,
        nan_policy=config.train.nan_policy,
        log_domain_loss=config.train.log_domain_loss,
        # The prompt format the adapter was trained with, so that `predict` can use it.
        adapter_extra={
            "prompt": prompt_format(dataset.template, dataset.encoder.system),
            "training": {
                "mixture": str(config.data.mixture),
                "domains": dict(report.per_domain),
            },
        },
        callbacks=[JsonlLogger(out / "logs.jsonl"), monitor, stopper],
    )
    if config.data.group_by_length:
        sampler = ModalityLengthGroupedSampler(
            dataset.lengths,
            dataset.has_image,
            config.train.per_device_batch_size,
            args.world_size,
            config.train.seed,
        )
        trainer._get_train_sampler = lambda *a, **k: sampler

    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    wall = time.perf_counter() - started
    tokens = trainer.accelerator.reduce(
        torch.as_tensor(trainer.tokens_seen, dtype=torch.float32, device=args.device), "sum"
    ).item()
    completed = not stopper.stopped
    summary = _summary(trainer, config, wall, tokens, report, monitor.warnings, checkpoint)
    if trainer.is_world_process_zero():
        if completed:
            trainer.save_model(str(out))
            atomic_write_bytes(out / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
            plot_training(
                out / "logs.jsonl",
                out / "training.png",
                title=f"{mole_config.mode} r={mole_config.rank}",
            )
        else:
            print(
                f"stopped after step {trainer.state.global_step}; run the same command again to resume",
                flush=True,
            )
    return TrainResult(out, summary, completed)


def _summary(trainer, config, wall, tokens, report, warnings, resumed_from) -> dict[str, Any]:
    records = read_log(Path(config.output_dir) / "logs.jsonl")
    last = records[-1] if records else {}
    return {
        "adapter": config.adapter.type,
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "tokens_this_invocation": int(tokens),
        "wall_time_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "trainable_parameters": count_trainable(trainer.model),
        "final": {
            k: v
            for k, v in last.items()
            if k not in ("step", "epoch", "grad_norm", "learning_rate")
        },
        "loss_curve": [[r["step"], r["loss"]] for r in records],
        "skipped_steps": trainer.skipped_steps,
        "router_warnings": warnings,
        "data": {"per_domain": dict(report.per_domain), "skipped": dict(report.skipped)},
    }
