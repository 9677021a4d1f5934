"""One test matrix over every supported family (PEFT style): family x adapter x dispatch path.

Each case builds the family's tiny random model (``family_zoo``), a batch built by the family's
own processor, and runs the same checks: identical logits at init (B = 0), the adapter on the
language model only, gradients to every adapter tensor, router and the projector after one
forward+backward, the vision tower untouched (no adapter, no gradient, same weights after an
optimizer step), and a bit-exact save_adapter / load_adapter round trip.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llava_mole import MoLEConfig, apply_mole, mole_aux_loss
from llava_mole.adapters import LoRALinear, MoLEMLP, load_adapter, save_adapter
from llava_mole.adapters.inject import adapter_info
from llava_mole.models.families import family_of, projector_roots, under, vision_roots
from tests.models import family_zoo as zoo
from tests.tiny_models import randomize_adapter

ADAPTERS = {
    "mole-loop": dict(mode="mole", dispatch="loop"),
    "mole-dense": dict(mode="mole", dispatch="dense"),
    "lora": dict(mode="lora"),
}
CASES = [(spec.key, adapter) for spec in zoo.SPECS for adapter in ADAPTERS]
_BATCHES: dict[str, dict[str, torch.Tensor]] = {}


def config(adapter: str, **kw) -> MoLEConfig:
    settings = dict(rank=4, alpha=8, num_experts=3, dropout=0.0, **ADAPTERS[adapter])
    settings.update(kw)
    return MoLEConfig(**settings)


def inputs(spec: zoo.Spec) -> dict[str, torch.Tensor]:
    """The family's processor-built batch (built once per family)."""
    if spec.key not in _BATCHES:
        _BATCHES[spec.key] = zoo.batch(spec)
    return _BATCHES[spec.key]


def parts(model: nn.Module) -> tuple[list[str], list[str]]:
    """Vision-tower and projector parameter names (the projector is not the tower)."""
    family = family_of(model)
    vision, projector = vision_roots(model, family), projector_roots(model, family)
    names = [n for n, _ in model.named_parameters()]
    in_projector = [n for n in names if under(n, projector)]
    in_vision = [n for n in names if under(n, vision) and n not in in_projector]
    return in_vision, in_projector


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def check_structure(model: nn.Module, spec: zoo.Spec, adapter: str) -> None:
    info = adapter_info(model)
    assert info.family is not None and spec.model_type in family_of(model).model_types
    tree = model.get_submodule(info.target_tree)
    for layer in tree.layers:
        if adapter == "lora":
            projections = ("gate_proj", "up_proj", "down_proj")
            assert all(isinstance(getattr(layer.mlp, p), LoRALinear) for p in projections)
        else:
            assert isinstance(layer.mlp, MoLEMLP)
        attention = [m for n, m in layer.named_children() if n in ("self_attn", "cross_attn")]
        assert attention and all(isinstance(a.q_proj, LoRALinear) for a in attention)
    vision, projector = parts(model)
    family = family_of(model)
    towers, projectors = vision_roots(model, family), projector_roots(model, family)
    for name, module in model.named_modules():
        if under(name, towers) and not under(name, projectors):
            assert not isinstance(module, (LoRALinear, MoLEMLP)), f"adapter in vision: {name}"
    adapter_names = {n for n in info.trainable if "lora_" in n or ".router." in n}
    assert set(info.trainable) == adapter_names | set(projector)
    assert set(info.projector) == set(projector)
    assert bool(projector) == bool(spec.processor), "multimodal families train a projector"
    assert bool(vision) == bool(spec.processor), "multimodal families have a vision tower"
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in vision)


@pytest.mark.parametrize(("key", "adapter"), CASES, ids=[f"{k}-{a}" for k, a in CASES])
def test_family(key: str, adapter: str, tmp_path) -> None:
    spec = zoo.BY_KEY[key]
    model = zoo.build(spec)
    batch = inputs(spec)
    base = logits(model, batch)
    apply_mole(model, config(adapter))
    assert torch.equal(logits(model, batch), base), "B = 0: the adapter must not change logits"
    check_structure(model, spec, adapter)

    vision, projector = parts(model)
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in vision + projector}
    randomize_adapter(model)
    model.train()
    loss = model(**batch).loss
    aux = mole_aux_loss(model)
    (loss if aux is None else loss + aux).backward()
    for name in adapter_info(model).trainable:
        grad = params[name].grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient: {name}"
    assert all(params[n].grad is None for n in vision)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    assert all(torch.equal(params[n], before[n]) for n in vision), "vision tower changed"
    assert all(not torch.equal(params[n], before[n]) for n in projector), "projector not trained"

    trained = logits(model, batch)
    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(zoo.build(spec), tmp_path / "adapter")
    assert torch.equal(logits(fresh, batch), trained), "round trip must be bit-exact"


@pytest.mark.parametrize("key", ["qwen2_vl", "qwen3_vl", "idefics3", "gemma3", "mllama"])
def test_export_peft_keeps_each_family_projector(key: str, tmp_path) -> None:
    """A plain-LoRA adapter exported to PEFT gives the same logits, projector included."""
    peft = pytest.importorskip("peft")
    from llava_mole.adapters.peft_export import export_peft

    spec = zoo.BY_KEY[key]
    model = apply_mole(zoo.build(spec), config("lora"))
    randomize_adapter(model)
    _, projector = parts(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in projector:
                param.add_(0.1)  # as if trained: the export must carry it
    save_adapter(model, tmp_path / "ad")
    export_peft(tmp_path / "ad", tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(zoo.build(spec), str(tmp_path / "peft")).eval()
    batch = inputs(spec)
    assert (logits(theirs, batch) - logits(model, batch)).abs().max().item() <= 1e-5
