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

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapters.config import MoLEConfig
from ..adapters.inject import AdapterError, apply_mole
from ..adapters.io import atomic_write_bytes
from ..adapters.mole import MoLEMLP
from ..data.collate import DataCollator, ModalityLengthGroupedSampler
from ..data.mixture import MixtureConfig, build_datasets, load_mixture
from ..data.templates import prompt_format
from ..models.loading import load_model_and_processor
from ..paths import not_found_or, path_problem
from . import distributed, engines
from ._hf_compat import load_checkpoint_state
from .arguments import MoLETrainingArguments, training_arguments
from .callbacks import JsonlLogger, RouterCollapseMonitor, StopAfterSteps
from .checkpoints import (
    folder_bytes,
    is_write_failure,
    latest_checkpoint,
    read_trainer_state,
    write_failure,
)
from .config import ConfigError, TrainConfig, load_train_config
from .convergence import (
    ConvergenceRule,
    DevEarlyStopping,
    DevScore,
    carve_dev,
    teacher_forced_exact,
)
from .lock import run_lock
from .plots import plot_training, read_log
from .resume import RUN_CONFIG, SUMMARY, RunPlan, plan_run
from .trainer import MoLETrainer, NonFiniteLossError

logger = logging.getLogger("llava_mole.train")


@dataclass
class TrainResult:
    """Where a run wrote its files and what it measured."""

    output_dir: Path
    summary: dict[str, Any]
    completed: bool


@dataclass
class _Setup:
    """What the recipe built before training: trainer, its callbacks and the data report."""

    trainer: MoLETrainer
    stopper: StopAfterSteps
    monitor: RouterCollapseMonitor
    report: Any
    convergence: DevEarlyStopping | None = None


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
    engines.check_engines(config)  # one line before any process loads a model
    with run_lock(config.output_dir):
        return _train_locked(config)


def _train_locked(config: TrainConfig) -> TrainResult:
    """The recipe: plan the folder, set up model -> data -> trainer, train, finalize."""
    from transformers import set_seed

    out = Path(config.output_dir)
    plan = plan_run(config)
    if plan.kind == "complete":
        print(f"{out}: run already complete ({plan.summary.get('steps')} steps); nothing changed")
        return TrainResult(out, plan.summary, True)
    set_seed(config.train.seed)
    distributed.init_process_group(config.train.dist_timeout)
    distributed.prepare_deepspeed(config)
    mixture = load_mixture(config.data.mixture)
    adapter = resolve_adapter(config, mixture)  # complete before it is injected
    model, processor = setup_model(config, adapter)
    engines.check_model(config, model)
    dataset, report = setup_data(config, mixture, processor)
    dataset, dev = split_dev(config, dataset)
    args = training_arguments_or_error(config)
    out.mkdir(parents=True, exist_ok=True)
    if args.process_index == 0:
        atomic_write_bytes(out / RUN_CONFIG, config.to_yaml().encode())
    setup = setup_trainer(config, model, processor, dataset, report, args)
    if dev is not None:
        setup.convergence = add_convergence(config, setup.trainer, processor, dev)
    started = time.perf_counter()
    _run(setup.trainer, plan, out)
    return finalize(config, setup, plan, time.perf_counter() - started)


def resolve_adapter(config: TrainConfig, mixture: MixtureConfig) -> MoLEConfig:
    """The adapter's complete config: with ``router: domain``, expert i serves the mixture's
    i-th domain (the adapter file records the names).

    Raises:
        ConfigError: the mixture's domains do not fit the experts.
    """
    if config.adapter.router != "domain":
        return dataclasses.replace(config.adapter)
    try:
        return dataclasses.replace(config.adapter, router_domains=tuple(mixture.domains))
    except ValueError as err:
        raise ConfigError(
            f"adapter.router: {err} (the mixture has {len(mixture.domains)} domains)"
        ) from None


def setup_model(config: TrainConfig, adapter: MoLEConfig) -> tuple[torch.nn.Module, Any]:
    """Base model and processor, adapted, with float32 trainable weights."""
    model, processor = load_model_and_processor(
        config.model.path,
        config.model.dtype,
        config.model.trust_remote_code,
        config.model.attn_implementation,
    )
    try:
        apply_mole(model, adapter)
    except AdapterError as err:
        raise ConfigError(f"model.path {config.model.path}: {err}") from None
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()  # fp32 master weights; autocast runs the math in bf16
    if engines.zero_stage(config) == 3 and any(isinstance(m, MoLEMLP) for m in model.modules()):
        # Routing picks experts per token: ZeRO-3 gathers a MoLE block's parameters as a whole
        # instead of tracing which expert tensors a forward touches.
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [MoLEMLP])
    return model, processor


def setup_data(config: TrainConfig, mixture: MixtureConfig, processor: Any) -> tuple[Any, Any]:
    """The training dataset (``data.max_length`` applied) and its load report."""
    if config.data.max_length is not None:
        mixture.max_length = config.data.max_length
    dataset, report = build_datasets(
        mixture,
        processor,
        split=config.data.split,
        seed=config.train.seed,
        strict=config.data.strict,
    )
    print(report.summary(), flush=True)
    if len(dataset) == 0:
        raise ConfigError(f"data.mixture {config.data.mixture}: no usable training samples")
    return dataset, report


