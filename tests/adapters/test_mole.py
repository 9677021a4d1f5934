"""MoLE blocks (adapters/mole.py) inside a tiny model: router gradients, experts, generation."""

from __future__ import annotations

import copy

import torch

from llava_mole import apply_mole, mole_aux_loss
from tests.adapters.common import mole_cfg
from tests.tiny_models import llava_batch, randomize_adapter


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
