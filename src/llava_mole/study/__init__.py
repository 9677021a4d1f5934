"""The data-conflict study: does mixing domains hurt plain LoRA, and does MoLE fix it?

``run_study(study_yaml, out_dir)`` trains and evaluates single-domain LoRA, mixed LoRA, mixed
MoLE and two controls (2x steps, rank K·r) over several seeds and writes ``results.json``,
``report.md`` and PNG figures. Names are imported lazily: the report and plot helpers work
without loading the training stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SETTINGS": "compare",
    "StudyConfig": "compare",
    "StudyConfigError": "compare",
    "load_study": "compare",
    "plan_runs": "compare",
    "run_study": "compare",
    "build_results": "report",
    "convergence_flag": "report",
    "render_report": "report",
    "verdict": "report",
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
