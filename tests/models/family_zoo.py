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
from functools import cache  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from torch import nn  # noqa: E402

from llava_mole.models.processors import image_only  # noqa: E402

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


# ---- LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision ----------------------------------------------------
def _llava(text_cls) -> Callable[[], nn.Module]:
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


def _llava_processor() -> Any:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return tf.LlavaProcessor(
        image_processor=image,
        tokenizer=tokenizer(),
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def _llava_next() -> nn.Module:
    config = tf.LlavaNextConfig(
        text_config=text(),
        vision_config=clip(image_size=16),
        image_grid_pinpoints=PINPOINTS,
        image_token_id=token_id("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return tf.LlavaNextForConditionalGeneration(config)


def _llava_next_processor() -> Any:
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


def _onevision() -> nn.Module:
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


def _onevision_processor() -> Any:
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


def _qwen2_vl() -> nn.Module:
    vision = dict(depth=1, embed_dim=HIDDEN, hidden_size=HIDDEN, mlp_ratio=2, **_QWEN_VISION)
    config = tf.Qwen2VLConfig(text_config=_qwen_text(), vision_config=vision, **_QWEN_IDS)
    return tf.Qwen2VLForConditionalGeneration(config)


def _qwen2_5_vl() -> nn.Module:
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


def _qwen3_vl() -> nn.Module:
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


def _qwen_processor(cls) -> Callable[[], Any]:
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
def _gemma3() -> nn.Module:
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


def _gemma3_processor() -> Any:
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = tokenizer(
        boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>"
    )
    image = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    return tf.Gemma3Processor(image_processor=image, tokenizer=tok, image_seq_length=4)


def _paligemma() -> nn.Module:
    config = tf.PaliGemmaConfig(
        text_config=text(tf.GemmaConfig, head_dim=8).to_dict(),
        vision_config=siglip(projection_dim=HIDDEN).to_dict(),
        projection_dim=HIDDEN,
        image_token_id=token_id("<image>"),
    )
    return tf.PaliGemmaForConditionalGeneration(config)


def _paligemma_processor() -> Any:
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image.image_seq_length = 16
    return tf.PaliGemmaProcessor(image_processor=image, tokenizer=tokenizer())


# ---- Idefics3, SmolVLM, Mllama -----------------------------------------------------------------
def _idefics(config_cls, model_cls) -> Callable[[], nn.Module]:
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


def _idefics3_processor() -> Any:
    """Also SmolVLM's inputs (the same layout for one unsplit image): SmolVLMProcessor needs
    the optional package num2words."""
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    image = Idefics3ImageProcessorPil(
        size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False
    )
    return tf.Idefics3Processor(image_processor=image, tokenizer=tokenizer(), image_seq_len=4)


def _mllama() -> nn.Module:
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


def _mllama_processor() -> Any:
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    image = MllamaImageProcessorPil(size={"height": 16, "width": 16}, max_image_tiles=2)
    return tf.MllamaProcessor(image_processor=image, tokenizer=tokenizer(image_token="<|image|>"))


def _causal(config_cls, model_cls, **kw) -> Callable[[], nn.Module]:
    return lambda: model_cls(text(config_cls, layers=2, **kw))


_QWEN_PROMPT = "USER: <|vision_start|><|image_pad|><|vision_end|>what colour is it? ASSISTANT: red"
_WIDE = ((32, 16), (16, 32))
SPECS: tuple[Spec, ...] = (
    Spec("llava-llama", "llava", _llava(tf.LlamaConfig), _llava_processor,
         "USER: <image>\nwhat colour is it? ASSISTANT: red"),
    Spec("llava-mistral", "llava", _llava(tf.MistralConfig), _llava_processor,
         "USER: <image>\nwhat colour is it? ASSISTANT: red"),
    Spec("llava-qwen2", "llava", _llava(tf.Qwen2Config), _llava_processor,
         "USER: <image>\nwhat colour is it? ASSISTANT: red"),
    Spec("llava_next", "llava_next", _llava_next, _llava_next_processor,
         "USER: <image>\nwhat colour is it? ASSISTANT: red", _WIDE),
    Spec("llava_onevision", "llava_onevision", _onevision, _onevision_processor,
         "USER: <image>\nwhat colour is it? ASSISTANT: red", _WIDE),
    Spec("qwen2_vl", "qwen2_vl", _qwen2_vl, _qwen_processor(tf.Qwen2VLProcessor), _QWEN_PROMPT,
         _WIDE),
    Spec("qwen2_5_vl", "qwen2_5_vl", _qwen2_5_vl, _qwen_processor(tf.Qwen2_5_VLProcessor),
         _QWEN_PROMPT, _WIDE),
    Spec("qwen3_vl", "qwen3_vl", _qwen3_vl, _qwen_processor(tf.Qwen3VLProcessor), _QWEN_PROMPT,
         _WIDE),
    Spec("gemma3", "gemma3", _gemma3, _gemma3_processor,
         "USER: <start_of_image> what colour is it? ASSISTANT: red", nested=True),
    Spec("paligemma", "paligemma", _paligemma, _paligemma_processor),
    Spec("idefics3", "idefics3", _idefics(tf.Idefics3Config, tf.Idefics3ForConditionalGeneration),
         _idefics3_processor, "USER: <image>what colour is it? ASSISTANT: red", nested=True),
    Spec("smolvlm", "smolvlm", _idefics(tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration),
         _idefics3_processor, "USER: <image>what colour is it? ASSISTANT: red", nested=True),
    Spec("mllama", "mllama", _mllama, _mllama_processor,
         "<|image|>USER: what colour is it? ASSISTANT: red", ((16, 16), (32, 16)), nested=True),
    Spec("llama", "llama", _causal(tf.LlamaConfig, tf.LlamaForCausalLM), None),
    Spec("qwen2", "qwen2", _causal(tf.Qwen2Config, tf.Qwen2ForCausalLM), None),
    Spec("qwen3", "qwen3", _causal(tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim=8), None),
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
