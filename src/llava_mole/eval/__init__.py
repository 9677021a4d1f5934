"""Evaluation: answer-level metrics and generation-based evaluation of models and adapters.

``evaluate``, ``generate_answers`` and ``predict`` are imported on first use, so that the data
layer can use the metric registry (:mod:`llava_mole.eval.metrics`) without a circular import.
"""

from typing import Any

from .metrics import METRICS, score_predictions

__all__ = ["METRICS", "evaluate", "generate_answers", "predict", "score_predictions"]

_LAZY = ("evaluate", "generate_answers", "predict")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import generate

        return getattr(generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
