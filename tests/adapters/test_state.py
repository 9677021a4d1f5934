"""Routing state (adapters/state.py, observe.py): balance and z-loss terms, checkpointing, routing stats."""

from __future__ import annotations

import pytest
import torch

from llava_mole import apply_mole, mole_aux_loss
from llava_mole.adapters import enable_routing_stats, routing_stats, set_token_tags
from tests.adapters.common import mole_cfg
from tests.tiny_models import build_llama, build_llava, llava_batch, randomize_adapter


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
