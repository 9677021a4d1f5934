"""Image inputs built by the model's own processor: one per-family hook, one collation rule.

LLaVA-1.5 expands ``<image>`` to a fixed number of image tokens and takes ``(3, H, W)`` pixel
values; the prompt encoder does that itself (``llava_mole.data.templates``), byte for byte as
before. Every other multimodal family (see ``InputRules`` in ``llava_mole.models.families``)
lets its processor do it: the image block of a user turn is what the processor returns for the
family's placeholder text and the image, ``processor(text=[placeholder], images=[image])``::

    "<s> USER: <image>\\nwhat is it? ASSISTANT:"          (template text)
         ───┬─── ──────┬─────  ────────┬───────
        text ids   image block        text ids
                 (processor ids, cut at its first bos: PaliGemma and Mllama append one)

and every other tensor it returns is carried to the model, sorted by layout:

- per-token (``TOKEN_KEYS``: ``token_type_ids``, ``mm_token_type_ids``,
  ``cross_attention_mask``): spread over the whole sequence by the family's ``tokens`` rule
  (:meth:`ImageInputs.token_inputs`), then padded along ``T``;
- per image (``pixel_values``, ``image_sizes``, ``image_grid_thw``, ...) or, for ``nested``
  families (Idefics3, SmolVLM, Mllama) and ``PER_SAMPLE_KEYS``, per sample: concatenated along
  dim 0, trailing dims zero-padded to the largest (LLaVA-NeXT's patch counts differ per image).
  A text-only sample in a batch of a nested family gets an all-zero entry (Idefics3 drops
  all-zero images; Mllama's zero aspect-ratio mask and cross-attention mask ignore it).

Token counts depend only on the image's size (every family resizes by size), so the ids of a
block are computed once per ``(width, height)`` from a blank image of that size
(:meth:`ImageInputs.block_ids`): dataset lengths are exact without decoding any image, and the
real image's block is checked against them. The image goes to the processor as it is
(``image_mode`` is LLaVA-1.5's).
"""

from __future__ import annotations

import os
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..models.families import Family, family_of_processor
from .images import DEFAULT_MAX_PIXELS, EmbeddedImage, _as_source, _open

__all__ = [
    "PER_SAMPLE_KEYS",
    "TOKEN_KEYS",
    "ImageBlock",
    "ImageInputs",
    "collate_image_inputs",
    "image_inputs_for",
    "image_size",
]

TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids", "cross_attention_mask")
"""Processor outputs with one entry per token (padded along ``T``)."""
PER_SAMPLE_KEYS = ("batch_num_images",)
"""Processor outputs with one entry per sample in every family."""
_TEXT_KEYS = ("input_ids", "attention_mask", "labels")
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass
class ImageBlock:
    """What the processor makes of one image.

    Attributes:
        ids: The block's token ids (image tokens and the family's markers around them).
        tensors: Per-image (or, nested, per-sample) inputs, each with a leading dim.
        token_values: Per-token inputs over the block, ``(len(ids), ...)``.
    """

    ids: list[int]
    tensors: dict[str, torch.Tensor]
    token_values: dict[str, torch.Tensor]


def image_size(source: str | os.PathLike[str] | EmbeddedImage) -> tuple[int, int]:
    """``(width, height)`` of an image as `load_image` returns it (EXIF orientation applied),
    from its header only.

    Raises:
        ImageLoadError: The file is missing, unreadable or too large.
    """
    with _open(_as_source(source), DEFAULT_MAX_PIXELS) as img:
        width, height = img.size
        try:
            orientation = img.getexif().get(274)
        except Exception:  # broken EXIF: load_image leaves such an image as is
            orientation = None
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def image_inputs_for(processor: Any) -> ImageInputs | None:
    """The processor-built image inputs of `processor`'s family, or None (LLaVA-1.5's fixed
    expansion, a bare tokenizer, or a processor of no known family)."""
    family = family_of_processor(processor)
    if family is None or family.inputs is None:
        return None
    return ImageInputs(processor, family)


