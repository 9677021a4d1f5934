"""Tests of the synthetic three-domain world."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from llava_mole.toy import synthetic as S

TRAIN, TEST, CLASSES = 48, 24, 24


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return S.make_data(
        tmp_path_factory.mktemp("world"), samples_per_domain=TRAIN, test_per_domain=TEST
    )


def _load(world: Path, name: str, split: str) -> list[dict]:
    return json.loads((world / name / f"{split}.json").read_text(encoding="utf-8"))


def test_deterministic_for_seed(world: Path, tmp_path: Path) -> None:
    again = S.make_data(tmp_path / "again", samples_per_domain=TRAIN, test_per_domain=TEST)
    text_files = sorted(p.relative_to(world) for p in world.rglob("*") if p.suffix != ".png")
    assert text_files, "nothing written"
    for rel in text_files:
        if (world / rel).is_file():
            assert (world / rel).read_bytes() == (again / rel).read_bytes(), rel
    for name in S.DATASET_NAMES:
        for png in ("train_00000.png", "test_00007.png"):
            path = Path(name) / "images" / png
            assert (world / path).read_bytes() == (again / path).read_bytes()


def test_other_seed_differs(world: Path, tmp_path: Path) -> None:
    other = S.make_data(tmp_path / "other", samples_per_domain=TRAIN, test_per_domain=TEST, seed=1)
    assert (other / "scenes" / "train.json").read_bytes() != (
        world / "scenes" / "train.json"
    ).read_bytes()


def test_counts_fields_and_images(world: Path) -> None:
    for spec in S.DATASETS:
        for split, n in (("train", TRAIN), ("test", TEST)):
            samples = _load(world, spec.name, split)
            assert len(samples) == n
            assert len({s["id"] for s in samples}) == n
            assert sum(s["task"] == "natural" for s in samples) == round(n * 0.25)
            # Balanced classes: every class appears n // CLASSES or one more times.
            counts = np.bincount([s["class_id"] for s in samples], minlength=CLASSES)
            assert counts.max() - counts.min() <= 1
            for s in samples:
                assert s["domain"] == spec.domain
                human, gpt = s["conversations"]
                assert human["from"] == "human" and gpt["from"] == "gpt"
                assert human["value"].startswith("<image>\n")
                question = human["value"].split("\n", 1)[1]
                code_question = S.CODE_QUESTION  # the fixture uses the shared wording
                expected = code_question if s["task"] == "code" else spec.natural_question
                assert question == expected
        for s in _load(world, spec.name, "test")[:10]:
            with Image.open(world / spec.name / "images" / s["image"]) as img:
                assert img.size == (32, 32) and img.mode == "RGB"


def test_answers_and_permutations(world: Path) -> None:
    vocab = set(S.CODE_WORDS[:CLASSES])
    natural = {
        "scenes": set(S.SCENE_COLOURS),
        "charts": set(S.ORDINALS),
        "cells": set(list(S.CELL_STAINS)[: CLASSES // 4]),
    }
    codebooks = json.loads((world / "synthetic_world.json").read_text())["codebooks"]
    perms = []
    for spec in S.DATASETS:
        codes = S.code_permutation(spec.name, seed=0, num_classes=CLASSES)
        assert sorted(codes) == sorted(vocab) and codebooks[spec.name] == codes
        perms.append(tuple(codes))
        for s in _load(world, spec.name, "train") + _load(world, spec.name, "test"):
            answer = s["conversations"][1]["value"]
            if s["task"] == "code":
                assert answer in vocab and answer == codes[s["class_id"]]
            else:
                assert answer in natural[spec.name]
                assert answer == S.natural_answer(S.class_attributes(spec.name, s["class_id"]))
    assert len(set(perms)) == len(perms), "domain permutations must differ"
    # Even with two classes (where random orders often coincide) the domains differ.
    small = [tuple(S.code_permutation(n, seed=3, num_classes=2)) for n in S.DATASET_NAMES[:2]]
    assert small[0] != small[1]


def test_mixture_yaml(world: Path) -> None:
    mixture = yaml.safe_load((world / "mixture.yaml").read_text())
    assert mixture["seed"] == 0 and mixture["template"] == "vicuna_v1"
    assert mixture["max_length"] == 128 and mixture["image_mode"] == "resize"
    entries = mixture["datasets"]
    assert [e["name"] for e in entries] == list(S.DATASET_NAMES)
    assert [e["domain"] for e in entries] == ["general", "document", "biomedical"]
    for entry in entries:
        assert entry["take"] == "all" and entry["metric"] == "exact_match"
        for key in ("train", "test", "image_folder"):
            assert (world / entry[key]).exists(), entry[key]
        single = yaml.safe_load((world / f"mixture-{entry['name']}.yaml").read_text())
        assert single["datasets"] == [entry]


def test_classes_and_natural_answers_cover_prefix() -> None:
    # Scenes and charts: the natural-task factor varies fastest, any class prefix covers all
    # natural answers. Cells: the stain varies slowest, four classes per stain.
    assert {S.natural_answer(S.class_attributes("charts", c)) for c in range(4)} == set(S.ORDINALS)
    assert {S.natural_answer(S.class_attributes("cells", c)) for c in range(8)} == set(
        list(S.CELL_STAINS)[:2]
    )
    for spec in S.DATASETS:
        attrs = [S.class_attributes(spec.name, c) for c in range(spec.max_classes)]
        assert len({tuple(sorted(a.items())) for a in attrs}) == spec.max_classes
    with pytest.raises(ValueError):
        S.make_data("unused", num_classes=S.MAX_CLASSES + 1)


def test_natural_answers_are_words_pretraining_produces() -> None:
    # An answer word the captions never produce is learnt all-or-nothing (the old yes/no cells
    # question: 20-40 or 100-120 errors of 250 depending on the seed), which swamps the study.
    rng = np.random.default_rng(0)
    for spec in S.DATASETS:
        for class_id in range(S.MAX_CLASSES):
            _, attrs = S.render(spec.name, class_id, rng)
            caption_words = set(re.findall(r"[A-Za-z]+", S.caption_for(attrs)))
            assert S.natural_answer(attrs) in caption_words, (spec.name, class_id)


def test_images_show_the_class() -> None:
    # Cheap visibility checks: the stated colour dominates, the tallest bar is tallest.
    rng = np.random.default_rng(0)
    for class_id in range(24):
        img, attrs = S.render("scenes", class_id, rng)
        pixels = np.asarray(img, dtype=float).reshape(-1, 3)
        target = np.array(S.SCENE_COLOURS[attrs["colour"]], dtype=float)
        assert (np.abs(pixels - target).max(axis=1) < 40).mean() > 0.12
        img, attrs = S.render("charts", class_id, rng)
        # Only the tallest bar reaches the top patch row (column 0 holds the axis).
        top_row = np.asarray(img, dtype=float)[:8, 1:, :]
        bar = np.array(S.CHART_COLOURS[attrs["colour"]], dtype=float)
        columns = (np.abs(top_row - bar).max(axis=2) < 40).any(axis=0).nonzero()[0] + 1
        assert columns.size and set(columns // 8) == {attrs["tallest"]}


def test_captions_plain_and_code_free() -> None:
    words = set(S.corpus_words())
    codes = set(S.CODE_WORDS)
    seen = set()
    for _, caption, name in S.caption_examples(60, seed=0):
        tokens = re.findall(r"[A-Za-z]+", caption)
        assert set(tokens) <= words, caption
        assert not codes & {t.lower() for t in tokens}, caption
        seen.add(name)
    assert seen == set(S.DATASET_NAMES)
    img, attrs = S.render("cells", 3, np.random.default_rng(1))
    assert "dense" in S.caption_for(attrs) and "large" in S.caption_for(attrs)


def test_caption_examples_counts_and_class_space() -> None:
    examples = list(S.caption_examples({"scenes": 6, "cells": 2}, seed=0, max_classes=24))
    assert [name for _, _, name in examples].count("scenes") == 6
    assert [name for _, _, name in examples].count("cells") == 2
    assert all(name != "charts" for _, _, name in examples)
    # Class space capped at 24: scenes only ever show the first three shapes.
    shapes = set(S.SCENE_SHAPES[:3])
    for _, caption, _ in S.caption_examples({"scenes": 40}, seed=1, max_classes=24):
        assert any(shape in caption for shape in shapes), caption


def test_domain_code_questions(tmp_path: Path) -> None:
    out = S.make_data(
        tmp_path / "dq",
        samples_per_domain=12,
        test_per_domain=4,
        num_classes=4,
        code_questions="domain",
    )
    questions = {spec.code_question for spec in S.DATASETS}
    assert len(questions) == len(S.DATASETS) and S.CODE_QUESTION not in questions
    for spec in S.DATASETS:
        for s in _load(out, spec.name, "train"):
            if s["task"] == "code":
                assert s["conversations"][0]["value"] == f"<image>\n{spec.code_question}"
    world = json.loads((out / "synthetic_world.json").read_text())
    assert world["code_questions"] == {s.name: s.code_question for s in S.DATASETS}
    # every word of the domain questions is in the tokenizer's vocabulary corpus
    words = set(S.corpus_words())
    for q in questions:
        assert set(re.findall(r"[A-Za-z]+", q)) <= words
    with pytest.raises(ValueError, match="code_questions"):
        S.make_data(tmp_path / "bad", samples_per_domain=4, test_per_domain=2, code_questions="x")


def test_domain_code_answers(tmp_path: Path) -> None:
    kwargs = dict(samples_per_domain=12, test_per_domain=4, num_classes=4, seed=3)
    plain = S.make_data(tmp_path / "plain", **kwargs)
    prefixed = S.make_data(tmp_path / "prefixed", code_answers="domain", **kwargs)
    subjects = {spec.name: spec.subject for spec in S.DATASETS}
    assert sorted(subjects.values()) == ["chart", "shape", "slide"]
    for spec in S.DATASETS:
        for split in ("train", "test"):
            a, b = _load(plain, spec.name, split), _load(prefixed, spec.name, split)
            assert [s["class_id"] for s in a] == [s["class_id"] for s in b]
            for x, y in zip(a, b, strict=True):
                answer, domain_answer = (
                    x["conversations"][1]["value"],
                    y["conversations"][1]["value"],
                )
                if x["task"] == "code":  # same code word, after the domain's subject
                    assert answer in S.CODE_WORDS
                    assert domain_answer == f"{spec.subject} {answer}"
                else:  # natural answers are consistent across domains: no prefix
                    assert domain_answer == answer
    world = json.loads((prefixed / "synthetic_world.json").read_text())
    assert world["code_answer_prefixes"] == {k: f"{v} " for k, v in subjects.items()}
    assert set(subjects.values()) <= set(S.corpus_words())
    with pytest.raises(ValueError, match="code_answers"):
        S.make_data(tmp_path / "bad", samples_per_domain=4, test_per_domain=2, code_answers="x")
