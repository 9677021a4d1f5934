"""`llava-mole convert`: small files in the public Hugging Face layouts -> a ready mixture.

The layouts (column names and types) are those of HuggingFaceM4/VQAv2, lmms-lab/textvqa,
lmms-lab/DocVQA, HuggingFaceM4/ChartQA, lmms-lab/ChartQA and flaviagiammarino/path-vqa; the
files are written here, nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

from llava_mole.cli import main
from llava_mole.data import load_mixture, load_split
from llava_mole.data.convert import PRESETS, write_mixture

datasets = pytest.importorskip("datasets")
V = datasets.Value


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    datasets.disable_progress_bars()


def img(i: int = 0) -> Image.Image:
    return Image.new("RGB", (10, 6), (20 * i, 100, 0))


def hub_folder(root: Path, splits: dict[str, datasets.Dataset]) -> Path:
    """A folder laid out like a Hub dataset repo: data/<split>-00000-of-00001.parquet."""
    (root / "data").mkdir(parents=True)
    for split, ds in splits.items():
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def vqav2(n: int) -> datasets.Dataset:
    answers = [
        [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(row)]
        for row in [["2"] * 6 + ["two"] * 3 + ["3"]] * n
    ]
    features = datasets.Features(
        {
            "question_type": V("string"),
            "multiple_choice_answer": V("string"),
            "answers": datasets.List(
                {"answer": V("string"), "answer_confidence": V("string"), "answer_id": V("int64")}
            ),
            "image_id": V("int64"),
            "answer_type": V("string"),
            "question_id": V("int64"),
            "question": V("string"),
            "image": datasets.Image(),
        }
    )
    data = {
        "question_type": ["how many"] * n,
        "multiple_choice_answer": ["2"] * n,
        "answers": answers,
        "image_id": list(range(n)),
        "answer_type": ["number"] * n,
        "question_id": [1000 + i for i in range(n)],
        "question": ["How many dogs are there?"] * n,
        "image": [img(i) for i in range(n)],
    }
    return datasets.Dataset.from_dict(data, features=features)


def textvqa(n: int, with_answers: bool = True) -> datasets.Dataset:
    features = datasets.Features(
        {
            "image_id": V("string"),
            "question_id": V("int32"),
            "question": V("string"),
            "question_tokens": datasets.List(V("string")),
            "image": datasets.Image(),
            "answers": datasets.List(V("string")),
            "set_name": V("string"),
        }
    )
    answers = [["nokia"] * 7 + ["nokia phone"] * 3 if with_answers else [] for _ in range(n)]
    data = {
        "image_id": [f"img{i}" for i in range(n)],
        "question_id": list(range(n)),
        "question": ["what brand is this?"] * n,
        "question_tokens": [["what", "brand", "is", "this"]] * n,
        "image": [img(i) for i in range(n)],
        "answers": answers,
        "set_name": ["train"] * n,
    }
    return datasets.Dataset.from_dict(data, features=features)


def docvqa(n: int, with_answers: bool = True) -> datasets.Dataset:
    features = datasets.Features(
        {
            "questionId": V("string"),
            "question": V("string"),
            "question_types": datasets.List(V("string")),
            "image": datasets.Image(),
            "docId": V("int32"),
            "ucsf_document_id": V("string"),
            "ucsf_document_page_no": V("string"),
            "answers": datasets.List(V("string")),
            "data_split": V("string"),
        }
    )
    data = {
        "questionId": [str(5000 + i) for i in range(n)],
        "question": ["What is the date?"] * n,
        "question_types": [["form"]] * n,
        "image": [img(i) for i in range(n)],
        "docId": list(range(n)),
        "ucsf_document_id": ["abc"] * n,
        "ucsf_document_page_no": ["1"] * n,
        "answers": [["1/8/93", "January 8, 1993"] if with_answers else None for _ in range(n)],
        "data_split": ["val"] * n,
    }
    return datasets.Dataset.from_dict(data, features=features)


def chartqa_m4(n: int) -> datasets.Dataset:
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "query": V("string"),
            "label": datasets.List(V("string")),
            "human_or_machine": datasets.ClassLabel(names=["human", "machine"]),
        }
    )
    data = {
        "image": [img(i) for i in range(n)],
        "query": ["What is the value in 2019?"] * n,
        "label": [["12%"]] * n,
        "human_or_machine": [0] * n,
    }
    return datasets.Dataset.from_dict(data, features=features)


def chartqa_lmms(n: int) -> datasets.Dataset:
    data = {
        "type": ["human_test"] * n,
        "question": ["Which year is highest?"] * n,
        "answer": ["2019"] * n,
        "image": [img(i) for i in range(n)],
    }
    features = datasets.Features(
        {
            "type": V("string"),
            "question": V("string"),
            "answer": V("string"),
            "image": datasets.Image(),
        }
    )
    return datasets.Dataset.from_dict(data, features=features)


def pathvqa(n: int) -> datasets.Dataset:
    data = {
        "image": [img(i) for i in range(n)],
        "question": ["is there a tumor?", "what stain is used?"] * (n // 2),
        "answer": ["yes", "hematoxylin and eosin"] * (n // 2),
    }
    features = datasets.Features(
        {"image": datasets.Image(), "question": V("string"), "answer": V("string")}
    )
    return datasets.Dataset.from_dict(data, features=features)


@pytest.fixture
def layouts(tmp_path) -> dict[str, str]:
    root = tmp_path / "hub"
    textvqa_dir = root / "textvqa"
    datasets.DatasetDict(
        {"train": textvqa(3), "validation": textvqa(2), "test": textvqa(2, with_answers=False)}
    ).save_to_disk(str(textvqa_dir))
    pathvqa(4).to_parquet(str(tmp_path / "pathvqa-test.parquet"))
    return {
        "vqav2": str(hub_folder(root / "vqav2", {"train": vqav2(3), "validation": vqav2(2)})),
        "textvqa": str(textvqa_dir),
        "docvqa": str(
            hub_folder(root / "docvqa", {"validation": docvqa(2), "test": docvqa(2, False)})
        ),
        "chartqa": str(
            hub_folder(
                root / "chartqa",
                {"train": chartqa_m4(2), "val": chartqa_m4(1), "test": chartqa_m4(2)},
            )
        ),
        "chartqa_lmms": str(hub_folder(root / "chartqa_lmms", {"test": chartqa_lmms(2)})),
        "pathvqa_test": str(tmp_path / "pathvqa-test.parquet"),
    }


def test_convert_writes_a_ready_mixture_with_a_metric_per_domain(tmp_path, layouts, capsys):
    out = tmp_path / "paper.yaml"
    argv = [
        "convert",
        f"vqav2={layouts['vqav2']}",
        f"textvqa={layouts['textvqa']}",
        f"docvqa={layouts['docvqa']}",
        f"chartqa={layouts['chartqa']}",
        f"pathvqa:test={layouts['pathvqa_test']}",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "docvqa: domain document, anls; test 2 rows" in printed
    cfg = load_mixture(out)
    assert cfg.metrics == {
        "general": "vqa_accuracy",
        "document": "anls",
        "chart": "relaxed_accuracy",
        "biomedical": "pathvqa",
    }
    entries = {e["name"]: e for e in yaml.safe_load(out.read_text())["datasets"]}
    assert entries["vqav2"]["train"] == "train" and entries["vqav2"]["test"] == "validation"
    assert entries["textvqa"]["test"] == "validation"  # the split with answers, not test
    assert entries["docvqa"]["columns"]["id"] == "questionId" and "train" not in entries["docvqa"]
    assert entries["chartqa"]["columns"] == {
        "question": "query",
        "answer": "label",
        "image": "image",
    }
    assert entries["pathvqa"]["test"] == layouts["pathvqa_test"] and "hf" not in entries["pathvqa"]

    test, report = load_split(out, "test")
    assert report.num_skipped == 0
    by = {}
    for s in test:
        by.setdefault(s.source.split("/")[-1], []).append(s)
    vqa = by["vqav2[validation]"][0]
    assert vqa.id == "1000" and vqa.turns[1] == ("assistant", "2")  # multiple_choice_answer
    assert vqa.meta["answers"] == ["2"] * 6 + ["two"] * 3 + ["3"]  # from the answer dicts
    assert vqa.turns[0][1] == "<image>\nHow many dogs are there?\n" + PRESETS["vqav2"].prompt_suffix
    text = by["textvqa[validation]"][0]
    assert text.turns[1] == ("assistant", "nokia") and len(text.meta["answers"]) == 10
    chart = by["chartqa[test]"][0]
    assert chart.turns[1] == ("assistant", "12%") and "answers" not in chart.meta
    assert chart.turns[0][1].endswith("\nAnswer the question with a single word.")
    path = by["pathvqa-test.parquet"]
    assert [s.turns[1][1] for s in path] == ["yes", "hematoxylin and eosin"] * 2
    assert path[0].turns[0][1] == "<image>\nis there a tumor?"  # no prompt suffix
    train, _ = load_split(out, "train")
    assert sorted({s.domain for s in train}) == ["chart", "general"]


def test_second_layout_of_a_preset(tmp_path, layouts):
    result = write_mixture([f"chartqa={layouts['chartqa_lmms']}"], tmp_path / "c.yaml")
    (entry,) = result["entries"]
    assert entry["columns"] == {"question": "question", "answer": "answer", "image": "image"}
    assert result["counts"] == [{"test": 2}] and "train" not in entry


def test_preset_key_in_a_mixture(tmp_path, layouts):
    mix = tmp_path / "m.yaml"
    mix.write_text(
        yaml.safe_dump(
            {
                "datasets": [
                    {
                        "domain": "docs",
                        "hf": layouts["docvqa"],
                        "test": "validation",
                        "preset": "docvqa",
                    }
                ]
            }
        )
    )
    cfg = load_mixture(mix)
    assert cfg.metrics == {"docs": "anls"}
    (first, _), _ = load_split(mix, "test")
    assert first.id == "5000" and first.meta["answers"] == ["1/8/93", "January 8, 1993"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bleu=/x"], "bad dataset 'bleu=/x': expected PRESET=SOURCE"),
        (["docvqa:dev=/x"], "expected PRESET=SOURCE or PRESET:train|test=SOURCE"),
        (["docvqa=/no/such/folder"], "/no/such/folder"),
        (["pathvqa={pathvqa_test}"], "holds one split: say which, e.g. pathvqa:test="),
        (["vqav2={chartqa_lmms}"], "no split named train, validation, val, testdev"),
        (["chartqa={textvqa}"], "has a question column but no 'answer' or 'answers' column"),
        (["pathvqa={vqav2}"], "has a question column but no 'answer' or 'answers' column"),
    ],
)
def test_bad_convert_input_is_one_line_exit_2(tmp_path, layouts, capsys, args, message):
    args = [a.format(**layouts) for a in args]
    assert main(["convert", *args, "--out", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("llava-mole convert: error: ") and message in err[0], err
    assert len(err) == 2 and "--debug" in err[1]
    assert not (tmp_path / "x.yaml").exists()


def test_paper_mixture_recipe_is_a_valid_mixture():
    cfg = load_mixture(Path(__file__).resolve().parents[2] / "configs" / "paper-mixture.yaml")
    assert cfg.domains == ["general", "document", "chart", "biomedical"]
    assert cfg.metrics == {
        "general": "vqa_accuracy",
        "document": "anls",
        "chart": "relaxed_accuracy",
        "biomedical": "pathvqa",
    }
    assert {d.name: d.preset for d in cfg.datasets} == {n: n for n in PRESETS}
    # the compute stated in docs/data.md: 100k + 34,602 + 39,463 + 28,299 + 2 x 19,654 samples
    rows = {"vqav2": 100_000, "textvqa": 34_602, "docvqa": 39_463, "chartqa": 28_299}
    rows["pathvqa"] = 19_654
    assert sum(rows[d.name] * d.repeat for d in cfg.datasets) == 241_672
