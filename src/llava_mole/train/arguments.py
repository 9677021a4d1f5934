"""The ``train:`` section as ``transformers.TrainingArguments``.

Three kinds of keys make up ``train:`` (see :class:`.config.TrainSection`):

* **MoLE settings** (:class:`.config.MoLESettings`): what the stock Trainer has no field for (router
  and projector learning rates, NaN policy, dense-routing warmup, ...). They are fields of
  :class:`MoLETrainingArguments` (``TrainingArguments`` plus these, as TRL's ``SFTConfig``
  extends it), so the trainer and its callbacks read them from ``args``.
* **Our names for Trainer settings** (:data:`RENAMED`): ``per_device_batch_size`` for
  ``per_device_train_batch_size``, ``precision`` for ``bf16``/``fp16``, ... kept so that every
  existing YAML stays valid; each is turned into its Trainer field(s) by :func:`_renamed`.
* **Any other ``TrainingArguments`` field** (``optim``, ``lr_scheduler_kwargs``,
  ``torch_compile``, ``adam_beta2``, ...): passed through unchanged.

Where this recipe's defaults differ from transformers', they are listed once, in
:data:`RECIPE_DEFAULTS` (fixed values) and in the defaults of :class:`.config.TrainSection`
(``learning_rate`` 2e-4, ``lr_scheduler`` cosine, ``warmup_ratio`` 0.03, ``epochs`` 1,
``logging_steps`` 10, ``save_steps`` 0 = only at the end, ``save_total_limit`` 2,
``report_to`` tensorboard).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Any

from transformers import TrainingArguments

from .config import MOLE_SETTINGS, MoLESettings, TrainConfig


@dataclass
class MoLETrainingArguments(TrainingArguments, MoLESettings):
    """``TrainingArguments`` plus the fields of :class:`.config.MoLESettings`."""


# Trainer fields this recipe fixes (the trainer relies on them) or defaults differently.
RECIPE_DEFAULTS: dict[str, Any] = {
    "remove_unused_columns": False,  # the collator's extra columns (domain ids, loss positions)
    "label_names": ["labels"],
    "ddp_find_unused_parameters": False,  # every expert stays in the graph (DESIGN pitfall 2)
    "logging_first_step": False,
    "disable_tqdm": False,
    "save_only_model": False,  # checkpoints resume bit-exactly
}
FIXED = frozenset({"remove_unused_columns", "label_names", "output_dir"})

# Trainer fields set from a ``train:`` key of another name: ``{trainer field: our key}``.
RENAMED: dict[str, str] = {
    "per_device_train_batch_size": "per_device_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation",
    "lr_scheduler_type": "lr_scheduler",
    "warmup_steps": "warmup_ratio",
    "num_train_epochs": "epochs",
    "save_strategy": "save_steps",
    "data_seed": "seed",
    "bf16": "precision",
    "fp16": "precision",
    "ddp_timeout": "dist_timeout",
    "dataloader_num_workers": "num_workers",
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing",
    "resume_from_checkpoint": "resume",
    "fsdp": "fsdp",
    "fsdp_config": "fsdp_config",
    "use_cpu": "(chosen from the hardware)",
    "ddp_backend": "(chosen from the hardware)",
}


@functools.cache
def trainer_fields() -> dict[str, Any]:
    """``{name: type}`` of every ``TrainingArguments`` field (the pass-through keys)."""
    import typing

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments)}


def _renamed(config: TrainConfig, has_cuda: bool) -> dict[str, Any]:
    """The Trainer fields set from keys of ``train:`` under our names."""
    from . import engines

    t = config.train
    multi_cpu = not has_cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs = dict(
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=float(t.warmup_ratio) if t.warmup_ratio > 0 else 0.0,  # a ratio in v5
        num_train_epochs=t.epochs,
        max_grad_norm=t.max_grad_norm or 0.0,  # null: no clipping
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps if t.save_steps > 0 else 500,
        data_seed=t.seed,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        use_cpu=not has_cuda,
        ddp_timeout=int(t.dist_timeout),
        # gloo only for a multi-process CPU launch (torchrun); set in a single process it asks
        # for a process group that does not exist.
        ddp_backend="gloo" if multi_cpu else None,
        report_to=[r for r in t.report_to if r != "none"] or "none",
        dataloader_num_workers=t.num_workers,
        **engines.fsdp_arguments(config),
    )
    if t.gradient_checkpointing:
        kwargs["activation_checkpointing"] = True
        kwargs["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    return kwargs


SAME_NAME = (
    "learning_rate",
    "max_steps",
    "weight_decay",
    "logging_steps",
    "save_total_limit",
    "seed",
    "deepspeed",
)


def training_arguments(config: TrainConfig, has_cuda: bool) -> MoLETrainingArguments:
    """The run's :class:`MoLETrainingArguments`.

    Precedence: :data:`RECIPE_DEFAULTS` < keys of ``train:`` (our names, the MoLE settings,
    then pass-through Trainer fields).

    Raises:
        ValueError: ``TrainingArguments`` refuses the combination (its own message).
    """
    t = config.train
    kwargs: dict[str, Any] = {**RECIPE_DEFAULTS, "output_dir": config.output_dir}
    kwargs.update({name: getattr(t, name) for name in SAME_NAME})
    kwargs.update(_renamed(config, has_cuda))
    kwargs.update({name: getattr(t, name) for name in MOLE_SETTINGS})
    kwargs.update(t.trainer_args)
    return MoLETrainingArguments(**kwargs)
