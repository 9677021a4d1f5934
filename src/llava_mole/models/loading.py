"""Load a base model and its processor from a local directory, with one clear error if it fails."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..paths import path_problem

logger = logging.getLogger("llava_mole")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The model directory is missing or not loadable; the message says which and why."""


def check_model_dir(path: str | Path) -> dict[str, Any]:
    """Return the directory's ``config.json`` or raise :class:`ModelLoadError`."""
    path = Path(path)
    problem = path_problem(path, "folder")
    if problem == "not found":
        raise ModelLoadError(
            f"model directory not found: {path} (for the built-in tiny model run `llava-mole make-tiny`)"
        )
    if problem:
        raise ModelLoadError(f"model directory {path}: {problem}")
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{config}: invalid JSON ({err})") from None


def load_model_and_processor(
    path: str | Path,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Load a LLaVA (image-text-to-text) or causal LM and its processor/tokenizer, offline.

    Args:
        path: local model directory.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        trust_remote_code: run code shipped with the model (off unless the user asks).
        attn_implementation: optional attention backend.

    Returns:
        ``(model, processor)``; for a text-only LM the "processor" is its tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    config = check_model_dir(path)
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    multimodal = "vision_config" in config or "llava" in str(config.get("model_type", ""))
    try:
        if multimodal:
            model = AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)
            processor = load_processor(path, config.get("model_type"), trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
            processor = AutoTokenizer.from_pretrained(
                str(path), trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError, KeyError, ImportError) as err:
        if isinstance(err, ModelLoadError):
            raise
        raise ModelLoadError(
            f"{path}: could not load the model or processor ({_first_line(err)})"
        ) from None
    return model, processor


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def load_processor(path: str | Path, model_type: str | None, trust_remote_code: bool = False):
    """The checkpoint's processor; its image-only form where the video part needs torchvision.

    Video processors (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, SmolVLM) import
    torchvision, which image-only fine-tuning does not need: without it (or without a video
    processor config) the processor is built without its video processor (a note says so). Any other missing package is named in one
    line with what to install (e.g. SmolVLM's ``num2words``).

    Raises:
        ModelLoadError: the processor cannot be built.
    """
    from transformers import AutoProcessor

    from .processors import load_image_only_processor, video_part_failed

    try:
        return AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (ImportError, OSError, ValueError) as err:
        if not video_part_failed(err):
            raise ModelLoadError(
                f"{path}: could not load the processor ({_first_line(err)})"
            ) from None
        first = _first_line(err).split(". ")[0].rstrip(".")
    try:
        processor = load_image_only_processor(path, model_type, trust_remote_code)
    except (ImportError, OSError, ValueError, KeyError) as err:
        raise ModelLoadError(
            f"{path}: could not load the processor, even without its video processor "
            f"({_first_line(err)})"
        ) from None
    if processor is None:
        hint = ""
        if "torchvision" in first.lower():
            hint = "; install the torchvision build matching your torch (`pip install torchvision`)"
        raise ModelLoadError(f"{path}: could not load the processor ({first}){hint}")
    logger.warning(
        "note: %s: %s is built without its video processor (images and text only): %s",
        path,
        type(processor).__name__,
        first,
    )
    return processor


def context_length(model: torch.nn.Module) -> int | None:
    """The model's context in tokens (the text model's ``max_position_embeddings``)."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None
