"""Injection (adapters/inject.py): which modules of a tiny transformers-5 model get adapted."""

from __future__ import annotations

import pytest
import torch

from llava_mole import MoLEConfig, apply_mole, mole_aux_loss
from llava_mole.adapters import AdapterError, LoRALinear, MoLEMLP, count_trainable
from tests.adapters.common import mole_cfg
from tests.tiny_models import build_causal_lm, build_llama


def test_llava_targets_language_model_only(llava):
    apply_mole(llava, mole_cfg())
    names = [n for n, p in llava.named_parameters() if p.requires_grad]
    assert not any("vision_tower" in n for n in names)
    assert any("multi_modal_projector" in n for n in names)
    lm = llava.model.language_model
    assert all(isinstance(layer.mlp, MoLEMLP) for layer in lm.layers)
    for layer in lm.layers:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert isinstance(getattr(layer.self_attn, proj), LoRALinear)
    for module in llava.model.vision_tower.modules():
        assert not isinstance(module, (LoRALinear, MoLEMLP))
    assert not any(
        p.requires_grad
        for n, p in llava.named_parameters()
        if "embed_tokens" in n or "lm_head" in n
    )


def test_projector_can_stay_frozen(llava):
    apply_mole(llava, mole_cfg(train_projector=False))
    assert not any(p.requires_grad for p in llava.model.multi_modal_projector.parameters())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_causal_lm_families(family):
    model = build_causal_lm(family)
    apply_mole(model, mole_cfg())
    assert sum(isinstance(m, MoLEMLP) for m in model.modules()) == 2
    ids = torch.randint(0, 100, (2, 7))
    out = model(input_ids=ids, labels=ids)
    (out.loss + mole_aux_loss(model)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bad_configs_and_models_name_the_problem():
    with pytest.raises(ValueError, match="MoLEConfig.rank"):
        MoLEConfig(rank=0)
    with pytest.raises(ValueError, match="MoLEConfig.top_k"):
        MoLEConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="MoLEConfig.dropout"):
        MoLEConfig(dropout=1.5)
    with pytest.raises(ValueError, match="MoLEConfig.gate_weighting"):
        MoLEConfig(gate_weighting="soft")
    with pytest.raises(ValueError, match="MoLEConfig.router: must be 'linear' or 'domain'"):
        MoLEConfig(router="oracle")
    with pytest.raises(ValueError, match="MoLEConfig.router_domains: more domains than experts"):
        MoLEConfig(num_experts=2, router="domain", router_domains=["a", "b", "c"])
    with pytest.raises(ValueError, match="MoLEConfig.router: 'domain' routing needs num_experts"):
        MoLEConfig(num_experts=1, router="domain")
    with pytest.raises(ValueError, match="MoLEConfig.router: 'domain' routing is for MoLE"):
        MoLEConfig(mode="lora", router="domain")
    saved = MoLEConfig(router="domain", router_domains=["a", "b"]).to_dict()
    assert saved["router_domains"] == ["a", "b"]
    assert MoLEConfig.from_dict(saved).router_domains == ("a", "b")
    with pytest.raises(ValueError, match="unknown field 'experts'"):
        MoLEConfig.from_dict({"experts": 3})
    with pytest.raises(AdapterError, match="no language model"):
        apply_mole(torch.nn.Linear(3, 3), MoLEConfig())
    model = build_llama()
    with pytest.raises(AdapterError, match="target_tree"):
        apply_mole(model, MoLEConfig(target_tree="model.nothing"))
    apply_mole(model, MoLEConfig())
    with pytest.raises(AdapterError, match="already has an adapter"):
        apply_mole(model, MoLEConfig())


def test_mlp_rank_gives_lora_the_parameter_count_of_mole():
    mole = apply_mole(build_llama(), mole_cfg(num_experts=3, rank=2, alpha=4))
    lora = apply_mole(build_llama(), mole_cfg(mode="lora", rank=2, alpha=4, mlp_rank=6))
    routers = sum(p.numel() for n, p in mole.named_parameters() if "router" in n)
    assert count_trainable(mole) - routers == count_trainable(lora)
    up = lora.model.layers[0].mlp.up_proj
    assert up.rank == 6 and up.scaling == pytest.approx(2.0)
