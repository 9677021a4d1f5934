"""Drawing the toy worlds' 32x32 images: supersampled canvases and the demo world's renderers.

Images are drawn at :data:`SUPERSAMPLE` times :data:`IMAGE_SIZE` and box-downsampled
(:func:`finish`), so that shapes stay clean at the tiny size; every random choice comes from
the caller's :mod:`numpy` generator, so an image is byte-identical for a given stream.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .classes import CELL_STAINS, CHART_COLOURS, SCENE_COLOURS, class_attributes

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # draw at 128 px, box-downsample to 32 px: anti-aliased edges


def jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, ...]:
    delta = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(c) for c in np.clip(np.array(rgb) + delta, 0, 255))


def finish(canvas: Image.Image, rng: np.random.Generator, noise: float) -> Image.Image:
    """Downsample the supersampled canvas and add mild pixel noise."""
    small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    arr = np.asarray(small, dtype=np.float32)
    if noise > 0:
        arr = arr + rng.normal(0.0, noise, size=arr.shape)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def _render_scene(attrs: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    s = SUPERSAMPLE
    grey = int(rng.integers(95, 166))
    background = jitter(rng, (grey, grey, grey), 10)
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), background)
    draw = ImageDraw.Draw(canvas)
    # Large and near the centre: a shape then always covers the same 8-px patches, so its
    # silhouette (not its position) is what the vision tower has to learn.
    size = float(rng.uniform(23, 28))
    half = size / 2
    cx, cy = (IMAGE_SIZE / 2 + rng.uniform(-1.5, 1.5, size=2)).tolist()
    x0, y0, x1, y1 = ((cx - half) * s, (cy - half) * s, (cx + half) * s, (cy + half) * s)
    fill = jitter(rng, SCENE_COLOURS[attrs["colour"]], 12)
    shape = attrs["shape"]
    if shape == "square":
        inset = size * 0.04 * s  # squares look bigger than circles of the same box
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
    elif shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx * s, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        arm = size * s / 6
        draw.rectangle((cx * s - arm, y0, cx * s + arm, y1), fill=fill)
        draw.rectangle((x0, cy * s - arm, x1, cy * s + arm), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx * s, y0), (x1, cy * s), (cx * s, y1), (x0, cy * s)], fill=fill)
    else:  # ring
        draw.ellipse((x0, y0, x1, y1), outline=fill, width=int(size * s / 5))
    attrs["size"] = "small" if size < 24.5 else ("large" if size >= 26.5 else "medium")
    attrs["background"] = "dark grey" if grey < 115 else ("light grey" if grey > 145 else "grey")
    return finish(canvas, rng, noise=3.0)


def _render_chart(attrs: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    s = SUPERSAMPLE
    paper = int(rng.integers(238, 256))
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), (paper, paper, paper))
    draw = ImageDraw.Draw(canvas)
    base = 30
    for y in (6, 14, 22):  # faint grid lines, table-like
        draw.rectangle((1 * s, y * s, 32 * s, y * s + 1), fill=(205, 205, 205))
    draw.rectangle((0, 0, s - 1, base * s), fill=(60, 60, 60))
    draw.rectangle((0, base * s, 32 * s, (base + 1) * s - 1), fill=(60, 60, 60))
    tallest = int(attrs["tallest"])
    # Bar k sits inside patch column k (8 px patches) and only the tallest bar reaches the
    # top patch row: the answer is visible to single patches of the vision tower.
    top = int(rng.integers(24, 29))
    heights = [top if k == tallest else int(rng.integers(5, 17)) for k in range(4)]
    fill = jitter(rng, CHART_COLOURS[attrs["colour"]], 10)
    for k, h in enumerate(heights):
        x0 = 8 * k + 2
        draw.rectangle((x0 * s, (base - h) * s, (x0 + 5) * s - 1, base * s - 1), fill=fill)
    attrs["heights"] = heights
    return finish(canvas, rng, noise=2.0)


def _render_cells(attrs: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    s = SUPERSAMPLE
    stain, fluorescent = CELL_STAINS[attrs["stain"]]
    if fluorescent:
        background = jitter(rng, (12, 12, 16), 6)
    else:
        background = jitter(rng, (238, 228, 234), 6)
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), background)
    draw = ImageDraw.Draw(canvas)
    large, dense = bool(attrs["large"]), bool(attrs["dense"])
    if large:
        count = int(rng.integers(10, 15) if dense else rng.integers(2, 5))
    else:
        count = int(rng.integers(18, 27) if dense else rng.integers(3, 7))
    for _ in range(count):
        r = float(rng.uniform(3.0, 4.2) if large else rng.uniform(1.3, 2.0))
        aspect = float(rng.uniform(0.8, 1.25))
        cx, cy = rng.uniform(r, IMAGE_SIZE - r, size=2)
        box = (
            (cx - r * aspect) * s,
            (cy - r / aspect) * s,
            (cx + r * aspect) * s,
            (cy + r / aspect) * s,
        )
        colour = jitter(rng, stain, 20)
        draw.ellipse(box, fill=colour)
        if large:  # a nucleus: darker in brightfield, brighter under fluorescence
            factor = 1.35 if fluorescent else 0.55
            nucleus = tuple(int(min(255, c * factor)) for c in colour)
            q = r * 0.45
            draw.ellipse(((cx - q) * s, (cy - q) * s, (cx + q) * s, (cy + q) * s), fill=nucleus)
    attrs["count"] = count
    attrs["background"] = "dark" if fluorescent else "light"
    return finish(canvas, rng, noise=6.0)


_RENDERERS = {"scenes": _render_scene, "charts": _render_chart, "cells": _render_cells}


def render(
    name: str, class_id: int, rng: np.random.Generator
) -> tuple[Image.Image, dict[str, Any]]:
    """Draw one 32x32 RGB image of a class.

    Args:
        name: Dataset name or domain label.
        class_id: Class index (see :func:`class_attributes`).
        rng: Source of all randomness (position, size, jitter, noise).

    Returns:
        ``(image, attrs)``: the image and its class factors plus rendering details used by
        :func:`caption_for` (size, bar heights, cell count, background).
    """
    attrs = class_attributes(name, class_id)
    image = _RENDERERS[attrs["dataset"]](attrs, rng)
    return image, attrs