class ImageInputs:
    """One family's image block and per-token inputs, built by its processor.

    Args:
        processor: The checkpoint's processor.
        family: Its family (``family.inputs`` set).
    """

    def __init__(self, processor: Any, family: Family) -> None:
        if family.inputs is None:
            raise ValueError(f"{family.name} has no processor-built inputs")
        self.processor = processor
        self.family = family
        self.rules = family.inputs
        tokenizer = getattr(processor, "tokenizer", processor)
        self.bos_id: int | None = tokenizer.bos_token_id
        fields = [f for _, f, _, _ in string.Formatter().parse(self.rules.placeholder) if f]
        names = {f: getattr(processor, f, None) for f in fields}
        missing = [f for f, value in names.items() if not isinstance(value, str)]
        if missing:
            raise ValueError(
                f"{type(processor).__name__} has no {missing[0]} (the {family.name} image "
                f"placeholder is {self.rules.placeholder!r})"
            )
        self.placeholder = self.rules.placeholder.format(**names)
        self._ids: dict[tuple[int, int], list[int]] = {}
        self._probe: ImageBlock | None = None

    @property
    def nested(self) -> bool:
        return self.rules.nested

    def block(self, image: Image.Image) -> ImageBlock:
        """The processor's block for one RGB image."""
        images: list[Any] = [[image]] if self.rules.nested else [image]
        out = self.processor(
            text=[self.placeholder], images=images, return_tensors="pt", add_special_tokens=False
        )
        ids = out["input_ids"][0].tolist()
        if self.bos_id is not None and self.bos_id in ids:
            ids = ids[: ids.index(self.bos_id)]
        n = len(ids)
        tokens = {k: out[k][0, :n] for k in TOKEN_KEYS if k in out}
        tensors = {
            k: torch.as_tensor(v)
            for k, v in out.items()
            if k not in TOKEN_KEYS and k not in _TEXT_KEYS
        }
        return ImageBlock(ids, tensors, tokens)

    def block_ids(self, size: tuple[int, int]) -> list[int]:
        """The block's ids for an image of ``(width, height)`` (computed once per size)."""
        if size not in self._ids:
            self._ids[size] = self.block(Image.new("RGB", size, (127, 127, 127))).ids
        return self._ids[size]

    def _probe_block(self) -> ImageBlock:
        if self._probe is None:
            self._probe = self.block(Image.new("RGB", (32, 32), (127, 127, 127)))
        return self._probe

    def token_inputs(
        self,
        input_ids: Sequence[int],
        labels: Sequence[int] | None = None,
        block: ImageBlock | None = None,
    ) -> dict[str, torch.Tensor]:
        """The per-token inputs of a whole sequence, ``(T, ...)`` each.

        Args:
            input_ids: The sequence (with the block's ids where the image is).
            labels: Its labels (-100 off answers; None: a generation prompt, all prefix).
            block: The sequence's image block (None: text only; zeros).
        """
        length = len(input_ids)
        template = block if block is not None else self._probe_block()
        start = _find(list(input_ids), template.ids) if block is not None else None
        out: dict[str, torch.Tensor] = {}
        for key, values in template.token_values.items():
            full = values.new_zeros((length, *values.shape[1:]))
            if start is not None and self.rules.tokens == "cross_attention":
                full[start:] = values[0]
            elif start is not None:
                full[start : start + len(values)] = values
            out[key] = full
        if self.rules.tokens == "prefix":
            types = torch.zeros(length, dtype=torch.long)
            trained = [k for k, y in enumerate(labels or []) if y != -100]
            if trained:
                types[trained[0] :] = 1
            out["token_type_ids"] = types
        return out

    def image_end(self, input_ids: Sequence[int], size: tuple[int, int]) -> int:
        """Position just after the image block in `input_ids` (0 if absent)."""
        ids = self.block_ids(size)
        start = _find(list(input_ids), ids)
        return 0 if start is None else start + len(ids)


def _find(seq: list[int], sub: list[int]) -> int | None:
    """First position of the sub-sequence `sub` in `seq`, or None."""
    if not sub:
        return None
    first = sub[0]
    for k in range(len(seq) - len(sub) + 1):
        if seq[k] == first and seq[k : k + len(sub)] == sub:
            return k
    return None


def _pad_trailing(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zero-pads dims 1.. of each tensor to the largest size among them."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    out = []
    for t in tensors:
        if list(t.shape[1:]) == shape:
            out.append(t)
            continue
        padded = t.new_zeros((t.shape[0], *shape))
        padded[tuple(slice(0, s) for s in t.shape)] = t
        out.append(padded)
    return out


def collate_image_inputs(
    features: Sequence[dict[str, Any]],
    length: int,
    nested: bool,
    left: bool = False,
) -> dict[str, torch.Tensor]:
    """Batches the processor-built inputs of dataset items (or generation rows).

    Args:
        features: Items; per-token keys hold ``(T_i, ...)`` tensors, the others a leading dim.
        length: The padded sequence length ``T``.
        nested: The family's image tensors are per sample (zero entries for text-only rows).
        left: Pad per-token inputs on the left (generation) instead of the right.

    Returns:
        Per-token inputs ``(B, T, ...)`` and the image inputs concatenated along dim 0.
    """
    keys = [k for k in dict.fromkeys(k for f in features for k in f) if _is_image_key(k)]
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        present = [torch.as_tensor(f[key]) for f in features if f.get(key) is not None]
        if key in TOKEN_KEYS:
            like = present[0]
            rows = like.new_zeros((len(features), length, *like.shape[1:]))
            for row, f in enumerate(features):
                value = f.get(key)
                if value is not None:
                    where = slice(length - len(value), length) if left else slice(0, len(value))
                    rows[row, where] = torch.as_tensor(value)
            batch[key] = rows
            continue
        if nested or key in PER_SAMPLE_KEYS:
            like = present[0]
            filler = like.new_zeros((1, *like.shape[1:]))
            present = [
                torch.as_tensor(f[key]) if f.get(key) is not None else filler for f in features
            ]
        batch[key] = torch.cat(_pad_trailing(present))
    return batch


def _is_image_key(key: str) -> bool:
    """Every item key but the text ones and the domain is a model input from the processor."""
    return key not in _TEXT_KEYS and key not in ("domain_id", "domain_ids")
