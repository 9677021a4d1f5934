"""Every family of the zoo through the real CLI: ``train`` (3 steps, MoLE and LoRA) -> ``eval``
-> ``predict`` -> adapter round trip, with inputs built by the family's own processor.

Each family's tiny model and processor are saved once per module (``save_pretrained``) to a
folder the CLI loads; the commands run in-process (``cli.main``), so the whole matrix stays
well under two minutes on two cores. The checks of ``test_families`` (vision tower untouched
in memory, gradients) are not repeated; here the files are checked: the adapter written by
``train`` holds no vision-tower tensor, its LoRA factors moved, and it loads bit-exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from llava_mole import cli
from llava_mole.adapters import load_adapter, save_adapter
from llava_mole.data.collate import DataCollator, InstructDataset
from llava_mole.data.mixture import load_mixture, load_split
from llava_mole.models.families import family_of, projector_roots, under, vision_roots
from llava_mole.models.loading import load_model_and_processor
from tests.models import family_zoo as zoo

SIZES = ((32, 16), (16, 32), (24, 24), (32, 32))
ANSWERS = ("red", "blue", "green", "red blue")


def _records(image: bool) -> list[dict]:
    records = []
    for k, answer in enumerate(ANSWERS):
        question = ("<image>\n" if image else "") + "what colour is it?"
        record = {
            "id": f"s{k}",
            "conversations": [
                {"from": "human", "value": question},
                {"from": "gpt", "value": answer},
            ],
        }
        if image:
            record["image"] = f"{k}.png"
        records.append(record)
    return records


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An image and a text-only mixture (4 train, 4 test samples; images of 4 sizes)."""
    root = tmp_path_factory.mktemp("family_data")
    for k, size in enumerate(SIZES):
        Image.new("RGB", size, (60 * k, 120, 200)).save(root / f"{k}.png")
    mixtures = {}
    for name, image in (("image", True), ("text", False)):
        (root / f"{name}.json").write_text(json.dumps(_records(image)))
        entry = {"name": name, "domain": name, "train": f"{name}.json", "test": f"{name}.json"}
        if image:
            entry["image_folder"] = "."
        doc = {"template": "vicuna_v1", "system": "", "max_length": 96, "datasets": [entry]}
        mixtures[name] = root / f"mixture-{name}.yaml"
        mixtures[name].write_text(yaml.safe_dump(doc))
    return {"root": root, **mixtures}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    """``saved(key)``: the family's tiny model + processor folder (written once)."""
    folders: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in folders:
            spec = zoo.BY_KEY[key]
            folder = tmp_path_factory.mktemp(key)
            zoo.build(spec).save_pretrained(folder)
            zoo.make_processor(spec).save_pretrained(folder)
            folders[key] = folder
        return folders[key]

    return get


def _train(model_dir: Path, mixture: Path, adapter: str, out: Path) -> None:
    config = {
        "model": {"path": str(model_dir)},
        "data": {"mixture": str(mixture)},
        "adapter": {"type": adapter, "rank": 2, "alpha": 4, "dropout": 0.0, "num_experts": 2},
        "train": {
            "learning_rate": 5e-2,
            "max_steps": 3,
            "per_device_batch_size": 2,
            "logging_steps": 1,
            "precision": "fp32",
            "seed": 0,
            "report_to": ["none"],
        },
        "output_dir": str(out),
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["train", str(path)]) == 0


def _first_batch(mixture: Path, processor) -> dict[str, torch.Tensor]:
    cfg = load_mixture(mixture)
    samples, _ = load_split(cfg, "train")
    dataset = InstructDataset(samples, processor, cfg.template, cfg.max_length, system=cfg.system)
    batch = DataCollator.from_processor(processor)([dataset[k] for k in range(len(dataset))])
    batch.pop("domain_ids")
    return batch


def _check_adapter_file(run: Path, spec: zoo.Spec) -> None:
    """Only language-model adapter tensors and the projector are saved; the LoRA factors
    trained (B no longer 0)."""
    model = zoo.build(spec)
    family = family_of(model)
    towers, projector = vision_roots(model, family), projector_roots(model, family)
    tensors = load_file(str(run / "adapter_model.safetensors"))
    for name in tensors:
        assert not under(name, towers) or under(name, projector), f"vision tensor saved: {name}"
    trained_b = [t for n, t in tensors.items() if "lora_B" in n]
    assert trained_b and any(t.abs().sum() > 0 for t in trained_b), "LoRA B never moved"


