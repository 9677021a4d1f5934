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
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from .classes import (
    CELL_STAINS,
    CHART_COLOURS,
    CODE_QUESTION,
    CODE_WORDS,
    DATASET_NAMES,
    DATASETS,
    DOMAIN_OF,
    MAX_CLASSES,
    NUMBER_WORDS,
    ORDINALS,
    PRETRAIN_QUESTION,
    SCENE_COLOURS,
    SCENE_SHAPES,
    DatasetSpec,
    _check_num_classes,
    class_attributes,
    code_permutation,
    dataset_spec,
    natural_answer,
)
from .draw import IMAGE_SIZE, render

__all__ = [
    "CELL_STAINS",
    "CHART_COLOURS",
    "CODE_QUESTION",
    "CODE_WORDS",
    "DATASETS",
    "DATASET_NAMES",
    "DOMAIN_OF",
    "IMAGE_SIZE",
    "MAX_CLASSES",
    "NUMBER_WORDS",
    "ORDINALS",
    "PRETRAIN_QUESTION",
    "SCENE_COLOURS",
    "SCENE_SHAPES",
    "DatasetSpec",
    "caption_examples",
    "caption_for",
    "class_attributes",
    "code_permutation",
    "corpus_words",
    "dataset_spec",
    "make_data",
    "natural_answer",
    "render",
    "write_mixture_yaml",
]

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


def _height_word(height: int) -> str:
    return "short" if height < 9 else ("medium" if height < 17 else "tall")


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
