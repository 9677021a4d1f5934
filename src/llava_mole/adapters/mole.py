"""Sparse mixture of LoRA experts on a SwiGLU MLP block.

LLaVA-MoLE (Chen et al., 2024, https://arxiv.org/abs/2401.16160).

For an MLP ``down(act(gate(x)) * up(x))`` with frozen projections, a router
``R: Linear(d_model, K)`` gives ``p = softmax(R x)`` (float32), the token goes to expert
``e = argmax p`` with gate ``g = p_e`` (raw, not renormalised, so the LM loss trains the router),
and every adapted projection ``P`` becomes

    P(h) + g * (alpha / r) * B_P^e A_P^e dropout(h)

with the same ``e`` for gate, up and down (``down`` sees the SwiGLU product of that token).
With ``shared_rank > 0`` every adapted projection also carries a *shared expert*, an ungated
plain LoRA every token uses: ``P(h) + (alpha / r) B_P^s A_P^s dropout(h) + g * (...)^e``
(the projection is a :class:`~.lora.LoRALinear`, so merging and exports treat it as the
attention LoRA).
With ``top_k > 1`` the token sums the deltas of its ``k`` most probable experts, each gated by
its probability (renormalised over the ``k`` if ``normalize_top_k``); with
``gate_weighting="none"`` every gate is 1 and the router learns from the balance loss only;
with ``"straight"`` every gate is ``p_e / stop_gradient(p_e)``: 1 in value (the delta has plain
LoRA's scale whatever the router's confidence, and the block exports exactly as a sparse MoE),
while the LM loss trains the router through ``d log p_e``. During a dense warmup every expert
is weighted by its probability, whatever the gate weighting (a soft mixture).

One forward for training and inference (:meth:`MoLEMLP.forward`):

1. routing, once: router logits, top-k, gate weights (:func:`.dispatch.route`) and the
   balance / z-loss terms of this forward recorded in the model's :class:`.state.MoLEState`;
2. a dispatch strategy for this forward (:mod:`.experts`, picked by
   :func:`.dispatch.choose_path`): how the expert deltas meet their tokens;
3. one SwiGLU composition; each projection is ``P_base(h)`` plus the strategy's deltas.

The base projections run once over all tokens; only the rank-r deltas depend on the expert.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MoLEConfig
from .dispatch import Routing, choose_path, route, router_logits
from .experts import ExpertDeltas, SingleExpert, expert_deltas
from .lora import LoRALinear, init_lora_pair
from .state import MoLEState


class MoLEMLP(nn.Module):
    """A frozen SwiGLU MLP with ``K`` LoRA experts per projection and one top-k router.

    It replaces the whole MLP module, so it is a natural leaf for DeepSpeed ZeRO-3
    (``deepspeed.utils.set_z3_leaf_modules(model, [MoLEMLP])``).

    Args:
        base: the model's MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``); frozen.
        config: the adapter configuration.
        block_index: position of this block among the model's MoLE blocks (for statistics).
        state: the model's shared :class:`MoLEState` (routing terms for the loss).
    """

    def __init__(
        self, base: nn.Module, config: MoLEConfig, block_index: int, state: MoLEState | None
    ) -> None:
        super().__init__()
        self.gate_proj = base.gate_proj
        self.up_proj = base.up_proj
        self.down_proj = base.down_proj
        self.act_fn = base.act_fn
        for proj in (self.gate_proj, self.up_proj, self.down_proj):
            proj.requires_grad_(False)
        # Deltas are accumulated into the base outputs in place (see ``add_expand_``): safe for
        # plain nn.Linear projections, whose backward does not need their output.
        self._fuse = all(
            type(p) is nn.Linear for p in (self.gate_proj, self.up_proj, self.down_proj)
        )
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.rank = config.mlp_lora_rank
        self.scaling = config.scaling
        self.gate_weighting = config.gate_weighting
        self.normalize_top_k = config.normalize_top_k
        self.dispatch = config.dispatch
        self.block_index = block_index
        self.targets = tuple(
            t for t in ("gate_proj", "up_proj", "down_proj") if t in config.mlp_targets
        )
        # A plain attribute (not a submodule): the state is shared by all blocks of the model.
        self.__dict__["state"] = state
        # The replaced module itself (sharing its projections), put back by ``unload``.
        self.__dict__["original"] = base

        weight = self.gate_proj.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in self.targets:
            proj: nn.Linear = getattr(self, name)
            a = torch.empty(self.num_experts, self.rank, proj.in_features, **factory)
            b = torch.empty(self.num_experts, proj.out_features, self.rank, **factory)
            if weight.device.type != "meta":
                init_lora_pair(a, b)
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(b)
        # One expert means no routing: exactly plain LoRA, and no idle router parameter for DDP.
        # Domain routing (a diagnostic) has no router parameters either.
        self.routes_by_domain = config.router == "domain" and self.num_experts > 1
        self.router = (
            nn.Linear(
                self.gate_proj.in_features,
                self.num_experts,
                bias=False,
                device=weight.device,
                dtype=torch.float32,
            )
            if self.num_experts > 1 and not self.routes_by_domain
            else None
        )
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if config.shared_rank:
            self._add_shared_expert(config)

    def _add_shared_expert(self, config: MoLEConfig) -> None:
        """Wrap each adapted projection in an ungated LoRA of rank ``shared_rank``.

        ``original`` keeps the plain projections, so ``unload`` restores the block unchanged.
        ``_fuse`` stays as computed for the plain layers: a LoRALinear returns a fresh tensor
        that its backward does not keep, so the expert deltas may still be added in place.
        """
        rank = config.shared_rank
        for name in self.targets:
            base = getattr(self, name)
            setattr(self, name, LoRALinear(base, rank, config.scaling * rank, config.dropout))

    def route(
        self, flat: torch.Tensor, top_k: int | None = None, gate_weighting: str | None = None
    ) -> tuple[torch.Tensor, Routing]:
        """Router logits (float32, autocast off) and the top-k decision for ``(N, d)`` tokens."""
        with torch.autocast(device_type=flat.device.type, enabled=False):
            if self.routes_by_domain:
                logits = self._domain_logits(flat)
            elif isinstance(self.router, nn.Linear):
                logits = router_logits(flat, self.router.weight)
            else:  # a user-supplied router module
                logits = self.router(flat.float()).float()
        top_k = self.top_k if top_k is None else top_k
        weighting = self.gate_weighting if gate_weighting is None else gate_weighting
        return logits, route(logits, top_k, weighting, self.normalize_top_k)

    def _domain_logits(self, flat: torch.Tensor) -> torch.Tensor:
        """One-hot logits (probability ~1) on the expert of each token's sample's domain."""
        experts = None if self.state is None else self.state.route_experts
        if experts is None or experts.numel() == 0 or flat.shape[0] % experts.numel():
            raise RuntimeError(
                "this MoLE adapter routes by domain label (adapter.router='domain'): tag the "
                "samples' domains first (set_routing_domains); it cannot answer free-form prompts"
            )
        per_sample = flat.shape[0] // experts.numel()
        experts = experts.to(flat.device).repeat_interleave(per_sample)
        logits = torch.full((flat.shape[0], self.num_experts), -30.0, device=flat.device)
        return logits.scatter(1, experts.unsqueeze(1), 30.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block on ``(..., d)`` tokens: route, then one SwiGLU composition (module doc)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        deltas = self._expert_deltas(flat, tuple(shape[:-1]))
        h = deltas.enter(flat)
        shared = deltas.shares_dropout
        h_drop = self.dropout(h) if shared else None
        mid = self.act_fn(self._project("gate_proj", h, h_drop, deltas, True))
        mid = mid * self._project("up_proj", h, h_drop, deltas, True)
        mid_drop = self.dropout(mid) if shared else None
        out = deltas.leave(self._project("down_proj", mid, mid_drop, deltas, False))
        return out.view(*shape[:-1], -1)

    def _project(
        self,
        name: str,
        h: torch.Tensor,
        h_drop: torch.Tensor | None,
        deltas: ExpertDeltas,
        of_input: bool,
    ) -> torch.Tensor:
        """``P_base(h)`` plus, for an adapted projection, its expert deltas."""
        y = getattr(self, name)(h)
        if name not in self.lora_A:
            return y
        if h_drop is None:  # a dropout draw of its own, after the base projection (as LoRA)
            h_drop = self.dropout(h)
        return deltas.add(name, y, h, h_drop, of_input)

    def _expert_deltas(self, flat: torch.Tensor, batch_shape: tuple[int, ...]) -> ExpertDeltas:
        """Route ``flat`` (recording the loss terms) and pick the dispatch strategy.

        ``batch_shape`` is the leading shape of the block input (``(B, T)``), for the state.
        """
        if self.router is None and not self.routes_by_domain:
            return SingleExpert(self.lora_A, self.lora_B, self.scaling, self._fuse)
        top_k, weighting = self.top_k, None
        if self.training and self.state is not None and self.state.dense_routing:
            # dense warmup: every expert, weighted by its probability
            top_k, weighting = self.num_experts, "prob"
        routing = self._route_and_record(flat, top_k, batch_shape, weighting)
        dropout_active = self.training and isinstance(self.dropout, nn.Dropout)
        requested = self.dispatch
        if requested == "triton" and dropout_active:
            requested = "auto"  # the kernels apply no dropout
        path = choose_path(requested, flat, self.num_experts, self.rank, top_k)
        return expert_deltas(
            path,
            self.lora_A,
            self.lora_B,
            self.scaling,
            self._fuse,
            routing,
            self.num_experts,
            dropout_active,
        )

    def _route_and_record(
        self,
        flat: torch.Tensor,
        top_k: int,
        batch_shape: tuple[int, ...],
        gate_weighting: str | None = None,
    ) -> Routing:
        """The router's decision for ``flat``, its balance / z-loss terms recorded in the state."""
        logits, routing = self.route(flat, top_k, gate_weighting)
        if self.state is not None:
            self.state.record(self.block_index, logits, routing, batch_shape)
        return routing

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, rank={self.rank}, "
            f"scaling={self.scaling:g}, gate_weighting={self.gate_weighting!r}"
        )
