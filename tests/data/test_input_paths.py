"""Paths that are the wrong kind say so; repeated ids are said once; strict mode lists the samples."""

from __future__ import annotations

import json

import pytest

from llava_mole.cli import main
from llava_mole.data.formats import DataError
from llava_mole.data.mixture import DataConfigError, load_mixture, load_split
from llava_mole.data.records import load_llava_file
from llava_mole.models.loading import ModelLoadError, check_model_dir
from llava_mole.train.config import ConfigError, load_train_config


def _record(i: int, image: str | None = None, sample_id: str | None = None) -> dict:
    human = "<image>\nwhat?" if image else "what?"
    record = {
        "id": sample_id or f"s{i}",
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "a"}],
    }
    if image:
        record["image"] = image
    return record


def test_a_folder_where_a_file_belongs_is_named_as_such(tmp_path):
    (tmp_path / "mix.yaml").mkdir()
    with pytest.raises(DataConfigError, match=r"mix.yaml: is a folder, not a file"):
        load_mixture(tmp_path / "mix.yaml")
    (tmp_path / "train.json").mkdir()
    # (a folder as a mixture entry is a Hugging Face datasets folder, read as such)
    with pytest.raises(DataError, match="is a folder, not a file"):
        list(load_llava_file(tmp_path / "train.json", None))
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        load_train_config(tmp_path / "mix.yaml")
    (tmp_path / "model").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file, not a folder"):
        check_model_dir(tmp_path / "model")
    with pytest.raises(ModelLoadError, match="model directory not found"):
        check_model_dir(tmp_path / "nowhere")


def test_an_image_path_that_is_a_folder_is_a_counted_skip_saying_so(tmp_path):
    (tmp_path / "images" / "a.png").mkdir(parents=True)
    (tmp_path / "d.json").write_text(json.dumps([_record(0, "a.png")]))
    from llava_mole.data.formats import LoadReport

    report = LoadReport()
    assert load_llava_file(tmp_path / "d.json", tmp_path / "images", report=report) == []
    assert sum(report.skipped.values()) == 1
    assert "is a folder, not a file" in report.problems[0]


def test_repeated_ids_are_kept_and_said_once(tmp_path):
    records = [_record(0, sample_id="x"), _record(1, sample_id="x"), _record(2)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "mix.yaml").write_text("datasets: [{domain: a, train: d.json}]\n")
    samples, report = load_split(tmp_path / "mix.yaml")
    assert len(samples) == 3
    assert (
        len(report.warnings) == 1
        and "1 samples repeat another sample's id (first: 'x')" in report.warnings[0]
    )


def test_strict_mode_lists_the_bad_samples_on_the_command_line(tiny_world, tmp_path, capsys):
    bad = [{"id": f"b{i}", "conversations": []} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(bad + [_record(9)]))
    (tmp_path / "mix.yaml").write_text("datasets: [{domain: a, train: d.json}]\nstrict: true\n")
    (tmp_path / "cfg.yaml").write_text("{}\n")
    args = [
        f"model.path={tiny_world['model']}",
        f"data.mixture={tmp_path / 'mix.yaml'}",
        f"output_dir={tmp_path / 'o'}",
    ]
    code = main(["train", str(tmp_path / "cfg.yaml"), *[a for x in args for a in ("--set", x)]])
    err = capsys.readouterr().err
    assert code == 2
    assert "3 bad samples (strict mode" in err
    assert all(f"b{i}" in err for i in range(3)), err
