"""Export a MoLE adapter as a standard sparse-MoE checkpoint (Mixtral-style language model).

With top-1 routing and ``gate_weighting="none"`` (the official LLaVA-MoLE release's variant) or
``"straight"`` (the same numbers; only the router's training gradient differs) a MoLE block
computes, for a token routed to expert ``e``,

    down_e(act(gate_e(x)) * up_e(x)),   P_e = W_P + (alpha / r) B_P^e A_P^e  for P in gate, up, down

i.e. a full SwiGLU MLP whose weights are the base plus expert ``e``'s merged LoRA (plus the
shared expert's, which every token uses, when ``shared_rank > 0``). A Mixtral
sparse-MoE block with ``num_experts_per_tok=1`` computes exactly that: its router is a
bias-free ``Linear(d, K)``, it picks the arg-max of the softmax and renormalises the single
top-k weight to 1.0. So the export is exact: the MoLE router becomes the MoE gate, each expert's
merged weights become one Mixtral expert, the attention LoRA is merged into the base, and
everything else (vision tower, trained projector, embeddings, norms) is copied. The result is a
transformers checkpoint of an existing architecture (``LlavaForConditionalGeneration`` with a
``mixtral`` text config, or ``MixtralForCausalLM``) in the layout serving engines read
(``block_sparse_moe.experts.N.w1/w2/w3``); loading it needs no llava-mole.

It costs K full MLPs per layer (for LLaVA-1.5-7B with K=3: about 2 x 4.3B extra parameters).
The default ``gate_weighting="prob"`` multiplies the *delta* by the router probability inside
the SwiGLU (``gate(x) + g * delta``), which no mixture of full experts reproduces; such
adapters are refused.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import MoLEConfig
from .inject import AdapterError, adapter_info, unwrap
from .lora import LoRALinear
from .merge import expert_delta, fold_lora
from .mole import MoLEMLP

# Language models whose decoder layer is Mixtral's minus the MoE (no attention or MLP bias).
_EXPORTABLE_LMS = ("llama", "mistral")
_COPIED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
)


def check_exportable(config: MoLEConfig, where: str) -> None:
    """Refuse, in one line, an adapter that no sparse MoE of full experts reproduces."""
    if config.mode != "mole" or config.num_experts < 2:
        raise AdapterError(
            f"{where}: export-moe needs a MoLE adapter with several experts; a plain-LoRA or "
            "one-expert adapter merges exactly with `llava-mole merge`"
        )
    if config.router != "linear":
        raise AdapterError(f"{where}: router={config.router!r} has no router weights to export")
    if config.top_k != 1:
        raise AdapterError(
            f"{where}: top_k={config.top_k}: only top-1 MoLE adapters export exactly (a top-k "
            "MoE weights full expert outputs, MoLE weights only the LoRA deltas)"
        )
    if config.gate_weighting == "prob":
        raise AdapterError(
            f"{where}: gate_weighting={config.gate_weighting!r} scales the LoRA delta by the "
            "router probability inside the MLP, which no mixture of full experts computes; "
            "only gate_weighting 'none' (the official release's variant) or 'straight' "
            "export exactly"
        )


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return getattr(config, "text_config", None) or config


def mixtral_text_config(text: Any, num_experts: int) -> Any:
    """A ``MixtralConfig`` with the Llama/Mistral LM's shapes and ``K`` top-1 experts."""
    from transformers import MixtralConfig

    kind = getattr(text, "model_type", None)
    if kind not in _EXPORTABLE_LMS:
        raise AdapterError(
            f"export-moe: a {kind!r} language model has no sparse-MoE twin in transformers that "
            f"matches it exactly (supported: {', '.join(_EXPORTABLE_LMS)})"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(text, flag, False):
            raise AdapterError(f"export-moe: {flag}=True has no place in a Mixtral layer")
    fields = {k: getattr(text, k) for k in _COPIED_FIELDS if hasattr(text, k)}
    return MixtralConfig(
        **fields,
        sliding_window=getattr(text, "sliding_window", None),
        num_local_experts=num_experts,
        num_experts_per_tok=1,
        output_router_logits=False,
        router_jitter_noise=0.0,
    )


def _projection_weight(projection: nn.Module) -> torch.Tensor:
    """A block projection's weight in float32, with its shared expert (if any) folded in."""
    weight = projection.weight.detach().float()
    if isinstance(projection, LoRALinear) and not projection.merged:
        weight = weight + projection.delta_weight().float()
    return weight


def _moe_tensors(block: MoLEMLP, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The Mixtral block's router and fused expert weights for one MoLE block."""
    experts: dict[str, list[torch.Tensor]] = {"gate_proj": [], "up_proj": [], "down_proj": []}
    for name, weights in experts.items():
        base = _projection_weight(getattr(block, name))
        for e in range(block.num_experts):
            delta = expert_delta(block, name, e) if name in block.targets else 0.0
            weights.append((base + delta).to(dtype))
    gate_up = [torch.cat([g, u], dim=0) for g, u in zip(experts["gate_proj"], experts["up_proj"])]
    return {
        f"{prefix}gate.weight": block.router.weight.detach().to(dtype),
        f"{prefix}experts.gate_up_proj": torch.stack(gate_up),
        f"{prefix}experts.down_proj": torch.stack(experts["down_proj"]),
    }


def moe_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the exported model, keyed by the Mixtral-style model's parameter names."""
    model = unwrap(model)
    state = fold_lora(model, merge_experts=False)  # attention LoRA merged, MLPs as they are
    for name, block in model.named_modules():
        if isinstance(block, MoLEMLP):
            for key in [k for k in state if k.startswith(f"{name}.")]:
                del state[key]
            state.update(_moe_tensors(block, f"{name}.", block.gate_proj.weight.dtype))
    return state


def export_moe_model(model: nn.Module) -> nn.Module:
    """Build the sparse-MoE twin of an adapted model (weights on the model's device and dtype).

    Raises:
        AdapterError: the adapter or the language model cannot be exported exactly.
    """
    info = adapter_info(model)
    if info is None:
        raise AdapterError("export-moe: the model has no llava-mole adapter")
    check_exportable(info.config, "export-moe")
    model = unwrap(model)
    text = _text_config(model)
    mixtral = mixtral_text_config(text, info.config.num_experts)
    if getattr(model.config, "text_config", None) is not None:
        from transformers import LlavaForConditionalGeneration

        if type(model).__name__ != "LlavaForConditionalGeneration":
            raise AdapterError(
                f"export-moe: {type(model).__name__} is not supported (LLaVA-1.5-style "
                "LlavaForConditionalGeneration or a Llama/Mistral causal LM)"
            )
        config = copy.deepcopy(model.config)
        config.text_config = mixtral
        cls = LlavaForConditionalGeneration
    else:
        from transformers import MixtralForCausalLM

        config, cls = mixtral, MixtralForCausalLM
    state = moe_state_dict(model)
    with torch.device("meta"):
        twin = cls(config)
    missing, unexpected = twin.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise AdapterError(
            f"export-moe: the {cls.__name__} twin does not fit "
            f"(missing {missing[:2]}, unexpected {unexpected[:2]})"
        )
    _copy_buffers(twin, model)
    return twin.eval()


def _copy_buffers(twin: nn.Module, source: nn.Module) -> None:
    """Fill the twin's non-persistent buffers (built on the meta device) from the source.

    They are fixed functions of the config (rotary frequencies, position ids), and the twin
    shares the source's layout outside the MLPs, so each has a same-named source buffer.
    """
    from_source = dict(source.named_buffers())
    for name, buffer in list(twin.named_buffers()):
        if buffer.device.type != "meta":
            continue
        if name not in from_source or from_source[name].shape != buffer.shape:
            raise AdapterError(f"export-moe: no source buffer for {name!r}")
        owner, _, attr = name.rpartition(".")
        module = twin.get_submodule(owner)
        module.register_buffer(attr, from_source[name].clone(), persistent=False)


def export_moe(model: nn.Module, out: str | os.PathLike, processor: Any | None = None) -> Path:
    """Write the sparse-MoE twin of ``model`` as a Hugging Face checkpoint in ``out``."""
    twin = export_moe_model(model)
    out = Path(out)
    twin.save_pretrained(str(out))
    if processor is not None:
        processor.save_pretrained(str(out))
    return out
