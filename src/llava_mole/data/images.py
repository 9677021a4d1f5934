"""Image loading and preprocessing (PIL only, no torchvision).

Pipeline for one image: open with PIL -> size guard -> EXIF orientation -> RGB -> ``pad``
(LLaVA's expand-to-square with the image processor's mean colour) or ``resize`` (plain resize to
the processor's input size) -> the model's own image processor.

Errors are raised as `ImageLoadError` carrying a skip reason, so that loading can count them and
the dataset can fall back instead of crashing the training loop.

An image is a file path, or an `EmbeddedImage`: the encoded bytes of an image stored inside a
memory-mapped Hugging Face dataset, read only when the image is opened.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .formats import IMAGE_TOO_LARGE, MISSING_IMAGE, UNREADABLE_IMAGE, Skip

ImageMode = Literal["pad", "resize"]
IMAGE_MODES: tuple[str, ...] = ("pad", "resize")

DEFAULT_MAX_PIXELS = 50_000_000
"""Images with more pixels than this are skipped (`image_too_large`): decompression-bomb guard."""

# Before padding to a square, images whose long side exceeds this are downscaled: the processor
# resizes to a few hundred pixels anyway, and padding a 1 x 100000 strip at full size would
# allocate 10^10 pixels.
_MAX_SIDE_BEFORE_PROCESSOR = 2048


class ImageBytesStore(Protocol):
    """Where `EmbeddedImage` bytes live (e.g. an Arrow image column, `llava_mole.data.hf`)."""

    name: str

    def image_bytes(self, row: int, item: int) -> bytes: ...


class EmbeddedImage:
    """An image stored as encoded bytes inside a dataset, read on `open`.

    Holds only a reference (store, row, item), so that a split of a million samples keeps its
    images in the memory-mapped dataset, not in Python objects.

    Attributes:
        store: The object holding the bytes.
        row: Row of the sample in the store.
        item: Position in the row's image list (0 for a single-image column).
    """

    __slots__ = ("item", "row", "store")

    def __init__(self, store: ImageBytesStore, row: int, item: int = 0) -> None:
        self.store = store
        self.row = row
        self.item = item

    def open(self) -> io.BytesIO:
        """The encoded image as a file-like object."""
        return io.BytesIO(self.store.image_bytes(self.row, self.item))

    def __str__(self) -> str:
        suffix = f"[{self.item}]" if self.item else ""
        return f"{self.store.name}#{self.row}{suffix}"

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EmbeddedImage) and (
            other.store is self.store and other.row == self.row and other.item == self.item
        )

    def __hash__(self) -> int:
        return hash((id(self.store), self.row, self.item))


ImageSource = Path | EmbeddedImage
"""What a `Sample` names as its image: a file or embedded bytes."""


class ImageLoadError(Exception):
    """An image could not be used.

    Attributes:
        reason: Skip reason (`missing_image`, `unreadable_image` or `image_too_large`).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _as_source(path: str | os.PathLike[str] | EmbeddedImage) -> ImageSource:
    return path if isinstance(path, EmbeddedImage) else Path(path)


