"""The demo world's class space: datasets, classes and their visual factors, code words.

Each of the three datasets (:data:`DATASETS`) decodes a class id into the factors its images
show (:func:`class_attributes`), and maps classes to code words through a seeded, per-domain
permutation of one shared vocabulary (:func:`code_permutation`): the mapping that conflicts
across domains. :mod:`llava_mole.toy.synthetic` says why; :mod:`llava_mole.toy.draw` draws.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

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
