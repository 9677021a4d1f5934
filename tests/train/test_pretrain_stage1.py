"""``llava-mole pretrain`` (LLaVA's stage 1) through the CLI: only the projector trains, the
caption loss falls, the written folder is a complete model (``from_pretrained``, the trained
model's logits, ``model.path`` of ``llava-mole train``), a non-LLaVA family (Qwen2-VL, whose
merger lives inside ``visual``) works, and bad input is one line with exit status 2.
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
from llava_mole.adapters.io import load_adapter
from llava_mole.data.collate import DataCollator, InstructDataset
from llava_mole.data.mixture import load_mixture, load_split
from llava_mole.data.templates import IGNORE_INDEX, ConversationEncoder
from llava_mole.models.loading import load_model_and_processor

FAST = ["train.report_to=[none]", "train.logging_steps=1", "train.per_device_batch_size=4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random LLaVA, a world with captions, and a 20-step stage-1 run on them."""
    from llava_mole.toy.tiny import make_tiny
    from llava_mole.toy.worlds import make_world

    root = tmp_path_factory.mktemp("stage1")
    base = make_tiny(root / "base", seed=0, pretrain=False, progress=False)
    data = make_world(
        "styles", root / "world", samples_per_domain=8, test_per_domain=2, captions=48
    )
    out = root / "new-base"
    argv = ["pretrain", str(data / "captions.json"), "--model", str(base), "--out", str(out)]
    assert cli.main(argv + _sets(FAST + ["train.max_steps=20"])) == 0
    return {"base": Path(base), "data": data, "out": out, "argv": argv, "root": root}


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _losses(run: Path) -> list[float]:
    lines = (run / "logs.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_only_the_projector_changes_and_the_caption_loss_falls(world) -> None:
    before, after = _weights(world["base"]), _weights(world["out"])
    assert before.keys() == after.keys()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all("multi_modal_projector." in k for k in changed), changed
    projector = [k for k in before if "multi_modal_projector." in k]
    assert sorted(projector) == changed  # every projector tensor trained
    losses = _losses(world["out"] / "stage1")
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    record = json.loads((world["out"] / "stage1.json").read_text())
    assert record["train"] == "projector" and record["steps"] == 20
    run_config = yaml.safe_load((world["out"] / "stage1" / "run_config.yaml").read_text())
    assert run_config["adapter"]["type"] == "none"
    assert run_config["train"]["learning_rate"] == pytest.approx(1e-3)  # LLaVA's stage 1


def _caption_batch(world, processor) -> dict[str, torch.Tensor]:
    cfg = load_mixture(world["out"] / "stage1" / "captions.yaml")
    samples, _ = load_split(cfg, "train")
    dataset = InstructDataset(samples[:3], processor, cfg.template, cfg.max_length)
    batch = DataCollator.from_processor(processor)([dataset[k] for k in range(3)])
    batch.pop("domain_ids")
    return batch


def test_written_folder_loads_and_reproduces_the_trained_logits(world) -> None:
    from transformers import AutoModelForImageTextToText

    written = AutoModelForImageTextToText.from_pretrained(world["out"]).eval()
    trained, processor = load_model_and_processor(world["base"])
    load_adapter(trained.eval(), world["out"] / "stage1")  # base + the run's projector
    base, _ = load_model_and_processor(world["base"])
    batch = _caption_batch(world, processor)
    batch.pop("labels")
    with torch.no_grad():
        ours, theirs = written(**batch).logits, trained(**batch).logits
        untrained = base.eval()(**batch).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, untrained, atol=1e-4)  # the projector did move


