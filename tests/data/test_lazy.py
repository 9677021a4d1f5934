"""Lazy Hugging Face training data: the same items as eager reading, without per-sample objects.

`load_split` keeps only the indices of a `datasets` split's valid rows (`HFRows` in a
`SampleView`) and `InstructDataset` keeps only per-item arrays, tokenizing in ``__getitem__``;
everything observable must equal the eager path (a `Sample` per row, token ids kept). The
JSON path is pinned by `test_snapshot_synthetic.py`.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import save_image
from PIL import Image

from llava_mole.data import ModalityLengthGroupedSampler, build_datasets, load_split
from llava_mole.data import collate as collate_module
from llava_mole.data.collate import InstructDataset
from llava_mole.data.hf import BATCH_ROWS, HFRows
from llava_mole.data.selection import SampleView, select_positions, select_samples

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    datasets.disable_progress_bars()
    return cache


def _png(i: int) -> dict:
    from io import BytesIO

    buf = BytesIO()
    Image.new("RGB", (12 + i % 5, 8), (i * 7 % 255, 40, 90)).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _write(tmp_path: Path, n: int = 40) -> Path:
    """A QA parquet (embedded images, bad rows, a repeated id, long answers) and a JSONL of
    image paths, in one mixture with take / random select / repeat and truncation drops."""
    long = [" and" * 30 * (i % 7 == 3) for i in range(n)]  # no answer left within max_length
    questions = [f"what is {i}{long[i]} ?" if i % 9 else None for i in range(n)]  # None: bad_turn
    answers = [[] if i % 11 == 5 else [f"a {i}", "cat", "cat"] for i in range(n)]
    rows = {
        "qid": [str(i if i != 7 else 6) for i in range(n)],  # id 6 twice: a warning
        "question": questions,
        "answers": answers,
        "image": [None if i % 4 == 1 else _png(i) for i in range(n)],
    }
    features = {
        "qid": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")),
        "image": datasets.Image(),
    }
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(features))
    ds.to_parquet(str(tmp_path / "qa.parquet"))
    for i in range(3):
        save_image(tmp_path / "imgs" / f"{i}.png", size=(20 + i, 16))
    lines = [{"q": f"and {i} ?", "a": "a dog", "img": f"{i % 4}.png"} for i in range(8)]
    (tmp_path / "paths.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    qa = {"id": "qid", "question": "question", "answers": "answers", "image": "image"}
    entries = [
        {"domain": "doc", "train": "qa.parquet", "columns": qa, "take": 0.7, "select": "random"},
        {"domain": "img", "train": "paths.jsonl", "image_folder": "imgs", "repeat": 2,
         "columns": {"question": "q", "answer": "a", "image": "img"}},
        {"domain": "doc", "name": "again", "train": "qa.parquet", "columns": qa, "take": 5,
         "repeat": 3},
    ]  # fmt: skip
    path = tmp_path / "mix.yaml"
    path.write_text(
        yaml.safe_dump({"seed": 4, "max_length": 40, "system": "", "datasets": entries})
    )
    return path


def _fields(sample) -> tuple:
    return (sample.id, sample.turns, sample.meta, str(sample.image), sample.domain,
            sample.source, sample.index)  # fmt: skip


def _same_items(a: InstructDataset, b: InstructDataset) -> None:
    assert len(a) == len(b) > 0
    assert list(a.lengths) == list(b.lengths) and list(a.has_image) == list(b.has_image)
    assert list(a.domain_ids) == list(b.domain_ids) and a.domains == b.domains
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert set(x) == set(y) and x["domain_id"] == y["domain_id"]
        for key in ("input_ids", "labels", "pixel_values"):
            if key in x:
                assert torch.equal(x[key], y[key]), (i, key)
        assert _fields(a.sample(i)) == _fields(b.sample(i))


def test_lazy_parquet_gives_the_items_and_report_of_eager_reading(tmp_path, processor):
    mix = _write(tmp_path)
    samples, _ = load_split(mix)
    assert isinstance(samples, SampleView) and samples.lazy
    assert isinstance(samples.parts[0].table, HFRows)
    eager_samples, _ = load_split(mix, lazy=False)
    assert isinstance(eager_samples, list)
    assert [_fields(s) for s in samples] == [_fields(s) for s in eager_samples]

    lazy, lazy_report = build_datasets(mix, processor)
    eager, eager_report = build_datasets(mix, processor, lazy=False)
    assert lazy.lazy and not eager.lazy and lazy._encoded is None
    assert isinstance(lazy.lengths, np.ndarray) and isinstance(eager.lengths, list)
    for key in ("per_domain", "skipped", "problems", "warnings"):
        assert getattr(lazy_report, key) == getattr(eager_report, key), key
    skipped = lazy_report.skipped
    assert skipped["bad_turn"] and skipped["missing_answer"]
    assert skipped["no_labels_after_truncation"] >= 2  # counted as eager reading counts them
    assert any("repeat another sample's id (first: '6')" in w for w in lazy_report.warnings)
    _same_items(lazy, eager)


def test_lazy_dataset_tokenizes_in_getitem_and_replaces_failed_images(tmp_path, processor):
    lazy, _ = build_datasets(_write(tmp_path), processor)
    calls = []
    real = lazy.encoder.encode
    lazy.encoder.encode = lambda turns: calls.append(1) or real(turns)
    item = lazy[0]
    assert calls == [1] and len(item["input_ids"]) == lazy.lengths[0]
    del lazy.encoder.encode
    # a file image breaking after loading: the same counted replacement as eager datasets
    first = next(i for i in range(len(lazy)) if isinstance(lazy.sample(i).image, Path))
    lazy.sample(first).image.write_bytes(b"broken")
    replaced = lazy[first]
    assert lazy.image_failures == {"unreadable_image": 1}
    assert torch.equal(replaced["input_ids"], lazy[first + 1]["input_ids"])
    # workers get a pickled copy with the same items; the tables pickle as their files
    assert len(pickle.dumps(lazy._samples)) < 20_000
    again = pickle.loads(pickle.dumps(lazy))
    assert torch.equal(again[3]["input_ids"], lazy[3]["input_ids"])


def test_sample_view_indexing_slicing_and_scattered_reads(tmp_path):
    n = 2 * BATCH_ROWS + 10
    data = {"question": [f"q {i} ?" for i in range(n)], "answer": [str(i) for i in range(n)]}
    datasets.Dataset.from_dict(data).to_parquet(str(tmp_path / "many.parquet"))
    entry = {"domain": "d", "train": "many.parquet", "take": 0.5, "select": "random", "repeat": 2}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({"datasets": [entry]}))
    view, _ = load_split(tmp_path / "mix.yaml")
    eager, _ = load_split(tmp_path / "mix.yaml", lazy=False)
    assert len(view) == len(eager) == 2 * round(n / 2)
    answers = [s.turns[1][1] for s in eager]
    assert [s.turns[1][1] for s in view] == answers
    for k in (0, 7, len(view) // 2 + 3, -1):
        assert _fields(view[k]) == _fields(eager[k])
    assert [s.turns[1][1] for s in view[5:-5:7]] == answers[5:-5:7]
    table = view.parts[0].table
    scattered = np.array([900, 3, 3, 1500, 2, 901, 0])
    got = [s.index for s in table.iter_samples(scattered)]
    assert got == [table.sample(int(p)).index for p in scattered]
    with pytest.raises(IndexError):
        view[len(view)]


def test_selection_of_positions_matches_selection_of_samples():
    items = list(range(37))
    for take, select in (("all", "first"), (5, "random"), (0.3, "random"), (40, "first")):
        picked = select_positions(len(items), take, select, "7:x:d:train")
        assert picked.tolist() == select_samples(items, take, select, "7:x:d:train")


def test_large_lists_encode_lazily_with_the_same_items(tmp_path, processor, monkeypatch):
    mix = _write(tmp_path)
    samples, _ = load_split(mix, lazy=False)
    eager = InstructDataset(samples, processor, max_length=40)
    monkeypatch.setattr(collate_module, "LAZY_MIN_ITEMS", 10)
    lazy = InstructDataset(samples, processor, max_length=40)
    assert lazy.lazy and not eager.lazy
    assert lazy.report.skipped == eager.report.skipped and lazy.report.problems
    _same_items(lazy, eager)


def test_sampler_takes_numpy_arrays_with_the_order_of_lists():
    lengths = [(i * 37) % 50 + 1 for i in range(40)]
    images = [i % 3 != 0 for i in range(40)]
    as_lists = list(ModalityLengthGroupedSampler(lengths, images, 4, seed=3))
    as_arrays = ModalityLengthGroupedSampler(
        np.array(lengths, dtype=np.int32), np.array(images), 4, seed=3
    )
    assert list(as_arrays) == as_lists and all(type(i) is int for i in as_lists)
