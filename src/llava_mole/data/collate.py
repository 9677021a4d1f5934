"""Torch dataset and batch collator (the sampler lives in `llava_mole.data.sampler`).

Text is tokenized when the dataset is built: that gives every item's length to the sampler
and lets truncation drops be counted up front. A small in-memory dataset keeps the token ids;
a lazily read one (a `SampleView` of Hugging Face rows, see `llava_mole.data.selection`) or a
list of more than `LAZY_MIN_ITEMS` samples keeps only small integer arrays -- per item its
position in the samples, token length, modality and domain id, about 17 bytes -- and tokenizes
the item again in ``__getitem__`` (the same ids: the encoder is deterministic). Items, their
order, the drops and the report do not depend on the mode. Images are opened lazily in
``__getitem__`` in both modes.

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

import copy
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .collator import DataCollator
from .formats import LoadReport, Sample, Skip, check_turns
from .image_inputs import ImageInputs, image_size
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
from .sampler import ModalityLengthGroupedSampler, modality_length_grouped_indices
from .selection import SampleView
from .templates import (
    IGNORE_INDEX,
    ConversationEncoder,
    EncodedConversation,
    EncodeError,
    TemplateName,
)

__all__ = [
    "LAZY_MIN_ITEMS",
    "DataCollator",
    "InstructDataset",
    "ModalityLengthGroupedSampler",
    "modality_length_grouped_indices",
]

logger = logging.getLogger(__name__)

LAZY_MIN_ITEMS = 50_000
"""A plain list of more samples than this is encoded lazily (no token ids kept)."""

_Encoded = tuple[torch.Tensor, torch.Tensor]


class _Index:
    """Per-item arrays of one pass over the samples (dropped samples: length -1)."""

    def __init__(self, n: int, keep_tensors: bool) -> None:
        self.lengths = np.full(n, -1, dtype=np.int32)
        self.has_image = np.zeros(n, dtype=bool)
        self.domain_ids = np.zeros(n, dtype=np.int32)
        self.encoded: list[_Encoded | None] | None = [None] * n if keep_tensors else None

    def kept(self, offset: int, where: list, *arrays: list) -> None:
        """Appends the kept items (positions shifted by `offset`) to the output lists."""
        keep = self.lengths >= 0
        where.append(np.flatnonzero(keep) + offset)
        for out, array in zip(arrays, (self.lengths, self.has_image, self.domain_ids)):
            out.append(array[keep])


class InstructDataset(Dataset):
    """Instruction-tuning examples: tokenized conversations with lazily loaded images.

    Each item is a dict with 1-D LongTensors ``input_ids`` and ``labels``, ``pixel_values``
    (``(3, H, W)`` float tensor; only for samples with an image) and ``domain_id`` (int).
    For families whose processor builds the image inputs (``llava_mole.data.image_inputs``),
    the item carries every tensor the processor returns instead (``pixel_values`` with a
    leading image dim, ``image_sizes``, ``image_grid_thw``, ..., per-token ones as ``(T, ...)``);
    lengths stay exact (the image block's length comes from the image's size, read from its
    header), and ``image_mode`` does not apply (the processor resizes).

    Samples that cannot be encoded (e.g. no answer token left after truncation, image tokens
    cut by truncation, malformed turns) are dropped and counted in `report`, in both modes.

    Args:
        samples: Validated samples (repeats allowed: each occurrence becomes an item; the
            tokenization is shared and a dropped sample is counted once): a list, or the
            `SampleView` of `llava_mole.data.mixture.load_split` (a part repeated N times is
            encoded once).
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
        lazy: Tokenize in ``__getitem__`` instead of keeping the ids. None: when `samples` is
            a lazy `SampleView` or a list of more than `LAZY_MIN_ITEMS` samples.
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
        lazy: bool | None = None,
    ) -> None:
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {image_mode!r}")
        view = isinstance(samples, SampleView)
        present = samples.domains() if view else list(dict.fromkeys(s.domain for s in samples))
        self.domains: list[str] = list(present if domains is None else domains)
        domain_ids = {d: i for i, d in enumerate(self.domains)}
        unknown = sorted(set(present) - set(domain_ids))
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
        self.images: ImageInputs | None = self.encoder.images
        self.report = LoadReport(per_domain={d: 0 for d in self.domains})
        self.image_failures: Counter[str] = Counter()
        self.pixel_cache_bytes = pixel_cache_bytes
        self._pixel_cache: dict[str, torch.Tensor] = {}
        self._pixel_cache_used = 0

        if not view and any(s.has_image for s in samples) and self.image_processor is None:
            raise ValueError("samples have images but the processor has no image_processor")
        if lazy is None:
            lazy = samples.lazy if view else len(samples) > LAZY_MIN_ITEMS
        self.lazy = lazy
        self._samples = samples
        self._build_index(samples, domain_ids)
        counts = np.bincount(self._domain_ids, minlength=len(self.domains))
        self.report.per_domain = {d: int(counts[i]) for i, d in enumerate(self.domains)}
        if strict:
            self.report.raise_if_problems()

    # ----------------------------------------------------------------- the up-front pass
    def _encode(self, sample: Sample) -> _Encoded | None:
        skip = check_turns(sample.turns, sample.has_image)
        if skip is None:
            try:
                enc = self._encode_turns(sample)
            except (EncodeError, ImageLoadError) as e:
                skip = Skip(e.reason, str(e))
            else:
                return torch.tensor(enc.input_ids), torch.tensor(enc.labels)
        self.report.add_skip(skip, source=sample.source, index=sample.index, sample_id=sample.id)
        return None

    def _image_size(self, sample: Sample) -> tuple[int, int] | None:
        """The image's ``(width, height)`` where the processor builds the block, else None."""
        if self.images is None or sample.image is None:
            return None
        return image_size(sample.image)

    def _encode_turns(self, sample: Sample) -> EncodedConversation:
        """The encoder's ids and labels of `sample` (with its image's size where needed)."""
        size = self._image_size(sample)
        if size is None:
            return self.encoder.encode(sample.turns)
        return self.encoder.encode(sample.turns, size)

    def _fill(self, index: _Index, k: int, sample: Sample, domain_ids: dict[str, int]) -> None:
        """Encodes `sample` as entry `k` of `index` (dropped: length -1, counted)."""
        if sample.has_image and self.image_processor is None:
            raise ValueError("samples have images but the processor has no image_processor")
        encoded = self._encode(sample)
        if encoded is None:
            return
        index.lengths[k] = len(encoded[0])
        index.has_image[k] = sample.has_image
        index.domain_ids[k] = domain_ids[sample.domain]
        if index.encoded is not None:
            index.encoded[k] = encoded

    def _index_list(self, samples: Sequence[Sample], domain_ids: dict[str, int]) -> _Index:
        """One entry per sample; a sample object seen before shares its first encoding."""
        index = _Index(len(samples), keep_tensors=not self.lazy)
        first: dict[int, int] = {}
        for k, sample in enumerate(samples):
            seen = first.setdefault(id(sample), k)
            if seen == k:
                self._fill(index, k, sample, domain_ids)
                continue
            for array in (index.lengths, index.has_image, index.domain_ids):
                array[k] = array[seen]
            if index.encoded is not None:
                index.encoded[k] = index.encoded[seen]
        return index

    def _index_part(self, samples: Iterable[Sample], n: int, domain_ids: dict) -> _Index:
        index = _Index(n, keep_tensors=not self.lazy)
        for k, sample in enumerate(samples):
            self._fill(index, k, sample, domain_ids)
        return index

    def _build_index(self, samples: Sequence[Sample], domain_ids: dict[str, int]) -> None:
        """Encodes every distinct sample once, in order, and keeps the kept items' arrays."""
        if isinstance(samples, SampleView):
            parts: list[tuple[int, _Index]] = []
            unique: list[tuple[Any, np.ndarray, _Index]] = []
            for offset, part in zip(samples.offsets.tolist(), samples.parts):
                same = (
                    u[2]
                    for u in unique
                    if u[0] is part.table and np.array_equal(u[1], part.positions)
                )
                index = next(same, None)
                if index is None:  # not a repeat of an earlier part
                    rows = part.table.iter_samples(part.positions)
                    index = self._index_part(rows, len(part.positions), domain_ids)
                    unique.append((part.table, part.positions, index))
                parts.append((offset, index))
        else:
            parts = [(0, self._index_list(samples, domain_ids))]
        where: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        images: list[np.ndarray] = []
        domains: list[np.ndarray] = []
        encoded: list[_Encoded] = []
        for offset, index in parts:
            index.kept(offset, where, lengths, images, domains)
            if index.encoded is not None:
                encoded.extend(e for e in index.encoded if e is not None)
        self._where = np.concatenate([np.zeros(0, dtype=np.int64), *where])
        self._lengths = np.concatenate([np.zeros(0, dtype=np.int32), *lengths])
        self._has_image = np.concatenate([np.zeros(0, dtype=bool), *images])
        self._domain_ids = np.concatenate([np.zeros(0, dtype=np.int32), *domains])
        self._encoded = None if self.lazy else encoded
        for array in (self._where, self._lengths, self._has_image, self._domain_ids):
            array.flags.writeable = False

    # ----------------------------------------------------------------- metadata
    def __len__(self) -> int:
        return len(self._where)

    @property
    def lengths(self) -> Sequence[int]:
        """Token length of each item (no image loading): a list, or a read-only int32 numpy
        array when the dataset is lazy."""
        return self._lengths if self.lazy else self._lengths.tolist()

    @property
    def has_image(self) -> Sequence[bool]:
        """Whether each item has an image (no image loading); a bool array when lazy."""
        return self._has_image if self.lazy else self._has_image.tolist()

    @property
    def domain_ids(self) -> Sequence[int]:
        """Domain id of each item; an int32 array when lazy."""
        return self._domain_ids if self.lazy else self._domain_ids.tolist()

    def subset(self, indices: Sequence[int]) -> InstructDataset:
        """The items at `indices` (in that order) as a dataset of the same encoder and images:
        no sample is encoded again. The load report is the parent's."""
        picked = np.asarray(indices, dtype=np.int64)
        child = copy.copy(self)
        for name in ("_where", "_lengths", "_has_image", "_domain_ids"):
            array = getattr(self, name)[picked]
            array.flags.writeable = False
            setattr(child, name, array)
        if self._encoded is not None:
            child._encoded = [self._encoded[i] for i in picked.tolist()]
        child.image_failures = Counter()
        child._pixel_cache, child._pixel_cache_used = {}, 0
        return child

    def sample(self, index: int) -> Sample:
        """The `Sample` behind item `index` (built from its row when the samples are lazy)."""
        return self._samples[int(self._where[index])]

    # ----------------------------------------------------------------- items
    def _tokens(self, index: int, sample: Sample) -> _Encoded:
        if self._encoded is not None:
            return self._encoded[index]
        enc = self._encode_turns(sample)  # encoded before: it cannot fail now
        return torch.tensor(enc.input_ids), torch.tensor(enc.labels)

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
        sample = self.sample(index)
        input_ids, labels = self._tokens(index, sample)
        out: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "domain_id": int(self._domain_ids[index]),
        }
        if not sample.has_image:
            if self.images is not None and self.images.rules.tokens != "cross_attention":
                out.update(self.images.token_inputs(input_ids.tolist(), labels.tolist()))
            return out
        try:
            if self.images is None:
                out["pixel_values"] = self._pixel_values(sample)
            else:
                out.update(self._processor_inputs(sample, input_ids, labels))
        except Exception as e:  # any failure must not reach the training loop
            reason = e.reason if isinstance(e, ImageLoadError) else "image_processing_error"
            self.image_failures[reason] += 1
            logger.warning(
                "image of item %d (%s) failed, trying a replacement: %s",
                index,
                sample.image,
                e,
            )
            return None
        return out

    def _processor_inputs(
        self, sample: Sample, input_ids: torch.Tensor, labels: torch.Tensor, blank: bool = False
    ) -> dict[str, torch.Tensor]:
        """Every input the family's processor makes of the sample's image (blank: a mean-colour
        image of the same size)."""
        assert self.images is not None and sample.image is not None
        if blank:
            size = self._image_size(sample)
            img = Image.new("RGB", size, mean_colour(self.image_processor))  # type: ignore[arg-type]
        else:
            img = load_image(sample.image, max_pixels=self.max_image_pixels)
        block = self.images.block(img)
        if block.ids != self.images.block_ids(img.size):
            raise ImageLoadError(
                "image_tokens_changed", f"{sample.image}: the image block changed since loading"
            )
        tokens = self.images.token_inputs(input_ids.tolist(), labels.tolist(), block)
        return {**block.tensors, **tokens}

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index %= n
        for k in range(min(self.max_replacement_tries + 1, n)):
            out = self._try_item((index + k) % n)
            if out is not None:
                return out
        # Last resort: keep the shapes valid, learn nothing.
        sample = self.sample(index)
        input_ids, labels = self._tokens(index, sample)
        self.image_failures["blank_fallback"] += 1
        if self.images is not None:
            return {
                "input_ids": input_ids,
                "labels": torch.full_like(labels, IGNORE_INDEX),
                "domain_id": int(self._domain_ids[index]),
                **self._processor_inputs(sample, input_ids, labels, blank=True),
            }
        height, width = processor_input_size(self.image_processor)
        blank = Image.new("RGB", (width, height), mean_colour(self.image_processor))
        return {
            "input_ids": input_ids,
            "labels": torch.full_like(labels, IGNORE_INDEX),
            "domain_id": int(self._domain_ids[index]),
            "pixel_values": pixel_values([blank], self.image_processor, "resize")[0],
        }
