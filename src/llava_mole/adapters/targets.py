"""Which parts of a model an adapter touches: the language model, its MLP blocks, the projector.

The family registry (:mod:`llava_mole.models.families`) says where each family keeps its
language model, projector and vision tower; models of other types are searched by name. A
model that cannot be adapted as a whole is refused with one line naming the architecture and
what is missing, before anything is changed:

- no language model (a decoder with a ``layers`` list) found;
- a mixture-of-experts language model (Mixtral, Qwen2-MoE, Qwen3-MoE, ...): its MLPs are routed
  experts with fused weights, while MoLE and the LoRA baseline adapt dense SwiGLU MLPs; adapting
  only its attention (or Qwen2-MoE's shared expert) would silently be a different method;
- MLP blocks without SwiGLU ``gate_proj``/``up_proj``/``down_proj`` (GPT-2, OPT, Phi, Phi-3's
  fused ``gate_up_proj``): the MLP targets would silently match nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from ..models.families import (
    GENERIC_LANGUAGE_MODELS,
    Family,
    family_names,
    family_of,
    is_vision,
    projector_roots,
    resolve,
    under,
    vision_roots,
)
from .config import SWIGLU_PROJECTIONS, MoLEConfig
from .errors import AdapterError

logger = logging.getLogger("llava_mole")

# Attribute names under which a decoder layer keeps its MLP block.
_MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "ffn")


@dataclass
class Targets:
    """The parts of one model an adapter works on (paths are absolute in the model)."""

    family: Family | None
    tree_path: str
    tree: nn.Module
    vision: list[str]
    projector: list[str]

    def is_vision(self, path: str) -> bool:
        """Whether the absolute module path ``path`` is in a vision tower (never adapted)."""
        return is_vision(path, self.vision) and not under(path, self.projector)


def architecture(model: nn.Module) -> str:
    """The model's class name, as messages name it."""
    return type(model).__name__


def not_supported(model: nn.Module, why: str) -> AdapterError:
    """``AdapterError("<Architecture> is not supported by llava-mole: <why>")``."""
    return AdapterError(f"{architecture(model)} is not supported by llava-mole: {why}")


def is_swiglu_mlp(module: nn.Module) -> bool:
    """A SwiGLU MLP block: ``gate_proj``, ``up_proj``, ``down_proj`` linears and ``act_fn``."""
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in SWIGLU_PROJECTIONS) and (
        hasattr(module, "act_fn")
    )


def find_targets(model: nn.Module, config: MoLEConfig) -> Targets:
    """Locate the language model, vision towers and projector, and check the MLP blocks.

    Raises:
        AdapterError: one line, when the model cannot be adapted as a whole.
    """
    family = family_of(model)
    vision = vision_roots(model, family)
    projector = projector_roots(model, family)
    tree_path, tree = _language_model(model, config, family, vision)
    check_mlp_blocks(model, tree_path, tree, vision)
    if family is None and config.target_tree is None:
        logger.warning(
            "note: %s (model_type %r) is not one of the tested families (%s); adapting its "
            "language model %r",
            architecture(model),
            getattr(getattr(model, "config", None), "model_type", None),
            ", ".join(family_names()),
            tree_path or "(the model)",
        )
    return Targets(family, tree_path, tree, vision, projector)


def _language_model(
    model: nn.Module, config: MoLEConfig, family: Family | None, vision: list[str]
) -> tuple[str, nn.Module]:
    if config.target_tree is not None:
        try:
            tree = model.get_submodule(config.target_tree)
        except AttributeError:
            raise AdapterError(
                f"MoLEConfig.target_tree: the model has no module {config.target_tree!r}"
            ) from None
        if is_vision(config.target_tree, vision):
            raise AdapterError("MoLEConfig.target_tree: vision towers are never adapted")
        return config.target_tree, tree
    candidates = (family.language_model,) if family else GENERIC_LANGUAGE_MODELS
    for candidate in candidates:
        path = resolve(model, candidate)
        if path is not None and hasattr(model.get_submodule(path), "layers"):
            return path, model.get_submodule(path)
    if family is None and hasattr(model, "layers"):
        return "", model
    if not any(is_swiglu_mlp(m) for m in model.modules()):
        raise not_supported(
            model,
            "no language model found: it has no SwiGLU MLP blocks (gate_proj/up_proj/down_proj "
            "+ act_fn) anywhere, which MoLE and the LoRA baseline adapt",
        )
    raise not_supported(
        model,
        f"no language model found (looked for {list(candidates)} with a 'layers' list); set "
        "MoLEConfig.target_tree to the language model's module path",
    )


