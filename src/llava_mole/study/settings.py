"""The registry of the study's settings: each built-in setting is one :class:`Setting` object.

A setting says, in one place, how its training config is derived from the study's shared
``adapter`` / ``train`` keys (:attr:`Setting.derive`), whether it runs once per domain
(:attr:`Setting.per_domain`), which adapter it trains, and which *role* the verdict reads it in
(:attr:`Setting.role`: the verdict's rules in :mod:`llava_mole.study.verdict` name roles, never
setting names). Tables, plots and run folders use :attr:`Setting.name`.

To add a built-in setting: add one :class:`Setting` to :data:`REGISTRY` (and, if the verdict
should read it, a role and a rule in :mod:`llava_mole.study.verdict`). Nothing else names it.

This module is pure (no torch, no training stack), so reports can be rendered without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "MIX_LORA",
    "MIX_LORA_2X",
    "MIX_LORA_RANK_KR",
    "MIX_MOLE",
    "REGISTRY",
    "SETTINGS",
    "SINGLE",
    "DeriveContext",
    "Role",
    "Setting",
    "by_role",
    "get",
]

Role = Literal["single", "mixed", "method", "steps_control", "parameters_control"]
"""How the verdict reads a setting: ``single`` = the per-domain reference, ``mixed`` = plain
LoRA on the mixture (the baseline the conflict is measured on), ``method`` = MoLE,
``steps_control`` = the mixed baseline with more training, ``parameters_control`` = the
mixed baseline with MoLE's MLP parameter count."""


@dataclass(frozen=True)
class DeriveContext:
    """What a setting's derivation may depend on besides the shared keys.

    Args:
        domains: number of domains in the mixture.
        single_steps: ``equal_exposure`` or ``same_steps`` (the study's key).
    """

    domains: int
    single_steps: str


Derive = Callable[[dict[str, Any], dict[str, Any], DeriveContext], None]


@dataclass(frozen=True)
class Setting:
    """One built-in setting of the study.

    Args:
        name: the name in the study YAML, tables, plots and run folders.
        label: a plain-language label (``mixed LoRA, MLP rank K·r``).
        summary: one sentence: what is trained.
        role: how the verdict reads it (see :data:`Role`).
        adapter_type: ``lora`` or ``mole``.
        per_domain: one run per domain (on that domain's data alone) instead of one run on the
            whole mixture.
        derive: changes the resolved ``adapter`` and ``train`` mappings in place (every adapter
            key present, defaults filled in); called after an extra setting's own changes.
        samples_factor: train on a mixture with this many times the study's train ``take``
            (:func:`llava_mole.study.plan.write_scaled_mixture`; ``1``: the study's mixture).
    """

    name: str
    label: str
    summary: str
    role: Role
    adapter_type: Literal["lora", "mole"]
    per_domain: bool
    derive: Derive
    samples_factor: int = 1


def _unchanged(adapter: dict[str, Any], train: dict[str, Any], ctx: DeriveContext) -> None:
    """The shared keys as they are."""


def _equal_exposure(adapter: dict[str, Any], train: dict[str, Any], ctx: DeriveContext) -> None:
    """``max_steps / D`` steps per domain under ``equal_exposure`` (halves round up).

    Each domain then sees as many samples alone as it does inside the mixture (exactly so when
    the domains are equally large).
    """
    if ctx.single_steps == "equal_exposure":
        train["max_steps"] = max(1, int(train["max_steps"] / ctx.domains + 0.5))


def _twice_the_steps(adapter: dict[str, Any], train: dict[str, Any], ctx: DeriveContext) -> None:
    """``2 * max_steps`` (and, by its ``samples_factor``, twice the samples the data has)."""
    train["max_steps"] = 2 * train["max_steps"]


def _mlp_rank_kr(adapter: dict[str, Any], train: dict[str, Any], ctx: DeriveContext) -> None:
    """MLP rank ``K * r`` (plus a shared expert's rank): exactly MoLE's MLP parameter count.

    ``r`` is MoLE's MLP rank (``mlp_rank``, else ``rank``). Attention LoRA stays as in MoLE and
    the scale ``alpha / r`` is unchanged; MoLE keeps only its routers (``d * K`` per block) extra.
    """
    expert_rank = adapter.get("mlp_rank") or adapter["rank"]
    adapter["mlp_rank"] = adapter["num_experts"] * expert_rank + adapter.get("shared_rank", 0)


SINGLE, MIX_LORA, MIX_MOLE = "single", "mix_lora", "mix_mole"
MIX_LORA_2X, MIX_LORA_RANK_KR = "mix_lora_2x", "mix_lora_rank_kr"

REGISTRY: tuple[Setting, ...] = (
    Setting(
        SINGLE,
        "single-domain LoRA",
        "plain LoRA on each domain alone (one run per domain and seed)",
        "single",
        "lora",
        True,
        _equal_exposure,
    ),
    Setting(
        MIX_LORA,
        "mixed LoRA",
        "plain LoRA on the whole mixture",
        "mixed",
        "lora",
        False,
        _unchanged,
    ),
    Setting(
        MIX_MOLE,
        "mixed MoLE",
        "MoLE (K experts of rank r, top-1) on the mixture, same steps",
        "method",
        "mole",
        False,
        _unchanged,
    ),
    Setting(
        MIX_LORA_2X,
        "mixed LoRA, 2× samples (2× steps where the data has no more)",
        "plain LoRA on the mixture with twice the steps, over twice the train take",
        "steps_control",
        "lora",
        False,
        _twice_the_steps,
        samples_factor=2,
    ),
    Setting(
        MIX_LORA_RANK_KR,
        "mixed LoRA, MLP rank K·r",
        "plain LoRA on the mixture, MLP rank K*r (MoLE's MLP parameter count)",
        "parameters_control",
        "lora",
        False,
        _mlp_rank_kr,
    ),
)

SETTINGS: tuple[str, ...] = tuple(s.name for s in REGISTRY)
"""The built-in settings' names, in report order."""

_BY_NAME = {s.name: s for s in REGISTRY}


def get(name: str) -> Setting:
    """The built-in setting called ``name``.

    Raises:
        KeyError: no such built-in setting.
    """
    return _BY_NAME[name]


def by_role(role: Role) -> Setting:
    """The built-in setting the verdict reads in ``role``."""
    return next(s for s in REGISTRY if s.role == role)
