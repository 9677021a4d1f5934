"""Per-item scores of a run, for the bootstrap: ``<run>/item_scores.json``.

Evaluation writes each answer to ``eval.predictions.jsonl`` (id, domain, prediction,
reference) and only per-domain means to ``eval.json``. The study scores every prediction again
with the mixture's metric of its domain (:func:`llava_mole.eval.metrics.metric_for`, the
function evaluation applies) and stores the per-item scores; their mean must equal the domain
score in ``eval.json``, else the files are inconsistent and the study stops.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..adapters.io import atomic_write_bytes
from ..data.mixture import load_mixture
from ..eval.metrics import metric_for
from .errors import StudyConfigError
from .plan import EVAL, ITEMS
from .results import DomainItems

__all__ = ["PREDICTIONS", "read_item_scores", "write_item_scores"]

PREDICTIONS = Path(EVAL).stem + ".predictions.jsonl"
"""Where evaluation writes the predictions of ``eval.json`` (its default, next to it)."""


def write_item_scores(run_dir: Path, mixture: Path) -> Path | None:
    """Score each prediction of the run and write ``item_scores.json``.

    Args:
        run_dir: the run's folder (with ``eval.json`` and its predictions).
        mixture: the mixture evaluated on (it names each domain's metric).

    Returns:
        The file (written unless unchanged), or None when the run has no predictions file.

    Raises:
        StudyConfigError: the per-item mean of a domain differs from ``eval.json``'s score.
    """
    predictions = run_dir / PREDICTIONS
    if not predictions.is_file():
        return None
    metrics = load_mixture(mixture).metrics
    per_domain: dict[str, dict[str, list]] = {}
    for line in predictions.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        domain = record["domain"]
        score = metric_for(metrics[domain], dataset=domain)(
            record["prediction"], record["reference"]
        )
        entry = per_domain.setdefault(domain, {"ids": [], "scores": []})
        entry["ids"].append(str(record["id"]))
        entry["scores"].append(float(score))
    expected = json.loads((run_dir / EVAL).read_text(encoding="utf-8")).get("per_domain", {})
    for domain, entry in per_domain.items():
        mean = math.fsum(entry["scores"]) / len(entry["scores"])
        want = expected.get(domain, {}).get("score")
        if want is None or abs(mean - want) > 1e-9:
            raise StudyConfigError(
                f"{run_dir}: per-item scores of {domain} average {mean:.6f}, {EVAL} says "
                f"{want}: the predictions file does not belong to this evaluation"
            )
    target = run_dir / ITEMS
    text = json.dumps({"domains": per_domain}) + "\n"
    # Unchanged content is not rewritten: a re-evaluation that gives the same answers leaves
    # the file (and its modification time) as it was.
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        atomic_write_bytes(target, text.encode("utf-8"))
    return target


def read_item_scores(run_dir: Path) -> dict[str, DomainItems] | None:
    """The run's per-item scores by domain, or None when not recorded."""
    path = run_dir / ITEMS
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))["domains"]
    return {d: DomainItems(list(v["ids"]), list(v["scores"])) for d, v in data.items()}
