"""The data-conflict study: single-domain LoRA vs mixed LoRA vs mixed MoLE, with controls.

:func:`run_study` is the pipeline: load the study YAML (:mod:`.config`), plan its runs
(:mod:`.plan`; settings from the registry :mod:`.settings`), train and evaluate them
(:mod:`.runner`), assemble the results with bootstrap intervals (:mod:`.assemble`, :mod:`.stats`),
judge them (:mod:`.rules`, :mod:`.verdict`) and write ``results.json``, ``report.md``
(:mod:`.render`) and three PNGs (:mod:`.plots`) into ``OUT``. Runs go to
``OUT/runs/<setting>[/<domain>]/seed<k>``; re-running continues an interrupted study.

This module only wires the stages together and re-exports their public names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from ..adapters.io import atomic_write_bytes
from .assemble import build_results
from .config import (
    BootstrapSection,
    ConvergenceSection,
    EvalSection,
    ExtraSetting,
    StudyConfig,
    load_study,
)
from .errors import StudyConfigError, StudyWorkersError
from .plan import RunSpec, plan_runs, single_mixture_path, write_mixtures, write_single_mixtures
from .render import render_report
from .results import StudyResults
from .runner import check_stale, collect_runs, run_all
from .settings import SETTINGS, by_role

__all__ = [
    "SETTINGS",
    "BootstrapSection",
    "ConvergenceSection",
    "EvalSection",
    "ExtraSetting",
    "RunSpec",
    "StudyConfig",
    "StudyConfigError",
    "StudyWorkersError",
    "collect_runs",
    "load_study",
    "plan_runs",
    "run_study",
    "single_mixture_path",
    "write_mixtures",
    "write_single_mixtures",
]


def _announce(study: StudyConfig, n_runs: int, out: Path) -> None:
    single = by_role("single").name
    per_domain = (
        f" ({single}: x {len(study.domains)} domains)" if single in study.all_settings else ""
    )
    print(
        f"[study] {n_runs} runs: {len(study.all_settings)} settings x "
        f"{len(study.seeds)} seeds{per_domain} -> {out}",
        flush=True,
    )


def _print_summary(results: StudyResults, out: Path) -> None:
    print(results.table, flush=True)
    print("[study] verdict (rules and details in the report):", flush=True)
    for line in results.verdict.lines:
        print(f"  - {line}", flush=True)
    print(f"[study] report: {out / 'report.md'}", flush=True)


def run_study(
    study_yaml: str | os.PathLike[str] | StudyConfig,
    out_dir: str | os.PathLike[str],
    progress: bool = True,
) -> StudyResults:
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
        The results; ``to_json()`` is what ``results.json`` holds and ``table`` is the main
        table in markdown, also printed at the end.
    """
    from .plots import plot_all

    study = study_yaml if isinstance(study_yaml, StudyConfig) else load_study(study_yaml)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_mixtures(study, out)
    specs = plan_runs(study, out)
    for spec in specs:
        check_stale(spec)
    atomic_write_bytes(
        out / "study.yaml", yaml.safe_dump(study.to_dict(), sort_keys=False).encode("utf-8")
    )
    if progress:
        _announce(study, len(specs), out)
    run_all(study, specs, progress)

    results = build_results(study, collect_runs(specs))
    results.plots = {k: v.name for k, v in plot_all(results.to_json(), out).items()}
    text = json.dumps(results.to_json(), indent=2) + "\n"
    atomic_write_bytes(out / "results.json", text.encode("utf-8"))
    atomic_write_bytes(out / "report.md", render_report(results).encode("utf-8"))
    if progress:
        _print_summary(results, out)
    return results