def test_new_base_is_a_model_path_for_train_and_a_rerun_changes_nothing(world, capsys) -> None:
    run = world["root"] / "tune"
    items = [
        f"model.path={world['out']}",
        f"data.mixture={world['data'] / 'mixture.yaml'}",
        f"output_dir={run}",
        "adapter.type=lora",
        "adapter.rank=2",
        "train.max_steps=2",
        *FAST,
    ]
    assert cli.main(["train", str(_yaml(world["root"] / "tune.yaml")), *_sets(items)]) == 0
    assert (run / "adapter_model.safetensors").is_file()

    stamp = (world["out"] / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(world["argv"] + _sets(FAST + ["train.max_steps=20"])) == 0
    assert "nothing changed" in capsys.readouterr().out
    assert (world["out"] / "model.safetensors").stat().st_mtime_ns == stamp


def _yaml(path: Path) -> Path:
    path.write_text("train: {}\n")
    return path


@pytest.mark.parametrize("what", ["lora", "full"])
def test_train_lora_or_full_also_trains_the_language_model_not_the_vision_tower(
    world, what
) -> None:
    out = world["root"] / f"{what}-base"
    argv = ["pretrain", str(world["data"] / "captions.json"), "--model", str(world["base"])]
    argv += ["--out", str(out), "--train", what, "--template", "plain"]
    assert cli.main(argv + _sets(FAST + ["train.max_steps=2", "adapter.rank=2"])) == 0
    before, after = _weights(world["base"]), _weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("language_model." in k and "q_proj" in k for k in changed)
    assert any("multi_modal_projector." in k for k in changed)
    assert not any("vision_tower." in k for k in changed)
    if what == "full":  # every decoder weight trained, not only the attention's
        assert any("language_model." in k and "down_proj" in k for k in changed)
        assert any(k.endswith("lm_head.weight") for k in changed)


def test_plain_template_is_image_then_caption() -> None:
    from llava_mole.toy.tiny import build_processor, build_tokenizer

    processor = build_processor(build_tokenizer())
    encoder = ConversationEncoder(processor, "plain")
    encoded = encoder.encode([("human", "<image>\nDescribe the image."), ("gpt", "a red square")])
    tokenizer = processor.tokenizer
    caption = tokenizer.encode("a red square", add_special_tokens=False)
    image = [encoder.image_token_id] * encoder.num_image_tokens
    assert encoded.input_ids == [tokenizer.bos_token_id, *image, *caption, tokenizer.eos_token_id]
    masked = 1 + len(image)
    assert encoded.labels[:masked] == [IGNORE_INDEX] * masked
    assert encoded.labels[masked:] == [*caption, tokenizer.eos_token_id]


def _records(root: Path, records: list[dict]) -> Path:
    path = root / "bad.json"
    path.write_text(json.dumps(records))
    return path


def _caption(rid: str, image: str | None, question: str, answer: str) -> dict:
    record = {
        "id": rid,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }
    if image is not None:
        record["image"] = image
    return record


def _refused(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("llava-mole pretrain: error: ") and len(err) == 2, err
    return err[0]


def test_bad_input_is_one_line_and_exit_2(world, tmp_path, capsys) -> None:
    model, image = str(world["base"]), "captions/00000.png"
    folder = world["data"]

    def run(captions: Path | str, *extra: str) -> str:
        argv = ["pretrain", str(captions), "--model", model, "--out", str(tmp_path / "o")]
        return _refused(argv + list(extra), capsys)

    assert "file not found" in run(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("[{")
    assert "broken.json" in run(tmp_path / "broken.json")
    no_tag = _records(folder, [_caption("a", image, "Describe the image.", "a cat")])
    assert "image_placeholder_mismatch" in run(no_tag)
    no_caption = _records(folder, [_caption("a", image, "<image>\nDescribe.", "")])
    assert "no usable image-caption records" in run(no_caption)
    text_only = [_caption("a", image, "<image>\nDescribe.", "x"), _caption("b", None, "Hi", "x")]
    assert "have no image" in run(_records(folder, text_only))
    lost = _records(tmp_path, [_caption("a", "gone.png", "<image>\nDescribe.", "a cat")])
    assert "--image-folder" in run(lost)
    assert "folder not found" in run(folder / "captions.json", "--image-folder", "/nowhere")
    assert "set by llava-mole pretrain" in run(folder / "captions.json", "--set", "output_dir=x")
    base_again = ["pretrain", str(folder / "captions.json"), "--model", model, "--out", model]
    assert "is the base model folder" in _refused(base_again, capsys)
    assert "train.learnng_rate: unknown key" in run(
        folder / "captions.json", "--set", "train.learnng_rate=1"
    )


def test_a_text_only_model_is_refused(world, tmp_path, capsys) -> None:
    from tests.models import family_zoo as zoo

    spec = zoo.BY_KEY["llama"]
    zoo.build(spec).save_pretrained(tmp_path / "llama")
    argv = ["pretrain", str(world["data"] / "captions.json"), "--model", str(tmp_path / "llama")]
    line = _refused(argv + ["--out", str(tmp_path / "o")], capsys)
    assert "has no projector" in line


def test_qwen2_vl_merger_inside_visual(tmp_path) -> None:
    from transformers import AutoModelForImageTextToText

    from tests.models import family_zoo as zoo

    spec = zoo.BY_KEY["qwen2_vl"]
    base = tmp_path / "qwen"
    zoo.build(spec).save_pretrained(base)
    zoo.make_processor(spec).save_pretrained(base)
    for k, size in enumerate(((32, 16), (16, 32), (24, 24), (32, 32))):
        Image.new("RGB", size, (60 * k, 120, 200)).save(tmp_path / f"{k}.png")
    records = [_caption(f"c{k}", f"{k}.png", "<image>\nDescribe.", "red blue") for k in range(4)]
    out = tmp_path / "qwen-stage1"
    argv = ["pretrain", str(_records(tmp_path, records)), "--model", str(base), "--out", str(out)]
    sets = ["train.max_steps=2", "train.per_device_batch_size=2", "train.learning_rate=0.05"]
    assert cli.main(argv + _sets(["train.report_to=[none]", *sets])) == 0
    before, after = _weights(base), _weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("visual.merger." in k for k in changed), changed
    assert any("visual." in k and "merger." not in k for k in before)  # the rest of visual
    AutoModelForImageTextToText.from_pretrained(out)
