"""Put MoLE (or the plain-LoRA baseline) into a Hugging Face model, in place.

Targets are found by module path, never by bare name: ``q_proj`` also exists in CLIP, so only
the language model's tree is searched (where each family keeps it: see
:mod:`llava_mole.models.families` and :mod:`.targets`) and any path through a vision tower is
refused. Mixture-of-experts and non-SwiGLU language models are refused with one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..models.families import GENERIC_PROJECTOR_NAME
from .config import MoLEConfig
from .errors import AdapterError
from .lora import LoRALinear
from .mole import MoLEMLP
from .state import STATE_ATTR, MoLEState
from .targets import (
    Targets,
    find_targets,
    is_swiglu_mlp,
    projector_modules,
    swiglu_mlps,
    train_projector,
)

__all__ = [
    "ADAPTER_ATTR",
    "PROJECTOR_NAME",
    "AdapterError",
    "AdapterInfo",
    "adapter_info",
    "apply_mole",
    "count_trainable",
    "merge_lora",
    "merge_mole",
    "unload",
    "unmerge_lora",
    "unwrap",
]

ADAPTER_ATTR = "_mole_adapter"
#: The LLaVA-style projector's module name (other families: ``AdapterInfo.projector``).
PROJECTOR_NAME = GENERIC_PROJECTOR_NAME


@dataclass
class AdapterInfo:
    """What ``apply_mole`` did to a model (kept on the model, not saved in its state dict)."""

    config: MoLEConfig
    target_tree: str
    trainable: list[str] = field(default_factory=list)
    state: MoLEState | None = None
    # The family's name (``None``: a model type outside the registry), the parameter names of
    # the projector / connector / merger that ``train_projector`` trains, and its module paths.
    family: str | None = None
    projector: list[str] = field(default_factory=list)
    projector_modules: list[str] = field(default_factory=list)
    # requires_grad of every parameter before injection, restored by ``unload``.
    requires_grad: dict[str, bool] = field(default_factory=dict, repr=False)
    hooks: list[Any] = field(default_factory=list, repr=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The adapted model inside DDP / accelerate / compile wrappers."""
    for _ in range(8):
        if ADAPTER_ATTR in model.__dict__:
            return model
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            break
        model = inner
    return model


def adapter_info(model: nn.Module) -> AdapterInfo | None:
    """The :class:`AdapterInfo` of an adapted model, or ``None``."""
    return unwrap(model).__dict__.get(ADAPTER_ATTR)


def apply_mole(model: nn.Module, config: MoLEConfig) -> nn.Module:
    """Adapt ``model`` in place and freeze everything but the adapter (and projector).

    ``mode="mole"``: plain LoRA on ``attn_targets``; each SwiGLU MLP becomes a :class:`MoLEMLP`
    with ``num_experts`` LoRA experts on ``mlp_targets`` and a top-k router.
    ``mode="lora"``: plain LoRA on ``attn_targets`` and on every ``mlp_targets`` linear.
    ``mode="none"``: nothing is injected; only the projector is trained (stage 1), or with
    ``train_language_model`` everything outside the vision towers (a full fine-tune).

    Args:
        model: a model of one of the families of :mod:`llava_mole.models.families` (LLaVA-1.5,
            LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3, PaliGemma,
            Idefics3, SmolVLM, Mllama, Llama/Mistral/Qwen2/Qwen3 causal LMs) or another model
            whose dense SwiGLU language model is found by name (a note says so).
        config: the adapter settings.

    Returns:
        The same ``model``.

    Raises:
        AdapterError: the model is already adapted, is not supported (no language model found,
            a mixture-of-experts or non-SwiGLU language model), or has no matching modules.
    """
    if not isinstance(config, MoLEConfig):
        raise AdapterError(f"apply_mole: config must be a MoLEConfig, got {type(config).__name__}")
    if adapter_info(model) is not None:
        raise AdapterError("apply_mole: this model already has an adapter")
    targets = find_targets(model, config)  # refuses before anything is changed
    mlps = swiglu_mlps(targets)
    if config.mode == "mole" and not mlps:
        raise AdapterError(
            f"{type(model).__name__}: no SwiGLU MLP blocks (gate_proj/up_proj/down_proj) under "
            f"{targets.tree_path or 'the model'!r}; MoLE needs a LLaMA-family language model"
        )
    if config.mode == "none":
        _check_projector(model, targets)  # nothing is injected: only the projector trains
    else:
        _check_attention(model, targets, config)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)

    image_token_id = getattr(getattr(model, "config", None), "image_token_id", None)
    use_router = config.mode == "mole" and config.num_experts > 1
    state = MoLEState(config, len(mlps), image_token_id) if use_router else None
    if config.mode != "none":
        _adapt_mlps(targets.tree, mlps, config, state)
        _adapt_attention(targets, config)
    projector = train_projector(model, targets) if config.train_projector else []
    if config.train_language_model:
        for name, param in model.named_parameters():
            if not targets.is_vision(name):  # the language model, its head (and the projector)
                param.requires_grad_(True)

    # New modules are created in training mode; give them the model's mode (eval stays eval).
    model.train(model.training)
    info = AdapterInfo(
        config=config,
        target_tree=targets.tree_path,
        state=state,
        family=targets.family.name if targets.family else None,
        projector=projector,
        projector_modules=projector_modules(model, projector, targets),
        requires_grad=requires_grad,
    )
    info.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if state is not None:
        info.hooks.append(
            model.register_forward_pre_hook(_begin_forward_hook(state), with_kwargs=True)
        )
    model.__dict__[ADAPTER_ATTR] = info
    model.__dict__[STATE_ATTR] = state
    return model


