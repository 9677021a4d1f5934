"""Greedy answers to ready-made prompts: the batching front end of the one decoding loop
(:func:`llava_mole.eval.decoding.generate_batch`), used by `evaluate` and `predict`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .batching import ImageInput
from .decoding import DecodeParams, generate_batch
from .settings import EVAL_DEFAULTS

__all__ = ["generate_answers"]


def generate_answers(
    model: nn.Module,
    processor: Any,
    prompts: Sequence[torch.Tensor | Sequence[int]],
    images: Sequence[ImageInput | None] | None = None,
    *,
    max_new_tokens: int = EVAL_DEFAULTS.max_new_tokens,
    batch_size: int = EVAL_DEFAULTS.batch_size,
    image_mode: str = "pad",
) -> list[str]:
    """Greedy answers (KV cache, left-padded batches) to ready-made generation prompts.

    Args:
        model: A LLaVA-style model or causal LM (put it in eval mode first).
        processor: Its processor (or tokenizer for a text-only model).
        prompts: Prompt token ids, each ending with the assistant prefix and with the image
            tokens already expanded (see `build_prompt_for_generation`).
        images: One entry per prompt: a PIL image, pixel values ``(3, H, W)`` (LLaVA-1.5), or
            None for a text-only prompt. None: all prompts are text-only.
        max_new_tokens: Maximum number of generated tokens per answer.
        batch_size: Prompts decoded together.
        image_mode: ``pad`` or ``resize``, for PIL images (see `llava_mole.data.images`).

    Returns:
        The decoded new tokens of each prompt (special tokens skipped, stripped), in order.

    Raises:
        ValueError: Bad arguments (lengths differ, non-positive sizes).
    """
    if images is None:
        images = [None] * len(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    params = DecodeParams(max_new_tokens=max_new_tokens)
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        out = generate_batch(
            model,
            processor,
            prompts[start : start + batch_size],
            images[start : start + batch_size],
            params,
            image_mode=image_mode,
        )
        answers.extend(g.text for g in out)
    return answers
