"""The batch collator: dynamic right padding, and every processor-built input laid out as the
model wants it (``llava_mole.data.image_inputs``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .image_inputs import ImageInputs, collate_image_inputs, image_inputs_for
from .templates import IGNORE_INDEX

__all__ = ["DataCollator"]


class DataCollator:
    """Pads a list of dataset items into a batch (dynamic right padding).

    Works as a ``transformers.Trainer`` ``data_collator``; note that the Trainer drops item keys
    that the model's ``forward`` does not name unless ``remove_unused_columns=False``, in which
    case ``domain_ids`` is simply left out of the batch.

    Args:
        pad_token_id: Id used to pad ``input_ids``.
        label_pad: Label id of padding.
        pad_to_multiple_of: Round the padded length up to a multiple of this.
        loss_positions: also return ``loss_positions``.
        image_inputs: The family's processor-built inputs (None: LLaVA-1.5 / text only): the
            items' processor tensors are then batched by
            `llava_mole.data.image_inputs.collate_image_inputs`.

    Returns (on call):
        ``input_ids``, ``attention_mask``, ``labels`` (LongTensors ``(B, T)``), ``pixel_values``
        (``(N_img, 3, H, W)``, images of the samples that have one, in batch order; absent if
        none), ``domain_ids`` (LongTensor ``(B,)``) and, if asked, ``loss_positions``: the
        positions ``t`` (LongTensor, ascending) at which some sample has a label at ``t + 1``,
        the only positions whose logits the loss needs (computed here, on the host, so that
        trimming the logits to them costs the training step no host-device synchronisation).
    """

    def __init__(
        self,
        pad_token_id: int,
        label_pad: int = IGNORE_INDEX,
        pad_to_multiple_of: int | None = None,
        loss_positions: bool = False,
        image_inputs: ImageInputs | None = None,
    ) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: set a pad token on the tokenizer")
        self.pad_token_id = int(pad_token_id)
        self.label_pad = label_pad
        self.pad_to_multiple_of = pad_to_multiple_of
        self.loss_positions = loss_positions
        self.image_inputs = image_inputs

    @classmethod
    def from_processor(cls, processor: Any, **kwargs: Any) -> DataCollator:
        """Builds a collator padding with the tokenizer's pad token (else its eos, else 0)."""
        tokenizer = getattr(processor, "tokenizer", None) or processor
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        kwargs.setdefault("image_inputs", image_inputs_for(processor))
        return cls(pad, **kwargs)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        labels = [torch.as_tensor(f["labels"], dtype=torch.long) for f in features]
        length = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_ids = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)
        batch_labels = torch.full((len(ids), length), self.label_pad, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, (x, y) in enumerate(zip(ids, labels, strict=True)):
            if len(x) != len(y):
                raise ValueError(f"item {row}: input_ids and labels differ in length")
            batch_ids[row, : len(x)] = x
            batch_labels[row, : len(y)] = y
            mask[row, : len(x)] = 1
        batch: dict[str, torch.Tensor] = {
            "input_ids": batch_ids,
            "attention_mask": mask,
            "labels": batch_labels,
        }
        if self.image_inputs is not None:
            batch.update(collate_image_inputs(features, length, self.image_inputs.nested))
        else:
            images = [f["pixel_values"] for f in features if f.get("pixel_values") is not None]
            if images:
                batch["pixel_values"] = torch.stack([torch.as_tensor(p) for p in images])
        if all("domain_id" in f for f in features):
            batch["domain_ids"] = torch.tensor([int(f["domain_id"]) for f in features])
        if self.loss_positions:
            following = batch_labels[:, 1:]
            needed = ((following != IGNORE_INDEX) & (following != self.label_pad)).any(dim=0)
            batch["loss_positions"] = needed.nonzero().flatten()
        return batch
