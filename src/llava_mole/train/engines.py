"""The engine settings of ``llava-mole train``: DeepSpeed and FSDP2 config files, the
``TrainingArguments`` fields they become, and the refusals that run before a model is loaded.

Every unsupported combination is one :class:`ConfigError` line here (:func:`check_engines`,
and :func:`check_model` for what needs the model); :mod:`.distributed` then starts and checks
the engine itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from .config import ConfigError, TrainConfig
from .distributed import world_size

# The ``train.fsdp`` words FSDP2 has: ``full_shard`` / ``shard_grad_op`` (reshard parameters after
# each unit's forward or keep them until backward), ``offload`` (CPU offload), ``auto_wrap``.
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")


def _read_json(key: str, path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}: cannot read {path} ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {path} must hold a JSON object")
    return data


def deepspeed_config(config: TrainConfig) -> dict[str, Any] | None:
    """The DeepSpeed JSON of ``train.deepspeed`` (``None`` when unset)."""
    path = config.train.deepspeed
    return _read_json("train.deepspeed", path) if path else None


def zero_stage(config: TrainConfig) -> int | None:
    """The ZeRO stage of ``train.deepspeed`` (``None`` without DeepSpeed)."""
    ds = deepspeed_config(config)
    if ds is None:
        return None
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def fsdp_config(config: TrainConfig) -> dict[str, Any]:
    path = config.train.fsdp_config
    data = _read_json("train.fsdp_config", path) if path else {}
    return {k.removeprefix("fsdp_"): v for k, v in data.items()}


def fsdp_arguments(config: TrainConfig) -> dict[str, Any]:
    """``fsdp`` / ``fsdp_config`` for ``TrainingArguments``: ``train.fsdp``'s words become FSDP2
    settings (transformers deprecates the option string)."""
    if not config.train.fsdp:
        return {"fsdp": "", "fsdp_config": None}
    cfg = {"version": 2, **fsdp_config(config)}
    words = config.train.fsdp.split()
    if "shard_grad_op" in words:
        cfg.setdefault("reshard_after_forward", False)
    elif "full_shard" in words:
        cfg.setdefault("reshard_after_forward", True)
    if "offload" in words:
        cfg.setdefault("cpu_offload", True)
    return {"fsdp": True, "fsdp_config": cfg}


# ---- refusals ----------------------------------------------------------------------------------


def check_engines(config: TrainConfig) -> None:
    """Refuse, with one line, what cannot train correctly; runs before any model is loaded."""
    t = config.train
    if config.adapter.dispatch == "triton":
        raise ConfigError(
            "adapter.dispatch: 'triton' runs forward-only kernels (generation, evaluation) and "
            "cannot train; use auto, loop, grouped_mm or dense (dispatch is a runtime setting: "
            "pass it to predict/serve instead)"
        )
    if t.deepspeed and (t.fsdp or t.fsdp_config):
        raise ConfigError("train.deepspeed and train.fsdp: choose one engine, not both")
    if t.fsdp_config and not t.fsdp:
        raise ConfigError("train.fsdp_config: set train.fsdp (e.g. full_shard) to use it")
    if t.deepspeed:
        _check_deepspeed(config)
    if t.fsdp:
        _check_fsdp(config)


def _check_deepspeed(config: TrainConfig) -> None:
    path = config.train.deepspeed
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "train.deepspeed: DeepSpeed is not installed (pip install 'llava-mole[deepspeed]')"
        )
    ds = deepspeed_config(config)
    assert ds is not None
    if "LOCAL_RANK" not in os.environ:
        raise ConfigError(
            "train.deepspeed: DeepSpeed needs a launcher that starts its process group: "
            "torchrun --nproc_per_node N -m llava_mole.cli train ... (N = 1 works) or "
            "accelerate launch"
        )
    for section, what in (
        (
            "optimizer",
            "the trainer's AdamW and its per-group rates (train.projector_lr, router_lr)",
        ),
        ("scheduler", "the trainer's schedule (train.lr_scheduler, warmup_ratio)"),
    ):
        if section in ds:
            raise ConfigError(
                f"train.deepspeed: {path} has an {section!r} section, which would replace {what}; "
                "remove it (the train section sets them)"
            )
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(
            f"train.deepspeed: {path}: zero_optimization.stage must be 0-3 (got {stage!r})"
        )
    if config.train.nan_policy == "skip":
        raise ConfigError(
            "train.nan_policy: 'skip' does not work with DeepSpeed (its engine steps the optimizer "
            "inside backward, before a step could be skipped); use 'stop'"
        )
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload in ("cpu", "nvme") and ds.get("zero_force_ds_cpu_optimizer", True):
        raise ConfigError(
            f"train.deepspeed: {path}: offload_optimizer needs DeepSpeed's CPU Adam, which would "
            'replace the trainer\'s AdamW groups; add "zero_force_ds_cpu_optimizer": false to '
            "offload the trainer's optimizer"
        )


def _check_fsdp(config: TrainConfig) -> None:
    words = config.train.fsdp.split()
    unknown = [w for w in words if w not in FSDP_OPTIONS]
    if unknown or not words:
        raise ConfigError(
            f"train.fsdp: unknown option {unknown[0] if unknown else ''!r} "
            f"(known: {', '.join(FSDP_OPTIONS)})"
        )
    cfg = fsdp_config(config)
    version = int(cfg.get("version", 2))
    if version != 2:
        raise ConfigError(
            f"train.fsdp_config: version {version} is not supported: llava-mole trains with "
            'FSDP2 (torch fully_shard); set "version": 2'
        )
    kind = str(cfg.get("state_dict_type", "FULL_STATE_DICT")).upper()
    if kind != "FULL_STATE_DICT":
        raise ConfigError(
            f"train.fsdp_config: state_dict_type {kind} is not supported; use FULL_STATE_DICT "
            "(only the adapter and its optimizer state are saved, gathered on rank 0)"
        )
    if str(cfg.get("activation_checkpointing", False)).lower() == "true" and (
        config.train.gradient_checkpointing
    ):
        raise ConfigError(
            "train.gradient_checkpointing: set it or fsdp_config activation_checkpointing, not both"
        )
    if world_size() < 2:
        raise ConfigError(
            "train.fsdp: needs 2 or more processes (launch with torchrun --nproc_per_node N, "
            "or accelerate launch); one process has nothing to shard with"
        )
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"train.fsdp: FSDP2 is unavailable in this torch ({err})") from None


def check_model(config: TrainConfig, model: nn.Module) -> None:
    """Refusals that need the loaded model (before any process trains)."""
    if config.train.fsdp:
        names = fsdp_config(config).get("transformer_layer_cls_to_wrap") or []
        names = [names] if isinstance(names, str) else list(names)
        present = {type(m).__name__ for m in model.modules()}
        missing = [n for n in names if n not in present]
        if missing:
            layers = sorted(n for n in present if n.endswith(("DecoderLayer", "Block", "Layer")))
            raise ConfigError(
                f"train.fsdp_config: transformer_layer_cls_to_wrap {missing[0]!r} is not a module "
                f"class of this model (its layer classes: {', '.join(layers[:6])})"
            )
