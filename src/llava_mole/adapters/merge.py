"""Merge plain-LoRA adapters into the base weights: a normal full checkpoint, no llava-mole needed.

For every adapted linear layer ``W' = W + (alpha / r) B A`` (the same update the layer adds at
run time). This is exact for plain LoRA (``mode="lora"``) and for a MoLE adapter with one
expert; a MoLE adapter with several experts has no single merged weight (the router picks the
expert per token): it is refused here, and :mod:`llava_mole.adapters.moe_export` writes it as
a sparse mixture of K full MLPs instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .inject import AdapterError, adapter_info, unload, unwrap
from .lora import LoRALinear
from .mole import MoLEMLP


def _check_mergeable(model: nn.Module) -> None:
    info = adapter_info(model)
    if info is None:
        raise AdapterError("merge: the model has no llava-mole adapter")
    config = info.config
    if config.mode == "mole" and config.num_experts > 1:
        raise AdapterError(
            f"merge: a MoLE adapter with {config.num_experts} experts has no single merged "
            "weight (the router picks the expert per token); use `llava-mole export-moe` for a "
            "sparse-MoE checkpoint (top-1, gate_weighting 'none' or 'straight'), or keep the adapter"
        )


def expert_delta(block: MoLEMLP, projection: str, expert: int) -> torch.Tensor:
    """``scaling * B_e A_e`` of one projection of a MoLE block, in float32 (out x in)."""
    a = block.lora_A[projection][expert].float()
    b = block.lora_B[projection][expert].float()
    return b @ a * block.scaling


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model with every LoRA update folded into its base weight.

    The adapted model is not changed. Keys are those of the un-adapted model; adapter tensors
    (``lora_A``, ``lora_B``) are left out. A trained projector is included as trained.

    Raises:
        AdapterError: the model has no adapter, or one that cannot be merged.
    """
    _check_mergeable(model)
    return fold_lora(unwrap(model), merge_experts=True)


def fold_lora(model: nn.Module, merge_experts: bool) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with plain-LoRA updates added to their base weights.

    Args:
        model: an adapted (unwrapped) model; it is not changed.
        merge_experts: also fold expert 0 of each MoLE block into its projections (exact only
            for one expert); otherwise the blocks' base projections stay as they are.
    """
    state = model.state_dict()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, LoRALinear):
            _add(state, f"{prefix}weight", module.delta_weight())
        elif isinstance(module, MoLEMLP) and merge_experts:
            for projection in module.targets:
                _add(state, f"{prefix}{projection}.weight", expert_delta(module, projection, 0))
    return {k: v for k, v in state.items() if not _is_adapter_key(k)}


def _add(state: dict[str, torch.Tensor], key: str, delta: torch.Tensor) -> None:
    weight = state[key]
    state[key] = (weight.float() + delta.float().to(weight.device)).to(weight.dtype)


def _is_adapter_key(key: str) -> bool:
    parts = key.split(".")
    return any(p in ("lora_A", "lora_B") for p in parts) or (
        len(parts) >= 2 and parts[-2] == "router"
    )


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the plain-LoRA updates into the base weights and remove the adapter layers.

    Returns:
        The plain (unwrapped) model, with merged weights.
    """
    _check_mergeable(model)
    merged = merged_state_dict(model)
    plain = unload(model)
    missing, unexpected = plain.load_state_dict(merged, strict=False)
    if unexpected:
        raise AdapterError(f"merge: tensor {unexpected[0]!r} has no place in the plain model")
    return plain


def merge_and_save(model: nn.Module, out: str | os.PathLike, processor: Any | None = None) -> Path:
    """Write the merged model as a normal Hugging Face checkpoint (``save_pretrained`` format).

    The adapted ``model`` is left as it is. ``from_pretrained(out)`` (e.g.
    ``AutoModelForImageTextToText``) then needs no llava-mole and gives the adapted model's
    outputs up to float rounding.

    Args:
        model: a model with a plain-LoRA (or one-expert MoLE) adapter.
        out: output folder.
        processor: optional processor / tokenizer saved beside the weights.
    """
    out = Path(out)
    state = merged_state_dict(model)
    unwrap(model).save_pretrained(str(out), state_dict=state)
    if processor is not None:
        processor.save_pretrained(str(out))
    return out
