"""The data-conflict study: single-domain LoRA vs mixed LoRA vs mixed MoLE, with controls.

One study YAML describes the shared model, mixture, adapter and training settings; the study
expands it into runs (setting x seed, x domain for the single-domain setting), trains and
evaluates each run into ``OUT/runs/<setting>[/<domain>]/seed<k>`` and writes ``results.json``,
``report.md`` and three PNGs into ``OUT``. Finished work is never redone: a run with a
``summary.json`` is not trained again and a run with an ``eval.json`` is not evaluated again,
so re-running an interrupted study continues it (partially trained runs resume from their
checkpoints through the trainer).

Settings (names fixed)::

    single             plain LoRA on each domain alone (one run per domain and seed)
    mix_lora           plain LoRA on the whole mixture
    mix_mole           MoLE (K experts of rank r, top-1) on the mixture, same steps
    mix_lora_2x        plain LoRA on the mixture with twice the steps (twice the samples)
    mix_lora_rank_kr   plain LoRA on the mixture, MLP rank K*r (MoLE's MLP parameter count)

See :func:`load_study` for the YAML schema.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import re
import sys
import time
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from ..adapters.io import atomic_write_bytes
from ..data.formats import DataConfigError
from ..data.mixture import load_mixture
from ..eval.generate import evaluate
from ..train.config import (
    AdapterSection,
    ConfigError,
    DataSection,
    ModelSection,
    TrainConfig,
    TrainSection,
)
from ..train.resume import RESUME_FREE_KEYS, config_changes
from ..train.run import train

__all__ = [
    "SETTINGS",
    "EvalSection",
    "ConvergenceSection",
    "ExtraSetting",
    "RunSpec",
    "StudyConfig",
    "StudyConfigError",
    "collect_runs",
    "load_study",
    "plan_runs",
    "run_study",
    "single_mixture_path",
    "write_single_mixtures",
]

SETTINGS: tuple[str, ...] = ("single", "mix_lora", "mix_mole", "mix_lora_2x", "mix_lora_rank_kr")
SUMMARY = "summary.json"
EVAL = "eval.json"

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
    "workers",
)
_EXTRA_KEYS = ("name", "base", "adapter", "train")
# Set by the study itself; allowing them in the YAML would silently be overridden.
_STUDY_OWNED = {
    "adapter.type": "set by the setting (single/mix_lora/... use lora, mix_mole uses mole)",
    "train.seed": "set per run from `seeds`",
    "train.report_to": "the study always uses [none]",
}
# Keys that may differ between the run already on disk and the study's plan without making
# the stored result stale (they change logging or speed, not the trained adapter).
_CHANGE_FREE = RESUME_FREE_KEYS | {"output_dir"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StudyConfigError(ValueError):
    """A study YAML problem; the message names the file and the dotted key."""


class StudyWorkersError(RuntimeError):
    """The process pool running the study's runs died (not an error of one run)."""


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
class ExtraSetting:
    """A further configuration: a built-in setting with changed adapter/train keys.

    The changes are applied to the study's shared sections first and the base setting's rule
    after, so ``{base: mix_lora_2x, train: {max_steps: 600}}`` trains 1200 steps and
    ``{base: mix_lora_rank_kr, adapter: {num_experts: 4}}`` uses MLP rank 4r.

    Args:
        name: the setting's name in tables, plots and run folders.
        base: one of :data:`SETTINGS`.
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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy (paths as strings)."""
        data = dataclasses.asdict(self)
        for key in ("path", "model", "mixture"):
            data[key] = None if data[key] is None else str(data[key])
        return data


@dataclass(frozen=True)
class RunSpec:
    """One training + evaluation run of the study.

    Args:
        setting: the setting's name.
        base: the built-in setting it derives from.
        seed: the run's seed.
        domain: the domain of a single-domain run, else ``None``.
        run_dir: the run's output directory.
        eval_mixture: the mixture evaluated on (the domain's own for single-domain runs).
        config: the run's full training config.
    """

    setting: str
    base: str
    seed: int
    domain: str | None
    run_dir: Path
    eval_mixture: Path
    config: TrainConfig

    @property
    def id(self) -> str:
        """``<setting>[/<domain>]/seed<k>``, the run's folder below ``OUT/runs``."""
        middle = f"/{self.domain}" if self.domain is not None else ""
        return f"{self.setting}{middle}/seed{self.seed}"

    @property
    def steps(self) -> int:
        """Optimizer steps of the run."""
        return self.config.train.max_steps


