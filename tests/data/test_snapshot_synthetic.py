"""`build_datasets` on the synthetic world matches a recorded snapshot exactly.

The snapshot (``snapshots/synthetic_build_datasets.json``) was written before the
Hugging Face training data became lazy, so this test pins the LLaVA JSON path (and small data):
every item's ``input_ids``, ``labels``, ``domain_id``, sample id, image and pixel values, the
dataset's ``lengths`` / ``has_image`` / ``domain_ids`` and the whole report (per-domain counts,
skip counts, problem lines, warnings) for the synthetic demo mixture and for a variant with
take / random select / repeat, truncation drops and bad records.

The data come from ``make_data(..., samples_per_domain=24, test_per_domain=6, seed=0)`` and the
tokenizer from the tiny model (`llava_mole.toy.tiny`); the snapshot records fingerprints of
both, so that a deliberate change there fails with a message saying so rather than a diff of
token ids. Regenerate (only after such a deliberate change) with::

    python tests/data/test_snapshot_synthetic.py --write
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

SNAPSHOT = Path(__file__).parent / "snapshots" / "synthetic_build_datasets.json"

# The demo mixture with selection, repeats, a short max_length (truncation drops) and a file of
# bad records (counted skips, a duplicate id warning, a take larger than the data).
VARIANT = """
seed: 3
template: vicuna_v1
system: ''
max_length: 31
image_mode: pad
datasets:
  - {name: scenes, domain: general, train: scenes/train.json, image_folder: scenes/images,
     take: 0.5, select: random, repeat: 2}
  - {name: charts, domain: document, train: charts/train.json, image_folder: charts/images,
     take: 10, select: random}
  - {name: cells, domain: biomedical, train: cells/train.json, image_folder: cells/images}
  - {name: bad, domain: general, train: bad.jsonl, image_folder: cells/images, take: 50,
     repeat: 3}
"""


def _bad_records(data: Path) -> list[str]:
    good = json.loads((data / "cells" / "train.json").read_text(encoding="utf-8"))
    long_answer = " ".join(["tango"] * 30)
    records: list[Any] = [
        good[0],
        {**good[1], "id": good[0]["id"]},  # a repeated id: kept, warned once
        {**good[2], "conversations": [{"from": "human", "value": "hello"}]},  # no answer turn
        {**good[3], "image": "missing.png"},  # missing_image
        {
            "id": "text",
            "conversations": [
                {"from": "human", "value": "why ?"},
                {"from": "gpt", "value": "because"},
            ],
        },
        {
            "id": "long",
            "conversations": [
                {"from": "human", "value": "why ?"},
                {"from": "gpt", "value": long_answer},
            ],
        },
        {**good[4], "conversations": [{"from": "robot", "value": "x"}]},  # unknown_role
        [1, 2],  # not_a_dict
        good[5],
    ]
    lines = [json.dumps(r) for r in records]
    lines.insert(3, "{not json")  # bad_json_line
    return lines


HF_VARIANT = """
seed: 5
max_length: 34
system: ''
image_mode: resize
datasets:
  - {name: scenes-hf, domain: general, train: scenes.parquet, take: 0.5, select: random,
     repeat: 2}
  - {name: charts-hf, domain: document, train: charts.parquet, take: 20, select: first,
     columns: {id: qid, question: question, answers: answers, image: image},
     prompt_suffix: Short.}
  - {name: cells, domain: biomedical, train: cells/train.json, image_folder: cells/images,
     take: 7}