def _open(path: ImageSource, max_pixels: int) -> Image.Image:
    """Opens `path` lazily (header only) and checks its size."""
    try:
        with warnings.catch_warnings():
            # We apply our own, lower limit below; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path.open() if isinstance(path, EmbeddedImage) else path)
    except FileNotFoundError:
        raise ImageLoadError(MISSING_IMAGE, f"image file not found: {path}") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(IMAGE_TOO_LARGE, f"{path}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageLoadError(UNREADABLE_IMAGE, f"cannot open image {path}: {e}") from None
    width, height = img.size
    if width < 1 or height < 1 or width * height > max_pixels:
        img.close()
        raise ImageLoadError(
            IMAGE_TOO_LARGE, f"{path}: {width}x{height} pixels (limit {max_pixels} pixels)"
        )
    return img


def check_image_file(
    path: str | os.PathLike[str] | EmbeddedImage, max_pixels: int = DEFAULT_MAX_PIXELS
) -> None:
    """Checks that an image file can be used without decoding all of its pixels.

    Opens the header, checks the size and runs PIL's ``verify()`` (structure and checksums, e.g.
    PNG CRCs). A file truncated in the middle of its pixel data can still pass (for JPEG,
    ``verify`` does not decode); such files are caught later by the dataset's fallback.

    Args:
        path: The image file, or an embedded image.
        max_pixels: Size limit in pixels.

    Raises:
        ImageLoadError: With the skip reason.
    """
    img = _open(_as_source(path), max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.verify()
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageLoadError(UNREADABLE_IMAGE, f"corrupt image {path}: {e}") from None
    finally:
        img.close()


def image_checker(max_pixels: int = DEFAULT_MAX_PIXELS):
    """Returns a ``check_image`` callable for `llava_mole.data.records.validate_record` (it also
    takes an `EmbeddedImage`)."""

    def check(path: ImageSource) -> Skip | None:
        try:
            check_image_file(path, max_pixels)
        except ImageLoadError as e:
            return Skip(e.reason, str(e))
        return None

    return check


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB.

    Transparent images are composited over `background` (white by default: diagrams and scans
    with transparent backgrounds usually have dark content). High bit-depth greyscale modes
    (``I;16*``, ``I``, ``F``) are min-max scaled to 0..255 rather than clipped, since 16-bit
    scans often use only 10 or 12 bits.

    Args:
        img: Image in any mode.
        background: RGB colour placed under transparent pixels.

    Returns:
        An RGB image.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.ndim == 3:  # e.g. "I;16" images decoded with a channel axis
            arr = arr[..., 0]
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def exif_transpose(img: Image.Image) -> Image.Image:
    """Applies the EXIF orientation tag; broken EXIF data leaves the image as is."""
    try:
        transposed = ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF should not cost us the image
        return img
    return transposed if transposed is not None else img


def load_image(
    path: str | os.PathLike[str] | EmbeddedImage,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Opens an image file as an upright RGB image.

    Args:
        path: The image file, or an embedded image.
        max_pixels: Size limit in pixels (decompression-bomb guard).
        background: Colour put under transparent pixels.

    Returns:
        A fully loaded RGB image.

    Raises:
        ImageLoadError: With the skip reason.
    """
    with _open(
        _as_source(path), max_pixels
    ) as img:  # closes the file, also for multi-frame formats
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
                out = to_rgb(exif_transpose(img), background)
        except Exception as e:  # PIL raises many types for corrupt data
            raise ImageLoadError(UNREADABLE_IMAGE, f"cannot decode image {path}: {e}") from None
        return img.copy() if out is img else out


def _size_dict_get(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value is not None else None


def processor_input_size(image_processor: Any) -> tuple[int, int]:
    """Returns the ``(height, width)`` of the pixel values the image processor produces.

    Uses ``crop_size`` when the processor centre-crops, else ``size`` (``height``/``width`` or a
    square ``shortest_edge``).

    Args:
        image_processor: A transformers image processor.

    Raises:
        ValueError: If the size cannot be determined.
    """
    if getattr(image_processor, "do_center_crop", False):
        crop = getattr(image_processor, "crop_size", None)
        h, w = _size_dict_get(crop, "height"), _size_dict_get(crop, "width")
        if h and w:
            return h, w
    size = getattr(image_processor, "size", None)
    h, w = _size_dict_get(size, "height"), _size_dict_get(size, "width")
    if h and w:
        return h, w
    edge = _size_dict_get(size, "shortest_edge")
    if edge:
        return edge, edge
    raise ValueError(
        f"cannot determine the input size of {type(image_processor).__name__}: "
        "it has no crop_size, size={'height', 'width'} or size={'shortest_edge'}"
    )


def mean_colour(image_processor: Any) -> tuple[int, int, int]:
    """The image processor's mean as an RGB colour (LLaVA's padding colour)."""
    mean = getattr(image_processor, "image_mean", None)
    if mean is None:
        return (127, 127, 127)
    if isinstance(mean, (int, float)):
        mean = [mean] * 3
    return tuple(int(round(float(m) * 255)) for m in list(mean)[:3])  # type: ignore[return-value]


def expand_to_square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pads an RGB image to a square, centred, with `background` (LLaVA's ``expand2square``)."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def prepare_image(img: Image.Image, mode: ImageMode, image_processor: Any) -> Image.Image:
    """Applies the ``pad`` or ``resize`` policy to an RGB image before the image processor.

    Args:
        img: RGB image.
        mode: ``pad``: expand to a square with the processor's mean colour (LLaVA-1.5);
            ``resize``: resize to the processor's input size, ignoring the aspect ratio.
        image_processor: The model's image processor.

    Returns:
        The prepared image; its size is bounded, whatever the input's aspect ratio.
    """
    if mode == "pad":
        if max(img.size) > _MAX_SIDE_BEFORE_PROCESSOR:
            img = img.copy()
            img.thumbnail((_MAX_SIDE_BEFORE_PROCESSOR, _MAX_SIDE_BEFORE_PROCESSOR))
        return expand_to_square(img, mean_colour(image_processor))
    if mode == "resize":
        height, width = processor_input_size(image_processor)
        return img.resize((width, height), Image.Resampling.BICUBIC)
    raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {mode!r}")


def pixel_values(
    images: Sequence[Image.Image], image_processor: Any, mode: ImageMode = "pad"
) -> torch.Tensor:
    """Runs the model's image processor on prepared images.

    Args:
        images: RGB images.
        image_processor: The model's image processor (e.g. ``processor.image_processor``).
        mode: ``pad`` or ``resize`` (see `prepare_image`).

    Returns:
        A float tensor of shape ``(len(images), 3, H, W)``.
    """
    prepared = [prepare_image(img, mode, image_processor) for img in images]
    return image_processor(prepared, return_tensors="pt")["pixel_values"]
