"""Built-in synthetic multimodal world: three visually distinct image domains.

The three datasets stand in for the general / document-chart / biomedical split of the
LLaVA-MoLE paper (arXiv 2401.16160):

- ``scenes`` (domain ``general``): one large, saturated shape on a greyish background;
  class = colour x shape.
- ``charts`` (domain ``document``): a four-bar chart on white with axes and grid lines;
  class = bar colour x position of the tallest bar.
- ``cells`` (domain ``biomedical``): microscopy-like blobs, brightfield stains on a light
  background or fluorescent stains on a dark one; class = stain x cell size x density.

Why the mixture can conflict
----------------------------
Every domain has ``num_classes`` visually separable classes and the *same* instruction,
``"What is the code for this image?"``. The answer is the class mapped to a code word from
ONE shared vocabulary (:data:`CODE_WORDS`) through a seeded, domain-specific permutation.
Each domain alone is therefore a clean image -> word mapping. Trained on the mixture, a
single low-rank adapter has to fit three contradicting mappings behind identical question
text: the same code word means "red square" in one domain and "purple stain, large, dense"
in another, and visual cues that domains share (colour above all) point to different
answers. Only the image tells the domain apart, so capacity spent on one mapping competes
with the others -- the data conflict that sparse experts (MoLE) are meant to resolve.

With ``make_data(code_questions="domain")`` each domain words the code question its own way
("What is the code for this shape/chart/slide?"), as document and medical questions differ in
real instruction data. The mappings still contradict each other, but the domain is then
visible in the text as well, so a token-level router can tell the domains apart at the
positions that produce the answer, not only at the image tokens.

With ``make_data(code_answers="domain")`` the code answer also starts with what the image shows
(``"shape xray"``, ``"chart xray"``, ``"slide xray"``), as answers in real domains come in the
domain's own form, so the code word is predicted right after a token that differs by domain.
Measured on the demo's setting (4 seeds, with the earlier yes/no cells question, see below) it
did not make the learned routers separate the domains at the answer (separation 0.22-0.30, as
with plain answers) and gave the same picture as plain answers: mixing cost general 0.041
(beyond seed spread, closed by 2x the steps), MoLE recovered 0.024 of it (within spread).

A smaller share of samples (``natural_share``) asks one natural question per domain whose
answer is consistent across domains (colour of the shape, ordinal of the tallest bar, name
of the stain: words the captions use); these carry no conflict and act as a control. (The
cells' question used to be "Are the cells dense?" with a yes/no answer: never seen in
pretraining, it was learnt all-or-nothing -- 20-40 or 100-120 errors out of 250 depending on
the seed, in single-domain and mixed runs alike -- and its noise swamped the code task's.)

Images are 32x32 RGB PNGs, drawn at 4x resolution and box-downsampled so that shapes stay
clean at the tiny size. Everything is seeded with :mod:`numpy` generators, so the output is
byte-identical for a given seed. :func:`caption_for` produces plain-language descriptions of
what is visible (used for stage-1 pretraining of the tiny model); captions never contain a
code word.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
_SUPERSAMPLE = 4  # draw at 128 px, box-downsample to 32 px: anti-aliased edges

CODE_QUESTION = "What is the code for this image?"
PRETRAIN_QUESTION = "Describe the image."

#: The shared answer vocabulary of the code task. Deliberately disjoint from every caption
#: word so that stage-1 pretraining never teaches the codes.
CODE_WORDS: tuple[str, ...] = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray",
    "yankee", "zulu", "gamma", "kappa", "sigma", "omega", "theta", "zeta",
)  # fmt: skip

ORDINALS: tuple[str, ...] = ("first", "second", "third", "fourth")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")

# Saturated colours that stay distinct after downsampling to 32 px.
SCENE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (30, 175, 50),
    "blue": (35, 75, 235),
    "yellow": (245, 215, 25),
    "purple": (150, 45, 205),
    "cyan": (25, 205, 215),
    "orange": (250, 130, 10),
    "pink": (250, 110, 190),
}
# Ordered by how coarsely they differ: drawn large, the first three differ even at the level
# of whole 8-px patches (square: corners filled, triangle: top empty, circle: corners empty).
# 24 classes use these three, <= 16 classes only square and triangle (the easiest pair).
SCENE_SHAPES: tuple[str, ...] = ("square", "triangle", "circle", "cross", "diamond", "ring")

CHART_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (35, 160, 60),
    "blue": (40, 80, 220),
    "orange": (245, 135, 20),
    "purple": (140, 50, 190),
    "cyan": (20, 180, 200),
    "brown": (130, 80, 35),
    "black": (30, 30, 30),
}

# (stain colour, True when fluorescent, i.e. bright cells on a dark background)
CELL_STAINS: dict[str, tuple[tuple[int, int, int], bool]] = {
    "purple": ((115, 45, 160), False),
    "pink": ((225, 80, 155), False),
    "brown": ((125, 70, 25), False),
    "blue": ((60, 110, 255), True),
    "green": ((40, 230, 70), True),
    "red": ((245, 45, 45), True),
    "yellow": ((240, 225, 40), True),
    "cyan": ((30, 215, 230), True),
}


@dataclass(frozen=True)
class DatasetSpec:
    """One synthetic dataset (a domain of the mixture).

    Attributes:
        name: Folder and dataset name (``scenes``, ``charts``, ``cells``).
        domain: Domain label stored in every sample and in the mixture YAML.
        natural_question: The domain's natural (non-conflicting) question.
        max_classes: Number of distinct classes the renderer supports.
        code_question: The domain's wording of the code question (used with
            ``make_data(code_questions="domain")``); names what the image shows.
        subject: What the image shows, in one word; starts the code answer with
            ``make_data(code_answers="domain")`` (``"slide xray"``).
    """

    name: str
    domain: str
    natural_question: str
    max_classes: int
    code_question: str = CODE_QUESTION
    subject: str = "image"


DATASETS: tuple[DatasetSpec, ...] = (
    DatasetSpec(
        "scenes",
        "general",
        "What colour is the shape?",
        8 * 6,
        "What is the code for this shape?",
        "shape",
    ),
    DatasetSpec(
        "charts",
        "document",
        "Which bar is tallest?",
        4 * 8,
        "What is the code for this chart?",
        "chart",
    ),
    DatasetSpec(
        "cells",
        "biomedical",
        "What stain is on the slide?",
        2 * 2 * 8,
        "What is the code for this slide?",
        "slide",
    ),
)
DATASET_NAMES: tuple[str, ...] = tuple(d.name for d in DATASETS)
DOMAIN_OF: dict[str, str] = {d.name: d.domain for d in DATASETS}
MAX_CLASSES: int = min(min(d.max_classes for d in DATASETS), len(CODE_WORDS))

# Caption templates per dataset; every word in them is covered by corpus_words().
_CAPTIONS: dict[str, tuple[str, ...]] = {
    "scenes": (
        "A {size} {colour} {shape} on a {background} background.",
        "The image shows one {size} {colour} {shape} on a {background} background.",
        "There is a {colour} {shape} in the middle. The background is {background}.",
    ),
    "charts": (
        "A bar chart with four {colour} bars. The {ordinal} bar is the tallest.",
        "A chart with four {colour} bars on white. Bar heights: {heights}.",
        "The image shows a bar chart. The bars are {colour} and the {ordinal} one is the "
        "tallest. Bar heights: {heights}.",
    ),
    "cells": (
        "A microscopy image with {amount} {size} {stain} cells on a {background} background. "
        "The cells are {density}.",
        "A {background} microscopy slide with {stain} stained cells. The cells are {size} and "
        "{density}.",
        "The image shows {amount} {size} cells. The stain is {stain} and the cells are {density}.",
    ),
}
_CAPTION_EXTRA_WORDS = (
    "small medium large middle dark light grey white short tall many few dense sparse one"
)


def dataset_spec(name: str) -> DatasetSpec:
    """Look up a dataset by folder name or domain label.

    Args:
        name: ``scenes``/``charts``/``cells`` or ``general``/``document``/``biomedical``.

    Returns:
        The matching :class:`DatasetSpec`.
    """
    for spec in DATASETS:
        if name in (spec.name, spec.domain):
            return spec
    raise KeyError(f"unknown synthetic dataset {name!r}; expected one of {DATASET_NAMES}")


def class_attributes(name: str, class_id: int) -> dict[str, Any]:
    """Decode a class id into its visual factors.

    In ``scenes`` and ``charts`` the factor of the natural task varies fastest, so any prefix
    of the class list (``num_classes`` < max) covers every natural answer; in ``cells`` the
    stain (the natural answer) varies slowest, so the first ``4 k`` classes use ``k`` stains.

    Args:
        name: Dataset name.
        class_id: Class index in ``[0, max_classes)``.

    Returns:
        Dict with ``dataset`` and the class factors (e.g. ``colour``/``shape``).
    """
    spec = dataset_spec(name)
    if not 0 <= class_id < spec.max_classes:
        raise ValueError(f"class_id {class_id} out of range for {spec.name}")
    if spec.name == "scenes":
        colours = list(SCENE_COLOURS)
        return {
            "dataset": "scenes",
            "colour": colours[class_id % len(colours)],
            "shape": SCENE_SHAPES[class_id // len(colours)],
        }
    if spec.name == "charts":
        return {
            "dataset": "charts",
            "tallest": class_id % 4,
            "colour": list(CHART_COLOURS)[class_id // 4],
        }
    return {
        "dataset": "cells",
        "dense": bool(class_id % 2),
        "large": bool((class_id // 2) % 2),
        "stain": list(CELL_STAINS)[class_id // 4],
    }


def natural_answer(attrs: Mapping[str, Any]) -> str:
    """Answer of the dataset's natural question, consistent across domains.

    Args:
        attrs: Attributes from :func:`class_attributes` or :func:`render`.

    Returns:
        A colour word, an ordinal (``first``..``fourth``) or a stain name.
    """
    name = attrs["dataset"]
    if name == "scenes":
        return str(attrs["colour"])
    if name == "charts":
        return ORDINALS[int(attrs["tallest"])]
    return str(attrs["stain"])


def code_permutation(name: str, seed: int = 0, num_classes: int = 24) -> list[str]:
    """The domain-specific class -> code word mapping.

    All domains use the same ``num_classes`` words (``CODE_WORDS[:num_classes]``), each in its
    own seeded order; domains are guaranteed to get pairwise different orders.

    Args:
        name: Dataset name or domain label.
        seed: World seed.
        num_classes: Classes per domain.

    Returns:
        ``words`` with ``words[class_id]`` the code answer of that class.
    """
    _check_num_classes(num_classes)
    target = dataset_spec(name).name
    vocab = np.array(CODE_WORDS[:num_classes])
    rng = np.random.default_rng([seed, 7919])
    seen: list[list[str]] = []
    # Draw sequentially so that a later domain can be re-drawn if it repeats an earlier one.
    for spec in DATASETS:
        perm = [str(w) for w in rng.permutation(vocab)]
        while perm in seen:
            perm = [str(w) for w in rng.permutation(vocab)]
        if spec.name == target:
            return perm
        seen.append(perm)
    raise AssertionError("unreachable")


def _check_num_classes(num_classes: int) -> None:
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in [2, {MAX_CLASSES}], got {num_classes}")


# --------------------------------------------------------------------------------------
# Rendering


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, ...]:
    delta = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(c) for c in np.clip(np.array(rgb) + delta, 0, 255))


def _finish(canvas: Image.Image, rng: np.random.Generator, noise: float) -> Image.Image:
    """Downsample the supersampled canvas and add mild pixel noise."""
    small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    arr = np.asarray(small, dtype=np.float32)
    if noise > 0:
        arr = arr + rng.normal(0.0, noise, size=arr.shape)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def _render_scene(attrs: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    s = _SUPERSAMPLE
    grey = int(rng.integers(95, 166))
    background = _jitter(rng, (grey, grey, grey), 10)
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), background)
    draw = ImageDraw.Draw(canvas)
    # Large and near the centre: a shape then always covers the same 8-px patches, so its
    # silhouette (not its position) is what the vision tower has to learn.
    size = float(rng.uniform(23, 28))
    half = size / 2
    cx, cy = (IMAGE_SIZE / 2 + rng.uniform(-1.5, 1.5, size=2)).tolist()
    x0, y0, x1, y1 = ((cx - half) * s, (cy - half) * s, (cx + half) * s, (cy + half) * s)
    fill = _jitter(rng, SCENE_COLOURS[attrs["colour"]], 12)
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
    return _finish(canvas, rng, noise=3.0)


def _height_word(height: int) -> str:
    return "short" if height < 9 else ("medium" if height < 17 else "tall")


def _render_chart(attrs: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    s = _SUPERSAMPLE
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
    fill = _jitter(rng, CHART_COLOURS[attrs["colour"]], 10)
    for k, h in enumerate(heights):
        x0 = 8 * k + 2
        draw.rectangle((x0 * s, (base - h) * s, (x0 + 5) * s - 1, base * s - 1), fill=fill)
    attrs["heights"] = heights
    return _finish(canvas, rng, noise=2.0)


def _render_cells(attrs: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    s = _SUPERSAMPLE
    stain, fluorescent = CELL_STAINS[attrs["stain"]]
    if fluorescent:
        background = _jitter(rng, (12, 12, 16), 6)
    else:
        background = _jitter(rng, (238, 228, 234), 6)
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
        colour = _jitter(rng, stain, 20)
        draw.ellipse(box, fill=colour)
        if large:  # a nucleus: darker in brightfield, brighter under fluorescence
            factor = 1.35 if fluorescent else 0.55
            nucleus = tuple(int(min(255, c * factor)) for c in colour)
            q = r * 0.45
            draw.ellipse(((cx - q) * s, (cy - q) * s, (cx + q) * s, (cy + q) * s), fill=nucleus)
    attrs["count"] = count
    attrs["background"] = "dark" if fluorescent else "light"
    return _finish(canvas, rng, noise=6.0)


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


def caption_for(attrs: Mapping[str, Any], rng: np.random.Generator | None = None) -> str:
    """A plain-language description of what an image shows (never a code word).

    Args:
        attrs: Attributes returned by :func:`render`.
        rng: Picks one of several templates; ``None`` always uses the first.

    Returns:
        The caption, e.g. ``"A large red circle on a grey background, in the top left."``.
    """
    name = attrs["dataset"]
    templates = _CAPTIONS[name]
    template = templates[0] if rng is None else templates[int(rng.integers(len(templates)))]
    if name == "scenes":
        fields = {k: attrs[k] for k in ("size", "colour", "shape", "background")}
    elif name == "charts":
        fields = {
            "colour": attrs["colour"],
            "ordinal": ORDINALS[int(attrs["tallest"])],
            "heights": ", ".join(_height_word(h) for h in attrs["heights"]),
        }
    else:
        fields = {
            "amount": "many" if attrs["dense"] else "few",
            "size": "large" if attrs["large"] else "small",
            "stain": attrs["stain"],
            "background": attrs["background"],
            "density": "dense" if attrs["dense"] else "sparse",
        }
    return template.format(**fields)


def caption_examples(
    n_per_domain: int | Mapping[str, int],
    seed: int = 0,
    stream: int = 0,
    max_classes: int | None = MAX_CLASSES,
) -> Iterator[tuple[Image.Image, str, str]]:
    """Image/caption pairs from every domain (for pretraining).

    Uses random streams disjoint from :func:`make_data`, so these images are not the
    instruction-tuning images.

    Args:
        n_per_domain: Pairs per domain, or a ``{dataset name: count}`` mapping.
        seed: World seed.
        stream: Independent sub-stream (e.g. 0 for training, 1 for held-out captions).
        max_classes: Draw classes from the first ``max_classes`` of each domain (default: the
            class space :func:`make_data` can use); ``None`` for every renderable class.

    Yields:
        ``(image, caption, dataset_name)``, domains interleaved round-robin.
    """
    if isinstance(n_per_domain, Mapping):
        counts = [int(n_per_domain.get(spec.name, 0)) for spec in DATASETS]
    else:
        counts = [int(n_per_domain)] * len(DATASETS)
    rngs = [np.random.default_rng([seed, 104729, stream, k]) for k in range(len(DATASETS))]
    for i in range(max(counts, default=0)):
        for spec, rng, count in zip(DATASETS, rngs, counts, strict=True):
            if i >= count:
                continue
            n_classes = (
                spec.max_classes if max_classes is None else min(max_classes, spec.max_classes)
            )
            image, attrs = render(spec.name, int(rng.integers(n_classes)), rng)
            yield image, caption_for(attrs, rng), spec.name


def corpus_words() -> list[str]:
    """Every word the synthetic world can produce (questions, answers, captions).

    Returns:
        Sorted unique words (letters only, case preserved).
    """
    texts = [CODE_QUESTION, PRETRAIN_QUESTION, _CAPTION_EXTRA_WORDS, "yes no"]
    texts += [spec.natural_question for spec in DATASETS]
    texts += [spec.code_question for spec in DATASETS] + [spec.subject for spec in DATASETS]
    texts += [t for group in _CAPTIONS.values() for t in group]
    texts += list(CODE_WORDS) + list(ORDINALS) + list(NUMBER_WORDS) + list(SCENE_SHAPES)
    texts += list(SCENE_COLOURS) + list(CHART_COLOURS) + list(CELL_STAINS)
    words = {w for text in texts for w in re.findall(r"[A-Za-z]+", text)}
    return sorted(words)


# --------------------------------------------------------------------------------------
# Dataset files


def _build_split(
    spec: DatasetSpec,
    split: str,
    n: int,
    out_dir: Path,
    codes: list[str],
    seed: int,
    num_classes: int,
    natural_share: float,
    code_question: str,
    code_answer_prefix: str,
) -> list[dict[str, Any]]:
    split_index = ("train", "test").index(split)
    rng = np.random.default_rng([seed, DATASET_NAMES.index(spec.name), split_index])
    # Balanced classes, shuffled; an exact natural-task share rather than a Bernoulli draw.
    classes = rng.permutation(np.arange(n) % num_classes)
    natural = set(rng.permutation(n)[: int(round(n * natural_share))].tolist())
    image_dir = out_dir / spec.name / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        class_id = int(classes[i])
        image, attrs = render(spec.name, class_id, rng)
        file_name = f"{split}_{i:05d}.png"
        image.save(image_dir / file_name, format="PNG")
        if i in natural:
            task, question, answer = "natural", spec.natural_question, natural_answer(attrs)
        else:
            task, question, answer = "code", code_question, code_answer_prefix + codes[class_id]
        samples.append(
            {
                "id": f"{spec.name}-{split}-{i:05d}",
                "image": file_name,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": answer},
                ],
                "domain": spec.domain,
                "task": task,
                "class_id": class_id,
            }
        )
    return samples


def _mixture_entry(spec: DatasetSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "domain": spec.domain,
        "train": f"{spec.name}/train.json",
        "test": f"{spec.name}/test.json",
        "image_folder": f"{spec.name}/images",
        "take": "all",
        "metric": "exact_match",
    }


def write_mixture_yaml(
    path: Path,
    seed: int,
    specs: Sequence[Any],
    generator: str = "llava_mole.toy.synthetic.make_data",
) -> None:
    """Writes a mixture YAML over `specs` (anything with ``.name`` and ``.domain``), paths
    relative to the file, with the settings every synthetic world shares."""
    doc = {
        "seed": seed,
        "template": "vicuna_v1",
        # No system prompt: the tiny model was pretrained without one (models/pretrain.py), and
        # LLaVA-1.5's would be 30 of a sample's 64 tokens, half of every training step's work.
        "system": "",
        "max_length": 128,
        "image_mode": "resize",
        "datasets": [_mixture_entry(s) for s in specs],
    }
    header = f"# Generated by {generator}; paths are relative to this file.\n"
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


def make_data(
    out_dir: str | Path,
    samples_per_domain: int = 600,
    test_per_domain: int = 200,
    seed: int = 0,
    num_classes: int = 24,
    natural_share: float = 0.25,
    code_questions: str = "shared",
    code_answers: str = "plain",
) -> Path:
    """Write the synthetic three-domain world in LLaVA format.

    Layout: ``<name>/{train,test}.json``, ``<name>/images/*.png`` for ``scenes``, ``charts``
    and ``cells``; ``mixture.yaml`` (all three), ``mixture-<name>.yaml`` (one each) and
    ``synthetic_world.json`` (parameters and per-domain codebooks).

    Args:
        out_dir: Target directory (created if missing).
        samples_per_domain: Training samples per domain.
        test_per_domain: Test samples per domain.
        seed: World seed; output is byte-identical for equal arguments.
        num_classes: Classes per domain (and code words in use), at most :data:`MAX_CLASSES`.
        natural_share: Fraction of samples asking the natural (non-conflicting) question.
        code_questions: ``"shared"``: every domain asks :data:`CODE_QUESTION`; ``"domain"``:
            each asks its own wording (``DatasetSpec.code_question``), so the question text
            tells the domain, as document and medical questions do in real instruction data.
        code_answers: ``"plain"``: the code answer is the code word (``"xray"``); ``"domain"``:
            it starts with what the image shows (``"shape xray"``, ``"chart xray"``, ``"slide
            xray"``), answers written in the domain's own form, as real domains' answers are.
            The code word is then predicted right after a domain-specific token.

    Returns:
        ``out_dir`` as a :class:`Path`.
    """
    if code_questions not in ("shared", "domain"):
        raise ValueError(f"code_questions must be 'shared' or 'domain', got {code_questions!r}")
    if code_answers not in ("plain", "domain"):
        raise ValueError(f"code_answers must be 'plain' or 'domain', got {code_answers!r}")
    _check_num_classes(num_classes)
    if not 0.0 <= natural_share <= 1.0:
        raise ValueError(f"natural_share must be in [0, 1], got {natural_share}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    codebooks = {}
    for spec in DATASETS:
        codes = code_permutation(spec.name, seed, num_classes)
        codebooks[spec.name] = codes
        for split, n in (("train", samples_per_domain), ("test", test_per_domain)):
            question = CODE_QUESTION if code_questions == "shared" else spec.code_question
            prefix = f"{spec.subject} " if code_answers == "domain" else ""
            samples = _build_split(
                spec, split, n, out, codes, seed, num_classes, natural_share, question, prefix
            )
            text = json.dumps(samples, indent=1, ensure_ascii=False) + "\n"
            (out / spec.name / f"{split}.json").write_text(text, encoding="utf-8")
        write_mixture_yaml(out / f"mixture-{spec.name}.yaml", seed, [spec])
    write_mixture_yaml(out / "mixture.yaml", seed, list(DATASETS))
    world = {
        "generator": "llava_mole.toy.synthetic",
        "seed": seed,
        "samples_per_domain": samples_per_domain,
        "test_per_domain": test_per_domain,
        "num_classes": num_classes,
        "natural_share": natural_share,
        "code_questions": {
            s.name: CODE_QUESTION if code_questions == "shared" else s.code_question
            for s in DATASETS
        },
        "code_answer_prefixes": {
            s.name: f"{s.subject} " if code_answers == "domain" else "" for s in DATASETS
        },
        "domains": {s.name: s.domain for s in DATASETS},
        "natural_questions": {s.name: s.natural_question for s in DATASETS},
        "codebooks": codebooks,
    }
    (out / "synthetic_world.json").write_text(json.dumps(world, indent=1) + "\n", encoding="utf-8")
    return out