"""


def _hf_parquets(data: Path) -> None:
    """The scenes (conversations schema) and charts (question/answers) splits as parquet
    files with embedded images, plus bad rows."""
    import datasets

    def load(name: str) -> list[dict[str, Any]]:
        return json.loads((data / name / "train.json").read_text(encoding="utf-8"))

    def image(name: str, rec: dict[str, Any]) -> dict[str, Any]:
        return {"bytes": (data / name / "images" / rec["image"]).read_bytes(), "path": None}

    scenes = load("scenes")
    turns = datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")})
    rows = {
        "id": [r["id"] for r in scenes] + ["bad-one-turn", "bad-no-image-tag"],
        "conversations": [r["conversations"] for r in scenes]
        + [scenes[0]["conversations"][:1], [{"from": "human", "value": "what ?"}] * 2],
        "image": [image("scenes", r) for r in scenes] + [image("scenes", scenes[0])] * 2,
    }
    features = {"id": datasets.Value("string"), "conversations": turns, "image": datasets.Image()}
    datasets.Dataset.from_dict(rows, features=datasets.Features(features)).to_parquet(
        str(data / "scenes.parquet")
    )
    charts = load("charts")
    rows = {
        "qid": list(range(len(charts))) + [900, 901],
        "question": [r["conversations"][0]["value"].split("\n", 1)[1] for r in charts]
        + ["what ?", "what ?"],
        "answers": [[r["conversations"][1]["value"]] * 2 for r in charts] + [[], ["x"]],
        "image": [image("charts", r) for r in charts] + [image("charts", charts[0]), None],
    }
    features = {
        "qid": datasets.Value("int64"),
        "question": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")),
        "image": datasets.Image(),
    }
    datasets.Dataset.from_dict(rows, features=datasets.Features(features)).to_parquet(
        str(data / "charts.parquet")
    )


def _sha(values: Any) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()[:20]


def _relative(text: str, root: Path) -> str:
    return text.replace(str(root), "<root>")


def _fingerprints(model: Path, data: Path) -> dict[str, str]:
    def digest(root: Path, paths: list[Path]) -> str:
        h = hashlib.sha256()
        for p in sorted(paths):
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
        return h.hexdigest()[:20]

    text_files = [p for p in data.rglob("*") if p.is_file() and p.suffix != ".png"]
    tokenizer = [p for p in (model / "tokenizer.json", model / "tokenizer_config.json")]
    return {
        "data": digest(data, text_files),
        "tokenizer": digest(model, [p for p in tokenizer if p.exists()]),
    }


def _record(dataset: Any, report: Any, root: Path) -> dict[str, Any]:
    items = []
    for i in range(len(dataset)):
        item = dataset[i]
        sample = dataset.sample(i)
        pixels = item.get("pixel_values")
        items.append(
            {
                "id": sample.id,
                "image": None if sample.image is None else _relative(str(sample.image), root),
                "domain_id": int(item["domain_id"]),
                "length": len(item["input_ids"]),
                "input_ids": _sha(item["input_ids"].numpy()),
                "labels": _sha(item["labels"].numpy()),
                "labelled": int((item["labels"] != -100).sum()),
                "pixels": None if pixels is None else _sha(np.round(pixels.numpy(), 4)),
            }
        )
    return {
        "items": items,
        "lengths": [int(n) for n in dataset.lengths],
        "has_image": [bool(b) for b in dataset.has_image],
        "domain_ids": [int(d) for d in dataset.domain_ids],
        "domains": list(dataset.domains),
        "per_domain": dict(report.per_domain),
        "skipped": dict(sorted(report.skipped.items())),
        "problems": [_relative(p, root) for p in report.problems],
        "warnings": [_relative(w, root) for w in report.warnings],
        "image_failures": dict(dataset.image_failures),
    }


def build_snapshot(model: Path, data: Path) -> dict[str, Any]:
    """Every case of the snapshot, built from the tiny model dir and the synthetic world."""
    from transformers import AutoProcessor

    from llava_mole.data import build_datasets

    torch.set_num_threads(1)
    processor = AutoProcessor.from_pretrained(model)
    (data / "bad.jsonl").write_text("\n".join(_bad_records(data)) + "\n", encoding="utf-8")
    variant = data / "mixture-variant.yaml"
    variant.write_text(textwrap.dedent(VARIANT), encoding="utf-8")
    _hf_parquets(data)
    hf_variant = data / "mixture-hf.yaml"
    hf_variant.write_text(textwrap.dedent(HF_VARIANT), encoding="utf-8")
    cases: dict[str, Any] = {}
    for name, mixture, split in (
        ("demo-train", data / "mixture.yaml", "train"),
        ("demo-test", data / "mixture.yaml", "test"),
        ("variant-train", variant, "train"),
        ("hf-variant-train", hf_variant, "train"),
    ):
        dataset, report = build_datasets(mixture, processor, split, seed=0)
        cases[name] = _record(dataset, report, data)
    return cases


def _world(root: Path) -> tuple[Path, Path]:
    from llava_mole.toy.synthetic import make_data
    from llava_mole.toy.tiny import make_tiny

    model = make_tiny(root / "model", seed=0, pretrain=False, progress=False)
    data = make_data(root / "data", samples_per_domain=24, test_per_domain=6, seed=0)
    return model, data


def test_build_datasets_matches_the_snapshot(tiny_world, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    datasets.disable_progress_bars()
    expected = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    data = tmp_path / "data"  # a copy: the variant writes files next to the world's
    shutil.copytree(tiny_world["data"], data)
    prints = _fingerprints(tiny_world["model"], data)
    for what, value in expected["fingerprints"].items():
        if prints.get(what) != value:
            pytest.fail(
                f"the synthetic world's {what} changed (fingerprint {prints.get(what)} != "
                f"{value}): if deliberate, regenerate: python {Path(__file__).name} --write"
            )
    got = build_snapshot(tiny_world["model"], data)
    for name, case in expected["cases"].items():
        for key, value in case.items():
            assert got[name][key] == value, f"{name}: {key} differs from the snapshot"
    assert set(got) == set(expected["cases"])


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--write"]:
        raise SystemExit(f"usage: python {sys.argv[0]} --write")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_DATASETS_CACHE"] = str(Path(tmp) / "hf-cache")
        model, data = _world(Path(tmp))
        snapshot = {
            "fingerprints": _fingerprints(model, data),
            "cases": build_snapshot(model, data),
        }
    SNAPSHOT.parent.mkdir(exist_ok=True)
    SNAPSHOT.write_text(json.dumps(snapshot, indent=1) + "\n", encoding="utf-8")
    for name, case in snapshot["cases"].items():
        print(name, len(case["items"]), case["per_domain"], case["skipped"], len(case["warnings"]))
