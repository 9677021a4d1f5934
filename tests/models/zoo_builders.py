"""The tiny model and processor builder of each family (see ``family_zoo``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers as tf
from torch import nn

from llava_mole.models.processors import image_only
from tests.models.zoo_parts import HIDDEN, PINPOINTS, clip, siglip, text, token_id, tokenizer


# ---- LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision ----------------------------------------------------
def llava(text_cls) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = tf.LlavaConfig(
            text_config=text(text_cls),
            vision_config=clip(),
            image_token_id=token_id("<image>"),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        return tf.LlavaForConditionalGeneration(config)

    return build


def llava_processor() -> Any:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return tf.LlavaProcessor(
        image_processor=image,
        tokenizer=tokenizer(),
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def llava_next() -> nn.Module:
    config = tf.LlavaNextConfig(
        text_config=text(),
        vision_config=clip(image_size=16),
        image_grid_pinpoints=PINPOINTS,
        image_token_id=token_id("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return tf.LlavaNextForConditionalGeneration(config)


def llava_next_processor() -> Any:
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    image = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16},
        crop_size={"height": 16, "width": 16},
        image_grid_pinpoints=PINPOINTS,
    )
    return tf.LlavaNextProcessor(
        image_processor=image,
        tokenizer=tokenizer(),
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def onevision() -> nn.Module:
    config = tf.LlavaOnevisionConfig(
        text_config=text(tf.Qwen2Config),
        vision_config=siglip(image_size=16),
        image_grid_pinpoints=PINPOINTS,
        image_token_id=token_id("<image>"),
        video_token_id=token_id("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    return tf.LlavaOnevisionForConditionalGeneration(config)


def onevision_processor() -> Any:
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    image = LlavaOnevisionImageProcessorPil(
        size={"height": 16, "width": 16}, image_grid_pinpoints=PINPOINTS
    )
    return image_only(tf.LlavaOnevisionProcessor)(
        image_processor=image,
        tokenizer=tokenizer(video_token="<video>"),
        patch_size=8,
        vision_feature_select_strategy="full",
        num_image_tokens=4,
    )


# ---- Qwen2-VL, Qwen2.5-VL, Qwen3-VL ------------------------------------------------------------
_MROPE = {"rope_type": "default", "mrope_section": [1, 1, 2]}
_QWEN_IDS = dict(
    image_token_id=token_id("<|image_pad|>"),
    video_token_id=token_id("<|video_pad|>"),
    vision_start_token_id=token_id("<|vision_start|>"),
    vision_end_token_id=token_id("<|vision_end|>"),
)
_QWEN_VISION = dict(patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_heads=4)


def _qwen_text(layers: int = 1, **kw) -> dict:
    config = text(tf.Qwen2Config, layers=layers).to_dict()
    config.update({"head_dim": 8, "rope_scaling": dict(_MROPE), **kw})
    return config


def qwen2_vl() -> nn.Module:
    vision = dict(depth=1, embed_dim=HIDDEN, hidden_size=HIDDEN, mlp_ratio=2, **_QWEN_VISION)
    config = tf.Qwen2VLConfig(text_config=_qwen_text(), vision_config=vision, **_QWEN_IDS)
    return tf.Qwen2VLForConditionalGeneration(config)


def qwen2_5_vl() -> nn.Module:
    vision = dict(
        depth=1,
        hidden_size=HIDDEN,
        intermediate_size=64,
        out_hidden_size=HIDDEN,
        fullatt_block_indexes=[0],
        window_size=16,
        **_QWEN_VISION,
    )
    config = tf.Qwen2_5_VLConfig(text_config=_qwen_text(), vision_config=vision, **_QWEN_IDS)
    return tf.Qwen2_5_VLForConditionalGeneration(config)


def qwen3_vl() -> nn.Module:
    vision = dict(
        depth=2,
        hidden_size=HIDDEN,
        intermediate_size=64,
        out_hidden_size=HIDDEN,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0],
        **_QWEN_VISION,
    )
    mrope = dict(_MROPE, mrope_interleaved=True)
    config = tf.Qwen3VLConfig(
        # Two layers: the DeepStack features enter after layer 0 and must reach a text token.
        text_config=_qwen_text(2, rope_scaling=mrope),
        vision_config=vision,
        **_QWEN_IDS,
    )
    return tf.Qwen3VLForConditionalGeneration(config)


def qwen_processor(cls) -> Callable[[], Any]:
    def build() -> Any:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        image = Qwen2VLImageProcessorPil(
            patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=1024
        )
        tok = tokenizer(image_token="<|image_pad|>", video_token="<|video_pad|>")
        return image_only(cls)(image_processor=image, tokenizer=tok)

    return build


# ---- Gemma 3, PaliGemma ------------------------------------------------------------------------
def gemma3() -> nn.Module:
    config = tf.Gemma3Config(
        text_config=text(tf.Gemma3TextConfig, head_dim=8, sliding_window=16).to_dict(),
        vision_config=siglip().to_dict(),
        mm_tokens_per_image=4,
        image_token_id=token_id("<image_soft_token>"),
        boi_token_id=token_id("<start_of_image>"),
        eoi_token_id=token_id("<end_of_image>"),
    )
    model = tf.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # initialised to zeros; a trained checkpoint's projector is not
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.05)
    return model


def gemma3_processor() -> Any:
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = tokenizer(
        boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>"
    )
    image = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    return tf.Gemma3Processor(image_processor=image, tokenizer=tok, image_seq_length=4)


def paligemma() -> nn.Module:
    config = tf.PaliGemmaConfig(
        text_config=text(tf.GemmaConfig, head_dim=8).to_dict(),
        vision_config=siglip(projection_dim=HIDDEN).to_dict(),
        projection_dim=HIDDEN,
        image_token_id=token_id("<image>"),
    )
    return tf.PaliGemmaForConditionalGeneration(config)


def paligemma_processor() -> Any:
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image.image_seq_length = 16
    return tf.PaliGemmaProcessor(image_processor=image, tokenizer=tokenizer())


# ---- Idefics3, SmolVLM, Mllama -----------------------------------------------------------------
def idefics(config_cls, model_cls) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        vision = dict(
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
        config = config_cls(
            text_config=text(),
            vision_config=vision,
            scale_factor=2,
            image_token_id=token_id("<image>"),
        )
        return model_cls(config)

    return build


def idefics3_processor() -> Any:
    """Also SmolVLM's inputs (the same layout for one unsplit image): SmolVLMProcessor needs
    the optional package num2words."""
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    image = Idefics3ImageProcessorPil(
        size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False
    )
    return tf.Idefics3Processor(image_processor=image, tokenizer=tokenizer(), image_seq_len=4)


def mllama() -> nn.Module:
    config = tf.MllamaConfig(
        text_config=dict(text().to_dict(), num_hidden_layers=2, cross_attention_layers=[1]),
        vision_config=dict(
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_global_layers=1,
            attention_heads=4,
            image_size=16,
            patch_size=8,
            max_num_tiles=2,
            intermediate_layers_indices=[0],
            vision_output_dim=2 * HIDDEN,
            supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
        ),
        image_token_index=token_id("<|image|>"),
    )
    model = tf.MllamaForConditionalGeneration(config)
    with torch.no_grad():  # tanh gates start closed (0); a trained checkpoint's are open
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(0.5)
    return model


def mllama_processor() -> Any:
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    image = MllamaImageProcessorPil(size={"height": 16, "width": 16}, max_image_tiles=2)
    return tf.MllamaProcessor(image_processor=image, tokenizer=tokenizer(image_token="<|image|>"))


def causal(config_cls, model_cls, **kw) -> Callable[[], nn.Module]:
    return lambda: model_cls(text(config_cls, layers=2, **kw))
