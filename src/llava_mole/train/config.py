"""The training YAML: five top-level sections, validated by :mod:`llava_mole.schema`.

```yaml
model: {path: llava-mole-work/tiny-llava, dtype: float32}
data: {mixture: llava-mole-work/data/mixture.yaml}
adapter: {type: mole, rank: 4, alpha: 8, num_experts: 3}
train: {learning_rate: 2.0e-4, max_steps: 200, per_device_batch_size: 8, optim: adamw_torch}
output_dir: runs/tiny-mole
```

``adapter:`` *is* :class:`llava_mole.MoLEConfig` (``type`` is its ``mode``). ``train:`` holds
this recipe's settings (:class:`TrainSection`, :class:`MoLESettings`) and any other
``transformers.TrainingArguments`` field, passed through (:mod:`.arguments`). Unknown keys,
wrong types and out-of-range values raise :class:`ConfigError`, one line naming the dotted key.
``--set train.max_steps=20`` style overrides are applied before validation.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import ArgsKwargs

from .. import schema
from ..adapters.config import MoLEConfig
from ..paths import not_found_or, path_problem
from ..schema import (
    SCHEMA_CONFIG,
    Bool,
    Float,
    Int,
    SchemaError,
    Str,
    StrList,
    above,
    at_least,
    between,
    section,
)


class ConfigError(SchemaError):
    """A training config problem; the message names the key."""


@section
class ModelSection:
    """Base model.

    Args:
        path: a local Hugging Face model directory (``save_pretrained`` layout).
        dtype: dtype of the frozen base weights (``float32``, ``bfloat16``, ``float16``).
        trust_remote_code: only if you trust the directory's code; never on by default.
        attn_implementation: e.g. ``sdpa`` or ``eager``; ``null`` lets transformers choose.
    """

    path: Str = ""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: Bool = False
    attn_implementation: Str | None = None


@section
class DataSection:
    """Training data.

    Args:
        mixture: the mixture YAML (see README, "Data mixtures").
        split: which split of each dataset to train on.
        strict: stop on the first bad samples instead of skipping and counting them
            (``null``: the mixture's own setting).
        max_length: override the mixture's ``max_length``.
        group_by_length: LLaVA's modality/length-grouped sampling.
    """

    mixture: Str = ""
    split: Str = "train"
    strict: Bool | None = None
    max_length: Annotated[Int | None, at_least(1)] = None
    group_by_length: Bool = False


@dataclass
class MoLESettings:
    """Training settings of a MoLE / LoRA run that ``TrainingArguments`` has no field for.

    Args:
        projector_lr: learning rate of the multimodal projector (LLaVA's ``mm_projector_lr``);
            ``null`` uses ``learning_rate``.
        router_lr: learning rate of the MoLE routers; ``null`` uses ``learning_rate``. A router's
            logits move by about ``lr * sum|x|`` per Adam step, so at the high learning rates
            that suit rank-1 adapters routing can flip every step: a lower router rate keeps
            each expert's tokens stable.
        router_dense_warmup: share of the optimizer steps at the start of training during which
            every MoLE token goes to all ``K`` experts, each weighted by its router probability
            (a soft mixture; see ``set_dense_routing``), before top-k routing takes over. With
            top-1 from step 0 a router only ever sees the expert it already chose; the dense
            phase lets it compare experts. ``0`` (the paper's recipe) turns it off; plain LoRA
            ignores it.
        nan_policy: ``stop`` (default) or ``skip`` a step whose loss or gradients are not finite.
        max_skipped_share: with ``nan_policy: skip``, the run fails when more than this share
            of its steps was skipped.
        log_domain_loss: log the LM loss per domain.
        collapse_threshold: warn when an expert gets less than this share of tokens...
        collapse_window: ...averaged over this many logged steps.
        stop_after_steps: end this invocation (with a checkpoint) after this many optimizer steps
            of the run, keeping the full schedule; resume continues it. ``0``: off.
        dev_per_domain: train to convergence: hold this many training samples of each domain
            out as a dev split (seeded), score them every ``dev_every`` steps (teacher-forced
            exact match, see :mod:`.convergence`); after ``dev_patience`` scores in a row that
            do not beat the best by more than ``dev_min_delta``, cut the learning rate
            (``dev_decays`` times), then stop, and keep the best weights. ``max_steps`` is then
            the budget. ``0``: off (train for the whole schedule).
        dev_every: steps between dev scores.
        dev_patience: dev scores in a row without improvement that cut the learning rate or,
            after ``dev_decays`` cuts, end the run.
        dev_min_delta: how much a dev score must beat the best to count as an improvement.
        dev_decays: learning-rate cuts on a dev plateau before one ends the run.
        dev_decay_factor: each cut multiplies the learning rate by this.
        dev_smooth: the rule judges the mean of the last this-many dev scores (a single lucky
            score then rarely holds the best).
        dev_hold: share of ``max_steps`` during which a dev plateau counts for nothing (no
            learning-rate cut, no stop; the best weights are still kept), so that a run that
            sits on an early plateau keeps its learning rate until it leaves it. ``0``: off.
    """

    __pydantic_config__ = SCHEMA_CONFIG

    projector_lr: Annotated[Float | None, above(0)] = None
    router_lr: Annotated[Float | None, above(0)] = None
    router_dense_warmup: Annotated[Float, between(0, 1)] = 0.0
    nan_policy: Literal["stop", "skip"] = "stop"
    max_skipped_share: Annotated[Float, between(0, 1)] = 0.25
    log_domain_loss: Bool = True
    collapse_threshold: Annotated[Float, between(0, 1, high_open=True)] = 0.02
    collapse_window: Annotated[Int, at_least(1)] = 5
    stop_after_steps: Annotated[Int, at_least(0)] = 0
    dev_per_domain: Annotated[Int, at_least(0)] = 0
    dev_every: Annotated[Int, at_least(1)] = 100
    dev_patience: Annotated[Int, at_least(1)] = 3
    dev_min_delta: Annotated[Float, at_least(0)] = 0.0
    dev_decays: Annotated[Int, at_least(0)] = 2
    dev_decay_factor: Annotated[Float, between(0, 1, low_open=True, high_open=True)] = 0.3
    dev_smooth: Annotated[Int, at_least(1)] = 3
    dev_hold: Annotated[Float, between(0, 1, high_open=True)] = 0.0


MOLE_SETTINGS = tuple(f.name for f in dataclasses.fields(MoLESettings))


@section
class TrainSection(MoLESettings):
    """Optimisation and run control (plus :class:`MoLESettings`).

    Any other ``transformers.TrainingArguments`` field may be given too (``optim``,
    ``lr_scheduler_kwargs``, ``torch_compile``, ...): it is type-checked against the Trainer's
    annotation and kept in ``trainer_args`` (see :mod:`.arguments`).

    Args:
        learning_rate: peak learning rate of the adapter.
        lr_scheduler: a transformers scheduler name (``cosine``, ``linear``, ``constant``...).
        warmup_ratio: share of steps for linear warmup.
        epochs: passes over the data (ignored when ``max_steps > 0``).
        max_steps: total optimizer steps; ``-1`` derives them from ``epochs``.
        per_device_batch_size: samples per device per micro-batch.
        gradient_accumulation: micro-batches per optimizer step.
        precision: ``fp32``, ``bf16`` or ``fp16`` (mixed precision; routers stay float32).
        seed: seed of data order, initialisation and dropout.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping norm (> 0); ``null`` turns clipping off.
        logging_steps: steps between log lines.
        save_steps: steps between checkpoints (``0``: only at the end).
        save_total_limit: checkpoints kept (>= 1; ``null`` keeps all).
        gradient_checkpointing: non-reentrant activation checkpointing.
        num_workers: data-loader workers.
        report_to: loggers (``tensorboard``, ``wandb``, ... any transformers integration) or
            ``none``.
        deepspeed: path to a DeepSpeed JSON config (ZeRO-2/3; CPU processes work too).
        fsdp: transformers ``fsdp`` option string, e.g. ``"full_shard"`` (FSDP2, 2+ processes).
        fsdp_config: path to an FSDP JSON config (``configs/fsdp.json``).
        dist_timeout: seconds a process waits in a collective operation (and for the other
            ranks at the end) before the run fails: a rank that crashed or hangs stops the run
            with one line instead of holding the others forever.
        resume: ``auto`` resumes from the latest checkpoint in ``output_dir``; a path resumes
            from that checkpoint; ``false`` refuses to reuse a directory holding checkpoints.
        trainer_args: the other ``TrainingArguments`` fields given (filled from the keys of
            ``train:``; written back there by :meth:`TrainConfig.to_dict`).
    """

    learning_rate: Annotated[Float, above(0)] = 2e-4
    lr_scheduler: Str = "cosine"
    warmup_ratio: Annotated[Float, between(0, 1, high_open=True)] = 0.03
    epochs: Float = 1.0
    max_steps: Int = -1
    per_device_batch_size: Annotated[Int, at_least(1)] = 8
    gradient_accumulation: Annotated[Int, at_least(1)] = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: Annotated[Int, at_least(0)] = 0
    weight_decay: Annotated[Float, at_least(0)] = 0.0
    max_grad_norm: Annotated[Float | None, above(0, "null turns clipping off")] = 1.0
    logging_steps: Annotated[Int, at_least(1)] = 10
    save_steps: Annotated[Int, at_least(0)] = 0
    save_total_limit: Annotated[Int | None, at_least(1)] = 2
    gradient_checkpointing: Bool = False
    num_workers: Annotated[Int, at_least(0)] = 0
    report_to: StrList = field(default_factory=lambda: ["tensorboard"])
    deepspeed: Str | None = None
    fsdp: Str | None = None
    fsdp_config: Str | None = None
    dist_timeout: Annotated[Float, above(0)] = 1800.0
    resume: Str | Bool = "auto"
    trainer_args: dict[str, Any] = field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _pass_through(cls, data: Any) -> Any:
        """Keys that are ``TrainingArguments`` fields go to ``trainer_args``, type-checked."""
        kwargs = (data.kwargs or {}) if isinstance(data, ArgsKwargs) else data
        if not isinstance(kwargs, dict):
            return data
        own = {f.name for f in dataclasses.fields(cls)}
        extra = {k: kwargs[k] for k in kwargs if k not in own}
        if not extra:
            return data
        kwargs = {k: v for k, v in kwargs.items() if k in own}
        checked = _check_trainer_args(extra, own)
        kwargs["trainer_args"] = {**(kwargs.get("trainer_args") or {}), **checked}
        return ArgsKwargs(data.args, kwargs) if isinstance(data, ArgsKwargs) else kwargs


def _check_trainer_args(extra: dict[str, Any], own: set[str]) -> dict[str, Any]:
    """Refuse unknown and doubly-named keys; check each value against the Trainer's type."""
    from pydantic import TypeAdapter

    from .arguments import FIXED, RENAMED, trainer_fields

    fields = trainer_fields()
    for key, value in extra.items():
        if key in FIXED:
            raise ValueError(f"train.{key}: set by this recipe, not configurable")
        if key in RENAMED:
            raise ValueError(f"train.{key}: set train.{RENAMED[key]} instead")
        if key not in fields:
            hint = schema.did_you_mean(str(key), own | set(fields))
            raise ValueError(f"train.{key}: unknown key{hint}")
        try:
            TypeAdapter(fields[key]).validate_python(value)
        except ValidationError as err:
            raise ValueError(schema.error_line(err, root=f"train.{key}")) from None
        except Exception:  # an annotation pydantic cannot check: TrainingArguments will
            pass
    return extra


_NOT_IN_YAML = ("extra",)  # the adapter file's metadata, not a setting


def _adapter_view() -> type:
    """``adapter:`` as a plain dataclass: ``type`` for ``mode``, lists for tuples.

    Generated from :class:`MoLEConfig`'s fields (nothing re-declared); kept for
    ``study/compare.py``, which checks and builds sections through ``dataclasses`` until it
    moves to :mod:`llava_mole.schema`.
    """
    hints = typing.get_type_hints(MoLEConfig)
    specs: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(MoLEConfig):
        if f.name in _NOT_IN_YAML or f.name == "router_domains":
            continue
        name = "type" if f.name == "mode" else f.name
        if isinstance(f.default, tuple):
            specs.append(
                (name, list[str], field(default_factory=functools.partial(list, f.default)))
            )
        else:
            specs.append((name, hints[f.name], field(default=f.default)))
    return dataclasses.make_dataclass("AdapterSection", specs)


AdapterSection = _adapter_view()


def adapter_to_dict(adapter: MoLEConfig) -> dict[str, Any]:
    """The ``adapter:`` section of a YAML for ``adapter`` (``router_domains`` only if set)."""
    data = adapter.to_dict()
    data = {"type": data.pop("mode"), **data}
    data.pop("extra", None)
    if not data["router_domains"]:
        data.pop("router_domains")
    return data


@section(error=ConfigError)
class TrainConfig:
    """The whole training config (``model``, ``data``, ``adapter``, ``train``, ``output_dir``)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    adapter: MoLEConfig = field(default_factory=MoLEConfig)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: Str = ""

    @field_validator("model", "data", "adapter", "train", mode="before")
    @classmethod
    def _section(cls, value: Any, info: ValidationInfo) -> Any:
        """An empty section (``train:``) is the defaults; an ``AdapterSection`` its mapping."""
        if value is None:
            return {}
        if isinstance(value, AdapterSection):
            return dataclasses.asdict(value)
        if info.field_name == "adapter" and isinstance(value, dict):
            for name in _NOT_IN_YAML:
                if name in value:
                    raise ValueError(f"adapter.{name}: not a setting (the adapter file's metadata)")
        return value

    def to_dict(self) -> dict[str, Any]:
        """The config as the YAML mapping it came from (pass-through keys inside ``train``)."""
        train = dataclasses.asdict(self.train)
        train.update(train.pop("trainer_args"))
        return {
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "adapter": adapter_to_dict(self.adapter),
            "train": train,
            "output_dir": self.output_dir,
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> None:
        """The rules across keys (each key's own type and range were checked when it was set)."""
        if not self.model.path:
            raise ConfigError("model.path: required (a local model directory)")
        if not self.data.mixture:
            raise ConfigError("data.mixture: required (a mixture YAML)")
        if not self.output_dir:
            raise ConfigError("output_dir: required")
        t = self.train
        if t.router_dense_warmup > 0 and self.adapter.gate_weighting == "none":
            raise ConfigError(
                "train.router_dense_warmup: needs adapter.gate_weighting='prob' or 'straight' "
                "(with 'none' the router never gets the LM loss's gradient)"
            )
        if t.max_steps == 0 or t.max_steps < -1:
            raise ConfigError(f"train.max_steps: must be > 0 or -1 (got {t.max_steps})")
        if t.max_steps == -1 and t.epochs <= 0:
            raise ConfigError(f"train.epochs: must be > 0 (got {t.epochs})")
        known = _report_targets()
        for name in t.report_to:
            if name not in known:
                hint = schema.did_you_mean(name, known)
                raise ConfigError(f"train.report_to: unknown logger {name!r}{hint}")


def _report_targets() -> set[str]:
    """What ``report_to`` accepts: the transformers integrations, ``all`` and ``none``."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return {*INTEGRATION_TO_CALLBACK, "all", "none"}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML; see :mod:`~llava_mole.schema`)."""
    try:
        return schema.apply_overrides(data, overrides)
    except SchemaError as err:
        raise ConfigError(str(err)) from None


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a training YAML, apply overrides, validate.

    Relative ``model.path``, ``data.mixture`` and ``output_dir`` are taken relative to the
    current directory (the shipped configs assume you run from the project folder).
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path_problem(path, "file"):
            missing = f"config file not found: {path}"
            raise ConfigError(not_found_or(path, "file", missing))
        try:
            data = schema.read_yaml(path)
        except SchemaError as err:
            raise ConfigError(str(err)) from None
    data = apply_overrides(data, overrides or [])
    try:
        config = schema.validate(TrainConfig, data)
    except SchemaError as err:
        raise ConfigError(str(err)) from None
    config.validate()
    return config