@pytest.mark.parametrize("adapter", ["mole", "lora"])
@pytest.mark.parametrize("key", [spec.key for spec in zoo.SPECS])
def test_family_through_the_cli(key, adapter, data, saved, tmp_path, capsys) -> None:
    spec = zoo.BY_KEY[key]
    model_dir = saved(key)
    mixture = data["image" if spec.processor else "text"]
    run = tmp_path / "run"
    _train(model_dir, mixture, adapter, run)
    _check_adapter_file(run, spec)

    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(model_dir), "--adapter", str(run), "--data", str(mixture)]
    assert cli.main([*argv, "--limit", "2", "--max-new-tokens", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 2 and not result["skipped"]
    assert (result["routing"] is not None) == (adapter == "mole")

    argv = ["predict", "--model", str(model_dir), "--adapter", str(run), "--question", "what?"]
    if spec.processor:
        argv += ["--image", str(data["root"] / "0.png")]
    capsys.readouterr()
    assert cli.main([*argv, "--max-new-tokens", "2"]) == 0

    # Round trip: the trained adapter loaded, saved again and reloaded gives the same logits
    # (the folder's weights are zoo.build(spec)'s, so a fresh build is the same base model).
    model, processor = load_model_and_processor(model_dir)
    batch = _first_batch(mixture, processor)
    first = load_adapter(model.eval(), run)
    save_adapter(first, tmp_path / "again")
    second = load_adapter(zoo.build(spec), tmp_path / "again")
    with torch.no_grad():
        a, b = first(**batch).logits, second(**batch).logits
    assert torch.equal(a, b), "adapter round trip must be bit-exact"


# ---- bad inputs: one clear line, exit 2, never a traceback --------------------------------------
def _bad_mixture(root: Path, records: list[dict], name: str) -> Path:
    (root / f"{name}.json").write_text(json.dumps(records))
    entry = {"name": name, "domain": name, "train": f"{name}.json", "test": f"{name}.json"}
    entry["image_folder"] = str(root)
    doc = {"template": "vicuna_v1", "system": "", "max_length": 96, "strict": True}
    path = root / f"mixture-{name}.yaml"
    path.write_text(yaml.safe_dump({**doc, "datasets": [entry]}))
    return path


def _train_fails(argv_config: Path, capsys) -> str:
    capsys.readouterr()
    assert cli.main(["train", str(argv_config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "llava-mole train: error:" in err
    return err


def _record(sample_id: str, question: str, image: bool = True, answer: bool = True) -> dict:
    turns = [{"from": "human", "value": question}]
    if answer:
        turns.append({"from": "gpt", "value": "red"})
    record = {"id": sample_id, "conversations": turns}
    if image:
        record["image"] = "0.png"
    return record


BAD = {
    "two-placeholders-one-image": (_record("bad-two", "<image>\n<image>\nwhat?"), "bad-two"),
    "image-without-placeholder": (_record("bad-none", "what colour?"), "bad-none"),
    "no-assistant-turn": (_record("bad-turns", "<image>\nwhat?", answer=False), "bad-turns"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_samples_are_one_clear_line_naming_the_sample(case, data, saved, tmp_path, capsys):
    record, sample_id = BAD[case]
    good = _records(True)[:2]
    mixture = _bad_mixture(data["root"], [*good, record], case)
    config = {
        "model": {"path": str(saved("qwen2_5_vl"))},
        "data": {"mixture": str(mixture)},
        "adapter": {"type": "mole", "rank": 2, "alpha": 4, "num_experts": 2},
        "train": {"max_steps": 1, "per_device_batch_size": 2, "report_to": ["none"]},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert sample_id in _train_fails(path, capsys)


def test_the_processor_built_block_must_match_the_placeholders() -> None:
    """A prompt with two placeholders for one image is refused before the model sees it."""
    from llava_mole.data.templates import ConversationEncoder, EncodeError

    encoder = ConversationEncoder(zoo.make_processor(zoo.BY_KEY["qwen2_vl"]), "vicuna_v1")
    turns = [("user", "<image>\n<image>\nwhat?"), ("assistant", "red")]
    with pytest.raises(EncodeError, match="2 <image> placeholder"):
        encoder.encode(turns, (32, 16))
    with pytest.raises(EncodeError, match="but no image"):
        encoder.prompt([("user", "<image>\nwhat?")])


def test_an_unsupported_architecture_is_one_line(tmp_path, capsys) -> None:
    import transformers as tf

    folder = tmp_path / "gpt2"
    tf.GPT2LMHeadModel(
        tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=320)
    ).save_pretrained(folder)
    zoo.tokenizer().save_pretrained(folder)
    mixture = tmp_path / "m.yaml"
    (tmp_path / "t.json").write_text(json.dumps(_records(False)))
    entry = {"name": "t", "domain": "t", "train": "t.json", "test": "t.json"}
    mixture.write_text(yaml.safe_dump({"datasets": [entry], "system": ""}))
    config = {
        "model": {"path": str(folder)},
        "data": {"mixture": str(mixture)},
        "adapter": {"type": "mole"},
        "train": {"max_steps": 1, "report_to": ["none"]},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    err = _train_fails(path, capsys)
    assert "GPT2LMHeadModel is not supported by llava-mole" in err


def test_predict_with_two_placeholders_for_one_image_is_one_line(data, saved, capsys) -> None:
    argv = ["predict", "--model", str(saved("qwen2_vl")), "--image", str(data["root"] / "0.png")]
    capsys.readouterr()
    assert cli.main([*argv, "--question", "<image> and <image>?"]) == 2
    err = capsys.readouterr().err
    assert "2 <image> placeholders but one image" in err and "Traceback" not in err


def test_the_qwen2_5_vl_example_config_trains_a_tiny_stand_in(data, saved, tmp_path) -> None:
    """configs/qwen2_5_vl.yaml validates and trains, with a tiny Qwen2.5-VL in its place."""
    from llava_mole.train.config import load_train_config

    config_file = Path(__file__).resolve().parents[2] / "configs" / "qwen2_5_vl.yaml"
    swap = [
        f"model.path={saved('qwen2_5_vl')}",
        f"data.mixture={data['image']}",
        f"output_dir={tmp_path / 'run'}",
    ]
    config = load_train_config(config_file, swap)
    assert (config.adapter.type, config.adapter.num_experts, config.model.dtype) == (
        "mole",
        3,
        "bfloat16",
    )
    cpu = ["model.dtype=float32", "train.precision=fp32", "train.max_steps=1", "data.max_length=96"]
    cpu += [
        "train.per_device_batch_size=2",
        "train.gradient_accumulation=1",
        "train.report_to=[none]",
    ]
    argv = ["train", str(config_file)]
    for item in swap + cpu:
        argv += ["--set", item]
    assert cli.main(argv) == 0
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
