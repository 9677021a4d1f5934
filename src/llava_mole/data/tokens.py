"""What a processor says about its tokens: the tokenizer inside it, the image token's id, and
how many image tokens one image occupies in ``input_ids`` (LLaVA-style processors)."""

from __future__ import annotations

from typing import Any

from .formats import IMAGE_PLACEHOLDER
from .images import processor_input_size

__all__ = ["get_tokenizer", "image_token_id", "num_image_tokens"]


def get_tokenizer(processor: Any) -> Any:
    """Returns the tokenizer of a processor (or the object itself if it is a tokenizer)."""
    return getattr(processor, "tokenizer", None) or processor


def image_token_id(processor: Any) -> int:
    """The id of the model's image token.

    Args:
        processor: A multimodal processor (``image_token_id``/``image_token``) or a tokenizer.

    Raises:
        ValueError: If the tokenizer does not know the image token.
    """
    token_id = getattr(processor, "image_token_id", None)
    if isinstance(token_id, int):
        return token_id
    tokenizer = get_tokenizer(processor)
    token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no image token {token!r}")
    return int(token_id)


def num_image_tokens(processor: Any) -> int:
    """Number of image tokens one image occupies in ``input_ids``.

    Uses ``processor.num_image_tokens`` if present; otherwise, like transformers'
    ``LlavaProcessor``: ``(H // patch_size) * (W // patch_size) + num_additional_image_tokens``,
    minus one (the CLS token) when ``vision_feature_select_strategy == "default"``, where
    ``H x W`` is the image processor's output size.

    Args:
        processor: A LLaVA-style processor.

    Raises:
        ValueError: If the processor lacks the information.
    """
    n = getattr(processor, "num_image_tokens", None)
    if isinstance(n, int) and n > 0:
        return n
    patch = getattr(processor, "patch_size", None)
    image_processor = getattr(processor, "image_processor", None)
    if not patch or image_processor is None:
        raise ValueError(
            "cannot compute the number of image tokens: the processor needs num_image_tokens, or "
            "an image_processor and patch_size"
        )
    height, width = processor_input_size(image_processor)
    n = (height // patch) * (width // patch)
    n += int(getattr(processor, "num_additional_image_tokens", 0) or 0)
    if getattr(processor, "vision_feature_select_strategy", None) == "default":
        n -= 1
    if n < 1:
        raise ValueError(f"computed a non-positive number of image tokens ({n})")
    return n
