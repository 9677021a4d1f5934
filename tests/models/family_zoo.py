"""Tiny random-weight models of every supported family, with inputs built by their processors.

One builder per family (hidden size 32, one or two decoder layers, a one- or two-layer vision
tower at 16-32 px), a processor whose image-token expansion matches the model, and
:func:`batch` building a two-sample batch (one image each) with labels through that processor,
so every family gets its real inputs (``image_sizes``, ``image_grid_thw``,
``pixel_attention_mask``, ``token_type_ids``, ``cross_attention_mask``, ...). Everything is
built offline from configs; nothing is downloaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from tests.models import zoo_builders as b  # noqa: E402
from tests.models.zoo_parts import SPECIAL, clip, siglip, text, token_id, tokenizer  # noqa: E402

__all__ = ["BY_KEY", "SPECS", "Spec", "batch", "build", "clip", "make_processor", "siglip", "text"]
__all__ += ["token_id", "tokenizer"]


@dataclass(frozen=True)
class Spec:
    """One family in the test matrix.

    Args:
        key: test id.
        model_type: ``config.model_type`` of the built model.
        build: the tiny random model (call under a seed).
        processor: its processor (``None``: text only, the tokenizer).
        prompt: one user turn with the family's image placeholder, then the answer.
        sizes: ``(width, height)`` of the two samples' images.
        nested: the processor wants images as one list per sample.
    """

    key: str
    model_type: str
    build: Callable[[], nn.Module]
    processor: Callable[[], Any] | None
    prompt: str = "USER: what colour is it? ASSISTANT: red"
    sizes: tuple[tuple[int, int], tuple[int, int]] = ((32, 32), (32, 32))
    nested: bool = False


_QWEN_PROMPT = "USER: <|vision_start|><|image_pad|><|vision_end|>what colour is it? ASSISTANT: red"
_WIDE = ((32, 16), (16, 32))
SPECS: tuple[Spec, ...] = (
    Spec("llava-llama", "llava", b.llava(tf.LlamaConfig), b.llava_processor,
         "USER: <image>\nwhat colour is it? ASSISTANT: red"),
    Spec("llava-mistral", "llava", b.llava(tf.MistralConfig), b.llava_processor,
         "USER: <image>\nwhat colour is it? ASSISTANT: red"),
    Spec("llava-qwen2", "llava", b.llava(tf.Qwen2Config), b.llava_processor,
         "USER: <image>\nwhat colour is it? ASSISTANT: red"),
    Spec("llava_next", "llava_next", b.llava_next, b.llava_next_processor,
         "USER: <image>\nwhat colour is it? ASSISTANT: red", _WIDE),
    Spec("llava_onevision", "llava_onevision", b.onevision, b.onevision_processor,
         "USER: <image>\nwhat colour is it? ASSISTANT: red", _WIDE),
    Spec("qwen2_vl", "qwen2_vl", b.qwen2_vl, b.qwen_processor(tf.Qwen2VLProcessor), _QWEN_PROMPT,
         _WIDE),
    Spec("qwen2_5_vl", "qwen2_5_vl", b.qwen2_5_vl, b.qwen_processor(tf.Qwen2_5_VLProcessor),
         _QWEN_PROMPT, _WIDE),
    Spec("qwen3_vl", "qwen3_vl", b.qwen3_vl, b.qwen_processor(tf.Qwen3VLProcessor), _QWEN_PROMPT,
         _WIDE),
    Spec("gemma3", "gemma3", b.gemma3, b.gemma3_processor,
         "USER: <start_of_image> what colour is it? ASSISTANT: red", nested=True),
    Spec("paligemma", "paligemma", b.paligemma, b.paligemma_processor),
    Spec("idefics3", "idefics3", b.idefics(tf.Idefics3Config, tf.Idefics3ForConditionalGeneration),
         b.idefics3_processor, "USER: <image>what colour is it? ASSISTANT: red", nested=True),
    Spec("smolvlm", "smolvlm", b.idefics(tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration),
         b.idefics3_processor, "USER: <image>what colour is it? ASSISTANT: red", nested=True),
    Spec("mllama", "mllama", b.mllama, b.mllama_processor,
         "<|image|>USER: what colour is it? ASSISTANT: red", ((16, 16), (32, 16)), nested=True),
    Spec("llama", "llama", b.causal(tf.LlamaConfig, tf.LlamaForCausalLM), None),
    Spec("qwen2", "qwen2", b.causal(tf.Qwen2Config, tf.Qwen2ForCausalLM), None),
    Spec("qwen3", "qwen3", b.causal(tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim=8), None),
)  # fmt: skip
BY_KEY = {spec.key: spec for spec in SPECS}


def build(spec: Spec, seed: int = 0) -> nn.Module:
    """The family's tiny model, random weights from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    return spec.build().eval()


def _image(size: tuple[int, int], seed: int) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def batch(spec: Spec, processor: Any = None) -> dict[str, torch.Tensor]:
    """Two samples (the second one token longer, so padded) with labels on the text tokens."""
    processor = processor if processor is not None else make_processor(spec)
    texts = [spec.prompt, spec.prompt + " blue"]
    if spec.processor is None:
        out = dict(processor(texts, padding=True, return_tensors="pt"))
    else:
        images = [_image(size, i) for i, size in enumerate(spec.sizes)]
        images = [[im] for im in images] if spec.nested else images
        out = dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))
    labels = out["input_ids"].clone()
    specials = torch.tensor([token_id(t) for t in SPECIAL])
    labels[torch.isin(labels, specials) | (out["attention_mask"] == 0)] = -100
    out["labels"] = labels
    return out


def make_processor(spec: Spec) -> Any:
    """The family's processor (the tokenizer for text-only models)."""
    return spec.processor() if spec.processor is not None else tokenizer()
