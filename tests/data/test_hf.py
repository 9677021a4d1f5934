"""Hugging Face `datasets` entries: parquet / arrow / save_to_disk / Hub-layout folders / cache.

Every dataset is written by the test (nothing is downloaded); images are embedded in the data
(`datasets` Image feature, i.e. {bytes, path} structs) unless a test says otherwise.
"""

from __future__ import annotations

import glob
import io
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import NUM_IMAGE_TOKENS, save_image
from PIL import Image

from llava_mole.data import (
    DataConfigError,
    DataError,
    EmbeddedImage,
    Sample,
    build_datasets,
    load_split,
)
from llava_mole.data.hf import BATCH_ROWS, HFSource, open_hf_split, require_datasets
from llava_mole.data.images import load_image

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch) -> Path:
    """A private `datasets` cache, so that tests neither read nor fill the user's."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    datasets.disable_progress_bars()
    return cache


def png(colour=(200, 30, 30), size=(12, 8)) -> Image.Image:
    return Image.new("RGB", size, colour)


def qa_dataset(n: int = 4, **extra_columns) -> datasets.Dataset:
    """DocVQA-like rows: question, answers (list), image (embedded), questionId."""
    data = {
        "questionId": list(range(100, 100 + n)),
        "question": [f"what is {i} ?" for i in range(n)],
        "answers": [[f"ans {i}", f"answer {i}"] for i in range(n)],
        "image": [png((10 * i, 0, 0)) for i in range(n)],
        **extra_columns,
    }
    features = datasets.Features(
        {
            "questionId": datasets.Value("int64"),
            "question": datasets.Value("string"),
            "answers": datasets.List(datasets.Value("string")),
            "image": datasets.Image(),
            **{k: datasets.Value("string") for k in extra_columns},
        }
    )
    return datasets.Dataset.from_dict(data, features=features)


def write_mixture(tmp_path: Path, *entries: dict, **top) -> Path:
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump({**top, "datasets": list(entries)}), encoding="utf-8")
    return path


QA_COLUMNS = {"question": "question", "answers": "answers", "image": "image", "id": "questionId"}


def test_parquet_with_embedded_images_trains_without_image_files(tmp_path, processor):
    qa_dataset(5).to_parquet(str(tmp_path / "docvqa.parquet"))
    mix = write_mixture(
        tmp_path,
        {"domain": "document", "train": "docvqa.parquet", "columns": QA_COLUMNS, "metric": "anls"},
    )
    samples, report = load_split(mix, "train")
    assert report.per_domain == {"document": 5} and report.num_skipped == 0
    first = samples[0]
    assert isinstance(first.image, EmbeddedImage)
    assert first.id == "100" and first.meta == {"answers": ["ans 0", "answer 0"]}
    # the trained answer is the most common reference (tie: the first one)
    assert first.turns == [("user", "<image>\nwhat is 0 ?"), ("assistant", "ans 0")]
    assert load_image(samples[3].image).getpixel((0, 0)) == (30, 0, 0)
    assert not list(tmp_path.rglob("*.png"))  # no image was written anywhere

    dataset, _ = build_datasets(mix, processor)
    item = dataset[1]
    assert item["pixel_values"].shape == (3, 32, 32)
    assert int((item["input_ids"] == processor.image_token_id).sum()) == NUM_IMAGE_TOKENS


def test_save_to_disk_dataset_dict_with_splits_and_a_prompt_suffix(tmp_path):
    train, val = qa_dataset(3), qa_dataset(2)
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(tmp_path / "dv"))
    entry = {
        "domain": "document",
        "hf": "dv",
        "train": "train",
        "test": "validation",
        "columns": QA_COLUMNS,
        "prompt_suffix": "Answer briefly.",
    }
    mix = write_mixture(tmp_path, entry)
    train_samples, _ = load_split(mix, "train")
    test_samples, _ = load_split(mix, "test")
    assert len(train_samples) == 3 and len(test_samples) == 2
    assert test_samples[1].turns[0] == ("user", "<image>\nwhat is 1 ?\nAnswer briefly.")
    assert test_samples[1].source == f"{tmp_path / 'dv'}[validation]"
    # a split the folder does not have is one line naming it and the splits there are
    bad = write_mixture(tmp_path, {**entry, "test": "testdev"})
    with pytest.raises(DataConfigError) as info:
        load_split(bad, "test")
    assert "datasets[0].test" in str(info.value) and "validation" in str(info.value)
    assert "\n" not in str(info.value)


def test_single_split_folder_arrow_file_and_hub_layout_folder(tmp_path):
    qa_dataset(2).save_to_disk(str(tmp_path / "one"))  # save_to_disk of one split
    arrow = glob.glob(str(tmp_path / "one" / "*.arrow"))[0]
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    qa_dataset(3).to_parquet(str(hub / "train-00000-of-00001.parquet"))
    qa_dataset(1).to_parquet(str(hub / "validation-00000-of-00001.parquet"))
    mix = write_mixture(
        tmp_path,
        {"domain": "a", "test": "one", "columns": QA_COLUMNS},
        {"domain": "b", "test": arrow, "columns": QA_COLUMNS},
        {"domain": "c", "hf": "hub", "train": "train", "test": "validation"},  # auto columns
    )
    _, report = load_split(mix, "test")
    assert report.per_domain == {"a": 2, "b": 2, "c": 1}
    train, _ = load_split(mix, "train")
    assert [s.domain for s in train] == ["c"] * 3


def test_jsonl_with_columns_and_image_paths(tmp_path):
    save_image(tmp_path / "imgs" / "x.png")
    rows = [
        {"q": "what is this ?", "a": "a cat", "img": "x.png"},
        {"q": "and this ?", "a": "a dog", "img": "missing.png"},
        {"q": "text only ?", "a": "yes", "img": None},
    ]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    entry = {
        "domain": "g",
        "test": "qa.jsonl",
        "image_folder": "imgs",
        "columns": {"question": "q", "answer": "a", "image": "img"},
    }
    samples, report = load_split(write_mixture(tmp_path, entry), "test")
    assert [s.image for s in samples] == [tmp_path / "imgs" / "x.png", None]
    assert samples[1].turns[0] == ("user", "text only ?")
    assert report.skipped == {"missing_image": 1}


def messages_dataset() -> datasets.Dataset:
    def m(role, *parts):
        content = [
            {"type": "image", "text": None} if p is None else {"type": "text", "text": p}
            for p in parts
        ]
        return {"role": role, "content": content}

    rows = [
        ([m("user", None, "what is this ?"), m("assistant", "a red cat")], [png()]),
        ([m("user", "hello world"), m("assistant", "hi")], []),
        ([m("user", None, None, "two ?"), m("assistant", "no")], [png(), png()]),
        ([m("user", None, "where ?"), m("assistant", "left")], []),  # image part, no image
        ([m("system", "be brief"), m("user", "hi"), m("assistant", "yes")], []),
    ]
    features = datasets.Features(
        {
            "messages": datasets.List(
                {
                    "role": datasets.Value("string"),
                    "content": datasets.List(
                        {"type": datasets.Value("string"), "text": datasets.Value("string")}
                    ),
                }
            ),
            "images": datasets.List(datasets.Image()),
        }
    )
    return datasets.Dataset.from_dict(
        {"messages": [r[0] for r in rows], "images": [r[1] for r in rows]}, features=features
    )


def test_messages_schema_in_a_dataset(tmp_path):
    messages_dataset().to_parquet(str(tmp_path / "chat.parquet"))
    samples, report = load_split(write_mixture(tmp_path, {"domain": "c", "train": "chat.parquet"}))
    assert [s.index for s in samples] == [0, 1]
    assert samples[0].turns == [("user", "<image>\nwhat is this ?"), ("assistant", "a red cat")]
    assert isinstance(samples[0].image, EmbeddedImage) and samples[1].image is None
    assert load_image(samples[0].image).size == (12, 8)
    assert report.skipped == {
        "bad_image_field": 1,  # two images
        "image_placeholder_mismatch": 1,  # an image part but no image
        "unknown_role": 1,  # system message
    }


def test_conversations_schema_in_a_dataset(tmp_path):
    convs = [[{"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "red"}]]
    ds = datasets.Dataset.from_dict(
        {"id": ["c0"], "conversations": convs, "image": [png()]},
        features=datasets.Features(
            {
                "id": datasets.Value("string"),
                "conversations": datasets.List(
                    {"from": datasets.Value("string"), "value": datasets.Value("string")}
                ),
                "image": datasets.Image(),
            }
        ),
    )
    ds.save_to_disk(str(tmp_path / "conv"))
    samples, _ = load_split(write_mixture(tmp_path, {"domain": "c", "train": "conv"}))
    assert samples[0].id == "c0" and samples[0].turns[1] == ("assistant", "red")


def test_bad_rows_are_counted_skips(tmp_path):
    broken = {"bytes": b"\x89PNG\r\n\x1a\n" + b"\0" * 30, "path": None}
    ds = datasets.Dataset.from_dict(
        {
            "question": ["fine ?", None, "no answer ?", "broken image ?"],
            "answer": ["yes", "x", None, "y"],
            "image": [png(), png(), png(), broken],
        },
        features=datasets.Features(
            {
                "question": datasets.Value("string"),
                "answer": datasets.Value("string"),
                "image": datasets.Image(),
            }
        ),
    )
    ds.to_parquet(str(tmp_path / "bad.parquet"))
    mix = write_mixture(tmp_path, {"domain": "d", "train": "bad.parquet"})
    samples, report = load_split(mix)
    assert [s.index for s in samples] == [0]
    assert report.skipped == {"bad_turn": 1, "missing_answer": 1, "unreadable_image": 1}
    assert any("bad.parquet: sample 2" in p and "missing_answer" in p for p in report.problems)
    with pytest.raises(DataError, match="unreadable_image"):
        load_split(mix, strict=True)


def test_missing_column_is_one_line_naming_column_and_dataset(tmp_path):
    qa_dataset(2).to_parquet(str(tmp_path / "dv.parquet"))
    columns = {**QA_COLUMNS, "answers": "labels"}
    mix = write_mixture(tmp_path, {"domain": "d", "train": "dv.parquet", "columns": columns})
    with pytest.raises(DataConfigError) as info:
        load_split(mix)
    message = str(info.value)
    assert message.startswith(f"{mix}: datasets[0].train: column 'labels' (columns.answers)")
    assert str(tmp_path / "dv.parquet") in message and "its columns: questionId" in message
    assert "\n" not in message
    # a dataset whose columns make no sample at all
    datasets.Dataset.from_dict({"text": ["x"]}).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(DataConfigError, match="no 'question', 'conversations' or 'messages'"):
        load_split(write_mixture(tmp_path, {"domain": "d", "train": "t.parquet"}))
    # an unknown role in the mapping is a schema error
    caption = {"domain": "d", "train": "t.parquet", "columns": {"caption": "text"}}
    with pytest.raises(DataConfigError, match=r"datasets\[0\]\.columns\.caption: unknown key"):
        load_split(write_mixture(tmp_path, caption))


def test_cached_dataset_by_name_offline_and_a_missing_one(tmp_path, hf_cache):
    qa_dataset(2).to_parquet(str(tmp_path / "v.parquet"))
    datasets.load_dataset("parquet", data_files={"validation": str(tmp_path / "v.parquet")})
    # Lay the cached Arrow files out as `load_dataset("someone/tiny_docs")` would have.
    built = next(
        p for p in glob.glob(str(hf_cache / "parquet" / "*" / "*" / "*")) if os.path.isdir(p)
    )
    target = hf_cache / "someone___tiny_docs" / "default" / "0.0.0" / Path(built).name
    shutil.copytree(built, target)
    for f in target.glob("parquet-*"):
        f.rename(target / f.name.replace("parquet-", "tiny_docs-"))
    entry = {"domain": "d", "hf": "someone/tiny_docs", "test": "validation", "preset": "docvqa"}
    env_before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    samples, _ = load_split(write_mixture(tmp_path, entry), "test")
    assert {k: os.environ.get(k) for k in env_before} == env_before  # offline only while loading
    assert [s.id for s in samples] == ["100", "101"]
    assert samples[0].turns[0][1].endswith("\nAnswer the question using a single word or phrase.")

    missing = write_mixture(tmp_path, {**entry, "hf": "someone/not_there"})
    with pytest.raises(DataConfigError) as info:
        load_split(missing, "test")
    message = str(info.value)
    assert "someone/not_there[validation]: not a local path" in message
    assert "not in the local cache" in message and "nothing is downloaded" in message
    assert "\n" not in message


def test_missing_datasets_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataConfigError, match=r"needs the `datasets` package: pip install"):
        require_datasets()
    with pytest.raises(DataConfigError, match="pip install 'llava-mole\\[data\\]'"):
        open_hf_split(HFSource("x.parquet"))


def test_embedded_images_pickle_by_file_and_batches_cross_rows(tmp_path):
    n = BATCH_ROWS + 3  # more than one reading batch
    ds = datasets.Dataset.from_dict(
        {"question": ["q ?"] * n, "answer": [str(i) for i in range(n)], "image": [None] * n}
    )
    ds.to_parquet(str(tmp_path / "many.parquet"))
    samples, _ = load_split(write_mixture(tmp_path, {"domain": "d", "train": "many.parquet"}))
    assert [s.turns[1][1] for s in samples[-2:]] == [str(n - 2), str(n - 1)]
    assert all(s.image is None for s in samples)

    qa_dataset(2).to_parquet(str(tmp_path / "img.parquet"))
    (sample,), _ = load_split(
        write_mixture(tmp_path, {"domain": "d", "train": "img.parquet", "take": 1})
    )
    blob = pickle.dumps(sample)
    assert len(blob) < 4096  # the table pickles as its file path, not its bytes
    again = pickle.loads(blob)
    assert isinstance(again, Sample) and load_image(again.image).size == (12, 8)
    assert io.BytesIO(again.image.open().read()).getbuffer().nbytes > 0


def test_llava_json_files_keep_their_reader_whatever_their_suffix(tmp_path):
    convs = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]
    (tmp_path / "train.data").write_text(json.dumps([{"id": "a", "conversations": convs}]))
    samples, _ = load_split(write_mixture(tmp_path, {"domain": "d", "train": "train.data"}))
    assert [s.id for s in samples] == ["a"]  # a JSON list, as before: not a datasets source
    bad = {"domain": "d", "train": "train.data", "prompt_suffix": "Answer briefly."}
    with pytest.raises(DataConfigError, match="prompt_suffix: applies to question/answer"):
        load_split(write_mixture(tmp_path, bad))
