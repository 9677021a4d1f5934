"""Synthetic worlds other than the demo's, for testing whether the study holds on fresh data.

The demo's world (:mod:`llava_mole.toy.synthetic`) was tuned until its study showed the
conflict the paper describes. A study tool must also tell the truth on worlds it was not tuned
for (issue 18), so these worlds are different *in kind*, and none of them was tuned to agree
with the paper:

``styles``
    Domains differ only in visual style and answer vocabulary. Every domain shows the same
    objects (colour x shape, 24 classes) and asks the same question, "What is in the image?".
    ``flat`` draws a filled shape on grey and answers in plain words (``"red square"``, the
    words of the captions); ``sketch`` draws the outline on white and ``glow`` a bright,
    blurred shape on black, and each answers with its own two code words (one for the colour,
    one for the shape, from disjoint slices of :data:`CODE_WORDS` under a seeded permutation).
    Only the style tells a model which vocabulary to use.
``skills``
    Domains need different skills on the *same* images: one to four shapes of distinct colours
    and sizes in a row. ``count`` asks "How many shapes are there?" (``"three"``), ``order``
    "What colour is on the left?" and ``largest`` "What colour is the largest shape?". The
    image distribution is shared; two domains answer with the same colour words for different
    reasons.
``unequal``
    The ``styles`` world with unequal domain sizes (``6 : 2 : 1`` training samples), as real
    mixtures have.

Each world writes the layout of :func:`llava_mole.toy.synthetic.make_data` (``<dataset>/{train,
test}.json``, ``<dataset>/images/``, ``mixture.yaml``, ``mixture-<dataset>.yaml``,
``world.json``) plus ``captions.json``: stage-1 pretraining records in LLaVA's pretrain format
(``{"id", "image", "conversations": [human "<image>\\nDescribe the image.", gpt caption]}``),
images under ``captions/``, and one "Say the word W." record per answer word that captions
never use, so a base pretrained on them (``llava-mole make-tiny --captions``) can emit every
answer word without being taught which image goes with which. Captions never contain a code
word. Everything is seeded; equal arguments give byte-identical files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from llava_mole.toy import WORLD_NAMES
from llava_mole.toy.classes import CODE_WORDS, NUMBER_WORDS, PRETRAIN_QUESTION, SCENE_COLOURS
from llava_mole.toy.draw import IMAGE_SIZE, SUPERSAMPLE, finish, jitter
from llava_mole.toy.synthetic import write_mixture_yaml

__all__ = ["WORLDS", "WorldDomain", "make_world"]

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES: tuple[str, ...] = ("square", "triangle", "circle", "cross")
STYLE_QUESTION = "What is in the image?"
_SIZE_STEPS = (
    4.0,
    5.5,
    7.0,
    8.0,
)  # shape sizes (px at 32 px) of the skills world: distinct, fit 4 in a row


@dataclass(frozen=True)
class WorldDomain:
    """One dataset (domain) of a world.

    Attributes:
        name: Folder and dataset name.
        domain: Domain label of the mixture.
        question: The instruction every sample of the domain asks.
    """

    name: str
    domain: str
    question: str


# ------------------------------------------------------------------------------- drawing
def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[float], **style) -> None:
    """Draws `shape` in the supersampled box ``(x0, y0, x1, y1)`` (fill or outline in style)."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "square":
        draw.rectangle(box, **style)
    elif shape == "circle":
        draw.ellipse(box, **style)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], **style)
    else:  # cross: two bars (an outline style draws both bars' outlines)
        arm = (x1 - x0) / 6
        draw.rectangle((cx - arm, y0, cx + arm, y1), **style)
        draw.rectangle((x0, cy - arm, x1, cy + arm), **style)