def _adapt_mlps(
    tree: nn.Module, mlps: list[tuple[str, nn.Module]], config: MoLEConfig, state: MoLEState | None
) -> None:
    """MoLE replaces each whole MLP block; the baseline wraps each MLP linear in LoRA."""
    for index, (name, mlp) in enumerate(mlps):
        if config.mode == "mole":
            parent_name, _, child = name.rpartition(".")
            tree.get_submodule(parent_name).__setattr__(child, MoLEMLP(mlp, config, index, state))
            continue
        for target in config.mlp_targets:
            if isinstance(getattr(mlp, target, None), nn.Linear):
                rank = config.mlp_lora_rank
                alpha = config.scaling * rank  # the attention LoRA's scale, whatever the rank
                base = getattr(mlp, target)
                setattr(mlp, target, LoRALinear(base, rank, alpha, config.dropout))


def _attention_sites(targets: Targets, config: MoLEConfig) -> list[tuple[nn.Module, str]]:
    """``(module, attribute)`` of every attention projection to wrap (MLPs and vision aside)."""
    sites = []
    for name, module in targets.tree.named_modules():
        path = ".".join(p for p in (targets.tree_path, name) if p)
        if targets.is_vision(path) or isinstance(module, (MoLEMLP, LoRALinear)):
            continue
        if is_swiglu_mlp(module):
            continue  # an MLP block: its linears are the MLP targets' business
        for target in config.attn_targets:
            if isinstance(getattr(module, target, None), nn.Linear):
                sites.append((module, target))
    return sites


def _check_attention(model: nn.Module, targets: Targets, config: MoLEConfig) -> None:
    found = {target for _, target in _attention_sites(targets, config)}
    missing = [target for target in config.attn_targets if target not in found]
    if missing:
        raise AdapterError(
            f"{type(model).__name__}: no attention projection named {missing[0]!r} under "
            f"{targets.tree_path or 'the model'!r} (attn_targets: {list(config.attn_targets)})"
        )


def _check_projector(model: nn.Module, targets: Targets) -> None:
    """Mode ``none`` trains the projector only: refuse a model that has none."""
    if targets.projector:
        return
    family = targets.family
    name = family.name if family else type(model).__name__
    why = "it is text only" if family and not family.multimodal else "none was found"
    raise AdapterError(
        f"{name} has no separable projector / connector / merger ({why}); adapter type "
        "'none' (stage-1 projector alignment) needs one"
    )


def _adapt_attention(targets: Targets, config: MoLEConfig) -> None:
    for module, target in _attention_sites(targets, config):
        child = getattr(module, target)
        setattr(module, target, LoRALinear(child, config.rank, config.alpha, config.dropout))


def _begin_forward_hook(state: MoLEState):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and hasattr(args[0], "dim"):
            input_ids = args[0]
        state.begin_forward(kwargs.get("attention_mask"), input_ids)

    return hook


def merge_lora(model: nn.Module) -> int:
    """Fold every plain-LoRA update (attention, baseline MLP) into its base weight.

    MoLE experts stay unmerged: which expert applies depends on the token, so no single weight
    can hold them. Returns the number of merged layers; undo with :func:`unmerge_lora`.
    """
    modules = [m for m in unwrap(model).modules() if isinstance(m, LoRALinear)]
    for module in modules:
        module.merge()
    return len(modules)


def unmerge_lora(model: nn.Module) -> int:
    """Undo :func:`merge_lora`. Returns the number of unmerged layers."""
    modules = [m for m in unwrap(model).modules() if isinstance(m, LoRALinear)]
    for module in modules:
        module.unmerge()
    return len(modules)


def merge_mole(model: nn.Module) -> None:
    """Always refuses: explains why MoLE experts cannot be merged."""
    raise AdapterError(
        "MoLE experts cannot be merged into the base weights: the router picks the expert per "
        "token, so no single weight matrix holds them; merge_lora() merges the attention LoRA"
    )


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapter without merging: the model is again the one ``apply_mole`` was given.

    Every ``LoRALinear`` is replaced by its (unmerged) base layer, every ``MoLEMLP`` by the MLP
    module it replaced, the forward hooks are removed and ``requires_grad`` is restored. A
    trained projector keeps its trained weights (it is part of the model, not of the adapter
    layers). Use :func:`llava_mole.adapters.merge.merge_and_unload` to keep plain-LoRA updates.

    Returns:
        The same (unwrapped) model.
    """
    model = unwrap(model)
    info = adapter_info(model)
    if info is None:
        raise AdapterError("unload: the model has no llava-mole adapter")
    for name, module in list(model.named_modules()):
        if isinstance(module, (LoRALinear, MoLEMLP)):
            if isinstance(module, LoRALinear):
                module.unmerge()
                plain = module.base
            else:
                plain = module.original
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, plain)
    for hook in info.hooks:
        hook.remove()
    for name, param in model.named_parameters():
        param.requires_grad_(info.requires_grad.get(name, param.requires_grad))
    del model.__dict__[ADAPTER_ATTR]
    model.__dict__.pop(STATE_ATTR, None)
    return model


def count_trainable(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
