"""Export a plain-LoRA adapter (or a one-expert MoLE) as a Hugging Face PEFT LoRA adapter.

The result loads with ``peft.PeftModel.from_pretrained(base_model, out_dir)``. A MoLE adapter
with several experts has no PEFT equivalent (the expert depends on the token) and is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import MoLEConfig
from .inject import PROJECTOR_NAME, AdapterError
from .io import atomic_save_tensors, atomic_write_bytes, read_adapter_config, read_adapter_tensors

_PEFT_PREFIX = "base_model.model."


def _split_expert_key(key: str) -> tuple[str, str, str] | None:
    """``<mlp>.lora_A.<proj>`` -> (mlp path, 'A', proj)."""
    for kind in ("A", "B"):
        marker = f".lora_{kind}."
        if marker in key:
            module, _, proj = key.rpartition(marker)
            return module, kind, proj
    return None


def _projector_root(key: str, projector_modules: list[str]) -> str | None:
    """The projector module a trained tensor belongs to (``None``: not a projector tensor)."""
    for root in projector_modules:
        if key.startswith(root + "."):
            return root
    if not projector_modules and PROJECTOR_NAME in key.split("."):
        return PROJECTOR_NAME
    return None


def _patterns(ranks: dict[str, int], rank: int, scaling: float) -> dict[str, dict]:
    """PEFT's per-module ``rank_pattern`` / ``alpha_pattern`` for modules whose rank differs.

    Every llava-mole LoRA scales by ``alpha / rank`` of the attention rank, whatever its own
    rank (``mlp_rank``), so a module of rank ``r'`` needs ``lora_alpha = scaling * r'`` in PEFT.
    Keys are full module paths (PEFT matches them as a suffix of the module name).
    """
    other = {name: r for name, r in sorted(ranks.items()) if r != rank}
    return {
        "rank_pattern": other,
        "alpha_pattern": {name: scaling * r for name, r in other.items()},
    }


def export_peft(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's LoRA format.

    Args:
        adapter_dir: a directory written by :func:`llava_mole.save_adapter`.
        out_dir: output folder (created).

    Returns:
        ``out_dir``.

    Raises:
        AdapterError: for a MoLE adapter with more than one expert.
    """
    config, payload = read_adapter_config(adapter_dir)
    if config.mode == "mole" and config.num_experts > 1:
        raise AdapterError(
            f"{adapter_dir}: a MoLE adapter with {config.num_experts} experts cannot be exported "
            "to PEFT: its experts are chosen per token by a router, which PEFT LoRA has no "
            "place for (export works for mode='lora' or num_experts=1)"
        )
    # Adapters saved before ``projector_modules`` existed are LLaVA-1.5 style.
    tensors = _peft_tensors(
        adapter_dir, read_adapter_tensors(adapter_dir), payload.get("projector_modules") or []
    )
    peft_config = _peft_config(config, payload, tensors)
    out = tensors.tensors
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(out_dir / "adapter_model.safetensors", out, metadata={"format": "pt"})
    atomic_write_bytes(
        out_dir / "adapter_config.json", (json.dumps(peft_config, indent=2) + "\n").encode()
    )
    return out_dir


@dataclass
class _PeftTensors:
    """An adapter's tensors under PEFT's names, and what PEFT's config must say of them."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)
    trained_projector: set[str] = field(default_factory=set)


def _peft_tensors(
    adapter_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], projector_modules: list[str]
) -> _PeftTensors:
    """LoRA pairs, one-expert MoLE pairs and projector weights, renamed for PEFT."""
    result = _PeftTensors()
    out = result.tensors
    for key, value in tensors.items():
        if key.endswith(".lora_A") or key.endswith(".lora_B"):
            module, kind = key[:-7], key[-1]
            out[f"{_PEFT_PREFIX}{module}.lora_{kind}.weight"] = value.contiguous()
            if kind == "A":
                result.targets.append(module)
                result.ranks[module] = value.shape[0]
            continue
        split = _split_expert_key(key)
        if split is not None:
            mlp, kind, proj = split
            out[f"{_PEFT_PREFIX}{mlp}.{proj}.lora_{kind}.weight"] = value[0].contiguous()
            if kind == "A":
                result.targets.append(f"{mlp}.{proj}")
                result.ranks[f"{mlp}.{proj}"] = value.shape[1]
            continue
        root = _projector_root(key, projector_modules)
        if root is not None:
            out[f"{_PEFT_PREFIX}{key}"] = value.contiguous()
            # PEFT matches modules_to_save as a suffix of the module name.
            result.trained_projector.add(root.removeprefix("model."))
            continue
        raise AdapterError(f"{adapter_dir}: tensor {key!r} has no PEFT LoRA equivalent")
    return result


def _peft_config(config: MoLEConfig, payload: dict[str, Any], tensors: _PeftTensors) -> dict:
    """PEFT's ``adapter_config.json`` for the renamed tensors."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(tensors.targets),
        **_patterns(tensors.ranks, config.rank, config.scaling),
        "modules_to_save": sorted(tensors.trained_projector) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "base_model_name_or_path": payload.get("base_model", {}).get("name_or_path"),
        "inference_mode": True,
    }
