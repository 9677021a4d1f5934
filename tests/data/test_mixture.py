"""Mixture YAML: schema validation, exact per-domain counts, determinism, drops, strict mode."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
from conftest import record, save_image, write_json

from llava_mole.data import (
    KNOWN_METRICS,
    DataConfigError,
    DataError,
    build_datasets,
    load_mixture,
    load_split,
)
from llava_mole.data.mixture import MixtureConfig, take_count
from llava_mole.data.mixture_schema import MixtureSettings
from llava_mole.data.templates import VICUNA_V1_SYSTEM


def write_yaml(tmp_path: Path, text: str, name: str = "mixture.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


MIXTURE = """
seed: 7
template: chat_template
max_length: 128
datasets:
  - {domain: science, train: a.json, test: a.json, image_folder: images, take: 3, select: first}
  - {domain: ocr, train: b.json, image_folder: images, take: 4, select: random, metric: anls}
  - {domain: chart, train: c.json, image_folder: images, take: 0.25, test: c.json, test_take: 2}
  - {domain: science, name: a_again, train: d.json, image_folder: images, repeat: 3}
"""


@pytest.fixture
def mixture(tmp_path, make_dataset) -> Path:
    for name, n in (("a", 10), ("b", 10), ("c", 10), ("d", 4)):
        make_dataset(name, n)
    return write_yaml(tmp_path, MIXTURE)


def test_config_values_and_domain_order(mixture):
    cfg = load_mixture(mixture)
    assert cfg.seed == 7 and cfg.template == "chat_template" and cfg.max_length == 128
    assert cfg.image_mode == "pad" and cfg.strict is False
    assert cfg.domains == ["science", "ocr", "chart"]
    assert cfg.metrics == {"science": "exact_match", "ocr": "anls", "chart": "exact_match"}
    assert [d.name for d in cfg.datasets] == ["a.json", "b.json", "c.json", "a_again"]
    assert cfg.datasets[0].train == mixture.parent / "a.json"
    assert cfg.datasets[1].test is None


def test_per_domain_counts_follow_the_config(mixture, processor):
    dataset, report = build_datasets(mixture, processor)
    # science: 3 first of a + 4 of d repeated 3 times; ocr: 4; chart: round(0.25 * 10) = 3
    assert report.per_domain == {"science": 15, "ocr": 4, "chart": 3}
    assert not report.skipped and not report.problems
    assert len(dataset) == 22 and dataset.domains == ["science", "ocr", "chart"]
    ids = [dataset.sample(i).id for i in range(len(dataset))]
    assert ids[:3] == ["a-0", "a-1", "a-2"]
    assert ids[10:] == ["d-0", "d-1", "d-2", "d-3"] * 3
    assert ids[7:10] == ["c-0", "c-1", "c-2"]  # select: first is the default
    ocr = ids[3:7]
    assert len(set(ocr)) == 4 and all(i.startswith("b-") for i in ocr)
    assert ocr == sorted(ocr, key=lambda s: int(s[2:]))  # random subset kept in file order
    assert dataset.domain_ids == [0] * 3 + [1] * 4 + [2] * 3 + [0] * 12
    assert dataset[3]["domain_id"] == 1


def test_selection_is_deterministic_and_seeded(mixture, processor):
    def ocr_ids(seed=None):
        samples, _ = load_split(mixture, "train", seed=seed)
        return [s.id for s in samples if s.domain == "ocr"]

    assert ocr_ids() == ocr_ids() == ocr_ids(seed=7)
    assert any(ocr_ids(seed=s) != ocr_ids() for s in range(1, 4))
    first, _ = build_datasets(mixture, processor)
    second, _ = build_datasets(mixture, processor)
    assert [x.id for x in map(first.sample, range(len(first)))] == [
        x.id for x in map(second.sample, range(len(second)))
    ]
    assert all((first[i]["input_ids"] == second[i]["input_ids"]).all() for i in range(len(first)))


def test_test_split_uses_test_take_and_no_repeat(mixture, processor):
    dataset, report = build_datasets(mixture, processor, split="test")
    assert report.per_domain == {"science": 10, "ocr": 0, "chart": 2}
    assert dataset.domains == ["science", "ocr", "chart"]  # stable ids across splits
    with pytest.raises(DataConfigError, match="split must be one of"):
        load_split(mixture, "validation")


@pytest.mark.parametrize(
    ("take", "available", "expected"),
    [("all", 7, 7), (3, 7, 3), (30, 7, 7), (0.5, 7, 4), (0.25, 10, 3), (0.01, 10, 1), (1.0, 9, 9)],
)
def test_take_count(take, available, expected):
    assert take_count(take, available) == expected


def test_take_larger_than_data_is_a_warning(tmp_path, make_dataset):
    make_dataset("a", 3)
    path = write_yaml(
        tmp_path, "datasets: [{domain: x, train: a.json, image_folder: images, take: 5}]"
    )
    samples, report = load_split(path)
    assert len(samples) == 3 and "take 5 but only 3 valid samples" in report.warnings[0]


ERRORS = [
    (
        "datasets: [{domain: a, train: a.json}, {domain: b, train: a.json, take: -3}]",
        "datasets[1].take: expected 'all', an integer >= 1 or a fraction in (0, 1] (got -3)",
    ),
    ("datasets: [{domain: a, train: a.json, take: 1.5}]", "datasets[0].take: expected 'all'"),
    ("datasets: [{domain: a, train: a.json, take: true}]", "datasets[0].take: expected 'all'"),
    ("datasets: [{domain: a, train: a.json, take: some}]", "got 'some'"),
    (
        "datasets: [{domain: a, train: a.json, repeat: 0}]",
        "datasets[0].repeat: must be >= 1 (got 0)",
    ),
    (
        "datasets: [{domain: a, train: a.json, repeat: '2'}]",
        "datasets[0].repeat: expected an integer (got '2')",
    ),
    (
        "datasets: [{domain: a, train: a.json, select: last}]",
        "datasets[0].select: must be one of 'first' or 'random' (got 'last')",
    ),
    (
        "datasets: [{domain: a, train: a.json, metric: bleu}]",
        "datasets[0].metric: must be one of 'exact_match', 'vqa_accuracy'",
    ),
    (
        "datasets: [{domain: a, train: a.json, test_take: 0}]",
        "datasets[0].test_take: expected 'all'",
    ),
    ("datasets: [{domain: a, train: a.json, colour: red}]", "datasets[0].colour: unknown key"),
    ("datasets: [{train: a.json}]", "datasets[0].domain: required"),
    ("datasets: [{domain: '', train: a.json}]", "datasets[0].domain: expected a non-empty string"),
    ("datasets: [{domain: a, train: 3}]", "datasets[0].train: expected a non-empty string (got 3)"),
    (
        "datasets: [{domain: a, image_folder: img}]",
        "datasets[0]: needs a 'train' and/or a 'test' file",
    ),
    ("datasets: [a.json]", "datasets[0]: expected a mapping"),
    ("datasets: []", "datasets: expected a non-empty list"),
    ("seed: 1", "datasets: required"),
    ("datasets: [{domain: a, train: a.json}]\nepochs: 3", "epochs: unknown key"),
    ("datasets: [{domain: a, train: a.json}]\nseed: '1'", "seed: expected an integer (got '1')"),
    (
        "datasets: [{domain: a, train: a.json}]\ntemplate: llama",
        "template: must be one of 'vicuna_v1', 'chat_template' or 'plain' (got 'llama')",
    ),
    (
        "datasets: [{domain: a, train: a.json}]\nsystem: 3",
        "system: expected a string ('' for none) (got 3)",
    ),
    (
        "datasets: [{domain: a, train: a.json}]\ntemplate: chat_template\nsystem: hi",
        "system: only the vicuna_v1 template takes a system prompt",
    ),
    (
        "datasets: [{domain: a, train: a.json}]\nmax_length: 0",
        "max_length: must be >= 1 (got 0)",
    ),
    (
        "datasets: [{domain: a, train: a.json}]\nmax_length: true",
        "max_length: expected an integer (got True)",
    ),
    (
        "datasets: [{domain: a, train: a.json}]\nimage_mode: crop",
        "image_mode: must be one of 'pad' or 'resize' (got 'crop')",
    ),
    (
        "datasets: [{domain: a, train: a.json}]\nstrict: yes please",
        "strict: expected true/false (got 'yes please')",
    ),
    (
        "datasets: [{domain: a, train: a.json}, {domain: a, train: a.json, metric: anls}]",
        "datasets[1].metric: domain 'a' already uses metric 'exact_match' (got 'anls')",
    ),
    ("datasets: [{domain: a, train: a.json, tkae: 3}]", "datasets[0].tkae: unknown key (did you"),
    ("seed: 1\ndatasets:", "datasets: expected a non-empty list (got None)"),
    ("datasets: [{domain: a, train: a.json, take: '0.5'}]", "datasets[0].take: expected 'all'"),
    ("datasets: [{domain: a, train: a.json, take: null}]", "datasets[0].take: expected 'all'"),
    ("datasets: [{domain: a, train: a.json, name: null}]", "datasets[0].name: expected a non-emp"),
    ("datasets: [{domain: a, hf: null, test: t}]", "datasets[0].hf: expected a non-empty string"),
    ("datasets: [{domain: a, hf: x}]", "datasets[0]: needs a 'train' and/or a 'test' split name"),
    (
        "datasets: [{domain: a, train: a.json, hf_config: c}]",
        "datasets[0].hf_config: only an 'hf' entry takes a config name",
    ),
    (
        "datasets: [{domain: a, train: a.parquet, columns: {questoin: q}}]",
        "datasets[0].columns.questoin: unknown key (did you mean 'question'?)",
    ),
    (
        "datasets: [{domain: a, train: a.parquet, columns: {}}]",
        "datasets[0].columns: expected a mapping of role: column (got {})",
    ),
    (
        "datasets: [{domain: a, train: a.parquet, columns: {image: 3}}]",
        "datasets[0].columns.image: expected a non-empty string (got 3)",
    ),
    (
        "datasets: [{domain: a, train: a.parquet, preset: coco}]",
        "datasets[0].preset: must be one of 'vqav2', 'textvqa', 'docvqa', 'chartqa' or 'pathvqa'",
    ),
    (
        "datasets: [{domain: a, train: a.parquet, prompt_suffix: 3}]",
        "datasets[0].prompt_suffix: expected a string (got 3)",
    ),
    ("datasets: [{domain: a, train: a.json}]\nsystem: null", "system: expected a string ('' for"),
    ("datasets: [{domain: a, train: a.json}]\nseed: null", "seed: must not be null"),
    ("- a\n- b", "expected a mapping with a 'datasets' list"),
    ("datasets: [{domain: a", "invalid YAML at line"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_config_errors_are_one_line_and_name_the_key(tmp_path, text, message):
    path = write_yaml(tmp_path, text)
    with pytest.raises(DataConfigError) as info:
        load_mixture(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_the_top_level_settings_are_declared_once():
    # MixtureConfig inherits MixtureSettings: a key of the YAML is an attribute, same default.
    settings = [f.name for f in dataclasses.fields(MixtureSettings)]
    assert settings == ["seed", "template", "system", "max_length", "image_mode", "strict"]
    assert [f.name for f in dataclasses.fields(MixtureConfig)] == [*settings, "path", "datasets"]
    cfg = MixtureConfig(path=Path("m.yaml"), datasets=[])
    assert (cfg.seed, cfg.template, cfg.system, cfg.max_length) == (0, "vicuna_v1", None, 2048)


def test_hf_entries_presets_and_nulls(tmp_path):
    (tmp_path / "local").mkdir()
    path = write_yaml(
        tmp_path,
        """
        datasets:
          - {domain: a, hf: local, train: tr, test: null, preset: docvqa}
          - {domain: b, hf: someone/docs, hf_config: en, test: val, preset: docvqa,
             prompt_suffix: null, metric: exact_match}
          - {domain: c, test: t.parquet, image_folder: null, prompt_suffix: '',
             columns: {question: q, image: null, answer: a}}
        """,
    )
    local, cached, columns = load_mixture(path).datasets
    assert (local.hf, local.train_split, local.test_split) == (str(tmp_path / "local"), "tr", None)
    assert local.train is None and local.name == "local"
    assert local.metric == "anls" and local.prompt_suffix.startswith("Answer the question")
    assert (cached.hf, cached.hf_config, cached.name) == ("someone/docs", "en", "someone/docs")
    assert cached.metric == "exact_match" and cached.prompt_suffix is None  # null: no suffix
    assert columns.test == tmp_path / "t.parquet" and columns.image_folder is None
    assert columns.prompt_suffix is None and columns.preset is None
    assert list(columns.columns.items()) == [("question", "q"), ("image", None), ("answer", "a")]


def test_known_metrics():
    assert KNOWN_METRICS == ("exact_match", "vqa_accuracy", "anls", "relaxed_accuracy", "pathvqa")


def test_missing_files_name_the_path(tmp_path, make_dataset, processor):
    with pytest.raises(DataConfigError, match=r"mixture file not found: .*nope\.yaml"):
        load_mixture(tmp_path / "nope.yaml")
    path = write_yaml(tmp_path, "datasets: [{domain: a, train: missing.json}]")
    with pytest.raises(DataConfigError) as info:
        build_datasets(path, processor)
    assert str(info.value) == (
        f"{path}: datasets[0].train: file not found: {tmp_path / 'missing.json'}"
    )
    make_dataset("a", 2)
    path = write_yaml(tmp_path, "datasets: [{domain: a, train: a.json, image_folder: pics}]")
    with pytest.raises(
        DataConfigError, match=r"datasets\[0\]\.image_folder: folder not found: .*pics"
    ):
        build_datasets(path, processor)


def test_default_image_folder_is_the_json_folder(tmp_path, processor):
    save_image(tmp_path / "data" / "x.png")
    write_json(tmp_path / "data" / "a.json", [record("a", "x.png")])
    path = write_yaml(tmp_path, "datasets: [{domain: a, train: data/a.json}]")
    dataset, report = build_datasets(path, processor)
    assert report.per_domain == {"a": 1} and dataset[0]["pixel_values"].shape == (3, 32, 32)


def _mixed_dataset(tmp_path: Path) -> None:
    save_image(tmp_path / "images" / "x.png")
    save_image(tmp_path / "x.png")
    write_json(
        tmp_path / "a.json",
        [
            record("text", turns=[("human", "hello"), ("gpt", "a red cat")]),
            record("img", "x.png"),
            record("img2", "x.png"),
            record("bad", "../x.png"),
        ],
    )


@pytest.mark.parametrize(
    ("max_length", "reason"), [(20, "no_labels_after_truncation"), (10, "image_tokens_truncated")]
)
def test_truncation_drops_are_counted(tmp_path, processor, max_length, reason):
    # chat_template: "<s> <|user|> hello <|assistant|> a red cat </s>" is 8 tokens; image samples
    # have 16 image tokens starting at position 2
    _mixed_dataset(tmp_path)
    path = write_yaml(
        tmp_path,
        f"""
        template: chat_template
        max_length: {max_length}
        datasets: [{{domain: a, train: a.json, image_folder: images, repeat: 2}}]
        """,
    )
    dataset, report = build_datasets(path, processor)
    assert report.per_domain == {"a": 2}  # the text sample, twice
    assert report.skipped == {"image_path_outside_root": 1, reason: 2}  # counted per sample
    assert all("pixel_values" not in dataset[i] for i in range(len(dataset)))
    assert any("id='img'" in p and reason in p for p in report.problems)
    with pytest.raises(DataError, match=reason):
        build_datasets(path, processor, strict=True)


def test_strict_mode_from_yaml_and_override(tmp_path, processor):
    _mixed_dataset(tmp_path)
    path = write_yaml(
        tmp_path, "strict: true\ndatasets: [{domain: a, train: a.json, image_folder: images}]"
    )
    with pytest.raises(DataError, match=r"a\.json: sample 3 \(id='bad'\): image_path_outside_root"):
        build_datasets(path, processor)
    dataset, report = build_datasets(path, processor, strict=False)
    assert len(dataset) == 3 and report.skipped == {"image_path_outside_root": 1}
    assert "skipped (image_path_outside_root): 1" in report.summary()
    dataset, report = build_datasets(path, processor, strict=False, allow_outside_images=True)
    assert len(dataset) == 4 and not report.skipped


def test_verification_can_be_skipped(tmp_path, processor):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(b"not a png")
    write_json(tmp_path / "a.json", [record("img", "x.png")])
    path = write_yaml(tmp_path, "datasets: [{domain: a, train: a.json, image_folder: images}]")
    _, report = build_datasets(path, processor)
    assert report.skipped == {"unreadable_image": 1}
    dataset, report = build_datasets(path, processor, verify_images=False)
    assert len(dataset) == 1 and not report.skipped


def test_system_prompt_of_the_mixture_reaches_the_dataset(mixture, processor):
    text = mixture.read_text().replace("template: chat_template", "template: vicuna_v1")
    default = write_yaml(mixture.parent, text)
    dataset, _ = build_datasets(default, processor)
    assert load_mixture(default).system is None
    without = mixture.parent / "no_system.yaml"
    without.write_text(text + "\nsystem: ''\n")
    assert load_mixture(without).system == ""
    bare, _ = build_datasets(without, processor)
    long_ids, short_ids = dataset[0]["input_ids"].tolist(), bare[0]["input_ids"].tolist()
    system_ids = processor.tokenizer(VICUNA_V1_SYSTEM, add_special_tokens=False)["input_ids"]
    assert len(long_ids) - len(short_ids) == len(system_ids)
    assert long_ids[1 : 1 + len(system_ids)] == system_ids
    assert short_ids[1:] == long_ids[1 + len(system_ids) :]
