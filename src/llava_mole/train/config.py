"""The training YAML: five top-level sections, strictly validated.

```yaml
model: {path: llava-mole-work/tiny-llava, dtype: float32}
data: {mixture: llava-mole-work/data/mixture.yaml}
adapter: {type: mole, rank: 4, alpha: 8, num_experts: 3}
train: {learning_rate: 2.0e-4, max_steps: 200, per_device_batch_size: 8}
output_dir: runs/tiny-mole
```

Unknown keys and wrong types raise :class:`ConfigError` naming the dotted key. ``--set
train.max_steps=20`` style overrides are applied before validation.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from ..adapters.config import MoLEConfig
from ..paths import not_found_or, path_problem


class ConfigError(ValueError):
    """A training config problem; the message names the key."""


@dataclass
class ModelSection:
    """Base model.

    Args:
        path: a local Hugging Face model directory (``save_pretrained`` layout).
        dtype: dtype of the frozen base weights (``float32``, ``bfloat16``, ``float16``).
        trust_remote_code: only if you trust the directory's code; never on by default.
        attn_implementation: e.g. ``sdpa`` or ``eager``; ``null`` lets transformers choose.
    """

    path: str = ""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    attn_implementation: str | None = None


@dataclass
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

    mixture: str = ""
    split: str = "train"
    strict: bool | None = None
    max_length: int | None = None
    group_by_length: bool = False


@dataclass
class AdapterSection:
    """The adapter (see :class:`llava_mole.MoLEConfig`); ``type`` is ``lora`` or ``mole``."""

    type: Literal["lora", "mole"] = "mole"
    rank: int = 16
    mlp_rank: int | None = None
    alpha: float = 32.0
    dropout: float = 0.05
    num_experts: int = 3
    top_k: int = 1
    normalize_top_k: bool = False
    balance_coef: float = 0.01
    router_z_coef: float = 0.0
    gate_weighting: Literal["prob", "none"] = "prob"
    balance_loss: Literal["switch", "official"] = "switch"
    attn_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    mlp_targets: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    target_tree: str | None = None
    train_projector: bool = True
    dispatch: Literal["auto", "loop", "grouped_mm", "dense", "triton"] = "auto"
    router: Literal["linear", "domain"] = "linear"

    def to_mole_config(self) -> MoLEConfig:
        data = dataclasses.asdict(self)
        data["mode"] = data.pop("type")
        try:
            return MoLEConfig(**data)
        except ValueError as err:
            raise ConfigError(str(err).replace("MoLEConfig.", "adapter.")) from None


@dataclass
class TrainSection:
    """Optimisation and run control.

    Args:
        learning_rate: peak learning rate of the adapter.
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
        nan_policy: ``stop`` (default) or ``skip`` a step whose loss or gradients are not finite.
        max_skipped_share: with ``nan_policy: skip``, the run fails when more than this share
            of its steps was skipped.
        collapse_threshold: warn when an expert gets less than this share of tokens...
        collapse_window: ...averaged over this many logged steps.
        log_domain_loss: log the LM loss per domain.
        report_to: ``tensorboard`` and/or ``none``.
        deepspeed: path to a DeepSpeed JSON config (ZeRO-2/3; CPU processes work too).
        fsdp: transformers ``fsdp`` option string, e.g. ``"full_shard"`` (FSDP2, 2+ processes).
        fsdp_config: path to an FSDP JSON config (``configs/fsdp.json``).
        dist_timeout: seconds a process waits in a collective operation (and for the other
            ranks at the end) before the run fails: a rank that crashed or hangs stops the run
            with one line instead of holding the others forever.
        resume: ``auto`` resumes from the latest checkpoint in ``output_dir``; a path resumes
            from that checkpoint; ``false`` refuses to reuse a directory holding checkpoints.
        stop_after_steps: end this invocation (with a checkpoint) after this many optimizer steps
            of the run, keeping the full schedule; resume continues it. ``0``: off.
    """

    learning_rate: float = 2e-4
    projector_lr: float | None = None
    router_lr: float | None = None
    router_dense_warmup: float = 0.0
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    max_steps: int = -1
    per_device_batch_size: int = 8
    gradient_accumulation: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    logging_steps: int = 10
    save_steps: int = 0
    save_total_limit: int | None = 2
    gradient_checkpointing: bool = False
    num_workers: int = 0
    nan_policy: Literal["stop", "skip"] = "stop"
    max_skipped_share: float = 0.25
    collapse_threshold: float = 0.02
    collapse_window: int = 5
    log_domain_loss: bool = True
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    deepspeed: str | None = None
    fsdp: str | None = None
    fsdp_config: str | None = None
    dist_timeout: float = 1800.0
    resume: str | bool = "auto"
    stop_after_steps: int = 0


@dataclass
class TrainConfig:
    """The whole training config (``model``, ``data``, ``adapter``, ``train``, ``output_dir``)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> None:
        if not self.model.path:
            raise ConfigError("model.path: required (a local model directory)")
        if not self.data.mixture:
            raise ConfigError("data.mixture: required (a mixture YAML)")
        if not self.output_dir:
            raise ConfigError("output_dir: required")
        self._check_ranges()
        if not 0 <= self.train.warmup_ratio < 1:
            raise ConfigError(
                f"train.warmup_ratio: must be in [0, 1) (got {self.train.warmup_ratio})"
            )
        if not 0 <= self.train.router_dense_warmup <= 1:
            raise ConfigError(
                "train.router_dense_warmup: must be in [0, 1] "
                f"(got {self.train.router_dense_warmup})"
            )
        if self.train.router_dense_warmup > 0 and self.adapter.gate_weighting == "none":
            raise ConfigError(
                "train.router_dense_warmup: needs adapter.gate_weighting='prob' (with 'none' "
                "the dense phase would sum the experts unweighted and never train the router)"
            )
        if self.train.max_steps == 0 or self.train.max_steps < -1:
            raise ConfigError(f"train.max_steps: must be > 0 or -1 (got {self.train.max_steps})")
        if self.train.max_steps == -1 and self.train.epochs <= 0:
            raise ConfigError(f"train.epochs: must be > 0 (got {self.train.epochs})")
        for name in self.train.report_to:
            if name not in ("tensorboard", "none"):
                raise ConfigError(f"train.report_to: unknown logger {name!r} (tensorboard, none)")
        self.adapter.to_mole_config()

    def _check_ranges(self) -> None:
        """Every numeric setting inside its range (``None`` is allowed where it means 'off')."""
        t = self.train
        rules: list[tuple[str, Any, str, Any]] = [
            ("data.max_length", self.data.max_length, ">=", 1),
            ("train.per_device_batch_size", t.per_device_batch_size, ">=", 1),
            ("train.gradient_accumulation", t.gradient_accumulation, ">=", 1),
            ("train.logging_steps", t.logging_steps, ">=", 1),
            ("train.save_steps", t.save_steps, ">=", 0),
            ("train.save_total_limit", t.save_total_limit, ">=", 1),
            ("train.stop_after_steps", t.stop_after_steps, ">=", 0),
            ("train.num_workers", t.num_workers, ">=", 0),
            ("train.seed", t.seed, ">=", 0),
            ("train.collapse_window", t.collapse_window, ">=", 1),
            ("train.learning_rate", t.learning_rate, ">", 0),
            ("train.projector_lr", t.projector_lr, ">", 0),
            ("train.router_lr", t.router_lr, ">", 0),
            ("train.max_grad_norm", t.max_grad_norm, ">", 0),
            ("train.dist_timeout", t.dist_timeout, ">", 0),
            ("train.weight_decay", t.weight_decay, ">=", 0),
            ("train.collapse_threshold", t.collapse_threshold, "in [0, 1)", (0, 1)),
            ("train.max_skipped_share", t.max_skipped_share, "in [0, 1]", (0, 1)),
        ]
        for key, value, rule, bound in rules:
            if value is None:
                continue
            if rule == ">=":
                ok = value >= bound
            elif rule == ">":
                ok = value > bound
            elif rule == "in [0, 1)":
                ok = bound[0] <= value < bound[1]
            else:
                ok = bound[0] <= value <= bound[1]
            if not ok:
                shown = rule if rule.startswith("in") else f"{rule} {bound}"
                hint = " (null turns clipping off)" if key == "train.max_grad_norm" else ""
                raise ConfigError(f"{key}: must be {shown} (got {value}){hint}")


# ---- parsing -------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_FLOAT_LITERAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: must be one of {list(get_args(tp))} (got {value!r})")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as err:
                errors.append(err)
        if value is None:
            raise ConfigError(f"{key}: must not be null")
        raise errors[0]
    if origin is list:
        (item,) = get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            # YAML 1.1 reads exponent literals without a dot (``5e-4``) as strings.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"{where}: unknown key (known: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name] if data[name] is not None else {}, key)
        else:
            kwargs[name] = _coerce(key, data[name], tp)
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


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
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    config = _build(TrainConfig, data, "")
    config.validate()
    return config