def _centred_box(rng: np.random.Generator, lo: float, hi: float) -> tuple[float, ...]:
    s = SUPERSAMPLE
    half = float(rng.uniform(lo, hi)) / 2
    cx, cy = (IMAGE_SIZE / 2 + rng.uniform(-2.0, 2.0, size=2)).tolist()
    return ((cx - half) * s, (cy - half) * s, (cx + half) * s, (cy + half) * s)


def _render_style(style: str, colour: str, shape: str, rng: np.random.Generator) -> Image.Image:
    """One object in one of the styles world's three styles."""
    s, rgb = SUPERSAMPLE, SCENE_COLOURS[colour]
    if style == "flat":
        grey = int(rng.integers(100, 161))
        canvas = Image.new("RGB", (IMAGE_SIZE * s,) * 2, jitter(rng, (grey,) * 3, 8))
        _draw_shape(
            ImageDraw.Draw(canvas), shape, _centred_box(rng, 20, 27), fill=jitter(rng, rgb, 12)
        )
        return finish(canvas, rng, noise=3.0)
    if style == "sketch":
        canvas = Image.new("RGB", (IMAGE_SIZE * s,) * 2, jitter(rng, (245, 245, 240), 6))
        width = int(rng.integers(2 * s, 3 * s))
        _draw_shape(
            ImageDraw.Draw(canvas), shape, _centred_box(rng, 18, 26), outline=rgb, width=width
        )
        return finish(canvas, rng, noise=2.0)
    canvas = Image.new("RGB", (IMAGE_SIZE * s,) * 2, jitter(rng, (12, 12, 18), 6))
    bright = tuple(min(255, int(c * 0.6 + 110)) for c in rgb)
    _draw_shape(ImageDraw.Draw(canvas), shape, _centred_box(rng, 16, 24), fill=bright)
    canvas = canvas.filter(ImageFilter.GaussianBlur(radius=1.5 * s))
    return finish(canvas, rng, noise=6.0)


