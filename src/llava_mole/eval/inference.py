"""Getting a model ready to answer: one loader, inference mode, the prompt format to use.

:func:`load_for_inference` is the one way `evaluate`, `predict` and the server get a model:
a model directory (and adapter) loaded here, or a caller's model used as is.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters.inject import merge_lora, unmerge_lora
from ..adapters.io import load_adapter, read_adapter_config
from ..data.templates import TEMPLATES
from ..models.loading import context_length, load_model_and_processor

__all__ = [
    "Loaded",
    "check_context",
    "inference_mode",
    "inference_prompt_format",
    "load_for_inference",
    "loaded_for_inference",
]

PathLike = str | os.PathLike[str]


@dataclass
class Loaded:
    """A model ready to answer.

    Attributes:
        model: The model (adapter loaded).
        processor: Its processor (or tokenizer).
        owned: Whether it was loaded here (then merging plain LoRA is safe).
    """

    model: nn.Module
    processor: Any
    owned: bool


def load_for_inference(
    model_dir: PathLike | None,
    adapter_dir: PathLike | None = None,
    *,
    dtype: str = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
    model: nn.Module | None = None,
    processor: Any = None,
) -> Loaded:
    """Loads `model_dir` (or takes the caller's `model` + `processor`) and the adapter.

    Args:
        model_dir: Model directory (unless `model` is given).
        adapter_dir: Adapter directory loaded into the model, or None.
        dtype: Weight dtype when loading.
        device: Device when loading (None: cuda if available, else cpu).
        trust_remote_code: Passed to the loader.
        model: An already loaded model, used as is.
        processor: Its processor (required with `model`).

    Raises:
        ValueError: Neither a directory nor a model, or a model without its processor.
        ModelLoadError: The directory cannot be loaded.
    """
    owned = model is None
    if model is None:
        if model_dir is None:
            raise ValueError("give model_dir, or model and processor")
        model, loaded = load_model_and_processor(model_dir, dtype, trust_remote_code)
        processor = loaded if processor is None else processor
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    elif processor is None:
        raise ValueError("a model was given without its processor")
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    return Loaded(model, processor, owned)


@contextmanager
def inference_mode(model: nn.Module, merge: bool) -> Iterator[None]:
    """Eval mode (and merged plain LoRA) for the block; the previous state is restored after.

    Merging folds only plain-LoRA layers into their weights; MoLE blocks stay unmerged (their
    expert depends on the token), so outputs and routing are unchanged, only faster.
    """
    was_training = model.training
    model.eval()
    merged = merge_lora(model) if merge else 0
    try:
        yield
    finally:
        if merged:
            unmerge_lora(model)
        model.train(was_training)


@contextmanager
def loaded_for_inference(
    model_dir: PathLike,
    adapter_dir: PathLike | None = None,
    *,
    dtype: str = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
) -> Iterator[tuple[nn.Module, Any]]:
    """Loads a model (and adapter) for answering, as `predict` does, for the block.

    The model is in eval mode with plain-LoRA layers merged (MoLE blocks stay unmerged), so a
    long-lived caller (the server) decodes exactly as `predict`.

    Yields:
        ``(model, processor)``.
    """
    loaded = load_for_inference(
        model_dir, adapter_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code
    )
    with inference_mode(loaded.model, True):
        yield loaded.model, loaded.processor


def _trained_prompt_format(adapter_dir: PathLike | None) -> dict[str, Any]:
    """The prompt format an adapter was trained with (empty if unknown or no adapter)."""
    if adapter_dir is None:
        return {}
    _, payload = read_adapter_config(adapter_dir)
    prompt = (payload.get("extra") or {}).get("prompt")
    return prompt if isinstance(prompt, dict) else {}


def inference_prompt_format(
    adapter_dir: PathLike | None, template: str | None = None, system: str | None = None
) -> tuple[str, str | None]:
    """The ``(template, system)`` to answer with: the caller's choice, else the adapter's.

    Args:
        adapter_dir: Adapter directory, or None.
        template: ``vicuna_v1`` or ``chat_template``; None: the one the adapter was trained
            with, else ``vicuna_v1``.
        system: ``vicuna_v1`` system prompt; None: the adapter's (same template only), else
            LLaVA-1.5's; ``""``: none.

    Raises:
        ValueError: Unknown template, or a domain-routed adapter (it needs domain labels).
    """
    trained = _trained_prompt_format(adapter_dir)
    if adapter_dir is not None and read_adapter_config(adapter_dir)[0].router == "domain":
        raise ValueError(
            f"{adapter_dir}: this adapter routes by domain label (adapter.router='domain', a "
            "study diagnostic), so it needs each sample's domain: use `llava-mole eval`"
        )
    template = template or trained.get("template") or "vicuna_v1"
    if system is None and template == trained.get("template"):
        system = trained.get("system")
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    return template, system


def check_context(model: nn.Module, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse, before generating, a prompt that does not fit the model's context.

    Truncating would silently drop part of the question (or the image tokens), and generating
    past the position embeddings gives garbage, so the rule is: refuse with the numbers.
    """
    limit = context_length(model)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"the prompt has {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} it "
            f"does not fit the model's context of {limit} tokens (shorten the question)"
        )
