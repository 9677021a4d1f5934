"""The shared expert (``shared_rank``): an ungated LoRA beside the routed experts of a MoLE block."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from llava_mole import MoLEConfig, apply_mole, load_adapter, save_adapter
from llava_mole.adapters import LoRALinear, MoLEMLP
from llava_mole.adapters.inject import merge_lora, unload
from llava_mole.adapters.moe_export import export_moe
from tests.adapters.common import mole_cfg
from tests.tiny_models import build_llava, llava_batch, randomize_adapter


def _block_reference(block: MoLEMLP, x: torch.Tensor) -> torch.Tensor:
    """The block in float64 from its parameters: ``W h + s B_s A_s h + p_e s B_e A_e h``."""
    x = x.double()
    probs = torch.softmax(x @ block.router.weight.double().t(), dim=-1)
    expert = probs.argmax(-1)
    gate = probs.gather(1, expert[:, None])

    def project(name: str, h: torch.Tensor) -> torch.Tensor:
        shared: LoRALinear = getattr(block, name)
        y = h @ shared.base.weight.double().t()
        y = y + shared.scaling * (h @ shared.lora_A.double().t()) @ shared.lora_B.double().t()
        a = block.lora_A[name].double()[expert]  # (N, r, in)
        b = block.lora_B[name].double()[expert]  # (N, out, r)
        routed = torch.einsum("nor,nr->no", b, torch.einsum("nri,ni->nr", a, h))
        return y + gate * block.scaling * routed

    mid = torch.nn.functional.silu(project("gate_proj", x)) * project("up_proj", x)
    return project("down_proj", mid)


@pytest.mark.parametrize("dispatch", ["loop", "dense", "grouped_mm"])
def test_block_matches_a_float64_reference(dispatch):
    model = apply_mole(build_llava(), mole_cfg(shared_rank=2, dispatch=dispatch)).eval()
    randomize_adapter(model, scale=0.5)
    block = model.model.language_model.layers[0].mlp
    assert isinstance(block.gate_proj, LoRALinear) and block.gate_proj.rank == 2
    x = torch.randn(2, 7, block.gate_proj.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = block(x).reshape(14, -1)
    with torch.no_grad():
        reference = _block_reference(block, x.reshape(14, -1))
    scale = reference.abs().max().item()  # float32 against float64: a relative bound
    assert (ours.double() - reference).abs().max().item() <= 1e-6 * scale
    # The shared expert is not a no-op: without it the block computes something else.
    with torch.no_grad():
        for name in block.targets:
            getattr(block, name).lora_B.zero_()
        assert (block(x).reshape(14, -1).double() - reference).abs().max().item() > 1e-3 * scale


def test_shared_expert_trains_and_saves(tmp_path):
    model = apply_mole(build_llava(), mole_cfg(shared_rank=1))
    randomize_adapter(model)
    model.train()
    model(**llava_batch()).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    shared = [n for n in grads if ".mlp.gate_proj.lora_A" in n]
    assert len(shared) == 2  # one per block, a plain (r, in) factor
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in shared)
    model.eval()
    batch = llava_batch()
    ours = model(**batch).logits
    save_adapter(model, tmp_path / "ad")
    card = (tmp_path / "ad" / "README.md").read_text()
    assert "beside a shared (always-on) LoRA of rank 1" in card
    loaded = load_adapter(build_llava(), tmp_path / "ad").eval()
    assert torch.equal(loaded(**batch).logits, ours)
    with pytest.raises(Exception, match="shared_rank: adapter has 1, model has 0"):
        load_adapter(apply_mole(build_llava(), mole_cfg()), tmp_path / "ad")


def test_merge_lora_folds_the_shared_expert_and_unload_restores():
    base = build_llava().eval()
    model = apply_mole(build_llava(), mole_cfg(shared_rank=1)).eval()
    randomize_adapter(model)
    batch = llava_batch()
    ours = model(**batch).logits
    assert merge_lora(model) == 2 * 4 + 2 * 3  # attention and shared-expert layers
    assert (model(**batch).logits - ours).abs().max().item() <= 1e-5
    expected = base(**batch).logits
    plain = unload(model)  # unmerges first: the base weights come back up to rounding
    assert not any(isinstance(m, (LoRALinear, MoLEMLP)) for m in plain.modules())
    assert (plain(**batch).logits - expected).abs().max().item() <= 1e-5
    fresh = apply_mole(build_llava(), mole_cfg(shared_rank=1)).eval()
    randomize_adapter(fresh)
    assert torch.equal(unload(fresh)(**batch).logits, expected)  # never merged: bitwise


def test_export_moe_folds_the_shared_expert_into_every_expert(tmp_path):
    model = apply_mole(build_llava(), mole_cfg(shared_rank=2, gate_weighting="straight")).eval()
    randomize_adapter(model, scale=0.5)
    batch = llava_batch()
    ours = model(**batch).logits
    export_moe(model, tmp_path / "moe")
    twin = AutoModelForImageTextToText.from_pretrained(tmp_path / "moe").eval()
    assert (twin(**batch).logits - ours).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(shared_rank=-1), "shared_rank: must be an integer >= 0"),
        (dict(shared_rank=1, mode="lora"), "shared_rank: a shared expert sits beside"),
        (dict(shared_rank=1, num_experts=1), "raise mlp_rank"),
    ],
)
def test_bad_shared_rank_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        MoLEConfig(**kw)
