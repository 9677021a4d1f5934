"""Planning: the study's runs (setting x domain x seed) and the single-domain mixtures.

Each run trains into ``OUT/runs/<setting>[/<domain>]/seed<k>``; a per-domain setting
(:attr:`~llava_mole.study.settings.Setting.per_domain`) trains on a mixture derived from the
study's with only that domain's datasets (``OUT/mixtures/single-<domain>.yaml``), and a setting
with :attr:`~llava_mole.study.settings.Setting.samples_factor` ``n > 1`` on one whose train
``take`` is ``n`` times the study's (``OUT/mixtures/samples-x<n>.yaml``): a count ``N`` becomes
``n * N`` and a fraction ``f`` becomes ``min(1, n * f)``, so the run sees more distinct samples
where the files have them (``take: all`` cannot grow; the run then only has more steps).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..adapters.io import atomic_write_bytes
from ..data.mixture import load_mixture
from ..train.config import TrainConfig
from . import settings as registry
from .config import StudyConfig

__all__ = [
    "EVAL",
    "ITEMS",
    "SUMMARY",
    "RunSpec",
    "plan_runs",
    "scaled_mixture_path",
    "single_mixture_path",
    "write_mixtures",
    "write_scaled_mixture",
    "write_single_mixtures",
]

SUMMARY = "summary.json"
"""Written by training when a run finished: the run is not trained again."""
EVAL = "eval.json"
"""Written by evaluation: the run is not evaluated again."""
ITEMS = "item_scores.json"
"""Per-item scores of the evaluation (for the bootstrap), written by the study."""


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


def single_mixture_path(out_dir: Path, domain: str) -> Path:
    """Where the single-domain mixture of ``domain`` is written."""
    return Path(out_dir) / "mixtures" / f"single-{domain}.yaml"


def scaled_mixture_path(out_dir: Path, factor: int) -> Path:
    """Where the mixture with ``factor`` times the study's train ``take`` is written."""
    return Path(out_dir) / "mixtures" / f"samples-x{factor}.yaml"


def _scaled_take(take: object, factor: int) -> object:
    """``take`` of a train entry with ``factor`` times the samples (``all`` cannot grow)."""
    if take is None or take == "all":
        return take
    if isinstance(take, float) or (isinstance(take, str) and "." in take):
        return min(1.0, factor * float(take))
    return factor * int(take)


def _write_derived(study: StudyConfig, target: Path, note: str, keep, factor: int = 1) -> Path:
    """Write a mixture derived from the study's: the entries ``keep(spec)`` accepts.

    Paths are written absolute so the file works from ``OUT/mixtures``; dataset names are
    written explicitly because a default name is the path as written, and ``select: random``
    seeds its draw with the name: a derived run must see the very samples the mixture run sees.
    """
    loaded = load_mixture(study.mixture)
    raw = yaml.safe_load(Path(study.mixture).read_text(encoding="utf-8"))
    entries = []
    for entry, spec in zip(raw["datasets"], loaded.datasets):
        if not keep(spec):
            continue
        entry = dict(entry)
        entry["name"] = spec.name
        for key in ("train", "test", "image_folder"):
            value = getattr(spec, key)
            if value is not None:
                entry[key] = str(Path(value).resolve())
        if factor != 1 and "take" in entry:
            entry["take"] = _scaled_take(entry["take"], factor)
        entries.append(entry)
    doc = {k: v for k, v in raw.items() if k != "datasets"}
    doc["datasets"] = entries
    target.parent.mkdir(parents=True, exist_ok=True)
    text = f"# Derived by llava_mole.study from {study.mixture} ({note}).\n" + yaml.safe_dump(
        doc, sort_keys=False
    )
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        atomic_write_bytes(target, text.encode("utf-8"))
    return target


def write_single_mixtures(study: StudyConfig, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Derive one mixture per domain from the study's mixture (datasets filtered by domain).

    Args:
        study: the study.
        out_dir: the study's output folder.

    Returns:
        ``{domain: mixture path}``.
    """
    return {
        domain: _write_derived(
            study,
            single_mixture_path(Path(out_dir), domain),
            f"domain {domain}",
            lambda spec, domain=domain: spec.domain == domain,
        )
        for domain in study.domains
    }


def write_scaled_mixture(study: StudyConfig, out_dir: str | os.PathLike[str], factor: int) -> Path:
    """Derive the mixture with ``factor`` times the study's train ``take`` (module doc)."""
    target = scaled_mixture_path(Path(out_dir), factor)
    return _write_derived(study, target, f"{factor}x the train take", lambda spec: True, factor)


def write_mixtures(study: StudyConfig, out_dir: str | os.PathLike[str]) -> None:
    """Every derived mixture the study's settings train on (single-domain and scaled)."""
    write_single_mixtures(study, out_dir)
    for factor in sorted(_factors(study)):
        write_scaled_mixture(study, out_dir, factor)


def _factors(study: StudyConfig) -> set[int]:
    """The samples factors > 1 of the study's settings (none if no train ``take`` can grow)."""
    takes = [spec.take for spec in load_mixture(study.mixture).datasets]
    if all(t == "all" or (isinstance(t, float) and t >= 1.0) for t in takes):
        return set()  # the mixture takes everything: a scaled one would be the same
    factors = {registry.get(study.base_of(s)).samples_factor for s in study.all_settings}
    return {f for f in factors if f > 1}


def _run_mixture(
    study: StudyConfig, out: Path, setting: str, domain: str | None, factors: set[int]
) -> Path:
    """The mixture a run of ``setting`` (on ``domain`` for a per-domain one) trains on."""
    if domain is not None:
        return single_mixture_path(out, domain)
    factor = registry.get(study.base_of(setting)).samples_factor
    return scaled_mixture_path(out, factor) if factor in factors else study.mixture


def plan_runs(study: StudyConfig, out_dir: str | os.PathLike[str]) -> list[RunSpec]:
    """Every run of the study, in execution order (setting, then domain, then seed).

    Args:
        study: the study.
        out_dir: the study's output folder (runs go to ``out_dir/runs``).

    Returns:
        The runs; configs carry ``output_dir``, ``train.seed`` and the data mixture.
    """
    out = Path(out_dir).resolve()
    factors = _factors(study)
    runs = []
    for setting in study.all_settings:
        template = study.training_config(setting)
        per_domain = registry.get(study.base_of(setting)).per_domain
        domains: list[str | None] = list(study.domains) if per_domain else [None]
        for domain in domains:
            mixture = _run_mixture(study, out, setting, domain, factors)
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
