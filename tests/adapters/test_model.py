"""MoLE and LoRA injected into tiny transformers-5 models: structure, gradients, losses, generation."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from llava_mole import MoLEConfig, apply_mole, mole_aux_loss
from llava_mole.adapters import (
    AdapterError,
    LoRALinear,
    MoLEMLP,
    count_trainable,
    enable_routing_stats,
    merge_lora,
    merge_mole,
    routing_stats,
    set_token_tags,
    unmerge_lora,
)
from tests.conftest import build_llama, build_llava, llava_batch, randomize_adapter


def mole_cfg(**kw) -> MoLEConfig:
    base = dict(rank=4, alpha=8, num_experts=3, dropout=0.0)
    base.update(kw)
    return MoLEConfig(**base)


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


@pytest.mark.parametrize(
    "build",
    [
        build_llama,
        lambda: MistralForCausalLM(
            MistralConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=100,
            )
        ),
        lambda: Qwen2ForCausalLM(
            Qwen2Config(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=100,
            )
        ),
    ],
)
def test_causal_lm_families(build):
    model = build()
    apply_mole(model, mole_cfg())
    assert sum(isinstance(m, MoLEMLP) for m in model.modules()) == 2
    ids = torch.randint(0, 100, (2, 7))
    out = model(input_ids=ids, labels=ids)
    (out.loss + mole_aux_loss(model)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_router_gets_gradient_from_lm_loss_alone(llava):
    apply_mole(llava, mole_cfg(balance_coef=0.0))
    randomize_adapter(llava)
    llava.train()
    llava(**llava_batch()).loss.backward()  # no auxiliary loss added
    for layer in llava.model.language_model.layers:
        assert layer.mlp.router.weight.grad.abs().sum() > 0


def test_gate_weighting_none_router_learns_only_from_balance(llava):
    apply_mole(llava, mole_cfg(gate_weighting="none", balance_coef=0.01))
    randomize_adapter(llava)
    out = llava(**llava_batch())
    out.loss.backward(retain_graph=True)
    router = llava.model.language_model.layers[0].mlp.router.weight
    assert router.grad is None or router.grad.abs().sum() == 0
    mole_aux_loss(llava).backward()
    assert router.grad.abs().sum() > 0


def test_every_expert_gets_a_gradient_each_step(llava):
    apply_mole(llava, mole_cfg(num_experts=4, dispatch="loop"))
    randomize_adapter(llava)
    mlp = llava.model.language_model.layers[0].mlp

    class ToExpertZero(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 4)
            logits[:, 0] = 5.0
            return logits + 0 * x[:, :4]

    mlp.router = ToExpertZero()  # every token of block 0 to expert 0: experts 1-3 idle
    batch = llava_batch()
    out = llava(**batch)
    (out.loss + mole_aux_loss(llava)).backward()
    for name, p in llava.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
    assert mlp.lora_A["gate_proj"].grad[1:].abs().max() == 0  # idle experts: zero, not None


def test_single_expert_equals_plain_lora(llava):
    lora = copy.deepcopy(llava)
    apply_mole(llava, mole_cfg(num_experts=1, dropout=0.1))
    apply_mole(lora, mole_cfg(mode="lora", dropout=0.1))
    randomize_adapter(llava, seed=5)
    # Same values in both: the one expert's factors are the baseline's MLP LoRA factors.
    with torch.no_grad():
        for layer_m, layer_l in zip(
            llava.model.language_model.layers, lora.model.language_model.layers
        ):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                getattr(layer_l.mlp, proj).lora_A.copy_(layer_m.mlp.lora_A[proj][0])
                getattr(layer_l.mlp, proj).lora_B.copy_(layer_m.mlp.lora_B[proj][0])
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer_l.self_attn, proj).lora_A.copy_(
                    getattr(layer_m.self_attn, proj).lora_A
                )
                getattr(layer_l.self_attn, proj).lora_B.copy_(
                    getattr(layer_m.self_attn, proj).lora_B
                )
    batch = llava_batch()
    for train in (False, True):  # train: same dropout masks from the same RNG stream
        llava.train(train)
        lora.train(train)
        torch.manual_seed(0)
        a = llava(**batch)
        torch.manual_seed(0)
        b = lora(**batch)
        assert torch.equal(a.logits, b.logits)
        assert mole_aux_loss(llava) is None


def test_balance_loss_excludes_padding_and_is_one_when_uniform(llava):
    apply_mole(llava, mole_cfg(num_experts=4))
    with torch.no_grad():
        for layer in llava.model.language_model.layers:
            layer.mlp.router.weight.zero_()  # uniform probabilities: P_k = 1/4
    llava(**llava_batch())
    # P_k = 1/4 for all k and sum_k f_k = 1 -> K * sum f P = 4 * 1/4 = 1
    assert mole_aux_loss(llava).item() == pytest.approx(0.01 * 1.0)

    # Padding must not count: a batch whose padded tail has other hidden states gives the
    # same balance loss as the batch cut before the padding.
    apply_cfg = mole_cfg(num_experts=3)
    model = build_llava()
    apply_mole(model, apply_cfg)
    randomize_adapter(model)
    padded = llava_batch(batch=1, text_len=10, pad_last=4)
    cut = {k: (v[:, :-4] if k != "pixel_values" else v) for k, v in padded.items()}
    model(**padded)
    a = mole_aux_loss(model)
    model(**cut)
    b = mole_aux_loss(model)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    model(**{**padded, "attention_mask": torch.ones_like(padded["attention_mask"])})
    assert mole_aux_loss(model).item() != pytest.approx(a.item(), rel=1e-6)


def test_official_balance_loss_matches_hand_computation():
    model = build_llama()
    apply_mole(model, mole_cfg(num_experts=2, balance_loss="official", balance_coef=1.0))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.weight.zero_()  # p = (1/2, 1/2), all tokens to expert 0
    model(input_ids=torch.randint(0, 100, (3, 5)))
    # per sample: sum_k mean(p_k) * mean(onehot_k) = 1/2 * 1 + 1/2 * 0 = 1/2
    assert mole_aux_loss(model).item() == pytest.approx(0.5)


def test_aux_loss_and_grads_exact_under_activation_checkpointing():
    def run(checkpointing: bool):
        model = build_llava()
        apply_mole(model, mole_cfg(router_z_coef=0.001))
        randomize_adapter(model)
        model.train()
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable({"use_reentrant": False})
        out = model(**llava_batch())
        aux = mole_aux_loss(model)
        (out.loss + aux).backward()
        state = model.__dict__["_mole_state"]
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out.loss.detach(), aux.detach(), len(state.balance), grads

    loss_a, aux_a, n_a, grads_a = run(False)
    loss_b, aux_b, n_b, grads_b = run(True)
    assert n_a == n_b == 2  # recomputation in backward did not record twice
    assert torch.allclose(loss_a, loss_b) and torch.allclose(aux_a, aux_b)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5), name


def test_generate_with_and_without_cache_agree(llava):
    apply_mole(llava, mole_cfg())
    randomize_adapter(llava, scale=0.5)
    batch = llava_batch(batch=2)
    kwargs = dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        max_new_tokens=6,
        do_sample=False,
    )
    with_cache = llava.generate(**kwargs, use_cache=True)
    without = llava.generate(**kwargs, use_cache=False)
    assert torch.equal(with_cache, without)


def test_routing_stats_by_domain_and_token_type(llava):
    apply_mole(llava, mole_cfg())
    randomize_adapter(llava)
    enable_routing_stats(llava)
    set_token_tags(llava, torch.tensor([0, 1]), num_domains=2)
    batch = llava_batch(batch=2, text_len=8, pad_last=3)
    llava(**batch)
    stats = routing_stats(llava)
    assert sorted(stats) == [0, 1]
    counts = stats[0]
    assert counts.shape == (2, 3, 3)  # domain x (text, image, answer) x experts
    assert counts[0, 1].sum() == 16 and counts[1, 1].sum() == 16  # image tokens per sample
    assert counts[0, 0].sum() == 8 and counts[1, 0].sum() == 5  # text tokens, padding excluded
    assert counts[:, 2].sum() == 0  # no answer positions marked

    # Positions marked as answer-producing move from "text" to "answer".
    enable_routing_stats(llava)
    answer = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    answer[0, -2:] = True
    set_token_tags(llava, torch.tensor([0, 1]), num_domains=2, answer_mask=answer)
    llava(**batch)
    counts = routing_stats(llava)[0]
    assert counts[0, 2].sum() == 2 and counts[0, 0].sum() == 6
    assert counts[1, 2].sum() == 0 and counts[1, 0].sum() == 5


def test_merge_and_unmerge_lora(llava):
    apply_mole(llava, mole_cfg(mode="lora"))
    randomize_adapter(llava)
    batch = llava_batch()
    before = llava(**batch).logits
    assert merge_lora(llava) == 2 * 7
    merged = llava(**batch).logits
    assert torch.allclose(before, merged, atol=1e-5)
    unmerge_lora(llava)
    assert torch.allclose(before, llava(**batch).logits, atol=1e-5)
    with pytest.raises(AdapterError, match="router picks the expert per token"):
        merge_mole(llava)


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
