"""The data-conflict study: does mixing domains hurt plain LoRA, and does MoLE fix it?

``run_study(study_yaml, out_dir)`` trains and evaluates single-domain LoRA, mixed LoRA, mixed
MoLE and two controls (2x steps, rank K·r) over several seeds and writes ``results.json``,
``report.md`` and PNG figures. Names are imported lazily: the report and plot helpers work
without loading the training stack. Stages, one module each: config (+ sections, _keys), settings (the registry),
plan, runner, items, stats, assemble, rules, verdict, render, plots, routing.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SETTINGS": "settings",
    "StudyConfig": "config",
    "StudyConfigError": "errors",
    "load_study": "config",
    "plan_runs": "plan",
    "run_study": "compare",
    "StudyResults": "results",
    "build_results": "assemble",
    "convergence_flag": "stats",
    "render_report": "render",
    "verdict": "verdict",
    "REGISTRY": "settings",
    "Setting": "settings",
    "plot_all": "plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import ``name`` from its submodule on first use.

    Args:
        name: an exported name.

    Returns:
        The object.
    """
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    return getattr(module, name)
