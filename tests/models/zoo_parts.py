"""Shared pieces of the tiny family zoo: one tokenizer with every family's special tokens,
tiny text and vision configs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

from functools import cache  # noqa: E402
from typing import Any  # noqa: E402

import transformers as tf  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

SPECIAL = (
    "<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>",
    "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
    "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<row_1_col_1>",
    "<|image|>", "<|python_tag|>",
)  # fmt: skip
VOCAB = 320  # model vocabulary (>= the tokenizer's)
HIDDEN = 32
PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]


@cache
def _tokenizer_object() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["USER: what colour is it? ASSISTANT: red green blue"] * 4, trainer)
    return tok


def tokenizer(**named: str) -> tf.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with every family's special tokens (``named``: roles)."""
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer_object(),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>", **named},
    )
    assert len(tok) <= VOCAB
    return tok


def token_id(name: str) -> int:
    return _tokenizer_object().token_to_id(name)


def text(cls=tf.LlamaConfig, layers: int = 1, **kw) -> Any:
    """A tiny text config of ``cls``."""
    base = dict(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    base.update(kw)
    return cls(**base)


def siglip(**kw) -> tf.SiglipVisionConfig:
    base = dict(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    base.update(kw)
    return tf.SiglipVisionConfig(**base)


def clip(**kw) -> tf.CLIPVisionConfig:
    base = dict(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    base.update(kw)
    return tf.CLIPVisionConfig(**base)
