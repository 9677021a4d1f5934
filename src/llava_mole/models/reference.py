"""The paper's base model shape, LLaVA-1.5-7B, as a config (no weights): one place for sizing.

Vicuna-7B v1.5 (Llama, d=4096, MLP 11008, 32 layers, 32 heads) + CLIP ViT-L/14-336 (d=1024,
24 layers, 576 image tokens) + LLaVA's 2-layer GELU projector. Used to count parameters and
memory (tests, ``benchmarks/zero_memory.py``) on the meta device, never to download anything.
"""

from __future__ import annotations

from typing import Any


def llava_15_7b_config(**text_overrides: Any) -> Any:
    """A ``LlavaConfig`` of LLaVA-1.5-7B's shapes (``text_overrides`` go to the Llama config)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
        max_position_embeddings=4096,
    )
    text.update(text_overrides)
    return LlavaConfig(
        text_config=LlamaConfig(**text),
        vision_config=CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        image_token_id=32000,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
