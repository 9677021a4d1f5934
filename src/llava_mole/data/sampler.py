"""Modality- and length-grouped sampling, like LLaVA's ``group_by_modality_length``.

Image and text-only items go to separate megabatches of similar lengths, so that a batch has
one modality and little padding. The sampler keeps the lengths and modalities as numpy arrays
(a few bytes per item, e.g. the arrays of a lazily encoded `InstructDataset`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["ModalityLengthGroupedSampler", "modality_length_grouped_indices"]


def modality_length_grouped_indices(
    lengths: Sequence[int],
    has_image: Sequence[bool],
    batch_size: int,
    world_size: int = 1,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Orders indices so that each (global) batch has a single modality and similar lengths.

    Image and text-only items are shuffled separately and cut into megabatches of
    ``batch_size * world_size`` items; each megabatch is sorted by length (longest first, so
    an out-of-memory error shows up early) and the megabatches are shuffled. The two leftover
    partial megabatches are merged and put last.

    Args:
        lengths: Token length of each item.
        has_image: Modality of each item.
        batch_size: Per-device batch size.
        world_size: Number of devices.
        generator: Random generator (for determinism).

    Returns:
        A permutation of ``range(len(lengths))``.
    """
    if len(lengths) != len(has_image):
        raise ValueError("lengths and has_image differ in length")
    mega = batch_size * world_size

    def megabatches(indices: list[int]) -> list[list[int]]:
        order = torch.randperm(len(indices), generator=generator).tolist()
        shuffled = [indices[k] for k in order]
        chunks = [shuffled[k : k + mega] for k in range(0, len(shuffled), mega)]
        return [sorted(c, key=lambda i: -lengths[i]) for c in chunks]

    groups = [
        megabatches([i for i, img in enumerate(has_image) if img]),
        megabatches([i for i, img in enumerate(has_image) if not img]),
    ]
    full = [c for g in groups for c in g if len(c) == mega]
    partial = [i for g in groups for c in g if len(c) < mega for i in c]
    order = torch.randperm(len(full), generator=generator).tolist()
    result = [i for k in order for i in full[k]]
    return result + sorted(partial, key=lambda i: -lengths[i])


class ModalityLengthGroupedSampler(Sampler[int]):
    """Sampler grouping items by modality and length, like LLaVA's ``group_by_modality_length``.

    Deterministic for a given ``seed`` and epoch (call `set_epoch` each epoch for a new order).

    Args:
        lengths: Token length of each item (e.g. ``dataset.lengths``; kept as a numpy array).
        has_image: Modality of each item (e.g. ``dataset.has_image``).
        batch_size: Per-device batch size.
        world_size: Number of devices.
        seed: Base seed.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        has_image: Sequence[bool],
        batch_size: int,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if batch_size < 1 or world_size < 1:
            raise ValueError("batch_size and world_size must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.has_image = np.asarray(has_image, dtype=bool)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        indices = modality_length_grouped_indices(
            self.lengths.tolist(),
            self.has_image.tolist(),
            self.batch_size,
            self.world_size,
            generator,
        )
        return iter(indices)
