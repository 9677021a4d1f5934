"""``load_model_and_processor`` on every family's checkpoint layout, without torchvision.

Checkpoints are the tiny zoo models and processors saved with ``save_pretrained``; for the
families with a video processor the saved processor config also names it, as a checkpoint saved
where torchvision is installed does.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers as tf

from llava_mole.models.loading import ModelLoadError, load_model_and_processor
from tests.models import family_zoo as zoo

VIDEO = {
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    "llava_onevision": ("LlavaOnevisionProcessor", "LlavaOnevisionVideoProcessor"),
}
NO_TORCHVISION = importlib.util.find_spec("torchvision") is None


def save_checkpoint(key: str, path) -> zoo.Spec:
    spec = zoo.BY_KEY[key]
    zoo.build(spec).save_pretrained(path)
    zoo.make_processor(spec).save_pretrained(path)
    return spec


@pytest.mark.parametrize("key", list(VIDEO))
def test_video_processor_families_load_image_only(key: str, tmp_path, caplog) -> None:
    spec = save_checkpoint(key, tmp_path)
    name, video = VIDEO[key]
    config_file = tmp_path / "processor_config.json"
    saved = json.loads(config_file.read_text())
    assert saved["processor_class"] == name
    saved["video_processor"] = {"video_processor_type": video, "processor_class": name}
    config_file.write_text(json.dumps(saved))
    if NO_TORCHVISION:
        with pytest.raises((ImportError, ValueError), match="(?i)torchvision"):
            tf.AutoProcessor.from_pretrained(str(tmp_path))

    model, processor = load_model_and_processor(tmp_path)
    assert isinstance(processor, getattr(tf, name))
    if NO_TORCHVISION:
        assert processor.video_processor is None
        assert "built without its video processor" in caplog.text
    batch = zoo.batch(spec, processor)
    expected = zoo.batch(spec)
    assert all(torch.equal(batch[k], expected[k]) for k in expected)
    assert torch.isfinite(model(**batch).loss)


@pytest.mark.parametrize("key", ["llava_next", "gemma3", "paligemma", "idefics3", "mllama"])
def test_image_families_load_their_processor(key: str, tmp_path) -> None:
    spec = save_checkpoint(key, tmp_path)
    model, processor = load_model_and_processor(tmp_path)
    assert type(model).__name__ == type(zoo.build(spec)).__name__
    batch = zoo.batch(spec, processor)
    expected = zoo.batch(spec)
    assert all(torch.equal(batch[k], expected[k]) for k in expected)
    assert torch.isfinite(model(**batch).loss)


@pytest.mark.skipif(importlib.util.find_spec("num2words") is not None, reason="num2words found")
def test_smolvlm_processor_names_the_package_to_install(tmp_path) -> None:
    save_checkpoint("smolvlm", tmp_path)  # an Idefics3 processor: SmolVLM's cannot be built
    config_file = tmp_path / "processor_config.json"
    saved = json.loads(config_file.read_text().replace("Idefics3", "SmolVLM"))
    saved["video_processor"] = {"video_processor_type": "SmolVLMVideoProcessor"}
    config_file.write_text(json.dumps(saved))
    with pytest.raises(ModelLoadError, match=r"pip install num2words") as err:
        load_model_and_processor(tmp_path)
    assert "\n" not in str(err.value)
