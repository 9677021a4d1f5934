"""A short ``README.md`` model card in every adapter folder, as PEFT and TRL adapters have.

It says what the folder holds (base model, method, K, rank, targets), how it was trained (data
mixture, steps) when the trainer recorded it, per-domain scores once ``llava-mole eval`` has
scored it, and how to load it. It is rebuilt from ``adapter_config.json`` on every save.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
SCORES_KEY = "evaluation"


def _method(mole: dict[str, Any]) -> str:
    rank = mole.get("rank")
    mlp_rank = mole.get("mlp_rank") or rank
    if mole.get("mode") == "none":
        return "no adapter layers: the projector only (stage 1, `llava-mole pretrain`)"
    if mole.get("mode") == "lora":
        return f"plain LoRA (rank {rank} on attention, rank {mlp_rank} on the MLP)"
    experts = mole.get("num_experts")
    shared = mole.get("shared_rank") or 0
    beside = f" beside a shared (always-on) LoRA of rank {shared}" if shared else ""
    return (
        f"sparse Mixture of LoRA Experts (LLaVA-MoLE, arXiv 2401.16160): LoRA rank {rank} on "
        f"attention, {experts} LoRA experts of rank {mlp_rank} per MLP block{beside}, top-"
        f"{mole.get('top_k')} router ({mole.get('router')}), gate weighting "
        f"{mole.get('gate_weighting')!r}"
    )


def _training_lines(extra: dict[str, Any]) -> list[str]:
    training = extra.get("training") or {}
    lines = []
    if training.get("mixture"):
        lines.append(f"- data mixture: `{training['mixture']}`")
    for domain, count in (training.get("domains") or {}).items():
        lines.append(f"  - {domain}: {count} training samples")
    if training.get("steps") is not None:
        lines.append(f"- optimizer steps: {training['steps']}")
    prompt = extra.get("prompt") or {}
    if prompt.get("template"):
        lines.append(f"- prompt template: `{prompt['template']}`")
    return lines


def _score_lines(extra: dict[str, Any]) -> list[str]:
    scores = extra.get(SCORES_KEY) or {}
    rows = scores.get("per_domain") or {}
    if not rows:
        return []
    lines = [
        f"## Evaluation (split `{scores.get('split')}`)",
        "",
        "| domain | metric | n | score |",
        "|---|---|---:|---:|",
    ]
    for domain, row in rows.items():
        lines.append(f"| {domain} | {row['metric']} | {row['n']} | {row['score']:.4f} |")
    return [*lines, ""]


def render_model_card(payload: dict[str, Any]) -> str:
    """The card's Markdown for an ``adapter_config.json`` payload."""
    mole = payload.get("mole", {})
    base = payload.get("base_model", {})
    extra = payload.get("extra") or {}
    lines = [
        "---",
        "library_name: llava-mole",
        "tags: [llava-mole, mole, lora, mixture-of-experts]",
        "---",
        "",
        "# llava-mole adapter",
        "",
        f"- base model: `{base.get('name_or_path') or base.get('class')}` "
        f"({base.get('model_type')}, {base.get('num_hidden_layers')} layers)",
        f"- method: {_method(mole)}",
        f"- scale alpha/r: {mole.get('alpha')}/{mole.get('rank')}; "
        f"projector trained: {mole.get('train_projector')}",
        f"- trained tensors: {payload.get('num_tensors')} "
        f"({payload.get('num_parameters'):,} parameters)",
        *_training_lines(extra),
        "",
        *_score_lines(extra),
        "## Use",
        "",
        "```python",
        "from llava_mole import load_adapter",
        "model = load_adapter(base_model, 'this-folder')",
        "```",
        "",
        "This is a llava-mole adapter, not a PEFT one: `peft.PeftModel.from_pretrained` cannot "
        "load a router over LoRA experts. `llava-mole export-peft` converts plain-LoRA adapters "
        "to PEFT, `llava-mole merge` writes a merged full checkpoint, and `llava-mole export-moe` "
        "writes a top-1 MoLE adapter (gate weighting 'none') as a sparse-MoE checkpoint that "
        "transformers and serving engines load without llava-mole.",
        "",
    ]
    return "\n".join(lines)


def card_for(directory: str | Path) -> str:
    """The card for an adapter folder, from its config."""
    from .io import CONFIG_NAME

    return render_model_card(json.loads((Path(directory) / CONFIG_NAME).read_text()))
