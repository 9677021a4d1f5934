"""The tiny LLaVA checkpoint loads through the Auto classes and behaves consistently."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from llava_mole.toy import synthetic, tiny

PROMPT = "USER: <image>\nWhat is the code for this image? ASSISTANT:"


def _image(seed: int = 0, name: str = "scenes"):
    return synthetic.render(name, 1, np.random.default_rng(seed))[0]


def test_directory_and_marker(tiny_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (tiny_dir / name).is_file(), name
    marker = json.loads((tiny_dir / tiny.MARKER_FILE).read_text())
    assert marker["seed"] == 0 and marker["pretrain"] is False
    assert marker["spec_version"] == tiny.BUILD_SPEC_VERSION


def test_roundtrip_identical_logits(tiny_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_dir)
    loaded = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    fresh, fresh_processor = tiny.build_tiny(seed=0)  # same seed -> same weights
    fresh.eval()
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    batch = processor(text=[PROMPT], images=[_image()], return_tensors="pt")
    fresh_batch = fresh_processor(text=[PROMPT], images=[_image()], return_tensors="pt")
    assert torch.equal(batch["input_ids"], fresh_batch["input_ids"])
    with torch.no_grad():
        a = loaded(**batch).logits
        b = fresh(**batch).logits
    assert torch.equal(a, b)


def test_processor_expansion_matches_model(tiny_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    config = model.config
    assert config.vision_feature_layer == -2
    assert config.vision_feature_select_strategy == "default"
    images = [_image(0), _image(1, "charts")]
    batch = processor(
        text=[PROMPT, "USER: <image>\nWhat stain is on the slide? ASSISTANT: purple"],
        images=images,
        padding=True,
        return_tensors="pt",
    )
    n_image = (batch["input_ids"] == config.image_token_index).sum(dim=1)
    assert n_image.tolist() == [tiny.NUM_IMAGE_TOKENS] * 2 == [config.image_seq_length] * 2
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    with torch.no_grad():
        out = model(**batch)
        generated = model.generate(
            **processor(text=PROMPT, images=images[0], return_tensors="pt"),
            max_new_tokens=3,
            do_sample=False,
        )
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert out.logits.shape[-1] == len(processor.tokenizer)
    assert torch.isfinite(out.logits).all()
    assert generated.shape[1] > 0


def test_architecture_and_size(tiny_dir: Path) -> None:
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    n = sum(p.numel() for p in model.parameters())
    assert 0.8e6 < n < 1.6e6, n
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert proj in names
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (128, 4, 4)
    vision = model.config.vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size) == (32, 8, 64)
    assert vision.num_hidden_layers == 2


def test_tokenizer_covers_corpus(tiny_dir: Path) -> None:
    tokenizer = AutoProcessor.from_pretrained(tiny_dir).tokenizer
    assert [tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS] == list(range(5))
    unk = tokenizer.unk_token_id
    for word in synthetic.corpus_words():
        for variant in (" " + word, " " + word.capitalize()):
            ids = tokenizer(variant, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1 and unk not in ids, (variant, ids)
    for _, caption, _ in synthetic.caption_examples(10):
        ids = tokenizer(caption)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and unk not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    ids = tokenizer(tiny.VICUNA_SYSTEM + " weird Zebra-words 123!")["input_ids"]
    assert unk not in ids


def test_chat_template(tiny_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_dir)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]},
        {"role": "assistant", "content": "alpha"},
        {"role": "user", "content": "Next?"},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "USER: <image>\nHi? ASSISTANT: alpha</s>USER: Next? ASSISTANT:"