def split_dev(config: TrainConfig, dataset: Any) -> tuple[Any, Any | None]:
    """``(train, dev)``: ``train.dev_per_domain`` items of each domain held out (seeded)."""
    if config.train.dev_per_domain == 0:
        return dataset, None
    domains = [dataset.domains[d] for d in dataset.domain_ids]
    train_idx, dev_idx = carve_dev(domains, config.train.dev_per_domain, config.train.seed)
    print(f"dev split: {len(dev_idx)} items held out of {len(domains)}", flush=True)
    return dataset.subset(train_idx), dataset.subset(dev_idx)


def training_arguments_or_error(config: TrainConfig) -> MoLETrainingArguments:
    """:func:`.arguments.training_arguments`; what ``TrainingArguments`` refuses is one line."""
    try:
        return training_arguments(config, torch.cuda.is_available())
    except ValueError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise ConfigError(f"train: {first}") from None


def setup_trainer(config, model, processor, dataset, report, args) -> _Setup:
    """The :class:`MoLETrainer` with this run's callbacks and sampler."""
    monitor = RouterCollapseMonitor(args.collapse_threshold, args.collapse_window)
    stopper = StopAfterSteps(args.stop_after_steps)
    sampler = None
    if config.data.group_by_length:
        sampler = ModalityLengthGroupedSampler(
            dataset.lengths,
            dataset.has_image,
            args.per_device_train_batch_size,
            args.world_size,
            config.train.seed,
        )
    trainer = MoLETrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollator.from_processor(processor, loss_positions=True),
        domains=list(dataset.domains),
        # The prompt format the adapter was trained with, so that `predict` can use it.
        adapter_extra={
            "prompt": prompt_format(dataset.template, dataset.encoder.system),
            "training": {
                "mixture": str(config.data.mixture),
                "domains": dict(report.per_domain),
            },
        },
        callbacks=[JsonlLogger(Path(config.output_dir) / "logs.jsonl"), monitor, stopper],
        train_sampler=sampler,
    )
    return _Setup(trainer, stopper, monitor, report)


def add_convergence(config: TrainConfig, trainer: MoLETrainer, processor, dev) -> DevEarlyStopping:
    """Early stopping on the dev split's teacher-forced exact match (:mod:`.convergence`)."""
    if trainer.args.world_size > 1:
        raise ConfigError("train.dev_per_domain: training to convergence runs in one process")
    collate = DataCollator.from_processor(processor)
    batch = max(1, trainer.args.per_device_train_batch_size)

    def score(model: torch.nn.Module) -> DevScore:
        batches = (
            collate([dev[i] for i in range(k, min(k + batch, len(dev)))])
            for k in range(0, len(dev), batch)
        )
        return teacher_forced_exact(model, batches, list(dev.domains))

    t = config.train
    rule = ConvergenceRule(
        every=t.dev_every,
        patience=t.dev_patience,
        min_delta=t.dev_min_delta,
        decays=t.dev_decays,
        decay_factor=t.dev_decay_factor,
        smooth=t.dev_smooth,
        hold=t.dev_hold,
    )
    callback = DevEarlyStopping(rule, score, config.output_dir, trainer.log)
    trainer.add_callback(callback)
    return callback


def _run(trainer: MoLETrainer, plan: RunPlan, out: Path) -> None:
    """Train (fresh or resumed), or only load the checkpoint that ends the schedule."""
    say = print if trainer.args.process_index == 0 else (lambda *a, **k: None)  # once
    if plan.kind == "finalize":
        say(f"{plan.checkpoint.name} is the end of the schedule: writing the final adapter")
        load_checkpoint_state(trainer, plan.checkpoint)
        return
    if plan.checkpoint is not None:
        state = read_trainer_state(plan.checkpoint)
        say(
            f"resuming {out} from {plan.checkpoint.name} "
            f"(step {state['global_step']} of {state.get('max_steps')})",
            flush=True,
        )
    trainer.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint else None)


def finalize(config: TrainConfig, setup: _Setup, plan: RunPlan, wall: float) -> TrainResult:
    """Summary, the skipped-steps rule, and (when the schedule is done) the final files."""
    trainer, out = setup.trainer, Path(config.output_dir)
    tokens = trainer.accelerator.reduce(
        torch.as_tensor(trainer.tokens_seen, dtype=torch.float32, device=trainer.args.device),
        "sum",
    ).item()
    completed = not setup.stopper.stopped
    summary = _summary(
        trainer, config, wall, tokens, setup.report, setup.monitor.warnings, plan.checkpoint
    )
    if setup.convergence is not None and not setup.stopper.stopped:
        setup.convergence.on_train_begin(trainer.args, trainer.state, trainer.control)  # replay
        setup.convergence.restore_best(trainer.model)  # the final adapter is the best one
        summary["convergence"] = setup.convergence.summary()
    _check_skipped(config, summary)
    if completed:
        _write_final(trainer, out, summary, config)  # every rank: gathering shards is collective
    elif trainer.is_world_process_zero():
        print(
            f"stopped after step {trainer.state.global_step}; run the same command again to resume",
            flush=True,
        )
    return TrainResult(out, summary, completed)


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
