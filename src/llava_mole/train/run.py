"""``llava-mole train``: one YAML in, an adapter directory out.

Output directory layout::

    run_config.yaml          the resolved config (written first; used to recognise the run)
    checkpoint-N/            adapter + optimizer/scheduler/RNG/trainer state (atomic)
    logs.jsonl               one JSON record per logging step
    runs/                    TensorBoard events
    adapter_config.json      final adapter (save_adapter format) ...
    adapter_model.safetensors
    summary.json             steps, tokens, wall time, tokens/s, final losses, expert load,
                             the engine and each rank's share of the trainable state
    training.png             loss curves and expert load

Under torchrun every rank runs this; DeepSpeed ZeRO-2/3 and FSDP2 are described in
:mod:`.distributed`. The final adapter and summary are written by rank 0 once every rank has
contributed its shard; ``llava-mole train`` says ``done`` after every rank has finished.
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
from transformers import TrainerState

from ..adapters.inject import AdapterError, apply_mole
from ..adapters.io import atomic_write_bytes
from ..adapters.mole import MoLEMLP
from ..data.collate import DataCollator, ModalityLengthGroupedSampler
from ..data.mixture import build_datasets, load_mixture
from ..data.templates import prompt_format
from ..models.loading import load_model_and_processor
from ..paths import not_found_or, path_problem
from . import distributed
from .callbacks import JsonlLogger, RouterCollapseMonitor, StopAfterSteps
from .checkpoints import (
    TRAINER_STATE,
    folder_bytes,
    is_write_failure,
    latest_checkpoint,
    read_trainer_state,
    write_failure,
)
from .config import ConfigError, TrainConfig, load_train_config
from .lock import run_lock
from .plots import plot_training, read_log
from .resume import RUN_CONFIG, SUMMARY, plan_run
from .trainer import MoLETrainer, NonFiniteLossError, warmup_steps_value

logger = logging.getLogger("llava_mole.train")


@dataclass
class TrainResult:
    """Where a run wrote its files and what it measured."""

    output_dir: Path
    summary: dict[str, Any]
    completed: bool


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
        max_grad_norm=t.max_grad_norm or 0.0,  # null: no clipping
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
        ddp_timeout=int(config.train.dist_timeout),
        # gloo only for a multi-process CPU launch (torchrun); set in a single process it asks
        # for a process group that does not exist.
        ddp_backend="gloo" if not has_cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        remove_unused_columns=False,
        label_names=["labels"],
        report_to=[r for r in t.report_to if r != "none"] or "none",
        dataloader_num_workers=t.num_workers,
        deepspeed=t.deepspeed,
        **distributed.fsdp_arguments(config),
        disable_tqdm=False,
        save_only_model=False,
    )
    if t.gradient_checkpointing:
        kwargs["activation_checkpointing"] = True
        kwargs["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    return TrainingArguments(**kwargs)


def train(config: TrainConfig | str | Path, overrides: list[str] | None = None) -> TrainResult:
    """Fine-tune a model with a MoLE or LoRA adapter as described by ``config``.

    One run per ``output_dir`` (an exclusive lock, see :mod:`.lock`); a finished run is
    recognised and left unchanged; an interrupted one resumes from its newest intact checkpoint.

    Args:
        config: a :class:`TrainConfig` or the path of a training YAML.
        overrides: ``dotted.key=value`` strings applied on top of the YAML.

    Returns:
        A :class:`TrainResult`; ``completed`` is False when ``stop_after_steps`` ended the run
        early (resume by running the same command again).
    """
    if not isinstance(config, TrainConfig):
        config = load_train_config(config, overrides)
    elif overrides:
        raise ValueError("overrides are only applied to a config path")
    if path_problem(config.data.mixture, "file"):
        missing = f"file not found: {config.data.mixture} (run `llava-mole make-data`?)"
        raise ConfigError(f"data.mixture: {not_found_or(config.data.mixture, 'file', missing)}")
    distributed.check_engines(config)  # one line before any process loads a model
    with run_lock(config.output_dir):
        return _train_locked(config)


def _train_locked(config: TrainConfig) -> TrainResult:
    from transformers import set_seed

    out = Path(config.output_dir)
    plan = plan_run(config)
    if plan.kind == "complete":
        print(f"{out}: run already complete ({plan.summary.get('steps')} steps); nothing changed")
        return TrainResult(out, plan.summary, True)
    set_seed(config.train.seed)
    distributed.init_process_group(config.train.dist_timeout)
    distributed.prepare_deepspeed(config)
    model, processor, mole_config = _setup_model(config)
    distributed.check_model(config, model)
    dataset, report = _setup_data(config, processor, mole_config)
    args = _training_arguments(config, torch.cuda.is_available())
    out.mkdir(parents=True, exist_ok=True)
    if args.process_index == 0:
        atomic_write_bytes(out / RUN_CONFIG, config.to_yaml().encode())
    trainer, stopper, monitor = _setup_trainer(config, model, processor, dataset, report, args)
    started = time.perf_counter()
    say = print if args.process_index == 0 else (lambda *a, **k: None)  # once under torchrun
    if plan.kind == "finalize":
        say(f"{plan.checkpoint.name} is the end of the schedule: writing the final adapter")
        trainer._load_from_checkpoint(str(plan.checkpoint))
        trainer.state = TrainerState.load_from_json(str(plan.checkpoint / TRAINER_STATE))
    else:
        if plan.checkpoint is not None:
            state = read_trainer_state(plan.checkpoint)
            say(
                f"resuming {out} from {plan.checkpoint.name} "
                f"(step {state['global_step']} of {state.get('max_steps')})",
                flush=True,
            )
        resume = str(plan.checkpoint) if plan.checkpoint else None
        trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - started
    tokens = trainer.accelerator.reduce(
        torch.as_tensor(trainer.tokens_seen, dtype=torch.float32, device=args.device), "sum"
    ).item()
    completed = not stopper.stopped
    summary = _summary(trainer, config, wall, tokens, report, monitor.warnings, plan.checkpoint)
    _check_skipped(config, summary)
    if completed:
        _write_final(trainer, out, summary, config)  # every rank: gathering shards is collective
    elif trainer.is_world_process_zero():
        print(
            f"stopped after step {trainer.state.global_step}; run the same command again to resume",
            flush=True,
        )
    return TrainResult(out, summary, completed)


def _setup_model(config: TrainConfig) -> tuple[torch.nn.Module, Any, Any]:
    """Base model and processor, adapted, with float32 trainable weights."""
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
    if distributed.zero_stage(config) == 3 and any(isinstance(m, MoLEMLP) for m in model.modules()):
        # Routing picks experts per token: ZeRO-3 gathers a MoLE block's parameters as a whole
        # instead of tracing which expert tensors a forward touches.
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [MoLEMLP])
    return model, processor, mole_config


def _setup_data(config: TrainConfig, processor: Any, mole_config: Any) -> tuple[Any, Any]:
    """The training dataset (``data.max_length`` applied) and its load report."""
    mixture = load_mixture(config.data.mixture)
    if config.data.max_length is not None:
        mixture.max_length = config.data.max_length
    dataset, report = build_datasets(
        mixture,
        processor,
        split=config.data.split,
        seed=config.train.seed,
        strict=config.data.strict,
    )
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
    return dataset, report


def _setup_trainer(config, model, processor, dataset, report, args):
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
        callbacks=[JsonlLogger(Path(config.output_dir) / "logs.jsonl"), monitor, stopper],
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
    return trainer, stopper, monitor


def _check_skipped(config: TrainConfig, summary: dict[str, Any]) -> None:
    """``nan_policy: skip`` fails the run when too many steps were skipped."""
    skipped, steps = len(summary["skipped_steps"]), max(1, summary["steps"])
    limit = config.train.max_skipped_share
    if skipped and skipped / steps > limit:
        raise NonFiniteLossError(
            f"skipped {skipped} of {steps} steps with non-finite loss or gradients "
            f"(more than train.max_skipped_share={limit:g}); the run failed: lower "
            "train.learning_rate or check the data"
        )


def _write_final(trainer: MoLETrainer, out: Path, summary: dict[str, Any], config) -> None:
    """Final adapter, then ``summary.json`` (its presence marks the run complete).

    Called on every rank: under ZeRO-3 and FSDP2 each rank holds a shard of the adapter and the
    gather is collective; rank 0 writes the files.
    """
    try:
        trainer.save_model(str(out))
        if trainer.is_world_process_zero():
            atomic_write_bytes(out / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
    except Exception as err:
        if not is_write_failure(err):
            raise
        raise write_failure(
            err, out, 2 * folder_bytes(latest_checkpoint(out)) + (1 << 20)
        ) from None
    if not trainer.is_world_process_zero():
        return
    plot_training(
        out / "logs.jsonl",
        out / "training.png",
        title=f"{config.adapter.type} r={config.adapter.rank}",
    )


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
        "trainable_parameters": distributed.trainable_numel(trainer.model),
        "distributed": trainer.shard_report,
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
