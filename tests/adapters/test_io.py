"""Adapter files: round trip, clear errors, PEFT export and the 7B size check."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from llava_mole import MoLEConfig, apply_mole, load_adapter, save_adapter
from llava_mole.adapters import AdapterError, LoRALinear, MoLEMLP, count_trainable
from llava_mole.adapters.peft_export import export_peft
from tests.tiny_models import build_llava, llava_batch, randomize_adapter


def cfg(**kw):
    base = dict(rank=4, alpha=8, num_experts=3)
    base.update(kw)
    return MoLEConfig(**base)


@pytest.mark.parametrize("mode", ["mole", "lora"])
def test_round_trip_gives_identical_logits(tmp_path, mode):
    model = apply_mole(build_llava(), cfg(mode=mode))
    randomize_adapter(model)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.weight.add_(0.5)
    save_adapter(model, tmp_path / "ad")
    files = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    stored = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert any("router" in k for k in stored) == (mode == "mole")
    assert any("multi_modal_projector" in k for k in stored)
    assert not any("vision_tower" in k for k in stored)

    fresh = build_llava()  # same seed: same base weights, fresh adapter
    load_adapter(fresh, tmp_path / "ad")
    batch = llava_batch()
    assert torch.equal(model(**batch).logits, fresh(**batch).logits)


def test_wrong_shape_names_first_tensor(tmp_path):
    save_adapter(apply_mole(build_llava(), cfg(rank=4)), tmp_path / "ad")
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    payload = json.loads(cfg_path.read_text())
    payload["mole"]["rank"] = 8
    cfg_path.write_text(json.dumps(payload))
    with pytest.raises(
        AdapterError, match=r"tensor '.*lora_A' has shape \(4, 32\) in the adapter but \(8, 32\)"
    ):
        load_adapter(build_llava(), tmp_path / "ad")


def test_config_mismatch_and_bad_directories(tmp_path):
    save_adapter(apply_mole(build_llava(), cfg()), tmp_path / "ad")
    other = apply_mole(build_llava(), cfg(num_experts=2))
    with pytest.raises(AdapterError, match="num_experts: adapter has 3, model has 2"):
        load_adapter(other, tmp_path / "ad")
    with pytest.raises(AdapterError, match="adapter directory not found"):
        load_adapter(build_llava(), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json: missing"):
        load_adapter(build_llava(), tmp_path / "empty")
    (tmp_path / "ad" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(build_llava(), tmp_path / "ad")


def test_corrupt_or_foreign_tensors(tmp_path):
    save_adapter(apply_mole(build_llava(), cfg()), tmp_path / "ad")
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(weights))
    with pytest.raises(AdapterError, match="'model.extra.weight' in the adapter has no place"):
        load_adapter(build_llava(), tmp_path / "ad")
    weights.write_bytes(b"garbage" * 10)
    with pytest.raises(AdapterError, match="unreadable safetensors"):
        load_adapter(build_llava(), tmp_path / "ad")


@pytest.mark.parametrize("mode,experts", [("lora", 1), ("mole", 1)])
def test_export_peft_matches_logits(tmp_path, mode, experts):
    peft = pytest.importorskip("peft")
    model = apply_mole(build_llava(), cfg(mode=mode, num_experts=experts))
    randomize_adapter(model)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.weight.mul_(1.5)
    model.eval()
    save_adapter(model, tmp_path / "ad")
    export_peft(tmp_path / "ad", tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(build_llava(), str(tmp_path / "peft")).eval()
    batch = llava_batch()
    ours = model(**batch).logits
    theirs = peft_model(**batch).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    # and the export is not trivially equal to the base model
    assert (build_llava()(**batch).logits - ours).abs().max().item() > 1e-3


def test_plain_lora_matches_peft_lora_numerically():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 20))
    ours = LoRALinear(torch.nn.Linear(12, 20), rank=4, alpha=8, dropout=0.0)
    ours.base.load_state_dict(base[0].state_dict())
    torch.nn.init.normal_(ours.lora_B)
    theirs = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.0)
    )
    layer = theirs.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(5, 12)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)


def test_export_refuses_real_mole(tmp_path):
    save_adapter(apply_mole(build_llava(), cfg(num_experts=3)), tmp_path / "ad")
    with pytest.raises(AdapterError, match="cannot be exported to PEFT"):
        export_peft(tmp_path / "ad", tmp_path / "peft")


def test_llava_15_7b_size_on_meta_device():
    from llava_mole.models.reference import llava_15_7b_config

    config = llava_15_7b_config()
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    k, r, d, ff, layers = 3, 32, 4096, 11008, 32
    apply_mole(model, MoLEConfig(num_experts=k, rank=r, alpha=64))
    assert sum(isinstance(m, MoLEMLP) for m in model.modules()) == 32
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 128
    assert not any(isinstance(m, (LoRALinear, MoLEMLP)) for m in model.model.vision_tower.modules())
    attention = 4 * r * (d + d)
    experts = k * 3 * r * (d + ff)
    router = d * k
    projector = (1024 * d + d) + (d * d + d)
    expected = layers * (attention + experts + router) + projector
    assert expected == 194_125_824
    assert count_trainable(model) == expected


def _rewrite_tensors(directory, change) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    first = sorted(tensors)[0]
    tensors[first] = change(tensors[first])
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda t: t * float("nan"), "holds NaN or Inf"),
        (lambda t: torch.full_like(t, float("inf")), "holds NaN or Inf"),
        (lambda t: t > 0, "is bool; adapter tensors must be floating point"),
        (lambda t: t.to(torch.int64), "is int64"),
    ],
)
def test_adapter_values_are_checked_before_the_model_changes(tmp_path, change, match):
    save_adapter(apply_mole(build_llava(), cfg()), tmp_path / "ad")
    _rewrite_tensors(tmp_path / "ad", change)
    model = build_llava()
    with pytest.raises(AdapterError, match=match):
        load_adapter(model, tmp_path / "ad")
    assert not any(isinstance(m, (LoRALinear, MoLEMLP)) for m in model.modules())


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("format_version", "2", "format_version must be an integer"),
        ("mole", ["x"], "'mole' and 'extra' must be mappings"),
    ],
)
def test_adapter_config_field_types(tmp_path, field, value, match):
    save_adapter(apply_mole(build_llava(), cfg()), tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_config.json"
    payload = json.loads(path.read_text())
    payload[field] = value
    path.write_text(json.dumps(payload))
    with pytest.raises(AdapterError, match=match):
        load_adapter(build_llava(), tmp_path / "ad")


def test_a_string_where_a_list_of_targets_belongs_is_refused():
    with pytest.raises(ValueError, match="attn_targets: must be a list"):
        MoLEConfig.from_dict({"attn_targets": "q_proj"})
    with pytest.raises(ValueError, match="'nope' is not one of"):
        MoLEConfig(mlp_targets=["nope"])
    with pytest.raises(AdapterError, match="no attention projection named 'qq_proj'"):
        apply_mole(build_llava(), MoLEConfig(attn_targets=["q_proj", "qq_proj"]))
