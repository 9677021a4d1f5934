"""The study YAML: its sections as dataclasses, :func:`load_study`, and each run's training config.

One study YAML describes the shared model, mixture, adapter and training settings; every
setting of the registry (:mod:`llava_mole.study.settings`) derives its training config from
the shared keys (:meth:`StudyConfig.training_config`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .. import schema
from ..data.formats import DataConfigError
from ..data.mixture import load_mixture
from ..train.config import (
    AdapterSection,
    ConfigError,
    DataSection,
    ModelSection,
    TrainConfig,
    TrainSection,
)
from . import settings as registry
from ._keys import check_keys
from .errors import StudyConfigError
from .sections import (
    BootstrapSection,
    ConvergenceSection,
    EvalSection,
    ExtraSetting,
    PlotsSection,
    StudyFile,
)

__all__ = [
    "BootstrapSection",
    "ConvergenceSection",
    "EvalSection",
    "ExtraSetting",
    "PlotsSection",
    "StudyConfig",
    "load_study",
]


SETTINGS = registry.SETTINGS


@dataclass
class StudyConfig:
    """A validated study YAML (paths absolute).

    Args:
        path: the YAML file (``None`` when built in code).
        model: the base model directory.
        mixture: the mixture YAML with all domains.
        domains: the mixture's domains, in mixture order.
        seeds: one run per setting (and domain) per seed.
        adapter: shared ``adapter`` keys of the training config (no ``type``).
        train: shared ``train`` keys (``max_steps`` required; no ``seed``/``report_to``).
        single_steps: ``equal_exposure`` (single-domain runs get ``max_steps / D`` steps) or
            ``same_steps``. Unset in the YAML: ``same_steps`` when the runs train to
            convergence (``train.dev_per_domain``; every budget is then the same cap), else
            ``equal_exposure``.
        settings: the built-in settings to run, in this order.
        extra_settings: further configurations.
        eval: evaluation settings.
        convergence: the convergence flag's window and tolerance.
        bootstrap: replicates, confidence and seed of the intervals.
        workers: runs trained in parallel (separate processes).
        plots: how the figures are drawn.
        threads: torch threads per run (None: the cores shared among the workers, and
            torch's own default in-process with one worker).
    """

    path: Path | None
    model: Path
    mixture: Path
    domains: list[str]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    adapter: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    single_steps: Literal["equal_exposure", "same_steps"] = "equal_exposure"
    settings: list[str] = field(default_factory=lambda: list(SETTINGS))
    extra_settings: list[ExtraSetting] = field(default_factory=list)
    eval: EvalSection = field(default_factory=EvalSection)
    bootstrap: BootstrapSection = field(default_factory=BootstrapSection)
    plots: PlotsSection = field(default_factory=PlotsSection)
    convergence: ConvergenceSection = field(default_factory=ConvergenceSection)
    workers: int = 1
    threads: int | None = None

    @property
    def all_settings(self) -> list[str]:
        """Built-in settings then extra settings, in report order."""
        return list(self.settings) + [e.name for e in self.extra_settings]

    def base_of(self, setting: str) -> str:
        """The built-in setting a (possibly extra) setting derives from."""
        for extra in self.extra_settings:
            if extra.name == setting:
                return extra.base
        return setting

    def shared_adapter(self) -> dict[str, Any]:
        """The shared adapter keys with the training config's defaults filled in.

        Returns:
            Every ``adapter`` key but ``type``.
        """
        resolved = dataclasses.asdict(AdapterSection(**self.adapter))
        resolved.pop("type")
        return resolved

    def training_config(self, setting: str) -> TrainConfig:
        """The training config of ``setting`` (placeholder output folder and seed).

        The shared ``adapter``/``train`` keys, then an extra setting's own changes, then the
        built-in setting's :attr:`~llava_mole.study.settings.Setting.derive`.

        Args:
            setting: a built-in or extra setting of this study.

        Returns:
            The config; :func:`llava_mole.study.plan.plan_runs` sets data, seed and folder.
        """
        base = registry.get(self.base_of(setting))
        adapter = dict(self.adapter)
        train_keys = dict(self.train)
        for extra in self.extra_settings:
            if extra.name == setting:
                adapter.update(extra.adapter)
                train_keys.update(extra.train)
        adapter = {**dataclasses.asdict(AdapterSection()), **adapter}
        context = registry.DeriveContext(len(self.domains), self.single_steps)
        base.derive(adapter, train_keys, context)
        adapter["type"] = base.adapter_type
        if base.adapter_type == "lora":
            adapter["shared_rank"] = 0  # a shared expert sits beside routed ones: not in LoRA
        train_keys["report_to"] = ["none"]
        return TrainConfig(
            model=ModelSection(path=str(self.model)),
            data=DataSection(mixture=str(self.mixture)),
            adapter=AdapterSection(**adapter),
            train=TrainSection(**train_keys),
            output_dir="placeholder",
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy (paths as strings)."""
        data = dataclasses.asdict(self)
        for key in ("path", "model", "mixture"):
            data[key] = None if data[key] is None else str(data[key])
        return data


# ---- load_study -----------------------------------------------------------------------------


def _resolve(base: Path, value: str) -> Path:
    """An absolute path; relative ones are taken relative to ``base`` (the YAML's folder)."""
    path = Path(os.path.expanduser(value))
    return (path if path.is_absolute() else base / path).resolve()


def _model_and_mixture(base: Path, raw: StudyFile) -> tuple[Path, Path, list[str]]:
    """``(model dir, mixture file, domains)``; the mixture must have at least two domains."""
    model, mixture_path = _resolve(base, raw.model), _resolve(base, raw.mixture)
    if not model.is_dir():
        raise schema.SchemaError(f"model: model directory not found: {model}")
    try:
        mixture = load_mixture(mixture_path)
    except DataConfigError as err:
        raise schema.SchemaError(f"mixture: {err}") from None
    if len(mixture.domains) < 2:
        raise schema.SchemaError(
            f"mixture: needs at least two domains, {mixture_path} has {mixture.domains}"
        )
    return model, mixture_path, mixture.domains


def _check_lists(raw: StudyFile) -> None:
    """Seeds non-empty and unique; settings known (did you mean) and unique; extra names new."""
    if not raw.seeds:
        raise schema.SchemaError("seeds: must not be empty")
    if len(set(raw.seeds)) != len(raw.seeds):
        raise schema.SchemaError(f"seeds: repeated seed in {raw.seeds}")
    for i, name in enumerate(raw.settings):
        if name not in SETTINGS:
            hint = schema.did_you_mean(name, SETTINGS)
            raise schema.SchemaError(f"settings[{i}]: unknown setting {name!r}{hint}")
    if len(set(raw.settings)) != len(raw.settings):
        raise schema.SchemaError(f"settings: repeated setting in {raw.settings}")
    taken = set(SETTINGS)
    for i, extra in enumerate(raw.extra_settings or []):
        if extra.name in taken:
            raise schema.SchemaError(
                f"extra_settings[{i}].name: {extra.name!r} is already a setting"
            )
        taken.add(extra.name)


def _training_keys(raw: StudyFile) -> tuple[dict, dict, list[ExtraSetting]]:
    """The shared and the extra settings' ``adapter``/``train`` keys, checked."""
    adapter = check_keys(raw.adapter, AdapterSection, "adapter")
    train_keys = check_keys(raw.train, TrainSection, "train")
    if "max_steps" not in train_keys or train_keys["max_steps"] < 1:
        raise schema.SchemaError(
            "train.max_steps: required, >= 1 (the settings scale it; epochs are not used)"
        )
    extras = []
    for i, extra in enumerate(raw.extra_settings or []):
        prefix = f"extra_settings[{i}]"
        extras.append(
            ExtraSetting(
                name=extra.name,
                base=extra.base,
                adapter=check_keys(extra.adapter, AdapterSection, f"{prefix}.adapter"),
                train=check_keys(extra.train, TrainSection, f"{prefix}.train"),
            )
        )
    return adapter, train_keys, extras


def _check_runs(study: StudyConfig) -> None:
    """Build every setting's training config once, so that range errors (rank 0, ...) surface
    now, named by the study key, and not after hours of training."""
    for setting in study.all_settings:
        try:
            study.training_config(setting).validate()
        except ConfigError as err:
            prefix = ""
            for i, extra in enumerate(study.extra_settings):
                if extra.name == setting:
                    prefix = f"extra_settings[{i}]."
            raise schema.SchemaError(f"{prefix}{err} (setting {setting})") from None


def _build(path: Path) -> StudyConfig:
    """The study of ``path``; every problem is a :class:`schema.SchemaError` (no file name)."""
    raw = schema.validate(StudyFile, schema.read_yaml(path))
    _check_lists(raw)
    model, mixture, domains = _model_and_mixture(path.resolve().parent, raw)
    adapter, train_keys, extras = _training_keys(raw)
    study = StudyConfig(
        path=path.resolve(),
        model=model,
        mixture=mixture,
        domains=domains,
        seeds=list(raw.seeds),
        adapter=adapter,
        train=train_keys,
        single_steps=raw.single_steps or _default_single_steps(train_keys),
        settings=list(raw.settings),
        extra_settings=extras,
        eval=raw.eval or EvalSection(),
        convergence=raw.convergence or ConvergenceSection(),
        bootstrap=raw.bootstrap or BootstrapSection(),
        plots=raw.plots or PlotsSection(),
        workers=raw.workers,
        threads=raw.threads,
    )
    _check_runs(study)
    return study


def _default_single_steps(train: dict[str, Any]) -> str:
    """``same_steps`` for runs trained to convergence (a budget is a cap), else equal exposure."""
    return "same_steps" if train.get("dev_per_domain") else "equal_exposure"


def load_study(path: str | os.PathLike[str]) -> StudyConfig:
    """Read and validate a study YAML with the shared schema (:mod:`llava_mole.schema`).

    Schema (every key but ``model``, ``mixture`` and ``train.max_steps`` optional)::

        model: path/to/model_dir          # relative paths: relative to this YAML's folder
        mixture: path/to/mixture.yaml     # all domains (at least two)
        seeds: [0, 1, 2]
        adapter: {rank: 1, alpha: 2, num_experts: 3}   # training-config adapter keys, no type
        train: {learning_rate: 2e-3, max_steps: 300}   # training-config train keys, no seed
        single_steps: equal_exposure      # or same_steps (the default with train.dev_per_domain)
        settings: [single, mix_lora, mix_mole, mix_lora_2x, mix_lora_rank_kr]
        extra_settings:
          - {name: mole_k4, base: mix_mole, adapter: {num_experts: 4}}
        eval: {split: test, batch_size: 32, max_new_tokens: 8, limit: null}
        convergence: {tail: 0.2, tolerance: 0.02}
        bootstrap: {samples: 2000, confidence: 0.95, seed: 0}
        plots: {loss_scale: linear}       # or log
        workers: 1
        threads: null                     # torch threads per run (null: cores / workers)

    Unknown keys are refused with a "did you mean" suggestion, values are type-checked
    strictly (numbers written as strings, such as ``2e-3``, are accepted for float keys).

    Args:
        path: the study YAML.

    Returns:
        The validated :class:`StudyConfig`; every run's training config has been checked.

    Raises:
        StudyConfigError: one line, ``<file>: <dotted key>: <problem>``.
    """
    path = Path(path)
    if not path.is_file():
        raise StudyConfigError(f"study file not found: {path}")
    try:
        return _build(path)
    except schema.SchemaError as err:
        text = str(err)
        if text.startswith(f"{path}:"):
            raise StudyConfigError(text) from None
        raise StudyConfigError(f"{path}: {text}") from None
