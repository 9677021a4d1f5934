"""The tests' one tiny-model builder: random Llama-family / LLaVA models from configs (offline).

Unit tests of the adapter layers need a model that builds in milliseconds and whose sizes the
assertions can count on (2 decoder layers, width 32, 16 image tokens, vocabulary 100 with the
image token at 99). Every such test builds it here; end-to-end tests use the package's own
tiny checkpoint (:func:`llava_mole.toy.tiny.make_tiny`, the ``tiny_world`` fixture).
Sizes are arguments, so a test that needs another shape says so at the call.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

IMAGE_TOKEN_ID = 99
NUM_IMAGE_TOKENS = 16  # 32 px / patch 8 -> 16 patches (CLS dropped by the "default" strategy)

#: The decoder every unit test uses unless it overrides a value.
TEXT_SIZES: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    max_position_embeddings=128,
)
#: The CLIP tower of :func:`tiny_llava_config`.
VISION_SIZES: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)

#: Causal-LM families with a SwiGLU MLP: (config class, model class).
CAUSAL_LMS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_text_config(family: str = "llama", **overrides: Any) -> PretrainedConfig:
    """A decoder config of ``family`` with :data:`TEXT_SIZES` (``overrides`` replace values)."""
    config_cls, _ = CAUSAL_LMS[family]
    return config_cls(**{**TEXT_SIZES, **overrides})


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """The tiny Llama decoder config (see :func:`tiny_text_config`)."""
    return tiny_text_config("llama", **overrides)


def tiny_llava_config(**text_overrides: Any) -> LlavaConfig:
    """Tiny LLaVA: the tiny Llama, a 2-layer CLIP at 32 px and image token :data:`IMAGE_TOKEN_ID`."""
    return LlavaConfig(
        text_config=tiny_llama_config(**text_overrides),
        vision_config=CLIPVisionConfig(**VISION_SIZES),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def build_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    """A random tiny LLaVA (eval mode), weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(tiny_llava_config()).eval()


def build_causal_lm(family: str = "llama", seed: int = 0) -> PreTrainedModel:
    """A random tiny decoder of ``family`` (eval mode), seeded like :func:`build_llava`."""
    _, model_cls = CAUSAL_LMS[family]
    torch.manual_seed(seed)
    return model_cls(tiny_text_config(family)).eval()


def build_llama(seed: int = 0) -> LlamaForCausalLM:
    """A random tiny Llama (eval mode)."""
    return build_causal_lm("llama", seed)


def llava_batch(batch: int = 2, text_len: int = 8, seed: int = 0, pad_last: int = 0) -> dict:
    """Image tokens then text; optionally the last ``pad_last`` positions of sample 1 padded."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(1, IMAGE_TOKEN_ID - 1, (batch, text_len), generator=gen)
    ids = torch.cat([torch.full((batch, NUM_IMAGE_TOKENS), IMAGE_TOKEN_ID), text], dim=1)
    mask = torch.ones_like(ids)
    if pad_last:
        mask[-1, -pad_last:] = 0
    labels = ids.clone()
    labels[:, :NUM_IMAGE_TOKENS] = -100
    labels[mask == 0] = -100
    pixels = torch.randn(batch, 3, 32, 32, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels}


def randomize_adapter(model: torch.nn.Module, seed: int = 1, scale: float = 0.2) -> None:
    """Give the (zero-initialised) LoRA B factors non-zero values so deltas are visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and ("lora_" in name or "router" in name):
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
