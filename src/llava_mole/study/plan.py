"""Planning: the study's runs (setting x domain x seed) and the single-domain mixtures.

Each run trains into ``OUT/runs/<setting>[/<domain>]/seed<k>``; a per-domain setting
(:attr:`~llava_mole.study.settings.Setting.per_domain`) trains on a mixture derived from the
study's with only that domain's datasets (``OUT/mixtures/single-<domain>.yaml``).
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
    "single_mixture_path",
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
        template = study.training_config(setting)
        per_domain = registry.get(study.base_of(setting)).per_domain
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
