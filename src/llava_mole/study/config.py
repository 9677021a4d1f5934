"""The study YAML: its sections as dataclasses, :func:`load_study`, and each run's training config.

One study YAML describes the shared model, mixture, adapter and training settings; every
setting of the registry (:mod:`llava_mole.study.settings`) derives its training config from
the shared keys (:meth:`StudyConfig.training_config`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

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
from ._validate import check_dataclass, check_mapping, check_section, check_type, fail
from .errors import StudyConfigError

__all__ = [
    "BootstrapSection",
    "ConvergenceSection",
    "EvalSection",
    "ExtraSetting",
    "StudyConfig",
    "load_study",
]

_TOP_KEYS = (
    "model",
    "mixture",
    "seeds",
    "adapter",
    "train",
    "single_steps",
    "settings",
    "extra_settings",
    "eval",
    "convergence",
    "bootstrap",
    "workers",
)
_EXTRA_KEYS = ("name", "base", "adapter", "train")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SETTINGS = registry.SETTINGS


@dataclass
class EvalSection:
    """How every run is evaluated.

    Args:
        split: mixture split to evaluate on (``test`` or ``train``).
        batch_size: samples per generation batch.
        max_new_tokens: maximum answer length in tokens.
        limit: at most this many samples per domain (``None``: all).
    """

    split: Literal["test", "train"] = "test"
    batch_size: int = 32
    max_new_tokens: int = 8
    limit: int | None = None


@dataclass
class ConvergenceSection:
    """When a run counts as still improving at the end.

    Args:
        tail: share of the logged steps forming the final window.
        tolerance: a run is flagged when the mean loss of the final window is more than this
            (relative) below the mean of the equal-length window just before it.
    """

    tail: float = 0.2
    tolerance: float = 0.02


@dataclass
class BootstrapSection:
    """The paired bootstrap behind every confidence interval (see :mod:`.stats`).

    Args:
        samples: bootstrap replicates ``B``.
        confidence: coverage of the percentile intervals (0.95: the 2.5th-97.5th percentiles).
        seed: seed of the resampling (the same seed gives the same intervals).
    """

    samples: int = 2000
    confidence: float = 0.95
    seed: int = 0


@dataclass
class ExtraSetting:
    """A further configuration: a built-in setting with changed adapter/train keys.

    The changes are applied to the study's shared sections first and the base setting's rule
    after, so ``{base: mix_lora_2x, train: {max_steps: 600}}`` trains 1200 steps and
    ``{base: mix_lora_rank_kr, adapter: {num_experts: 4}}`` uses MLP rank 4r.

    Args:
        name: the setting's name in tables, plots and run folders.
        base: a built-in setting (:data:`llava_mole.study.settings.SETTINGS`).
        adapter: changed ``adapter`` keys.
        train: changed ``train`` keys.
    """

    name: str
    base: str
    adapter: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


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
            ``same_steps``.
        settings: the built-in settings to run, in this order.
        extra_settings: further configurations.
        eval: evaluation settings.
        convergence: the convergence flag's window and tolerance.
        bootstrap: replicates, confidence and seed of the intervals.
        workers: runs trained in parallel (separate processes).
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
    convergence: ConvergenceSection = field(default_factory=ConvergenceSection)
    workers: int = 1

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


def _read(path: Path) -> dict[str, Any]:
    """The YAML's top-level mapping, its keys checked."""
    where = str(path)
    if not path.is_file():
        raise StudyConfigError(f"study file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise StudyConfigError(f"{where}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise StudyConfigError(f"{where}: expected a mapping at the top level")
    for key in data:
        if key not in _TOP_KEYS:
            raise fail(where, str(key), f"unknown key (known: {', '.join(_TOP_KEYS)})")
    return data


def _model_and_mixture(where: str, base: Path, data: dict[str, Any]) -> tuple[Path, Path, list]:
    """``(model dir, mixture file, domains)``; the mixture must have at least two domains."""
    paths = {}
    for key in ("model", "mixture"):
        if key not in data:
            raise fail(where, key, "required")
        paths[key] = _resolve(base, check_type(where, key, data[key], str))
    if not paths["model"].is_dir():
        raise fail(where, "model", f"model directory not found: {paths['model']}")
    try:
        mixture = load_mixture(paths["mixture"])
    except DataConfigError as err:
        raise fail(where, "mixture", str(err)) from None
    if len(mixture.domains) < 2:
        raise fail(
            where,
            "mixture",
            f"needs at least two domains, {paths['mixture']} has {mixture.domains}",
        )
    return paths["model"], paths["mixture"], mixture.domains


def _seeds_and_settings(where: str, data: dict[str, Any]) -> dict[str, Any]:
    """``seeds``, ``single_steps`` and ``settings``, checked."""
    seeds = check_type(where, "seeds", data.get("seeds", [0, 1, 2]), list[int])
    if not seeds:
        raise fail(where, "seeds", "must not be empty")
    if len(set(seeds)) != len(seeds):
        raise fail(where, "seeds", f"repeated seed in {seeds}")
    single_steps = check_type(
        where,
        "single_steps",
        data.get("single_steps", "equal_exposure"),
        Literal["equal_exposure", "same_steps"],
    )
    names = check_type(where, "settings", data.get("settings", list(SETTINGS)), list[str])
    for i, name in enumerate(names):
        if name not in SETTINGS:
            raise fail(where, f"settings[{i}]", f"unknown setting {name!r} (one of {SETTINGS})")
    if len(set(names)) != len(names):
        raise fail(where, "settings", f"repeated setting in {names}")
    return {"seeds": seeds, "single_steps": single_steps, "settings": names}


def _extra_setting(where: str, i: int, entry: Any, taken: set[str]) -> ExtraSetting:
    """``extra_settings[i]``, checked (its name must not be ``taken``; it is added)."""
    prefix = f"extra_settings[{i}]"
    entry = check_mapping(where, prefix, entry)
    for key in entry:
        if key not in _EXTRA_KEYS:
            raise fail(where, f"{prefix}.{key}", f"unknown key (known: {', '.join(_EXTRA_KEYS)})")
    for key in ("name", "base"):
        if key not in entry:
            raise fail(where, f"{prefix}.{key}", "required")
    name = check_type(where, f"{prefix}.name", entry["name"], str)
    if not _NAME.match(name):
        raise fail(where, f"{prefix}.name", f"letters, digits, _ . - only, got {name!r}")
    if name in taken:
        raise fail(where, f"{prefix}.name", f"{name!r} is already a setting")
    taken.add(name)
    base_name = check_type(where, f"{prefix}.base", entry["base"], str)
    if base_name not in SETTINGS:
        raise fail(where, f"{prefix}.base", f"must be one of {SETTINGS}, got {base_name!r}")
    return ExtraSetting(
        name=name,
        base=base_name,
        adapter=check_section(where, f"{prefix}.adapter", entry.get("adapter"), AdapterSection),
        train=check_section(where, f"{prefix}.train", entry.get("train"), TrainSection),
    )


def _extra_settings(where: str, raw: Any) -> list[ExtraSetting]:
    """``extra_settings``, checked."""
    raw = raw or []
    if not isinstance(raw, list):
        raise fail(where, "extra_settings", f"expected a list, got {raw!r}")
    taken = set(SETTINGS)
    return [_extra_setting(where, i, entry, taken) for i, entry in enumerate(raw)]


def _sections(where: str, data: dict[str, Any]) -> dict[str, Any]:
    """``eval``, ``convergence``, ``bootstrap`` and ``workers``, checked (ranges too)."""
    ev = check_dataclass(where, "eval", data.get("eval"), EvalSection)
    for key in ("batch_size", "max_new_tokens"):
        if getattr(ev, key) < 1:
            raise fail(where, f"eval.{key}", f"must be >= 1, got {getattr(ev, key)}")
    if ev.limit is not None and ev.limit < 1:
        raise fail(where, "eval.limit", f"must be >= 1 or null, got {ev.limit}")
    conv = check_dataclass(where, "convergence", data.get("convergence"), ConvergenceSection)
    if not 0 < conv.tail <= 0.5:
        raise fail(where, "convergence.tail", f"must be in (0, 0.5], got {conv.tail}")
    if conv.tolerance < 0:
        raise fail(where, "convergence.tolerance", f"must be >= 0, got {conv.tolerance}")
    boot = check_dataclass(where, "bootstrap", data.get("bootstrap"), BootstrapSection)
    if boot.samples < 100:
        raise fail(where, "bootstrap.samples", f"must be >= 100, got {boot.samples}")
    if not 0.5 <= boot.confidence < 1:
        raise fail(where, "bootstrap.confidence", f"must be in [0.5, 1), got {boot.confidence}")
    workers = check_type(where, "workers", data.get("workers", 1), int)
    if workers < 1:
        raise fail(where, "workers", f"must be >= 1, got {workers}")
    return {"eval": ev, "convergence": conv, "bootstrap": boot, "workers": workers}


def _check_runs(where: str, study: StudyConfig) -> None:
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
            raise StudyConfigError(f"{where}: {prefix}{err} (setting {setting})") from None


def load_study(path: str | os.PathLike[str]) -> StudyConfig:
    """Read and validate a study YAML.

    Schema (every key but ``model``, ``mixture`` and ``train.max_steps`` optional)::

        model: path/to/model_dir          # relative paths: relative to this YAML's folder
        mixture: path/to/mixture.yaml     # all domains (at least two)
        seeds: [0, 1, 2]
        adapter: {rank: 1, alpha: 2, num_experts: 3}   # training-config adapter keys, no type
        train: {learning_rate: 2.0e-3, max_steps: 300} # training-config train keys, no seed
        single_steps: equal_exposure      # or same_steps
        settings: [single, mix_lora, mix_mole, mix_lora_2x, mix_lora_rank_kr]
        extra_settings:
          - {name: mole_k4, base: mix_mole, adapter: {num_experts: 4}}
        eval: {split: test, batch_size: 32, max_new_tokens: 8, limit: null}
        convergence: {tail: 0.2, tolerance: 0.02}
        bootstrap: {samples: 2000, confidence: 0.95, seed: 0}
        workers: 1

    Args:
        path: the study YAML.

    Returns:
        The validated :class:`StudyConfig`; every run's training config has been checked.

    Raises:
        StudyConfigError: unknown keys, wrong types or values, missing files; the message names
            the file and the dotted key.
    """
    path = Path(path)
    where = str(path)
    data = _read(path)
    model, mixture, domains = _model_and_mixture(where, path.resolve().parent, data)
    adapter = check_section(where, "adapter", data.get("adapter"), AdapterSection)
    train_keys = check_section(where, "train", data.get("train"), TrainSection)
    if "max_steps" not in train_keys or train_keys["max_steps"] < 1:
        raise fail(
            where, "train.max_steps", "required, >= 1 (the settings scale it; epochs are not used)"
        )
    study = StudyConfig(
        path=path.resolve(),
        model=model,
        mixture=mixture,
        domains=domains,
        adapter=adapter,
        train=train_keys,
        **_seeds_and_settings(where, data),
        extra_settings=_extra_settings(where, data.get("extra_settings")),
        **_sections(where, data),
    )
    _check_runs(where, study)
    return study
