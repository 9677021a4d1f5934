"""Models llava-mole cannot adapt as a whole are refused with one line, before anything changes.

Mixture-of-experts language models (text-only and as a LLaVA ``text_config``), models without
SwiGLU MLPs, models with no language model; plus the per-family settings that differ:
``train_projector=False``, a vision ``target_tree``, an unknown family, a missing projector.
"""

from __future__ import annotations

import logging
import re

import pytest
import transformers as tf
from torch import nn

from llava_mole import MoLEConfig, apply_mole
from llava_mole.adapters import AdapterError, LoRALinear, MoLEMLP
from llava_mole.adapters.inject import adapter_info
from tests.models import family_zoo as zoo

_MOE = dict(num_experts=2, moe_intermediate_size=16)


def _mixtral() -> tf.MixtralConfig:
    return zoo.text(tf.MixtralConfig, num_local_experts=2)


def _qwen2_moe() -> tf.Qwen2MoeConfig:
    return zoo.text(tf.Qwen2MoeConfig, shared_expert_intermediate_size=32, **_MOE)


def _qwen3_moe() -> tf.Qwen3MoeConfig:
    return zoo.text(tf.Qwen3MoeConfig, head_dim=8, **_MOE)


def _qwen3_vl_moe() -> nn.Module:
    text = dict(
        _qwen3_moe().to_dict(), rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]}
    )
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32)
    vision.update(patch_size=4, num_position_embeddings=16, deepstack_visual_indexes=[0])
    config = tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision)
    return tf.Qwen3VLMoeForConditionalGeneration(config)


def _llava(text_config) -> nn.Module:
    config = tf.LlavaConfig(text_config=text_config, vision_config=zoo.clip())
    return tf.LlavaForConditionalGeneration(config)


MOE = {
    "Mixtral": (lambda: tf.MixtralForCausalLM(_mixtral()), "MixtralForCausalLM"),
    "Qwen2-MoE": (lambda: tf.Qwen2MoeForCausalLM(_qwen2_moe()), "Qwen2MoeForCausalLM"),
    "Qwen3-MoE": (lambda: tf.Qwen3MoeForCausalLM(_qwen3_moe()), "Qwen3MoeForCausalLM"),
    "LLaVA-Mixtral": (lambda: _llava(_mixtral()), "LlavaForConditionalGeneration"),
    "LLaVA-Qwen2-MoE": (lambda: _llava(_qwen2_moe()), "LlavaForConditionalGeneration"),
    "LLaVA-Qwen3-MoE": (lambda: _llava(_qwen3_moe()), "LlavaForConditionalGeneration"),
    "Qwen3-VL-MoE": (_qwen3_vl_moe, "Qwen3VLMoeForConditionalGeneration"),
}
NOT_SWIGLU = {
    "GPT-2": (
        lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64)),
        "GPT2LMHeadModel is not supported by llava-mole: no language model found: it has no "
        "SwiGLU MLP",
    ),
    "OPT": (
        lambda: tf.OPTForCausalLM(
            tf.OPTConfig(
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                vocab_size=64,
                word_embed_proj_dim=32,
            )
        ),
        "OPTForCausalLM is not supported by llava-mole: no language model found",
    ),
    "Phi": (
        lambda: tf.PhiForCausalLM(zoo.text(tf.PhiConfig)),
        r"PhiForCausalLM is not supported by llava-mole: its MLP blocks \(PhiMLP: fc1/fc2\) are "
        "not SwiGLU",
    ),
    "Phi-3": (
        lambda: tf.Phi3ForCausalLM(zoo.text(tf.Phi3Config)),
        r"Phi3ForCausalLM is not supported by llava-mole: its MLP blocks \(Phi3MLP: "
        "gate_up_proj/down_proj\\) are not SwiGLU",
    ),
}


def _refused(model: nn.Module, mode: str) -> str:
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(AdapterError) as err:
        apply_mole(model, MoLEConfig(mode=mode))
    message = str(err.value)
    assert "\n" not in message
    assert adapter_info(model) is None
    assert not any(isinstance(m, (LoRALinear, MoLEMLP)) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    return message


@pytest.mark.parametrize("mode", ["mole", "lora"])
@pytest.mark.parametrize("name", list(MOE))
def test_moe_language_models_are_refused(name: str, mode: str) -> None:
    build, arch = MOE[name]
    message = _refused(build(), mode)
    assert message.startswith(f"{arch}")
    assert "is not supported by llava-mole: it is a mixture-of-experts language model" in message
    assert "dense SwiGLU MLPs" in message


@pytest.mark.parametrize("mode", ["mole", "lora"])
@pytest.mark.parametrize("name", list(NOT_SWIGLU))
def test_models_without_swiglu_mlps_are_refused(name: str, mode: str) -> None:
    build, match = NOT_SWIGLU[name]
    message = _refused(build(), mode)
    assert re.match(match, message), message


def test_a_module_without_language_model_is_refused() -> None:
    message = _refused(nn.Sequential(nn.Linear(3, 3)), "mole")
    assert message.startswith("Sequential is not supported by llava-mole: no language model")


def test_unknown_family_with_a_swiglu_language_model_is_adapted_with_a_note(caplog) -> None:
    model = tf.SmolLM3ForCausalLM(zoo.text(tf.SmolLM3Config))
    with caplog.at_level(logging.WARNING, logger="llava_mole"):
        apply_mole(model, MoLEConfig())
    assert "SmolLM3ForCausalLM (model_type 'smollm3') is not one of the tested families" in (
        caplog.text
    )
    assert adapter_info(model).family is None
    assert isinstance(model.model.layers[0].mlp, MoLEMLP)


def test_projector_stays_frozen_without_train_projector() -> None:
    model = zoo.build(zoo.BY_KEY["qwen2_vl"])
    apply_mole(model, MoLEConfig(train_projector=False))
    assert adapter_info(model).projector == []
    assert not any(p.requires_grad for n, p in model.named_parameters() if "visual" in n)


def test_vision_target_tree_is_refused() -> None:
    model = zoo.build(zoo.BY_KEY["qwen2_vl"])
    with pytest.raises(AdapterError, match="vision towers are never adapted"):
        apply_mole(model, MoLEConfig(target_tree="model.visual"))


def test_target_tree_with_moe_blocks_is_refused() -> None:
    model = _llava(_mixtral())
    with pytest.raises(AdapterError, match="mixture-of-experts"):
        apply_mole(model, MoLEConfig(target_tree="model.language_model"))


def test_missing_projector_warns(caplog) -> None:
    model = zoo.build(zoo.BY_KEY["llava-llama"])
    del model.model.multi_modal_projector
    with caplog.at_level(logging.WARNING, logger="llava_mole"):
        apply_mole(model, MoLEConfig())
    assert "train_projector: LLaVA-1.5 has no separable projector" in caplog.text
    assert adapter_info(model).projector == []
