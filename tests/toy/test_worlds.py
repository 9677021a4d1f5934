"""The worlds the study was not tuned for: files, answers, captions and their pretraining."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from llava_mole.cli import main
from llava_mole.data.mixture import load_split
from llava_mole.toy import WORLD_NAMES
from llava_mole.toy.synthetic import CODE_WORDS, NUMBER_WORDS
from llava_mole.toy.tiny import MARKER_FILE, cache_key, make_tiny
from llava_mole.toy.worlds import WORLDS, make_world


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def _records(world: Path, dataset: str, split: str = "train") -> list[dict]:
    return json.loads((world / dataset / f"{split}.json").read_text())


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("worlds")
    return {
        kind: make_world(kind, root / kind, samples_per_domain=36, test_per_domain=6, captions=40)
        for kind in WORLD_NAMES
    }


def test_every_world_is_byte_identical_for_a_seed_and_differs_across_seeds(worlds, tmp_path):
    again = make_world(
        "skills", tmp_path / "a", samples_per_domain=36, test_per_domain=6, captions=40
    )
    other = make_world("skills", tmp_path / "b", 36, 6, 40, seed=1)
    assert _digest(again) == _digest(worlds["skills"])
    assert _digest(other) != _digest(worlds["skills"])


@pytest.mark.parametrize("kind", WORLD_NAMES)
def test_each_world_loads_as_a_mixture_with_its_domain_sizes(worlds, kind):
    world = worlds[kind]
    samples, report = load_split(world / "mixture.yaml", "train")
    expected = {"unequal": [36, 12, 6]}.get(kind, [36, 36, 36])
    domains = [d.domain for d in WORLDS[kind].domains]
    assert [report.per_domain[d] for d in domains] == expected
    assert not report.skipped
    test, _ = load_split(world / "mixture.yaml", "test")
    assert len(test) == 18 and all(s.has_image for s in samples)


def test_skills_answers_follow_the_drawn_objects(worlds):
    world = worlds["skills"]
    for dataset, answer in (
        ("count", lambda objs: NUMBER_WORDS[len(objs)]),
        ("order", lambda objs: objs[0]["colour"]),
        ("largest", lambda objs: max(objs, key=lambda o: o["size"])["colour"]),
    ):
        records = _records(world, dataset)
        for r in records:
            assert r["conversations"][1]["value"] == answer(r["attributes"]["objects"])
        # The skill is needed: the answer is not constant over the domain.
        assert len({r["conversations"][1]["value"] for r in records}) > 1


def test_styles_domains_name_the_same_objects_with_disjoint_vocabularies(worlds):
    world = worlds["styles"]
    books = json.loads((world / "world.json").read_text())["codebooks"]
    words = {
        name: set(book["colour"].values()) | set(book["shape"].values())
        for name, book in books.items()
    }
    assert not words["sketch"] & words["glow"] and not words["flat"] & words["sketch"]
    for dataset in ("flat", "sketch", "glow"):
        for r in _records(world, dataset):
            attrs, book = r["attributes"], books[dataset]
            expected = f"{book['colour'][attrs['colour']]} {book['shape'][attrs['shape']]}"
            assert r["conversations"][1]["value"] == expected
            assert r["conversations"][0]["value"] == "<image>\nWhat is in the image?"


def test_captions_never_contain_a_code_word_and_every_answer_word_is_said(worlds):
    records = json.loads((worlds["styles"] / "captions.json").read_text())
    captions = [r for r in records if r["id"].startswith("caption-")]
    said = {r["conversations"][1]["value"] for r in records if r["id"].startswith("say-")}
    assert len(captions) == 40 and said
    for r in captions:
        assert not set(r["conversations"][1]["value"].rstrip(".").split()) & set(CODE_WORDS)
        assert (worlds["styles"] / r["image"]).is_file()
    books = json.loads((worlds["styles"] / "world.json").read_text())["codebooks"]
    used = {w for b in books.values() for part in b.values() for w in part.values()}
    assert said <= used & set(CODE_WORDS)


def test_bad_captions_records_are_one_line_errors_naming_the_record(tmp_path):
    from transformers import AutoProcessor

    from llava_mole.toy.pretrain import caption_file_sets

    tiny = make_tiny(tmp_path / "tiny", pretrain=False, progress=False)
    processor = AutoProcessor.from_pretrained(tiny)
    path = tmp_path / "captions.json"
    path.write_text(
        json.dumps([{"image": "x.png", "conversations": [{"from": "human", "value": "hi"}]}])
    )
    with pytest.raises(ValueError, match=r"record 0: needs 'conversations'") as err:
        caption_file_sets(processor, path, heldout=4)
    assert "\n" not in str(err.value)
    path.write_text("[")
    with pytest.raises(ValueError, match="cannot read captions file"):
        caption_file_sets(processor, path, heldout=4)


def test_make_tiny_pretrains_on_a_worlds_captions(worlds, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLAVA_MOLE_CACHE", str(tmp_path / "cache"))
    captions = worlds["skills"] / "captions.json"
    out = tmp_path / "tiny"
    assert main(["make-tiny", str(out), "--captions", str(captions), "--pretrain-steps", "3"]) == 0
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["pretrain_captions"] == str(captions.resolve())
    assert marker["cache_key"] == cache_key(0, 3, captions) != cache_key(0, 3)
    assert marker["heldout_caption_loss_final"] < marker["heldout_caption_loss_init"]
    assert (
        main(
            ["make-tiny", str(tmp_path / "x"), "--captions", str(tmp_path), "--pretrain-steps", "3"]
        )
        == 2
    )
    assert "is a folder, not a file" in capsys.readouterr().err


def test_make_data_writes_a_world_and_refuses_demo_only_options(tmp_path, capsys):
    assert main(["make-data", str(tmp_path / "w"), "--world", "unequal", "--samples-per-domain", "12",
                 "--test-per-domain", "2", "--captions", "0"]) == 0  # fmt: skip
    meta = json.loads((tmp_path / "w" / "world.json").read_text())
    assert meta["train_per_domain"] == {"flat": 12, "sketch": 4, "glow": 2}
    assert not (tmp_path / "w" / "captions.json").exists()
    assert (
        main(["make-data", str(tmp_path / "v"), "--world", "skills", "--code-answers", "domain"])
        == 2
    )
    assert "--code-answers is an option of the demo world" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()
