"""Interop: save_pretrained of adapted models, unload, merge, PEFT, sparse-MoE export, file modes."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    LlavaForConditionalGeneration,
)

from llava_mole import MoLEConfig, apply_mole, load_adapter, save_adapter
from llava_mole.adapters import AdapterError, LoRALinear, MoLEMLP
from llava_mole.adapters.inject import adapter_info, unload
from llava_mole.adapters.io import atomic_write_bytes, record_evaluation
from llava_mole.adapters.merge import merge_and_save, merge_and_unload
from llava_mole.adapters.moe_export import export_moe
from llava_mole.adapters.observe import enable_routing_stats, routing_stats
from llava_mole.adapters.peft_export import export_peft
from tests.tiny_models import build_llama, build_llava, llava_batch, randomize_adapter


def adapted(mode: str = "mole", **kw) -> torch.nn.Module:
    settings = dict(mode=mode, rank=4, alpha=8, num_experts=3, dropout=0.0)
    settings.update(kw)
    model = apply_mole(build_llava(), MoLEConfig(**settings))
    randomize_adapter(model)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.weight.add_(0.3)
    return model.eval()


@pytest.mark.parametrize("mode", ["mole", "lora"])
def test_save_pretrained_keeps_every_base_weight(tmp_path, mode):
    model = adapted(mode)
    batch = llava_batch()
    model.save_pretrained(tmp_path / "full")
    plain, info = LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "full", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all("lora_" in k or ".router." in k for k in info["unexpected_keys"])
    # Every base weight is the trained model's: the plain model is the base plus the projector.
    reference = unload(adapted(mode))
    assert torch.equal(plain.eval()(**batch).logits, reference(**batch).logits)
    # The full state dict (base names + adapter keys) restores the adapted model exactly.
    again = apply_mole(build_llava(seed=7), adapter_info(model).config).eval()
    again.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(again(**batch).logits, model(**batch).logits)


def test_state_dict_uses_base_names_and_unmerged_weights():
    model = adapted("lora")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in before
    assert not any(".base." in k for k in before)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.merge()
    after = model.state_dict()
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(after[key], before[key], atol=1e-6)  # the unmerged weight is saved
    assert not after[key].requires_grad


@pytest.mark.parametrize("mode", ["mole", "lora"])
def test_unload_restores_the_plain_model(mode):
    base = build_llava().eval()
    trainable_before = {n: p.requires_grad for n, p in base.named_parameters()}
    model = apply_mole(build_llava(), MoLEConfig(mode=mode, rank=4, num_experts=3)).eval()
    randomize_adapter(model)
    plain = unload(model)
    batch = llava_batch()
    assert torch.equal(plain(**batch).logits, base(**batch).logits)
    assert adapter_info(plain) is None
    assert not any(isinstance(m, (LoRALinear, MoLEMLP)) for m in plain.modules())
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == trainable_before
    assert set(plain.state_dict()) == set(base.state_dict())
    apply_mole(plain, MoLEConfig(rank=2))  # adaptable again
    with pytest.raises(AdapterError, match="no llava-mole adapter"):
        unload(build_llava())


@pytest.mark.parametrize("mode,experts", [("lora", 3), ("mole", 1)])
def test_merge_and_save_loads_without_llava_mole(tmp_path, mode, experts):
    model = adapted(mode, num_experts=experts)
    batch = llava_batch()
    ours = model(**batch).logits
    merge_and_save(model, tmp_path / "merged")
    assert torch.equal(model(**batch).logits, ours)  # the adapted model is left as it was
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == "LlavaForConditionalGeneration"
    assert (merged(**batch).logits - ours).abs().max().item() <= 1e-5
    assert (build_llava()(**batch).logits - ours).abs().max().item() > 1e-3
    plain = merge_and_unload(adapted(mode, num_experts=experts))
    assert (plain(**batch).logits - ours).abs().max().item() <= 1e-5


def test_merge_refuses_several_experts(tmp_path):
    with pytest.raises(AdapterError, match="3 experts has no single merged weight.*export-moe"):
        merge_and_save(adapted("mole"), tmp_path / "merged")


def test_peft_refuses_a_mole_adapter_with_one_line_how_to_load(tmp_path):
    peft = pytest.importorskip("peft")
    save_adapter(adapted("mole"), tmp_path / "ad")
    with pytest.raises(Exception) as caught:
        peft.PeftModel.from_pretrained(build_llava(), str(tmp_path / "ad"))
    message = str(caught.value)
    assert "llava_mole.load_adapter" in message and "\n" not in message
    load_adapter(build_llava(), tmp_path / "ad")  # ours still loads it


def test_export_peft_of_the_rank_k_r_control(tmp_path):
    """mode='lora' with mlp_rank = K*r: PEFT needs rank_pattern/alpha_pattern to load it."""
    peft = pytest.importorskip("peft")
    model = adapted("lora", mlp_rank=12)
    save_adapter(model, tmp_path / "ad")
    export_peft(tmp_path / "ad", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {12}
    assert set(config["alpha_pattern"].values()) == {24.0}  # alpha/r = 2 at rank 12
    theirs = peft.PeftModel.from_pretrained(build_llava(), str(tmp_path / "peft")).eval()
    batch = llava_batch()
    assert (theirs(**batch).logits - model(**batch).logits).abs().max().item() <= 1e-5


def _experts_used(model: torch.nn.Module, batch: dict) -> int:
    enable_routing_stats(model)
    with torch.no_grad():
        model(**batch)
    counts = routing_stats(model)
    enable_routing_stats(model, enabled=False)
    return max(int((c > 0).sum()) for c in counts.values())


@pytest.mark.parametrize(
    ("family", "gate"), [("llava", "none"), ("llama", "none"), ("llava", "straight")]
)
def test_export_moe_equals_the_mole_model(tmp_path, family, gate):
    settings = MoLEConfig(rank=4, alpha=8, num_experts=3, gate_weighting=gate, dropout=0.0)
    build, auto = (build_llava, AutoModelForImageTextToText)
    batch = llava_batch()
    if family == "llama":
        build, auto = (build_llama, AutoModelForCausalLM)
        batch = {"input_ids": batch["input_ids"] % 90, "attention_mask": batch["attention_mask"]}
    model = apply_mole(build(), settings).eval()
    randomize_adapter(model, scale=0.5)
    assert _experts_used(model, batch) >= 2  # routing is not trivially one expert
    ours = model(**batch).logits
    export_moe(model, tmp_path / "moe")
    text = json.loads((tmp_path / "moe" / "config.json").read_text())
    text = text.get("text_config", text)
    assert text["model_type"] == "mixtral" and text["num_experts_per_tok"] == 1
    assert text["num_local_experts"] == 3
    twin = auto.from_pretrained(tmp_path / "moe").eval()
    assert (twin(**batch).logits - ours).abs().max().item() <= 1e-4
    prompt = {k: v[:1] for k, v in batch.items() if k != "labels"}
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**prompt, **settings), twin.generate(**prompt, **settings))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(gate_weighting="prob"), "gate_weighting='prob'"),
        (dict(gate_weighting="none", top_k=2), "top_k=2"),
        (dict(mode="lora"), "llava-mole merge"),
    ],
)
def test_export_moe_refuses_inexact_adapters(tmp_path, kw, match):
    with pytest.raises(AdapterError, match=match):
        export_moe(adapted(**kw), tmp_path / "moe")


def _cli(capsys, *args: str) -> tuple[int, str]:
    """The CLI in this process (same error handling as the console script, no interpreter start)."""
    from llava_mole.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


def test_merge_and_export_moe_cli(tiny_world, tmp_path, capsys):
    model_dir = tiny_world["model"]
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    apply_mole(model, MoLEConfig(rank=2, num_experts=2, gate_weighting="none"))
    randomize_adapter(model)
    save_adapter(model, tmp_path / "none")
    code, err = _cli(capsys, "export-moe", str(tmp_path / "none"), str(tmp_path / "moe"))
    assert code == 0, err
    assert (tmp_path / "moe" / "processor_config.json").exists() or any(
        "tokenizer" in p.name for p in (tmp_path / "moe").iterdir()
    )
    AutoModelForImageTextToText.from_pretrained(tmp_path / "moe")

    lora = AutoModelForImageTextToText.from_pretrained(model_dir)
    save_adapter(apply_mole(lora, MoLEConfig(mode="lora", rank=2)), tmp_path / "lora")
    code, err = _cli(capsys, "merge", str(tmp_path / "lora"), str(tmp_path / "merged"))
    assert code == 0, err
    assert (tmp_path / "merged" / "config.json").is_file()


def test_export_moe_cli_bad_adapters(tmp_path, capsys):
    save_adapter(adapted("mole"), tmp_path / "prob")
    save_adapter(adapted("mole", gate_weighting="none", top_k=2), tmp_path / "top2")
    save_adapter(adapted("mole", gate_weighting="none"), tmp_path / "corrupt")
    (tmp_path / "corrupt" / "adapter_config.json").write_text("{broken")
    for folder, expected in (
        ("prob", "gate_weighting='prob'"),
        ("top2", "top_k=2"),
        ("corrupt", "not valid JSON"),
    ):
        code, err = _cli(capsys, "export-moe", str(tmp_path / folder), str(tmp_path / "out"))
        assert code == 2, err
        first = err.strip().splitlines()[0]
        assert first.startswith("llava-mole export-moe: error:") and expected in first, first
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        save_adapter(adapted("lora"), tmp_path / "ad")
        atomic_write_bytes(tmp_path / "report.md", b"x")
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "ad").iterdir()] + [tmp_path / "report.md"]
    assert len(files) == 4
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_model_card_describes_the_adapter(tmp_path):
    model = adapted("mole")
    save_adapter(model, tmp_path / "ad", extra={"training": {"mixture": "mix.yaml", "steps": 40}})
    card = (tmp_path / "ad" / "README.md").read_text()
    assert "3 LoRA experts of rank 4" in card and "LlavaForConditionalGeneration" in card
    assert "mix.yaml" in card and "optimizer steps: 40" in card
    assert "## Evaluation" not in card
    record_evaluation(
        tmp_path / "ad", "test", {"general": {"metric": "exact_match", "n": 6, "score": 0.5}}
    )
    card = (tmp_path / "ad" / "README.md").read_text()
    assert "| general | exact_match | 6 | 0.5000 |" in card
    load_adapter(build_llava(), tmp_path / "ad")  # the recorded scores do not break loading
