"""Batch inputs shared by the decoding loop and evaluation's routing forward: the model's
device and dtype, pad and stop ids, left padding, the image inputs (stacked pixel values for
LLaVA-1.5, every processor-built input for the other families)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from llava_mole.data.image_inputs import collate_image_inputs, image_inputs_for
from llava_mole.data.images import pixel_values

__all__ = [
    "ImageInput",
    "image_batch",
    "left_pad",
    "model_device",
    "model_dtype",
    "pad_token_id",
    "stack_pixels",
    "stop_ids",
]

ImageInput = Image.Image | torch.Tensor
"""An RGB image, or its pixel values ``(3, H, W)`` already produced by the image processor."""


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (where its inputs go)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """Floating dtype of the model (pixel values are cast to it)."""
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def pad_token_id(tokenizer: Any) -> int:
    """The pad id: the tokenizer's pad token, else its eos, else 0."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pad)


def stop_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """Token ids that end an answer: the generation config's eos id(s) and the tokenizer's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def stack_pixels(
    images: Sequence[ImageInput | None],
    processor: Any,
    image_mode: str,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Stacks the pixel values of the images of a batch, in batch order (None: no image).

    LLaVA fills the image tokens of the batch in order with the stacked images, so rows without
    an image simply contribute nothing.
    """
    present = [img for img in images if img is not None]
    if not present:
        return None
    image_processor = getattr(processor, "image_processor", None)
    tensors = []
    for img in present:
        if isinstance(img, torch.Tensor):
            tensors.append(img)
        else:
            if image_processor is None:
                raise ValueError("an image was given but the processor has no image_processor")
            tensors.append(pixel_values([img], image_processor, image_mode)[0])  # type: ignore[arg-type]
    return torch.stack(tensors).to(device=device, dtype=dtype)


def left_pad(prompts: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads 1-D id tensors into ``(input_ids, attention_mask)``.

    Left padding keeps the last prompt token of every row at the same position, so the first
    generated token of each row follows its own prompt directly.
    """
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, length - len(prompt) :] = prompt
            mask[row, length - len(prompt) :] = 1
    return ids, mask


def image_batch(
    processor: Any,
    rows: Sequence[torch.Tensor],
    images: Sequence[ImageInput | None],
    length: int,
    *,
    left: bool,
    image_mode: str,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The image inputs of a batch of token rows, on the model's device.

    LLaVA-1.5 (and text-only models): ``pixel_values`` stacked as `stack_pixels` does. Other
    families: every input their processor makes of each row's image
    (``llava_mole.data.image_inputs``), per-token ones padded to `length` on the same side as
    the ids; floating tensors cast to `dtype`. Rows are generation prompts (no answer labels),
    so PaliGemma's ``token_type_ids`` mark every row as prefix.

    Args:
        processor: The model's processor.
        rows: The token ids of each row (with the image block where the image is).
        images: One image (PIL; LLaVA-1.5 also a ``(3, H, W)`` tensor) or None per row.
        length: The padded length of the batch.
        left: Rows are left-padded (generation) rather than right-padded.
        image_mode: ``pad`` or ``resize`` (LLaVA-1.5 only).
        dtype: The model's floating dtype.
        device: The model's device.
    """
    hook = image_inputs_for(processor)
    if hook is None:
        pixels = stack_pixels(images, processor, image_mode, dtype, device)
        return {} if pixels is None else {"pixel_values": pixels}
    features: list[dict[str, torch.Tensor]] = []
    for ids, img in zip(rows, images, strict=True):
        tokens = ids.tolist()
        if img is None:
            text_only = hook.rules.tokens != "cross_attention"
            features.append(hook.token_inputs(tokens) if text_only else {})
            continue
        if not isinstance(img, Image.Image):
            raise ValueError(f"{hook.family.name} takes PIL images, not pixel tensors")
        block = hook.block(img)
        features.append({**block.tensors, **hook.token_inputs(tokens, None, block)})
    batch = collate_image_inputs(features, length, hook.nested, left=left)
    return {
        k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
        for k, v in batch.items()
    }