# ---- YAML validation ----------------------------------------------------------------------


def _fail(where: str, key: str, message: str) -> StudyConfigError:
    """The error ``<file>: <dotted key>: <message>``."""
    return StudyConfigError(f"{where}: {key}: {message}")


def _check_type(where: str, key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints accepted for floats); returns it."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise _fail(where, key, f"must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = [o for o in get_args(tp) if o is not type(None)]
        if value is None:
            if type(None) in get_args(tp):
                return None
            raise _fail(where, key, "must not be null")
        error: StudyConfigError | None = None
        for option in options:
            try:
                return _check_type(where, key, value, option)
            except StudyConfigError as err:
                error = error or err
        assert error is not None
        raise error
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, list):
            raise _fail(where, key, f"expected a list, got {value!r}")
        return [_check_type(where, f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(where, key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(where, key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = ""
            if isinstance(value, str) and re.fullmatch(r"[-+]?\d+[eE][-+]?\d+", value):
                hint = " (YAML reads 2e-3 as text; write 2.0e-3)"
            raise _fail(where, key, f"expected a number, got {value!r}{hint}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(where, key, f"expected a string, got {value!r}")
        return value
    raise _fail(where, key, f"unsupported type {tp}")  # pragma: no cover


def _check_mapping(where: str, key: str, value: Any) -> dict[str, Any]:
    """``value`` as a mapping (null reads as empty); anything else is an error naming ``key``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(where, key, f"expected a mapping, got {value!r}")
    return value


def _check_section(where: str, prefix: str, data: Any, cls: type) -> dict[str, Any]:
    """Validate keys and value types of a training-config section given as a mapping.

    Args:
        where: the file name for messages.
        prefix: the dotted key of the section (e.g. ``extra_settings[0].adapter``).
        data: the mapping from the YAML.
        cls: the training config's section dataclass.

    Returns:
        The checked mapping (ints converted to floats where a float is expected).
    """
    data = _check_mapping(where, prefix, data)
    hints = typing.get_type_hints(cls)
    section = prefix.rsplit(".", 1)[-1]
    names = [f.name for f in dataclasses.fields(cls)]
    allowed = [n for n in names if f"{section}.{n}" not in _STUDY_OWNED]
    out = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}"
        if f"{section}.{key}" in _STUDY_OWNED:
            raise _fail(where, dotted, f"not allowed here: {_STUDY_OWNED[f'{section}.{key}']}")
        if key not in names:
            raise _fail(where, dotted, f"unknown key (known: {', '.join(allowed)})")
        out[key] = _check_type(where, dotted, value, hints[key])
    return out


def _check_dataclass(where: str, prefix: str, data: Any, cls: type) -> Any:
    """Build the study section ``cls`` from a mapping, checking keys and value types."""
    data = _check_mapping(where, prefix, data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise _fail(where, f"{prefix}.{key}", f"unknown key (known: {', '.join(names)})")
    return cls(**{k: _check_type(where, f"{prefix}.{k}", v, hints[k]) for k, v in data.items()})


def _resolve(base: Path, value: str) -> Path:
    """An absolute path; relative ones are taken relative to ``base`` (the YAML's folder)."""
    path = Path(os.path.expanduser(value))
    return (path if path.is_absolute() else base / path).resolve()


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
            raise _fail(where, str(key), f"unknown key (known: {', '.join(_TOP_KEYS)})")
    base = path.resolve().parent

    paths = {}
    for key in ("model", "mixture"):
        if key not in data:
            raise _fail(where, key, "required")
        paths[key] = _resolve(base, _check_type(where, key, data[key], str))
    if not paths["model"].is_dir():
        raise _fail(where, "model", f"model directory not found: {paths['model']}")
    try:
        mixture = load_mixture(paths["mixture"])
    except DataConfigError as err:
        raise _fail(where, "mixture", str(err)) from None
    if len(mixture.domains) < 2:
        raise _fail(
            where,
            "mixture",
            f"needs at least two domains, {paths['mixture']} has {mixture.domains}",
        )

    seeds = _check_type(where, "seeds", data.get("seeds", [0, 1, 2]), list[int])
    if not seeds:
        raise _fail(where, "seeds", "must not be empty")
    if len(set(seeds)) != len(seeds):
        raise _fail(where, "seeds", f"repeated seed in {seeds}")

    adapter = _check_section(where, "adapter", data.get("adapter"), AdapterSection)
    train_keys = _check_section(where, "train", data.get("train"), TrainSection)
    if "max_steps" not in train_keys or train_keys["max_steps"] < 1:
        raise _fail(
            where, "train.max_steps", "required, >= 1 (the settings scale it; epochs are not used)"
        )

    single_steps = _check_type(
        where,
        "single_steps",
        data.get("single_steps", "equal_exposure"),
        Literal["equal_exposure", "same_steps"],
    )
    settings = _check_type(where, "settings", data.get("settings", list(SETTINGS)), list[str])
    for i, name in enumerate(settings):
        if name not in SETTINGS:
            raise _fail(where, f"settings[{i}]", f"unknown setting {name!r} (one of {SETTINGS})")
    if len(set(settings)) != len(settings):
        raise _fail(where, "settings", f"repeated setting in {settings}")

    extras_raw = data.get("extra_settings") or []
    if not isinstance(extras_raw, list):
        raise _fail(where, "extra_settings", f"expected a list, got {extras_raw!r}")
    extras: list[ExtraSetting] = []
    taken = set(SETTINGS)
    for i, entry in enumerate(extras_raw):
        prefix = f"extra_settings[{i}]"
        entry = _check_mapping(where, prefix, entry)
        for key in entry:
            if key not in _EXTRA_KEYS:
                raise _fail(
                    where, f"{prefix}.{key}", f"unknown key (known: {', '.join(_EXTRA_KEYS)})"
                )
        for key in ("name", "base"):
            if key not in entry:
                raise _fail(where, f"{prefix}.{key}", "required")
        name = _check_type(where, f"{prefix}.name", entry["name"], str)
        if not _NAME.match(name):
            raise _fail(where, f"{prefix}.name", f"letters, digits, _ . - only, got {name!r}")
        if name in taken:
            raise _fail(where, f"{prefix}.name", f"{name!r} is already a setting")
        taken.add(name)
        base_name = _check_type(where, f"{prefix}.base", entry["base"], str)
        if base_name not in SETTINGS:
            raise _fail(where, f"{prefix}.base", f"must be one of {SETTINGS}, got {base_name!r}")
        extras.append(
            ExtraSetting(
                name=name,
                base=base_name,
                adapter=_check_section(
                    where, f"{prefix}.adapter", entry.get("adapter"), AdapterSection
                ),
                train=_check_section(where, f"{prefix}.train", entry.get("train"), TrainSection),
            )
        )

    eval_section = _check_dataclass(where, "eval", data.get("eval"), EvalSection)
    for key in ("batch_size", "max_new_tokens"):
        if getattr(eval_section, key) < 1:
            raise _fail(where, f"eval.{key}", f"must be >= 1, got {getattr(eval_section, key)}")
    if eval_section.limit is not None and eval_section.limit < 1:
        raise _fail(where, "eval.limit", f"must be >= 1 or null, got {eval_section.limit}")
    convergence = _check_dataclass(
        where, "convergence", data.get("convergence"), ConvergenceSection
    )
    if not 0 < convergence.tail <= 0.5:
        raise _fail(where, "convergence.tail", f"must be in (0, 0.5], got {convergence.tail}")
    if convergence.tolerance < 0:
        raise _fail(where, "convergence.tolerance", f"must be >= 0, got {convergence.tolerance}")
    workers = _check_type(where, "workers", data.get("workers", 1), int)
    if workers < 1:
        raise _fail(where, "workers", f"must be >= 1, got {workers}")

    study = StudyConfig(
        path=path.resolve(),
        model=paths["model"],
        mixture=paths["mixture"],
        domains=mixture.domains,
        seeds=seeds,
        adapter=adapter,
        train=train_keys,
        single_steps=single_steps,
        settings=settings,
        extra_settings=extras,
        eval=eval_section,
        convergence=convergence,
        workers=workers,
    )
    # Build every run's training config once so that range errors (rank 0, ...) surface now,
    # named by the study key, and not after hours of training.
    for setting in study.all_settings:
        try:
            _sections(study, setting)[0].validate()
        except ConfigError as err:
            prefix = ""
            for i, extra in enumerate(study.extra_settings):
                if extra.name == setting:
                    prefix = f"extra_settings[{i}]."
            raise StudyConfigError(f"{where}: {prefix}{err} (setting {setting})") from None
    return study


# ---- planning -----------------------------------------------------------------------------


def _sections(study: StudyConfig, setting: str) -> tuple[TrainConfig, bool]:
    """The training config of ``setting`` (placeholder paths) and whether it is per domain."""
    base = study.base_of(setting)
    adapter = dict(study.adapter)
    train_keys = dict(study.train)
    for extra in study.extra_settings:
        if extra.name == setting:
            adapter.update(extra.adapter)
            train_keys.update(extra.train)
    defaults = AdapterSection()
    if base == "single" and study.single_steps == "equal_exposure":
        # Each domain then sees as many samples alone as it does inside the mixture (exactly
        # so when the domains are equally large).
        steps = train_keys["max_steps"] / len(study.domains)
        train_keys["max_steps"] = max(1, int(steps + 0.5))  # halves up, not to even
    elif base == "mix_lora_2x":
        train_keys["max_steps"] = 2 * train_keys["max_steps"]
    elif base == "mix_lora_rank_kr":
        # Rank K*r on the MLP only: exactly MoLE's MLP parameter count (attention LoRA as in
        # MoLE, scale alpha/r unchanged); MoLE keeps only its routers (d*K per block) extra.
        k = adapter.get("num_experts", defaults.num_experts)
        adapter["mlp_rank"] = k * adapter.get("rank", defaults.rank)
    adapter["type"] = "mole" if base == "mix_mole" else "lora"
    train_keys["report_to"] = ["none"]
    config = TrainConfig(
        model=ModelSection(path=str(study.model)),
        data=DataSection(mixture=str(study.mixture)),
        adapter=AdapterSection(**adapter),
        train=TrainSection(**train_keys),
        output_dir="placeholder",
    )
    return config, base == "single"


def single_mixture_path(out_dir: Path, domain: str) -> Path:
    """Where the single-domain mixture of ``domain`` is written."""
    return Path(out_dir) / "mixtures" / f"single-{domain}.yaml"


def write_single_mixtures(study: StudyConfig, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Derive one mixture per domain from the study's mixture (datasets filtered by domain).

    Paths are written absolute so the files work from ``OUT/mixtures``; dataset names are
    written explicitly because a default name is the path as written, and ``select: random``
    seeds its draw with the name: the single-domain run must see the very samples the mixture
    run sees.

    Args:
        study: the study.
        out_dir: the study's output folder.

    Returns:
        ``{domain: mixture path}``.
    """
    loaded = load_mixture(study.mixture)
    raw = yaml.safe_load(Path(study.mixture).read_text(encoding="utf-8"))
    out: dict[str, Path] = {}
    for domain in study.domains:
        entries = []
        for entry, spec in zip(raw["datasets"], loaded.datasets):
            if spec.domain != domain:
                continue
            entry = dict(entry)
            entry["name"] = spec.name
            for key in ("train", "test", "image_folder"):
                value = getattr(spec, key)
                if value is not None:
                    entry[key] = str(Path(value).resolve())
            entries.append(entry)
        doc = {k: v for k, v in raw.items() if k != "datasets"}
        doc["datasets"] = entries
        target = single_mixture_path(Path(out_dir), domain)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = (
            f"# Derived by llava_mole.study from {study.mixture} (domain {domain}).\n"
            + yaml.safe_dump(doc, sort_keys=False)
        )
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            atomic_write_bytes(target, text.encode("utf-8"))
        out[domain] = target
    return out


def plan_runs(study: StudyConfig, out_dir: str | os.PathLike[str]) -> list[RunSpec]:
    """Every run of the study, in execution order (setting, then domain, then seed).

    Args:
        study: the study.
        out_dir: the study's output folder (runs go to ``out_dir/runs``).

    Returns:
        The runs; configs carry ``output_dir``, ``train.seed`` and the data mixture.
    """
    out = Path(out_dir).resolve()
    runs = []
    for setting in study.all_settings:
        template, per_domain = _sections(study, setting)
        domains: list[str | None] = list(study.domains) if per_domain else [None]
        for domain in domains:
            mixture = study.mixture if domain is None else single_mixture_path(out, domain)
            for seed in study.seeds:
                middle = Path(setting) / domain if domain is not None else Path(setting)
                run_dir = out / "runs" / middle / f"seed{seed}"
                config = dataclasses.replace(
                    template,
                    data=dataclasses.replace(template.data, mixture=str(mixture)),
                    train=dataclasses.replace(template.train, seed=seed),
                    adapter=dataclasses.replace(template.adapter),
                    output_dir=str(run_dir),
                )
                runs.append(
                    RunSpec(
                        setting=setting,
                        base=study.base_of(setting),
                        seed=seed,
                        domain=domain,
                        run_dir=run_dir,
                        eval_mixture=Path(mixture),
                        config=config,
                    )
                )
    return runs


# ---- running ------------------------------------------------------------------------------


def _check_stale(spec: RunSpec) -> None:
    """Refuse to reuse a finished run that was trained with another config than planned now."""
    saved = spec.run_dir / "run_config.yaml"
    if not (spec.run_dir / SUMMARY).is_file() or not saved.is_file():
        return
    before = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    changes = config_changes(before, spec.config, ignore=_CHANGE_FREE)
    if changes:
        key, old, now = changes[0]
        raise StudyConfigError(
            f"{spec.run_dir}: this finished run was trained with {key}={old!r}, "
            f"the study now asks {now!r}; use a new output folder or delete the run"
        )


@dataclass
class _Job:
    """What a (possibly remote) worker needs to do one run."""

    spec: RunSpec
    model: Path
    eval: EvalSection
    progress: bool
    log_to_file: bool


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout/stderr (file descriptors, so C and tqdm too) to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _execute(job: _Job) -> dict[str, Any]:
    """Train (unless finished) and evaluate (unless evaluated) one run.

    Args:
        job: the run and the evaluation settings.

    Returns:
        ``{"id", "trained", "evaluated", "seconds"}``.
    """
    spec = job.spec
    started = time.perf_counter()
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    trained = evaluated = False
    context = (
        _output_to(spec.run_dir / "study.log") if job.log_to_file else contextlib.nullcontext()
    )
    with context:
        if not (spec.run_dir / SUMMARY).is_file():
            (spec.run_dir / EVAL).unlink(missing_ok=True)  # an eval of an older adapter
            result = train(spec.config)
            if not result.completed:
                raise RuntimeError(f"{spec.id}: training stopped before the end")
            trained = True
        if not (spec.run_dir / EVAL).is_file():
            evaluate(
                job.model,
                spec.run_dir,
                mixture=spec.eval_mixture,
                split=job.eval.split,
                out=spec.run_dir / EVAL,
                batch_size=job.eval.batch_size,
                max_new_tokens=job.eval.max_new_tokens,
                limit=job.eval.limit,
                routing=True,
                progress=job.progress,
            )
            evaluated = True
    return {
        "id": spec.id,
        "trained": trained,
        "evaluated": evaluated,
        "seconds": time.perf_counter() - started,
    }


def _init_worker(threads: int) -> None:
    """Pool initializer: share the cores among the workers instead of oversubscribing them."""
    import torch

    torch.set_num_threads(threads)


def _clock(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class _Progress:
    """Elapsed time and an ETA from the runs finished so far, weighted by their steps."""

    def __init__(self, specs: list[RunSpec], enabled: bool) -> None:
        self.enabled = enabled
        self.total = len(specs)
        self.started = time.perf_counter()
        self.pending_steps = {s.id: self._work(s) for s in specs}
        self.work_done = 0.0
        self.time_spent = 0.0

    @staticmethod
    def _work(spec: RunSpec) -> float:
        # Training dominates; an evaluation-only run counts as a fraction of a step budget.
        if (spec.run_dir / SUMMARY).is_file():
            return 0.0 if (spec.run_dir / EVAL).is_file() else 0.1 * spec.steps
        return float(spec.steps)

    def eta(self) -> str:
        remaining = sum(self.pending_steps.values())
        if remaining == 0:
            return "0m00s"
        if self.work_done == 0:
            return "unknown"
        return "~" + _clock(self.time_spent / self.work_done * remaining)

    def done(self, spec: RunSpec, seconds: float, wall: bool) -> None:
        work = self.pending_steps.pop(spec.id, 0.0)
        if work > 0:
            self.work_done += work
            # In parallel the wall clock, not the summed run times, is what the ETA must track.
            self.time_spent = (
                time.perf_counter() - self.started if wall else self.time_spent + seconds
            )

    def say(self, text: str) -> None:
        if self.enabled:
            elapsed = _clock(time.perf_counter() - self.started)
            print(f"[study] {text} | elapsed {elapsed}, ETA {self.eta()}", flush=True)


def _describe(spec: RunSpec) -> str:
    """One line naming the run for progress output."""
    adapter = spec.config.adapter
    mlp = f", MLP r={adapter.mlp_rank}" if adapter.mlp_rank not in (None, adapter.rank) else ""
    kind = (
        f"MoLE K={adapter.num_experts} r={adapter.rank}"
        if adapter.type == "mole"
        else f"LoRA r={adapter.rank}{mlp}"
    )
    domain = f" domain {spec.domain}" if spec.domain else ""
    return f"{spec.setting}{domain} seed {spec.seed} ({kind}, {spec.steps} steps)"


def _status(spec: RunSpec) -> str:
    """What a run still needs: ``training``, ``evaluating`` or nothing (``done``)."""
    if (spec.run_dir / SUMMARY).is_file():
        return "done" if (spec.run_dir / EVAL).is_file() else "evaluating"
    return "training"


def _run_all(study: StudyConfig, specs: list[RunSpec], progress: bool) -> None:
    """Execute every run, in this process (one worker) or in a spawn process pool."""
    meter = _Progress(specs, progress)
    if study.workers == 1:
        for i, spec in enumerate(specs, 1):
            status = _status(spec)
            meter.say(f"run {i}/{len(specs)} {_describe(spec)}: {status}")
            if status == "done":
                meter.done(spec, 0.0, wall=False)
                continue
            job = _Job(spec, study.model, study.eval, progress, log_to_file=not progress)
            outcome = _execute(job)
            meter.done(spec, outcome["seconds"], wall=False)
        meter.say(f"all {len(specs)} runs finished")
        return

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // study.workers)
    todo = [s for s in specs if _status(s) != "done"]
    for spec in specs:
        if spec not in todo:
            meter.done(spec, 0.0, wall=False)
    meter.say(
        f"{len(specs) - len(todo)}/{len(specs)} runs already done; {len(todo)} to go on "
        f"{study.workers} workers x {threads} threads (per-run output in <run>/study.log)"
    )
    context = multiprocessing.get_context("spawn")
    finished = len(specs) - len(todo)
    with futures.ProcessPoolExecutor(
        max_workers=study.workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(threads,),
    ) as pool:
        pending = {
            pool.submit(_execute, _Job(s, study.model, study.eval, False, True)): s for s in todo
        }
        try:
            for future in futures.as_completed(pending):
                spec = pending[future]
                try:
                    outcome = future.result()
                except futures.process.BrokenProcessPool as err:
                    raise StudyWorkersError(
                        f"the study's worker processes stopped abruptly (run {spec.id} did not "
                        "finish): a worker was killed (out of memory?), or a script calling "
                        'run_study lacks `if __name__ == "__main__":` (workers start with '
                        "spawn); finished runs are kept, run the study again to continue"
                    ) from err
                except BaseException:
                    print(f"[study] run {spec.id} failed; see {spec.run_dir}/study.log", flush=True)
                    raise
                finished += 1
                meter.done(spec, outcome["seconds"], wall=True)
                meter.say(f"finished {finished}/{len(specs)}: {_describe(spec)}")
        except BaseException:
            # Do not start queued runs; finished ones are on disk and a re-run continues.
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``."""
    return json.loads(path.read_text(encoding="utf-8"))


def collect_runs(specs: list[RunSpec]) -> list[dict[str, Any]]:
    """Read each run's ``summary.json`` and ``eval.json`` into one record per run.

    Args:
        specs: the planned runs (all finished).

    Returns:
        Records with ``id``, ``setting``, ``base``, ``domain``, ``seed``, ``run_dir``,
        ``adapter`` (type, rank, alpha, experts), ``max_steps``, ``summary`` and ``eval``.
    """
    records = []
    for spec in specs:
        adapter = spec.config.adapter
        records.append(
            {
                "id": spec.id,
                "setting": spec.setting,
                "base": spec.base,
                "domain": spec.domain,
                "seed": spec.seed,
                "run_dir": str(spec.run_dir),
                "adapter": {
                    "type": adapter.type,
                    "rank": adapter.rank,
                    "mlp_rank": adapter.mlp_rank,
                    "alpha": adapter.alpha,
                    "num_experts": adapter.num_experts if adapter.type == "mole" else 1,
                },
                "max_steps": spec.steps,
                "batch_size": spec.config.train.per_device_batch_size
                * spec.config.train.gradient_accumulation,
                "summary": _read_json(spec.run_dir / SUMMARY),
                "eval": _read_json(spec.run_dir / EVAL),
            }
        )
    return records


def run_study(
    study_yaml: str | os.PathLike[str] | StudyConfig,
    out_dir: str | os.PathLike[str],
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or continue) a data-conflict study and write its results, report and plots.

    With ``workers > 1`` runs go to a spawn process pool: call this from a CLI or under
    ``if __name__ == "__main__":`` (spawned workers re-import the main module). Set
    ``train.save_steps`` to make long runs resumable mid-way, not only run by run.

    Args:
        study_yaml: the study YAML (see :func:`load_study`) or a loaded :class:`StudyConfig`.
        out_dir: the output folder; re-running with the same folder continues the study.
        progress: print progress lines (run i/N, elapsed, ETA) and the trainer's output; when
            False the trainer's output goes to ``<run>/study.log``.

    Returns:
        The results (as written to ``results.json``); ``results["table"]`` is the main table
        in markdown, also printed at the end.
    """
    from .plots import plot_all
    from .report import build_results, render_report

    study = study_yaml if isinstance(study_yaml, StudyConfig) else load_study(study_yaml)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_single_mixtures(study, out)
    specs = plan_runs(study, out)
    for spec in specs:
        _check_stale(spec)
    atomic_write_bytes(
        out / "study.yaml", yaml.safe_dump(study.to_dict(), sort_keys=False).encode("utf-8")
    )
    if progress:
        print(
            f"[study] {len(specs)} runs: {len(study.all_settings)} settings x "
            f"{len(study.seeds)} seeds (single: x {len(study.domains)} domains) -> {out}",
            flush=True,
        )
    _run_all(study, specs, progress)

    results = build_results(study, collect_runs(specs))
    results["plots"] = {k: v.name for k, v in plot_all(results, out).items()}
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=2) + "\n").encode("utf-8"))
    atomic_write_bytes(out / "report.md", render_report(results).encode("utf-8"))
    if progress:
        print(results["table"], flush=True)
        print("[study] verdict (rules and details in the report):", flush=True)
        for line in results["verdict"]["lines"]:
            print(f"  - {line}", flush=True)
        print(f"[study] report: {out / 'report.md'}", flush=True)
    return results
