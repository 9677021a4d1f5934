"""Torch dataset, batch collator and modality/length-grouped sampler.

Text is tokenized once, when the dataset is built (cheap, and it gives every item's length to
the sampler and lets truncation drops be counted up front). Images are opened lazily in
``__getitem__``.

Image failures at training time: files are checked when the data is loaded, but a file can
still fail later (changed on disk, or a truncated JPEG that passed ``verify``). ``__getitem__``
then never raises: it counts the failure in ``InstructDataset.image_failures`` (per reason) and
returns a deterministic replacement, the next item (``i + 1, i + 2, ...``, wrapping around)
whose image loads or that has no image. If none of ``max_replacement_tries`` candidates works,
it returns the original text with a blank (mean-colour) image and all labels -100, so the batch
shape stays valid and nothing is learnt from it. With DataLoader workers, each worker process
keeps its own counter.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .formats import LoadReport, Sample, Skip, check_turns
from .images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_MODES,
    ImageLoadError,
    ImageMode,
    load_image,
    mean_colour,
    pixel_values,
    processor_input_size,
)
from .templates import IGNORE_INDEX, ConversationEncoder, EncodeError, TemplateName

logger = logging.getLogger(__name__)


@dataclass
class _Item:
    sample: Sample
    input_ids: torch.Tensor
    labels: torch.Tensor
    domain_id: int


class InstructDataset(Dataset):
    """Instruction-tuning examples: tokenized conversations with lazily loaded images.

    Each item is a dict with 1-D LongTensors ``input_ids`` and ``labels``, ``pixel_values``
    (``(3, H, W)`` float tensor; only for samples with an image) and ``domain_id`` (int).

    Samples that cannot be encoded (e.g. no answer token left after truncation, image tokens
    cut by truncation, malformed turns) are dropped and counted in `report`.

    Args:
        samples: Validated samples (repeats allowed: each occurrence becomes an item; the
            tokenization is shared and a dropped sample is counted once).
        processor: The model's processor (tokenizer + image processor).
        template: ``vicuna_v1`` or ``chat_template``.
        max_length: Truncation length in tokens.
        image_mode: ``pad`` or ``resize``.
        domains: Domain names, defining ``domain_id`` (default: order of first appearance).
        max_image_pixels: Size limit for images opened in ``__getitem__``.
        max_replacement_tries: How many replacement items to try when an image fails.
        system: ``vicuna_v1`` system prompt (None: LLaVA-1.5's; ``""``: none).
        strict: Raise `DataError` instead of dropping samples.
        pixel_cache_bytes: Keep processed images in memory up to this many bytes (per
            process), so that small datasets seen for several epochs skip decoding and
            resizing (about 10% of a tiny-model training step); 0 disables it.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        processor: Any,
        template: TemplateName | str = "vicuna_v1",
        max_length: int | None = 2048,
        image_mode: ImageMode | str = "pad",
        domains: Sequence[str] | None = None,
        *,
        system: str | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        max_replacement_tries: int = 10,
        strict: bool = False,
        pixel_cache_bytes: int = 64 * 2**20,
    ) -> None:
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {image_mode!r}")
        if domains is None:
            domains = list(dict.fromkeys(s.domain for s in samples))
        self.domains: list[str] = list(domains)
        domain_ids = {d: i for i, d in enumerate(self.domains)}
        unknown = sorted({s.domain for s in samples} - set(domain_ids))
        if unknown:
            raise ValueError(f"samples have domains missing from `domains`: {unknown}")

        self.processor = processor
        self.image_processor = getattr(processor, "image_processor", None)
        self.template = template
        self.max_length = max_length
        self.image_mode: ImageMode = image_mode  # type: ignore[assignment]
        self.max_image_pixels = max_image_pixels
        self.max_replacement_tries = max_replacement_tries
        self.encoder = ConversationEncoder(processor, template, max_length, system=system)
        self.report = LoadReport(per_domain={d: 0 for d in self.domains})
        self.image_failures: Counter[str] = Counter()
        self.pixel_cache_bytes = pixel_cache_bytes
        self._pixel_cache: dict[str, torch.Tensor] = {}
        self._pixel_cache_used = 0

        if any(s.has_image for s in samples) and self.image_processor is None:
            raise ValueError("samples have images but the processor has no image_processor")

        self._items: list[_Item] = []
        cache: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        for sample in samples:
            key = id(sample)
            if key not in cache:
                cache[key] = self._encode(sample)
            encoded = cache[key]
            if encoded is None:
                continue
            self._items.append(_Item(sample, *encoded, domain_ids[sample.domain]))
            self.report.per_domain[sample.domain] += 1
        if strict:
            self.report.raise_if_problems()

    def _encode(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor] | None:
        skip = check_turns(sample.turns, sample.has_image)
        if skip is None:
            try:
                enc = self.encoder.encode(sample.turns)
            except EncodeError as e:
                skip = Skip(e.reason, str(e))
            else:
                return torch.tensor(enc.input_ids), torch.tensor(enc.labels)
        self.report.add_skip(skip, source=sample.source, index=sample.index, sample_id=sample.id)
        return None

    # ----------------------------------------------------------------- metadata
    def __len__(self) -> int:
        return len(self._items)

    @property
    def lengths(self) -> list[int]:
        """Token length of each item (no image loading)."""
        return [len(item.input_ids) for item in self._items]

    @property
    def has_image(self) -> list[bool]:
        """Whether each item has an image (no image loading)."""
        return [item.sample.has_image for item in self._items]

    @property
    def domain_ids(self) -> list[int]:
        """Domain id of each item."""
        return [item.domain_id for item in self._items]

    def sample(self, index: int) -> Sample:
        """The `Sample` behind item `index`."""
        return self._items[index].sample

    # ----------------------------------------------------------------- items
    def _pixel_values(self, sample: Sample) -> torch.Tensor:
        key = str(sample.image)
        cached = self._pixel_cache.get(key)
        if cached is not None:
            return cached
        img = load_image(sample.image, max_pixels=self.max_image_pixels)  # type: ignore[arg-type]
        values = pixel_values([img], self.image_processor, self.image_mode)[0]
        size = values.numel() * values.element_size()
        if self._pixel_cache_used + size <= self.pixel_cache_bytes:
            self._pixel_cache[key] = values
            self._pixel_cache_used += size
        return values

    def _try_item(self, index: int) -> dict[str, Any] | None:
        item = self._items[index]
        out: dict[str, Any] = {
            "input_ids": item.input_ids,
            "labels": item.labels,
            "domain_id": item.domain_id,
        }
        if not item.sample.has_image:
            return out
        try:
            out["pixel_values"] = self._pixel_values(item.sample)
        except Exception as e:  # any failure must not reach the training loop
            reason = e.reason if isinstance(e, ImageLoadError) else "image_processing_error"
            self.image_failures[reason] += 1
            logger.warning(
                "image of item %d (%s) failed, trying a replacement: %s",
                index,
                item.sample.image,
                e,
            )
            return None
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self._items)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index %= n
        for k in range(min(self.max_replacement_tries + 1, n)):
            out = self._try_item((index + k) % n)
            if out is not None:
                return out
        # Last resort: keep the shapes valid, learn nothing.
        item = self._items[index]
        self.image_failures["blank_fallback"] += 1
        height, width = processor_input_size(self.image_processor)
        blank = Image.new("RGB", (width, height), mean_colour(self.image_processor))
        return {
            "input_ids": item.input_ids,
            "labels": torch.full_like(item.labels, IGNORE_INDEX),
            "domain_id": item.domain_id,
            "pixel_values": pixel_values([blank], self.image_processor, "resize")[0],
        }


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
    ) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: set a pad token on the tokenizer")
        self.pad_token_id = int(pad_token_id)
        self.label_pad = label_pad
        self.pad_to_multiple_of = pad_to_multiple_of
        self.loss_positions = loss_positions

    @classmethod
    def from_processor(cls, processor: Any, **kwargs: Any) -> DataCollator:
        """Builds a collator padding with the tokenizer's pad token (else its eos, else 0)."""
        tokenizer = getattr(processor, "tokenizer", None) or processor
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
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
        lengths: Token length of each item (e.g. ``dataset.lengths``).
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
        self.lengths = list(lengths)
        self.has_image = list(has_image)
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
            self.lengths, self.has_image, self.batch_size, self.world_size, generator
        )
        return iter(indices)
