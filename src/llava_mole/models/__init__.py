"""Built-in offline models (the tiny LLaVA and its stage-1 pretraining) and model loading.

Submodules are imported on use (``llava_mole.models.tiny``), so that importing the default
paths does not load transformers.
"""

from .defaults import DEFAULT_DATA_DIR, DEFAULT_TINY_MODEL_DIR, DEFAULT_WORK_DIR

__all__ = ["DEFAULT_DATA_DIR", "DEFAULT_TINY_MODEL_DIR", "DEFAULT_WORK_DIR"]
