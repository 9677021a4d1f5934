"""Configuration of a MoLE (or plain-LoRA baseline) adapter.

LLaVA-MoLE (Chen et al., 2024, https://arxiv.org/abs/2401.16160) keeps plain LoRA on the
attention projections and turns every SwiGLU MLP block of the language model into a sparse
mixture of ``num_experts`` LoRA experts with a per-block top-1 router.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NoReturn

from pydantic import Field

from ..schema import SCHEMA_CONFIG, Bool, Float, Int, Str, StrTuple

AdapterMode = Literal["mole", "lora", "none"]
GateWeighting = Literal["prob", "none", "straight"]
BalanceLoss = Literal["switch", "official"]
Dispatch = Literal["auto", "loop", "grouped_mm", "dense", "triton"]
Router = Literal["linear", "domain"]
SWIGLU_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# Fields that change how the adapter computes but not which tensors it holds or what they mean;
# a saved adapter may be loaded under different values of these.
RUNTIME_FIELDS = frozenset({"dispatch", "dropout", "balance_coef", "router_z_coef", "balance_loss"})


@dataclass
class MoLEConfig:
    """Validated settings of a MoLE or plain-LoRA adapter.

    Args:
        mode: ``"mole"`` (LoRA on attention, K LoRA experts + router per MLP block) or
            ``"lora"`` (the plain-LoRA baseline: LoRA on attention and on every MLP linear), or
            ``"none"``: nothing injected, only the projector is trained (LLaVA's stage 1,
            ``llava-mole pretrain``); it needs ``train_projector``.
        rank: LoRA rank ``r`` (per expert for MoLE).
        mlp_rank: rank of the MLP adapters (per expert for MoLE) when it should differ from
            ``rank``; their scale stays ``alpha / rank``. The study's rank-K*r control uses it to
            give plain LoRA exactly MoLE's MLP parameter count.
        alpha: LoRA scaling numerator; deltas are scaled by ``alpha / rank``.
        dropout: dropout on the LoRA input.
        num_experts: experts per MLP block (``K``). ``1`` behaves exactly as plain LoRA.
        shared_rank: rank of a *shared expert*: an always-on LoRA on the MoLE block's MLP
            projections that every token uses beside its routed expert(s), with the gate 1
            (as in DeepSeekMoE's shared experts); ``0`` (the default) has none, as the paper.
            Its scale is ``alpha / rank`` like every other adapter here. It needs
            ``mode="mole"`` and ``num_experts >= 2`` (beside one expert, raise ``mlp_rank``).
        top_k: experts per token (the paper uses 1).
        normalize_top_k: renormalise the top-k weights to sum to one. Never with ``top_k=1``:
            a renormalised single weight is constantly 1 and cuts the router's LM gradient.
        balance_coef: coefficient of the load-balancing loss.
        router_z_coef: coefficient of the router z-loss ``mean(logsumexp(logits)^2)``.
        gate_weighting: ``"prob"`` multiplies the expert delta by the router probability (the
            LM loss then trains the router); ``"none"`` adds it unweighted as in the official
            release (the router then learns from the balance loss only); ``"straight"`` adds it
            unweighted in value but gives the router the LM gradient of ``log p`` (a
            straight-through gate ``p / stop_gradient(p)``; exports exactly as a sparse MoE).
        balance_loss: ``"switch"`` (Switch Transformer, ``K * sum_k f_k P_k`` per block, averaged
            over blocks) or ``"official"`` (the release's per-sample pooled form).
        attn_targets: attention projections that get plain LoRA.
        mlp_targets: MLP projections that get LoRA experts (SwiGLU gate/up/down).
        target_tree: dotted path of the module tree to adapt; ``None`` picks the family's
            language model (``model.language_model`` of a LLaVA, ``model.text_model`` of an
            Idefics3, ``model`` of a causal LM: ``llava_mole.models.families``). Vision towers
            are never adapted.
        train_projector: train the family's projector / connector / merger fully (LLaVA's
            instruction tuning does); a warning says so where a model has none.
        train_language_model: with ``mode="none"``, also train every weight outside the vision
            towers fully (the language model and its head: a full fine-tune, ``llava-mole
            pretrain --train full``); the adapter files then hold all of them.
        dispatch: how tokens reach their experts (see ``adapters.dispatch``); ``"auto"`` picks.
        router: ``"linear"`` (the paper's learned router) or ``"domain"``: every token goes to
            the expert of its sample's domain (``router_domains[i]`` -> expert ``i``), a
            diagnostic upper bound for routing ("would MoLE help if routing were perfect?").
            It needs each sample's domain at training and evaluation time, so it cannot
            answer free-form questions.
        router_domains: the domain of each expert for ``router="domain"`` (set from the training
            mixture).
    """

    # The field types are the schema's (:mod:`llava_mole.schema`): ``adapter:`` of a training
    # YAML is validated as this class. In YAML, ``mode`` is written ``type``.
    __pydantic_config__ = SCHEMA_CONFIG

    mode: Annotated[AdapterMode, Field(alias="type")] = "mole"
    rank: Int = 16
    mlp_rank: Int | None = None
    alpha: Float = 32.0
    dropout: Float = 0.05
    num_experts: Int = 3
    shared_rank: Int = 0
    top_k: Int = 1
    normalize_top_k: Bool = False
    balance_coef: Float = 0.01
    router_z_coef: Float = 0.0
    gate_weighting: GateWeighting = "prob"
    balance_loss: BalanceLoss = "switch"
    attn_targets: StrTuple = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp_targets: StrTuple = ("gate_proj", "up_proj", "down_proj")
    target_tree: Str | None = None
    train_projector: Bool = True
    train_language_model: Bool = False
    dispatch: Dispatch = "auto"
    router: Router = "linear"
    router_domains: StrTuple = ()
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("attn_targets", "mlp_targets", "router_domains"):
            value = getattr(self, name)
            if isinstance(value, list):  # a string stays a string: validate() refuses it
                setattr(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        bad = self._bad
        if self.mode not in ("mole", "lora", "none"):
            bad("mode", "must be 'mole', 'lora' or 'none'")
        if self.mode == "none" and self.train_projector is not True:
            bad("train_projector", "mode 'none' trains only the projector: it must be true")
        self._check_sizes()
        self._check_choices()
        self._check_targets()
        self._check_routing()

    def _bad(self, name: str, why: str) -> NoReturn:
        raise ValueError(f"MoLEConfig.{name}: {why} (got {getattr(self, name)!r})")

    def _check_sizes(self) -> None:
        """Ranks, expert counts, alpha, dropout and loss coefficients: types and ranges."""
        bad = self._bad
        for name in ("rank", "num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(name, "must be an integer >= 1")
        if self.mlp_rank is not None and (
            isinstance(self.mlp_rank, bool)
            or not isinstance(self.mlp_rank, int)
            or self.mlp_rank < 1
        ):
            bad("mlp_rank", "must be an integer >= 1 or null")
        if (
            isinstance(self.shared_rank, bool)
            or not isinstance(self.shared_rank, int)
            or self.shared_rank < 0
        ):
            bad("shared_rank", "must be an integer >= 0")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            bad("alpha", "must be a number")
        if self.alpha <= 0:
            bad("alpha", "must be > 0")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            bad("dropout", "must be a number in [0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "must be in [0, 1)")
        if self.top_k > self.num_experts:
            bad("top_k", f"must be <= num_experts ({self.num_experts})")
        for name in ("balance_coef", "router_z_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                bad(name, "must be a number >= 0")

    def _check_choices(self) -> None:
        """The gate, balance loss and dispatch, and what each choice needs."""
        bad = self._bad
        if self.normalize_top_k and self.top_k == 1:
            bad(
                "normalize_top_k",
                "top_k=1 with renormalised weights gives the router no LM gradient",
            )
        if self.gate_weighting not in ("prob", "none", "straight"):
            bad("gate_weighting", "must be 'prob', 'none' or 'straight'")
        if self.balance_loss not in ("switch", "official"):
            bad("balance_loss", "must be 'switch' or 'official'")
        if self.gate_weighting == "none" and self.balance_coef == 0 and self.num_experts > 1:
            bad("balance_coef", "must be > 0 with gate_weighting='none' (the router's only signal)")
        if self.dispatch not in ("auto", "loop", "grouped_mm", "dense", "triton"):
            bad("dispatch", "must be one of 'auto', 'loop', 'grouped_mm', 'dense', 'triton'")

    def _check_targets(self) -> None:
        """Target module names, and what trains besides the adapter."""
        bad = self._bad
        for name in ("attn_targets", "mlp_targets"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
                bad(name, "must be a list of module names")
        if self.mode == "mole" and len(self.mlp_targets) == 0:
            bad("mlp_targets", "MoLE needs at least one MLP projection")
        unknown = [t for t in self.mlp_targets if t not in SWIGLU_PROJECTIONS]
        if unknown:
            bad("mlp_targets", f"{unknown[0]!r} is not one of {list(SWIGLU_PROJECTIONS)}")
        if self.target_tree is not None and not isinstance(self.target_tree, str):
            bad("target_tree", "must be a dotted module path or null")
        if not isinstance(self.train_projector, bool):
            bad("train_projector", "must be true or false")
        if not isinstance(self.train_language_model, bool):
            bad("train_language_model", "must be true or false")
        if self.train_language_model and self.mode != "none":
            bad("train_language_model", "a full fine-tune is adapter type 'none' (no LoRA on top)")

    def _check_routing(self) -> None:
        """The router kind and the domains a domain router names."""
        bad = self._bad
        if self.router not in ("linear", "domain"):
            bad("router", "must be 'linear' or 'domain'")
        if not isinstance(self.router_domains, tuple) or not all(
            isinstance(v, str) and v for v in self.router_domains
        ):
            bad("router_domains", "must be a list of domain names")
        if self.shared_rank and (self.mode != "mole" or self.num_experts < 2):
            bad(
                "shared_rank",
                "a shared expert sits beside routed ones: it needs type 'mole' and "
                "num_experts >= 2 (for a larger single MLP adapter raise mlp_rank)",
            )
        if self.router == "domain" and self.mode != "mole":
            bad("router", "'domain' routing is for MoLE adapters (mode='mole')")
        if self.router == "domain" and self.num_experts < 2:
            bad("router", "'domain' routing needs num_experts >= 2")
        if len(self.router_domains) > self.num_experts:
            bad("router_domains", f"more domains than experts ({self.num_experts})")

    @property
    def type(self) -> AdapterMode:
        """``mode`` under its YAML name (``adapter.type``)."""
        return self.mode

    @property
    def mlp_lora_rank(self) -> int:
        """Rank of the MLP adapters."""
        return self.mlp_rank or self.rank

    @property
    def scaling(self) -> float:
        """LoRA scale ``alpha / rank``."""
        return float(self.alpha) / self.rank

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["attn_targets"] = list(self.attn_targets)
        data["mlp_targets"] = list(self.mlp_targets)
        data["router_domains"] = list(self.router_domains)
        if not data["extra"]:
            data.pop("extra")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoLEConfig:
        """Build from a dictionary; unknown keys are an error that names them."""
        if not isinstance(data, dict):
            raise ValueError(f"MoLEConfig: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MoLEConfig: unknown field {unknown[0]!r} (known: {sorted(known)})")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
