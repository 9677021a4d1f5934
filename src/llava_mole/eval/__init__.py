"""Evaluation: answer-level metrics and generation-based evaluation of models and adapters."""

from .generate import evaluate, generate_answers, predict
from .metrics import METRICS, score_predictions

__all__ = ["METRICS", "evaluate", "generate_answers", "predict", "score_predictions"]
