"""One answer to one question (about one image, or text only): ``llava-mole predict``.

Defaults: :data:`llava_mole.eval.settings.PREDICT_DEFAULTS`.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image
from torch import nn

from ..data.formats import IMAGE_PLACEHOLDER, USER
from ..data.images import ImageLoadError, load_image
from ..data.templates import EncodeError, build_prompt_for_generation
from . import generation  # called through the module: one place to stub decoding
from .inference import check_context, inference_mode, inference_prompt_format, load_for_inference
from .settings import PREDICT_DEFAULTS, PredictSettings

__all__ = ["predict"]

PathLike = str | os.PathLike[str]


def _open_image(image: PathLike | Image.Image) -> Image.Image:
    """An RGB image from a PIL image or a file; a bad file is a ValueError naming it."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    try:
        return load_image(path)
    except ImageLoadError as err:
        raise ValueError(f"cannot use image {path}: {err}") from None


def _question(question: str, img: Image.Image | None) -> str:
    """The question with exactly one ``<image>`` placeholder for an image (put first unless
    there), none without one."""
    if not question.strip():
        raise ValueError("question is empty")
    if img is None and IMAGE_PLACEHOLDER in question:
        raise ValueError(f"the question contains {IMAGE_PLACEHOLDER} but no image was given")
    if img is not None and IMAGE_PLACEHOLDER not in question:
        question = f"{IMAGE_PLACEHOLDER}\n{question}"
    if question.count(IMAGE_PLACEHOLDER) > 1:
        raise ValueError(
            f"the question has {question.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} "
            "placeholders but one image was given"
        )
    return question


def predict(
    model_dir: PathLike | None = None,
    image: PathLike | Image.Image | None = None,
    question: str = "",
    adapter_dir: PathLike | None = None,
    template: str | None = None,
    max_new_tokens: int | None = None,
    *,
    system: str | None = None,
    settings: PredictSettings = PREDICT_DEFAULTS,
    model: nn.Module | None = None,
    processor: Any = None,
    **overrides: Any,
) -> str:
    """Answers one question, about one image or text-only, with greedy decoding.

    Args:
        model_dir: Model directory (unless `model` is given).
        image: Image file or PIL image; the ``<image>`` placeholder is put before the question
            unless the question already contains it. None: text-only.
        question: The question.
        adapter_dir: Adapter directory, or None.
        template: ``vicuna_v1`` or ``chat_template``; None: the one the adapter was trained
            with (recorded in its ``adapter_config.json``), else ``vicuna_v1``.
        max_new_tokens: Maximum answer length in tokens (None: ``settings.max_new_tokens``).
        system: ``vicuna_v1`` system prompt, as in the training mixture's ``system``; None: the
            one the adapter was trained with, else LLaVA-1.5's; ``""``: none.
        settings: Answer length, image mode, loading (see `PredictSettings`).
        model: An already loaded model (with `processor`).
        processor: Its processor.
        **overrides: Fields of `settings` to change for this call (``image_mode="resize"``).

    Returns:
        The answer text.

    Raises:
        ValueError: Empty question, unknown template or image mode, a placeholder without an
            image, or an image file that is missing or unreadable (the message names it).
    """
    if max_new_tokens is not None:
        overrides["max_new_tokens"] = max_new_tokens
    settings = replace(settings, **overrides)
    if not question.strip():
        raise ValueError("question is empty")
    template, system = inference_prompt_format(adapter_dir, template, system)
    img = _open_image(image) if image is not None else None  # before loading: fail fast
    question = _question(question, img)
    loaded = load_for_inference(
        model_dir,
        adapter_dir,
        dtype=settings.dtype,
        device=settings.device,
        trust_remote_code=settings.trust_remote_code,
        model=model,
        processor=processor,
    )
    size = img.size if img is not None else None
    try:
        prompt = build_prompt_for_generation(
            [(USER, question)], loaded.processor, template, system, image_size=size
        )
    except EncodeError as err:
        raise ValueError(f"cannot build the prompt: {err}") from None
    check_context(loaded.model, len(prompt), settings.max_new_tokens)
    with inference_mode(loaded.model, loaded.owned):
        (answer,) = generation.generate_answers(
            loaded.model,
            loaded.processor,
            [prompt],
            [img],
            max_new_tokens=settings.max_new_tokens,
            image_mode=settings.image_mode,
        )
    return answer
