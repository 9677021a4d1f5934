"""``llava-mole compare --plan``: short probes that size a study before it runs.

The pilot trains each probed setting (single-domain LoRA, mixed LoRA, mixed MoLE by default)
at a few learning rates around the study's (``lr / 3``, ``lr``, ``3 lr``) for a short budget,
two seeds each, scoring a held-out dev split every few steps (``train.dev_per_domain``, see
:mod:`llava_mole.train.convergence`) and the test split at the end. From the dev curves, the
speed and the per-item test scores, :func:`llava_mole.study.sizing.plan_study` proposes the
learning rate per setting, the budget, the seeds needed to resolve a difference ``delta``,
and the wall time of the study. The probes are ordinary study runs under ``OUT/pilot`` (so an
interrupted pilot continues); nothing of the study itself is run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..adapters.io import atomic_write_bytes
from .config import ExtraSetting, StudyConfig
from .plan import plan_runs, write_mixtures
from .results import RunOutput
from .runner import check_stale, collect_runs, run_all
from .sizing import Probe, StudyPlan, plan_study

__all__ = ["PilotSettings", "run_pilot"]


@dataclass(frozen=True)
class PilotSettings:
    """What the pilot probes.

    Attributes:
        delta: the smallest difference the study must resolve.
        steps: optimizer steps of a probe (None: a quarter of the study's ``max_steps``, at
            least 100).
        learning_rates: probed learning rates (empty: ``lr / 3, lr, 3 lr`` of the study's).
        settings: the built-in settings probed.
        seeds: seeds per probe (>= 2: seed variance is what the pilot measures).
        dev_per_domain: dev items per domain.
        evals: dev scores per probe.
    """

    delta: float = 0.03
    steps: int | None = None
    learning_rates: tuple[float, ...] = ()
    settings: tuple[str, ...] = ("single", "mix_lora", "mix_mole")
    seeds: tuple[int, ...] = (0, 1)
    dev_per_domain: int = 50
    evals: int = 5

    def __post_init__(self) -> None:
        if len(self.seeds) < 2:
            raise ValueError("--plan needs at least 2 seeds: seed variance is what it measures")
        if self.delta <= 0 or self.evals < 2:
            raise ValueError(f"--plan: delta must be > 0 and evals >= 2, got {self}")


def _probe_name(setting: str, lr: float) -> str:
    return f"pilot_{setting}_lr{lr:g}".replace(".", "p").replace("-", "m")


def pilot_study(study: StudyConfig, pilot: PilotSettings) -> tuple[StudyConfig, dict]:
    """The study of the probes (only extra settings) and ``{probe name: (setting, lr)}``."""
    lr = float(study.train.get("learning_rate", 2e-4))
    rates = pilot.learning_rates or (lr / 3, lr, 3 * lr)
    budget = int(study.train.get("max_steps", 400))
    steps = pilot.steps or max(100, budget // 4)
    every = max(1, steps // pilot.evals)
    extras, names = [], {}
    for setting in pilot.settings:
        for rate in rates:
            train = {"learning_rate": rate, "max_steps": steps, "dev_every": every}
            train |= {"dev_per_domain": pilot.dev_per_domain, "dev_patience": pilot.evals + 1}
            name = _probe_name(setting, rate)
            extras.append(ExtraSetting(name=name, base=setting, train=train))
            names[name] = (setting, rate)
    probes = dataclasses.replace(study, seeds=list(pilot.seeds), settings=[], extra_settings=extras)
    return probes, names


def _probes(runs: Sequence[RunOutput], names: dict) -> list[Probe]:
    """One :class:`Probe` per (setting, lr): dev curve of seed 0's runs, speed, item scores."""
    out = []
    for name, (setting, rate) in names.items():
        group = [r for r in runs if r.setting == name]
        rows: dict[int, list[float]] = {}
        curve: dict[int, list[float]] = {}
        seconds, steps = 0.0, 0
        for run in sorted(group, key=lambda r: (r.seed, r.domain or "")):
            for domain in sorted(run.items or {}):
                rows.setdefault(run.seed, []).extend(run.items[domain].scores)
            for step, value in run.summary.get("convergence", {}).get("dev_curve", []):
                curve.setdefault(int(step), []).append(float(value))
            seconds += float(run.summary.get("wall_time_s") or 0.0)
            steps += int(run.summary.get("steps") or 0)
        mean_curve = [(s, sum(v) / len(v)) for s, v in sorted(curve.items())]
        speed = seconds / steps if steps else 0.0
        out.append(Probe(setting, rate, mean_curve, speed, list(rows.values())))
    return out


def run_pilot(
    study: StudyConfig, out_dir: Path, pilot: PilotSettings, progress: bool = True
) -> StudyPlan:
    """Runs (or continues) the probes under ``out_dir/pilot`` and writes ``plan.json``.

    Returns:
        The proposed plan; its ``lines`` are what ``compare --plan`` prints.
    """
    probes_study, names = pilot_study(study, pilot)
    root = Path(out_dir).resolve() / "pilot"
    root.mkdir(parents=True, exist_ok=True)
    write_mixtures(probes_study, root)
    specs = plan_runs(probes_study, root)
    for spec in specs:
        check_stale(spec)
    if progress:
        print(f"[plan] {len(specs)} probe runs -> {root}", flush=True)
    run_all(probes_study, specs, progress)
    probes = _probes(collect_runs(specs), names)
    runs_per_seed = len(plan_runs(study, root / "study-shape")) // max(1, len(study.seeds))
    plan = plan_study(probes, pilot.delta, runs_per_seed, study.workers)
    record = {
        "delta": pilot.delta,
        "lr": plan.lr,
        "budget_steps": plan.budget_steps,
        "seeds": plan.seeds,
        "estimated_seconds": round(plan.seconds, 1),
        "noise": {k: dataclasses.asdict(v) for k, v in plan.noise.items()},
        "probes": [
            {
                "setting": p.setting,
                "lr": p.lr,
                "dev_curve": list(p.curve),
                "s_per_step": p.seconds_per_step,
            }
            for p in probes
        ],
    }
    atomic_write_bytes(root / "plan.json", (json.dumps(record, indent=2) + "\n").encode())
    return plan
