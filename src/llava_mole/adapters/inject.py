"""Put MoLE (or the plain-LoRA baseline) into a Hugging Face model, in place.

Targets are found by module path, never by bare name: ``q_proj`` also exists in CLIP, so only
the language model's tree is searched (``model.language_model`` of a transformers-5 LLaVA,
``model`` of a LLaMA-family causal LM) and any path through a vision tower is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import MoLEConfig
from .lora import LoRALinear
from .mole import MoLEMLP
from .state import STATE_ATTR, MoLEState

ADAPTER_ATTR = "_mole_adapter"
_TREE_CANDIDATES = ("model.language_model", "language_model", "model.model", "model")
_VISION_WORDS = ("vision_tower", "vision_model", "visual")
PROJECTOR_NAME = "multi_modal_projector"


class AdapterError(ValueError):
    """A model, adapter file or adapter config that does not fit; the message says what."""


@dataclass
class AdapterInfo:
    """What ``apply_mole`` did to a model (kept on the model, not saved in its state dict)."""

    config: MoLEConfig
    target_tree: str
    trainable: list[str] = field(default_factory=list)
    state: MoLEState | None = None
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


def _is_vision(path: str) -> bool:
    return any(word in path.split(".") for word in _VISION_WORDS)


def _find_tree(model: nn.Module, config: MoLEConfig) -> tuple[str, nn.Module]:
    if config.target_tree is not None:
        try:
            tree = model.get_submodule(config.target_tree)
        except AttributeError:
            raise AdapterError(
                f"MoLEConfig.target_tree: the model has no module {config.target_tree!r}"
            ) from None
        if _is_vision(config.target_tree):
            raise AdapterError("MoLEConfig.target_tree: vision towers are never adapted")
        return config.target_tree, tree
    for path in _TREE_CANDIDATES:
        try:
            tree = model.get_submodule(path)
        except AttributeError:
            continue
        if hasattr(tree, "layers"):
            return path, tree
    if hasattr(model, "layers"):
        return "", model
    raise AdapterError(
        f"{type(model).__name__}: no language model found (looked for {list(_TREE_CANDIDATES)} "
        "with a 'layers' list); set MoLEConfig.target_tree"
    )


def _is_swiglu_mlp(module: nn.Module) -> bool:
    return all(
        isinstance(getattr(module, n, None), nn.Linear)
        for n in ("gate_proj", "up_proj", "down_proj")
    ) and hasattr(module, "act_fn")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def apply_mole(model: nn.Module, config: MoLEConfig) -> nn.Module:
    """Adapt ``model`` in place and freeze everything but the adapter (and projector).

    ``mode="mole"``: plain LoRA on ``attn_targets``; each SwiGLU MLP becomes a :class:`MoLEMLP`
    with ``num_experts`` LoRA experts on ``mlp_targets`` and a top-k router.
    ``mode="lora"``: plain LoRA on ``attn_targets`` and on every ``mlp_targets`` linear.

    Args:
        model: a transformers-5 ``LlavaForConditionalGeneration`` or a LLaMA-family causal LM
            (Llama, Mistral, Qwen2: SwiGLU MLPs with ``gate_proj``/``up_proj``/``down_proj``).
        config: the adapter settings.

    Returns:
        The same ``model``.

    Raises:
        AdapterError: the model is already adapted, or has no matching modules.
    """
    if not isinstance(config, MoLEConfig):
        raise AdapterError(f"apply_mole: config must be a MoLEConfig, got {type(config).__name__}")
    if adapter_info(model) is not None:
        raise AdapterError("apply_mole: this model already has an adapter")
    tree_path, tree = _find_tree(model, config)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)

    mlps = [
        (name, mod)
        for name, mod in tree.named_modules()
        if _is_swiglu_mlp(mod) and not _is_vision(_join(tree_path, name))
    ]
    if config.mode == "mole" and not mlps:
        raise AdapterError(
            f"{type(model).__name__}: no SwiGLU MLP blocks (gate_proj/up_proj/down_proj) under "
            f"{tree_path or 'the model'!r}; MoLE needs a LLaMA-family language model"
        )
    image_token_id = getattr(getattr(model, "config", None), "image_token_id", None)
    use_router = config.mode == "mole" and config.num_experts > 1
    state = MoLEState(config, len(mlps), image_token_id) if use_router else None

    # MLPs first: MoLE replaces the whole block; the baseline wraps each MLP linear.
    for index, (name, mlp) in enumerate(mlps):
        if config.mode == "mole":
            parent_name, _, child = name.rpartition(".")
            tree.get_submodule(parent_name).__setattr__(child, MoLEMLP(mlp, config, index, state))
        else:
            for target in config.mlp_targets:
                if isinstance(getattr(mlp, target, None), nn.Linear):
                    rank = config.mlp_lora_rank
                    alpha = config.scaling * rank  # the attention LoRA's scale, whatever the rank
                    base = getattr(mlp, target)
                    setattr(mlp, target, LoRALinear(base, rank, alpha, config.dropout))

    wrapped = {target: 0 for target in config.attn_targets}
    for name, module in list(tree.named_modules()):
        if _is_vision(_join(tree_path, name)) or isinstance(module, (MoLEMLP, LoRALinear)):
            continue
        for target in config.attn_targets:
            child = getattr(module, target, None)
            if isinstance(child, nn.Linear) and not _is_swiglu_mlp(module):
                setattr(
                    module, target, LoRALinear(child, config.rank, config.alpha, config.dropout)
                )
                wrapped[target] += 1
    missing = [target for target, count in wrapped.items() if count == 0]
    if missing:
        raise AdapterError(
            f"{type(model).__name__}: no attention projection named {missing[0]!r} under "
            f"{tree_path or 'the model'!r} (attn_targets: {list(config.attn_targets)})"
        )

    if config.train_projector:
        for name, module in model.named_modules():
            if name.split(".")[-1] == PROJECTOR_NAME:
                module.requires_grad_(True)

    # New modules are created in training mode; give them the model's mode (eval stays eval).
    model.train(model.training)
    info = AdapterInfo(
        config=config, target_tree=tree_path, state=state, requires_grad=requires_grad
    )
    info.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if state is not None:
        info.hooks.append(
            model.register_forward_pre_hook(_begin_forward_hook(state), with_kwargs=True)
        )
    model.__dict__[ADAPTER_ATTR] = info
    model.__dict__[STATE_ATTR] = state
    return model


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
