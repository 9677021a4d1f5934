"""Offline fixtures: a tiny word-level tokenizer, a LLaVA processor at 32 px and image helpers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from llava_mole.data.templates import VICUNA_V1_SYSTEM

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<|user|>", "<|assistant|>", "<|end|>"]
CORPUS = (
    VICUNA_V1_SYSTEM
    + " USER: ASSISTANT: what is this ? the a an colour color of cat dog image picture red blue"
    + " green shows and how many are there two three yes no question answer tell me more about it"
    + " describe photo sky sea tree house car small big left right on in text only hello world"
    + " why because zqx probe"
)
# Patch size 8 at 32 px: 4 x 4 patches + CLS, minus CLS ("default" strategy) = 16 image tokens.
NUM_IMAGE_TOKENS = 16

# Simple tokenizer-level template; assistant turns end with eos.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "<|user|> {{ m['content'] }}\n{% else %}<|assistant|> {{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(CORPUS):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<image>", "<|user|>", "<|assistant|>", "<|end|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_processor(
    chat_template: str | None = CHAT_TEMPLATE, processor_template: str | None = None
) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(chat_template),
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=processor_template,
    )


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def processor() -> LlavaProcessor:
    return build_processor()


def save_image(path: Path, size: tuple[int, int] = (40, 24), mode: str = "RGB", **kw: Any) -> Path:
    """Writes a small image (PNG unless the suffix says otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour: Any = {"RGB": (200, 30, 30), "RGBA": (200, 30, 30, 128), "L": 90, "1": 1}.get(mode, 0)
    Image.new(mode, size, colour).save(path, **kw)
    return path


def write_json(path: Path, records: Any, jsonl: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def record(
    sid: Any, image: str | None = None, turns: list[tuple[str, str]] | None = None, **extra: Any
) -> dict[str, Any]:
    """A LLaVA record; default turns are one QA pair with the placeholder iff there is an image."""
    if turns is None:
        question = "<image>\nwhat is this ?" if image else "hello world"
        turns = [("human", question), ("gpt", "a red cat")]
    out: dict[str, Any] = {"id": sid, "conversations": [{"from": r, "value": v} for r, v in turns]}
    if image is not None:
        out["image"] = image
    out.update(extra)
    return out


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Writes `n` valid records (every other one with an image) to tmp_path/<name>.json."""

    def make(name: str, n: int, with_images: bool = True) -> Path:
        records = []
        for i in range(n):
            if with_images and i % 2 == 0:
                save_image(tmp_path / "images" / name / f"{i}.png")
                records.append(record(f"{name}-{i}", f"{name}/{i}.png"))
            else:
                records.append(record(f"{name}-{i}"))
        return write_json(tmp_path / f"{name}.json", records)

    return make
