"""Evaluation and prediction defaults, in one place.

:data:`EVAL_DEFAULTS` and :data:`PREDICT_DEFAULTS` are the defaults of
:func:`llava_mole.eval.evaluation.evaluate`, :func:`llava_mole.eval.prediction.predict` and the
``llava-mole eval`` / ``predict`` options. What a mixture defines stays the mixture's: its
metrics per domain, ``image_mode``, template and system prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EVAL_DEFAULTS", "PREDICT_DEFAULTS", "EvalSettings", "PredictSettings"]


def _check_loading(dtype: str) -> None:
    from ..models.loading import DTYPES  # here: the CLI reads the defaults without torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


@dataclass(frozen=True)
class EvalSettings:
    """How `evaluate` answers and measures one split of a mixture.

    Attributes:
        split: ``test`` or ``train``.
        batch_size: Samples per generation batch (and per routing forward).
        max_new_tokens: Maximum answer length in tokens.
        limit: At most this many samples per domain (the first ones); None: all.
        routing: Measure the routing picture (MoLE adapters only).
        progress: Show a progress bar.
        dtype: Weight dtype when loading (``float32``, ``bfloat16``, ``float16``).
        device: Device when loading (None: cuda if available, else cpu).
        merge: Merge plain-LoRA layers for speed; None: only for a model loaded here.
        trust_remote_code: Passed to the loader.
    """

    split: str = "test"
    batch_size: int = 16
    max_new_tokens: int = 16
    limit: int | None = None
    routing: bool = True
    progress: bool = True
    dtype: str = "float32"
    device: str | None = None
    merge: bool | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")
        _check_loading(self.dtype)


@dataclass(frozen=True)
class PredictSettings:
    """How `predict` answers one question.

    Attributes:
        max_new_tokens: Maximum answer length in tokens.
        image_mode: ``pad`` or ``resize`` (LLaVA-1.5; other families' processors resize).
        dtype: Weight dtype when loading.
        device: Device when loading (None: cuda if available, else cpu).
        trust_remote_code: Passed to the loader.
    """

    max_new_tokens: int = 32
    image_mode: str = "pad"
    dtype: str = "float32"
    device: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        from ..data.images import IMAGE_MODES

        if self.image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {self.image_mode!r}")
        _check_loading(self.dtype)


EVAL_DEFAULTS = EvalSettings()
PREDICT_DEFAULTS = PredictSettings()
