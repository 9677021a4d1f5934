"""Shared fixtures: tiny Hugging Face models built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

IMAGE_TOKEN_ID = 99
NUM_IMAGE_TOKENS = 16  # 32 px / patch 8 -> 16 patches (CLS dropped by the "default" strategy)


def tiny_llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=128,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llava_config() -> LlavaConfig:
    return LlavaConfig(
        text_config=tiny_llama_config(),
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def build_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(tiny_llava_config()).eval()


def build_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


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


@pytest.fixture
def llava():
    return build_llava()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A tiny (not pretrained) LLaVA model directory and a small 3-domain synthetic data set."""
    from llava_mole.data.synthetic import make_data
    from llava_mole.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny_world")
    model_dir = make_tiny(root / "model", seed=0, pretrain=False, progress=False)
    data_dir = make_data(root / "data", samples_per_domain=24, test_per_domain=6, seed=0)
    return {
        "model": model_dir,
        "data": data_dir,
        "mixture": data_dir / "mixture.yaml",
        "root": root,
    }