def _blocks(tree: nn.Module, tree_path: str, vision: list[str]) -> list[tuple[str, nn.Module]]:
    """The MLP block of every decoder layer (or, without ``layers``, every block by name)."""
    layers = getattr(tree, "layers", None)
    if isinstance(layers, (nn.ModuleList, nn.Sequential)):
        found = []
        for index, layer in enumerate(layers):
            for name in _MLP_NAMES:
                child = getattr(layer, name, None)
                if isinstance(child, nn.Module):
                    found.append((f"layers.{index}.{name}", child))
                    break
        return found
    return [
        (name, module)
        for name, module in tree.named_modules()
        if name.split(".")[-1] in _MLP_NAMES and not is_vision(_join(tree_path, name), vision)
    ]


def check_mlp_blocks(model: nn.Module, tree_path: str, tree: nn.Module, vision: list[str]) -> None:
    """Refuse mixture-of-experts and non-SwiGLU MLP blocks (one line, naming the class)."""
    composite = getattr(getattr(model, "config", None), "text_config", None) is not None
    where = f" (language model {type(tree).__name__})" if composite else ""
    for _, block in _blocks(tree, tree_path, vision):
        if is_swiglu_mlp(block):
            continue
        kind = type(block).__name__
        if hasattr(block, "experts") or "moe" in kind.lower() or "expert" in kind.lower():
            raise AdapterError(
                f"{architecture(model)}{where} is not supported by llava-mole: it is a "
                f"mixture-of-experts language model (its MLPs, {kind}, are routed experts with "
                "fused expert weights); MoLE and the LoRA baseline need dense SwiGLU MLPs "
                "(gate_proj/up_proj/down_proj)"
            )
        linears = [n for n, m in block.named_children() if isinstance(m, nn.Linear)]
        raise AdapterError(
            f"{architecture(model)}{where} is not supported by llava-mole: its MLP blocks "
            f"({kind}: {'/'.join(linears) or 'no linear layers'}) are not SwiGLU; MoLE and the "
            "LoRA baseline adapt gate_proj/up_proj/down_proj + act_fn"
        )


def swiglu_mlps(targets: Targets) -> list[tuple[str, nn.Module]]:
    """Every SwiGLU MLP block of the language model, as ``(path in the tree, module)``."""
    return [
        (name, module)
        for name, module in targets.tree.named_modules()
        if is_swiglu_mlp(module) and not targets.is_vision(_join(targets.tree_path, name))
    ]


def train_projector(model: nn.Module, targets: Targets) -> list[str]:
    """Unfreeze the projector; return its parameter names. Warns where there is none."""
    names: list[str] = []
    params = dict(model.named_parameters())
    for root in targets.projector:
        found = [n for n in params if n == root or n.startswith(root + ".")]
        for name in found:
            params[name].requires_grad_(True)
        names += found
    multimodal = targets.family.multimodal if targets.family else bool(targets.vision)
    if multimodal and not names:
        family = targets.family.name if targets.family else architecture(model)
        logger.warning(
            "warning: train_projector: %s has no separable projector%s; only the adapter is "
            "trained",
            family,
            f" (looked for {list(targets.family.projector)})" if targets.family else "",
        )
    return names


def projector_modules(model: nn.Module, names: list[str], targets: Targets) -> list[str]:
    """The module paths holding the trained projector parameter ``names``.

    Containers (Qwen3-VL's ``deepstack_merger_list``) are listed by their children, so that
    each path is a module PEFT's ``modules_to_save`` can wrap.
    """
    paths: list[str] = []
    for root in targets.projector:
        if not any(under(n, [root]) for n in names):
            continue
        try:
            module = model.get_submodule(root)
        except AttributeError:  # a bare parameter
            paths.append(root)
            continue
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            paths += [f"{root}.{child}" for child, _ in module.named_children()]
        else:
            paths.append(root)
    return paths


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)
