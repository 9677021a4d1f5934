"""Load a base model and its processor from a local directory, with one clear error if it fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..paths import path_problem

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
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    config = check_model_dir(path)
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    multimodal = "vision_config" in config or "llava" in str(config.get("model_type", ""))
    try:
        if multimodal:
            model = AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)
            processor = AutoProcessor.from_pretrained(
                str(path), trust_remote_code=trust_remote_code
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
            processor = AutoTokenizer.from_pretrained(
                str(path), trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{path}: could not load the model or processor ({first})") from None
    return model, processor


def context_length(model: torch.nn.Module) -> int | None:
    """The model's context in tokens (the text model's ``max_position_embeddings``)."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None
