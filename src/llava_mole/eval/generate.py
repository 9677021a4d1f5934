"""Compatibility names: evaluation and prediction now live in small modules of `eval/`.

- :mod:`llava_mole.eval.generation`: `generate_answers` (greedy front end of the one decoding
  loop, :func:`llava_mole.eval.decoding.generate_batch`);
- :mod:`llava_mole.eval.inference`: `load_for_inference`, `loaded_for_inference`,
  `inference_prompt_format`;
- :mod:`llava_mole.eval.evaluation`: `evaluate`; :mod:`llava_mole.eval.prediction`: `predict`;
- :mod:`llava_mole.eval.routing`: the routing picture; :mod:`llava_mole.eval.settings`: the
  defaults (`EVAL_DEFAULTS`, `PREDICT_DEFAULTS`).
"""

from __future__ import annotations

from .evaluation import evaluate
from .generation import generate_answers
from .inference import inference_prompt_format, load_for_inference, loaded_for_inference
from .prediction import predict

__all__ = [
    "evaluate",
    "generate_answers",
    "inference_prompt_format",
    "load_for_inference",
    "loaded_for_inference",
    "predict",
]