def _render_row(rng: np.random.Generator) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One to four shapes of distinct colours and sizes in a row, left to right."""
    n = int(rng.integers(1, 5))
    colours = [COLOURS[i] for i in rng.permutation(len(COLOURS))[:n]]
    sizes = [_SIZE_STEPS[i] for i in rng.permutation(len(_SIZE_STEPS))[:n]]
    slot = IMAGE_SIZE / n
    s = SUPERSAMPLE
    grey = int(rng.integers(110, 151))
    canvas = Image.new("RGB", (IMAGE_SIZE * s,) * 2, jitter(rng, (grey,) * 3, 8))
    draw = ImageDraw.Draw(canvas)
    objects = []
    for k, (colour, size) in enumerate(zip(colours, sizes)):
        shape = ("square", "circle")[int(rng.integers(2))]
        cx = slot * (k + 0.5) + float(rng.uniform(-0.15, 0.15)) * max(0.0, slot - size)
        cy = IMAGE_SIZE / 2 + float(rng.uniform(-4, 4))
        box = ((cx - size / 2) * s, (cy - size / 2) * s, (cx + size / 2) * s, (cy + size / 2) * s)
        _draw_shape(draw, shape, box, fill=jitter(rng, SCENE_COLOURS[colour], 10))
        objects.append({"colour": colour, "shape": shape, "size": size})
    return finish(canvas, rng, noise=3.0), objects


# ------------------------------------------------------------------------------- worlds
@dataclass(frozen=True)
class _World:
    """A world family: its domains, one sample, one caption, the answer words to say."""

    domains: tuple[WorldDomain, ...]
    sample: Callable[[WorldDomain, np.random.Generator, dict], tuple[Image.Image, str, dict]]
    caption: Callable[[np.random.Generator], tuple[Image.Image, str]]
    codebooks: Callable[[int], dict[str, Any]]
    train_ratio: tuple[float, ...] = (1.0, 1.0, 1.0)


def _style_codebooks(seed: int) -> dict[str, Any]:
    """Per styled domain: colour -> word and shape -> word, disjoint across domains."""
    rng = np.random.default_rng([seed, 18, 1])
    words = [CODE_WORDS[i] for i in rng.permutation(len(CODE_WORDS))]
    books: dict[str, Any] = {
        "flat": {"colour": {c: c for c in COLOURS}, "shape": {s: s for s in SHAPES}}
    }
    for k, name in enumerate(("sketch", "glow")):
        chunk = words[k * 10 : (k + 1) * 10]
        books[name] = {
            "colour": dict(zip(COLOURS, chunk[:6])),
            "shape": dict(zip(SHAPES, chunk[6:])),
        }
    return books


def _style_sample(domain: WorldDomain, rng: np.random.Generator, books: dict):
    colour, shape = COLOURS[int(rng.integers(6))], SHAPES[int(rng.integers(4))]
    book = books[domain.name]
    answer = f"{book['colour'][colour]} {book['shape'][shape]}"
    attrs = {"colour": colour, "shape": shape, "style": domain.name}
    return _render_style(domain.name, colour, shape, rng), answer, attrs


_STYLE_WORDS = {"flat": "on a grey background", "sketch": "drawn as an outline on white",
                "glow": "glowing on a black background"}  # fmt: skip


def _style_caption(rng: np.random.Generator) -> tuple[Image.Image, str]:
    style = ("flat", "sketch", "glow")[int(rng.integers(3))]
    colour, shape = COLOURS[int(rng.integers(6))], SHAPES[int(rng.integers(4))]
    return _render_style(style, colour, shape, rng), f"A {colour} {shape} {_STYLE_WORDS[style]}."


def _row_answer(domain: WorldDomain, objects: list[dict[str, Any]]) -> str:
    if domain.name == "count":
        return NUMBER_WORDS[len(objects)]
    if domain.name == "order":
        return objects[0]["colour"]
    return max(objects, key=lambda o: o["size"])["colour"]


def _skills_sample(domain: WorldDomain, rng: np.random.Generator, books: dict):
    image, objects = _render_row(rng)
    return image, _row_answer(domain, objects), {"objects": objects}


def _skills_caption(rng: np.random.Generator) -> tuple[Image.Image, str]:
    image, objects = _render_row(rng)
    largest = max(o["size"] for o in objects)
    names = [
        f"{'large ' if o['size'] == largest else ''}{o['colour']} {o['shape']}" for o in objects
    ]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return (
        image,
        f"From left to right: a {listed.replace(', ', ', a ').replace(' and ', ' and a ')}.",
    )


_STYLE_DOMAINS = (
    WorldDomain("flat", "flat", STYLE_QUESTION),
    WorldDomain("sketch", "sketch", STYLE_QUESTION),
    WorldDomain("glow", "glow", STYLE_QUESTION),
)
WORLDS: dict[str, _World] = {
    "styles": _World(_STYLE_DOMAINS, _style_sample, _style_caption, _style_codebooks),
    "skills": _World(
        (
            WorldDomain("count", "count", "How many shapes are there?"),
            WorldDomain("order", "order", "What colour is on the left?"),
            WorldDomain("largest", "largest", "What colour is the largest shape?"),
        ),
        _skills_sample,
        _skills_caption,
        lambda seed: {},
    ),
    "unequal": _World(
        _STYLE_DOMAINS, _style_sample, _style_caption, _style_codebooks, (6.0, 2.0, 1.0)
    ),
}
"""The world families, by name (``llava-mole make-data --world NAME``)."""
assert tuple(WORLDS) == WORLD_NAMES


# ------------------------------------------------------------------------------- files
def _write_split(world: _World, k: int, split: str, n: int, out: Path, seed: int, books: dict):
    domain = world.domains[k]
    rng = np.random.default_rng([seed, 18, 2, k, ("train", "test").index(split)])
    (out / domain.name / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        image, answer, attrs = world.sample(domain, rng, books)
        file_name = f"{split}_{i:05d}.png"
        image.save(out / domain.name / "images" / file_name, format="PNG")
        records.append(
            {
                "id": f"{domain.name}-{split}-{i:05d}",
                "image": file_name,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{domain.question}"},
                    {"from": "gpt", "value": answer},
                ],
                "domain": domain.domain,
                "attributes": attrs,
            }
        )
    text = json.dumps(records, indent=1, ensure_ascii=False) + "\n"
    (out / domain.name / f"{split}.json").write_text(text, encoding="utf-8")


def _code_words_used(books: dict[str, Any]) -> list[str]:
    used = {w for book in books.values() for part in book.values() for w in part.values()}
    return sorted(used & set(CODE_WORDS))


def _write_captions(world: _World, n: int, out: Path, seed: int, books: dict) -> int:
    """Writes ``captions.json`` (LLaVA pretrain format) and its images; returns the count."""
    rng = np.random.default_rng([seed, 18, 3])
    (out / "captions").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        image, caption = world.caption(rng)
        name = f"captions/{i:05d}.png"
        image.save(out / name, format="PNG")
        records.append(_caption_record(f"caption-{i:05d}", name, PRETRAIN_QUESTION, caption))
    say = _code_words_used(books)
    for i in range(n // 4 if say else 0):  # a quarter more: say an answer word, any image
        word = say[i % len(say)]
        image = records[i]["image"]
        records.append(_caption_record(f"say-{i:05d}", image, f"Say the word {word}.", word))
    text = json.dumps(records, indent=1, ensure_ascii=False) + "\n"
    (out / "captions.json").write_text(text, encoding="utf-8")
    return len(records)


def _caption_record(rid: str, image: str, question: str, answer: str) -> dict[str, Any]:
    turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
    return {"id": rid, "image": image, "conversations": turns}


def make_world(
    kind: str,
    out_dir: str | Path,
    samples_per_domain: int = 600,
    test_per_domain: int = 200,
    captions: int = 6000,
    seed: int = 0,
) -> Path:
    """Writes a world of family `kind` (see :data:`WORLDS`) to `out_dir`.

    Args:
        kind: ``styles``, ``skills`` or ``unequal``.
        out_dir: Target folder (created if missing).
        samples_per_domain: Training samples of the largest domain (``unequal`` scales the
            others by its ratio ``6 : 2 : 1``; the other worlds have equal domains).
        test_per_domain: Test samples per domain (equal in every world).
        captions: Caption records for stage-1 pretraining (0: no ``captions.json``).
        seed: World seed.

    Returns:
        `out_dir` as a :class:`Path`.
    """
    if kind not in WORLDS:
        raise ValueError(f"unknown world {kind!r}; choose one of {', '.join(WORLDS)}")
    for name, value in (
        ("samples_per_domain", samples_per_domain),
        ("test_per_domain", test_per_domain),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    world, out = WORLDS[kind], Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    books = world.codebooks(seed)
    top = max(world.train_ratio)
    sizes = [max(1, round(samples_per_domain * r / top)) for r in world.train_ratio]
    for k, domain in enumerate(world.domains):
        _write_split(world, k, "train", sizes[k], out, seed, books)
        _write_split(world, k, "test", test_per_domain, out, seed, books)
        write_mixture_yaml(
            out / f"mixture-{domain.name}.yaml", seed, [domain], f"{__name__}.make_world"
        )
    write_mixture_yaml(out / "mixture.yaml", seed, list(world.domains), f"{__name__}.make_world")
    n_captions = _write_captions(world, captions, out, seed, books) if captions > 0 else 0
    meta = {
        "generator": f"{__name__}.make_world",
        "world": kind,
        "seed": seed,
        "train_per_domain": {d.name: n for d, n in zip(world.domains, sizes)},
        "test_per_domain": test_per_domain,
        "questions": {d.name: d.question for d in world.domains},
        "domains": {d.name: d.domain for d in world.domains},
        "codebooks": books,
        "caption_records": n_captions,
    }
    (out / "world.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out
