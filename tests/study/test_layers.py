"""The study package's import graph: no cycles, and the report side loads without training."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import llava_mole.study

PACKAGE = Path(llava_mole.study.__file__).parent
# Pure modules: statistics, verdict and rendering must work without the training stack
# (the package root itself imports torch for the adapters; transformers and train/ not).
PURE = (
    "settings",
    "sections",
    "stats",
    "spread",
    "stability",
    "results",
    "rules",
    "verdict",
    "render",
    "routing",
    "errors",
)


def _imports(path: Path) -> set[str]:
    """Study modules imported at module level (``if TYPE_CHECKING`` blocks excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def test_study_modules_import_each_other_without_cycles():
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert {"config", "settings", "plan", "runner", "stats", "verdict", "render"} <= set(graph)
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join([*trail, dep])}"
            if dep not in state:
                visit(dep, [*trail, dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_report_side_imports_without_the_training_stack():
    modules = "; ".join(f"import llava_mole.study.{m}" for m in PURE)
    heavy = "('transformers', 'llava_mole.train', 'llava_mole.eval', 'llava_mole.data')"
    code = f"import sys; {modules}; print(any(m in sys.modules for m in {heavy}))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False", out.stderr
