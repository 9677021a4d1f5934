"""Sparse mixture of LoRA experts on a SwiGLU MLP block (LLaVA-MoLE, arXiv 2401.16160).

For an MLP ``down(act(gate(x)) * up(x))`` with frozen projections, a router
``R: Linear(d_model, K)`` gives ``p = softmax(R x)`` (float32), the token goes to expert
``e = argmax p`` with gate ``g = p_e`` (raw, not renormalised, so the LM loss trains the router),
and every adapted projection ``P`` becomes

    P(h) + g * (alpha / r) * B_P^e A_P^e h

with the same ``e`` for gate, up and down (``down`` sees the SwiGLU product of that token).
The base projections run once over all tokens; only the rank-r deltas depend on the expert.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MoLEConfig
from .dispatch import (
    ExpertGrouping,
    choose_path,
    dense_shrink,
    permute_rows,
    route,
    router_logits,
    sorted_lora_delta,
    sorted_shrink,
)
from .kernels import gathered_lora_add_
from .lora import add_expand_, init_lora_pair, lora_shrink
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

    def route(self, flat: torch.Tensor, top_k: int | None = None):
        """Router logits (float32, autocast off) and the top-k decision for ``(N, d)`` tokens."""
        with torch.autocast(device_type=flat.device.type, enabled=False):
            if self.routes_by_domain:
                logits = self._domain_logits(flat)
            elif isinstance(self.router, nn.Linear):
                logits = router_logits(flat, self.router.weight)
            else:  # a user-supplied router module
                logits = self.router(flat.float()).float()
        top_k = self.top_k if top_k is None else top_k
        return logits, route(logits, top_k, self.gate_weighting, self.normalize_top_k)

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
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.router is None and not self.routes_by_domain:
            return self._forward_single(flat).view(*shape[:-1], -1)
        top_k = self.top_k
        if self.training and self.state is not None and self.state.dense_routing:
            top_k = self.num_experts  # dense warmup: every expert, weighted by its probability
        logits, routing = self.route(flat, top_k)
        if self.state is not None:
            self.state.record(self.block_index, logits, routing, tuple(shape[:-1]))
        requested = self.dispatch
        if requested == "triton" and self.training and isinstance(self.dropout, nn.Dropout):
            requested = "auto"  # the kernels apply no dropout
        path = choose_path(requested, flat, self.num_experts, self.rank, top_k)
        if path == "triton":
            out = self._forward_triton(flat, routing)
        elif path == "dense":
            out = self._forward_dense(flat, routing.dense_weights())
        else:
            out = self._forward_grouped(flat, routing, path)
        return out.view(*shape[:-1], -1)

    def _forward_single(self, x: torch.Tensor) -> torch.Tensor:
        # Same operations, in the same order, as LoRALinear on each projection.
        def proj(name: str, h: torch.Tensor) -> torch.Tensor:
            y = getattr(self, name)(h)
            if name in self.lora_A:
                a, b = self.lora_A[name][0], self.lora_B[name][0]
                h_a = lora_shrink(self.dropout(h), a, self.scaling)
                y = add_expand_(y, h_a, b, in_place=self._fuse)
            return y

        h = self.act_fn(proj("gate_proj", x)) * proj("up_proj", x)
        return proj("down_proj", h)

    def _forward_dense(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # Scale and cast the gate once for the three projections (fewer small kernels: at
        # generation sizes on GPU the block's time is mostly kernel launches).
        dtype = next(iter(self.lora_A.values())).dtype
        gate = (weights * self.scaling).to(dtype)

        def proj(name: str, h: torch.Tensor, h_drop: torch.Tensor) -> torch.Tensor:
            y = getattr(self, name)(h)
            if name in self.lora_A:
                shrunk, b_cat = dense_shrink(h_drop, self.lora_A[name], self.lora_B[name], gate)
                y = add_expand_(y, shrunk, b_cat, in_place=self._fuse)
            return y

        x_drop = self.dropout(x)
        h = self.act_fn(proj("gate_proj", x, x_drop)) * proj("up_proj", x, x_drop)
        return proj("down_proj", h, self.dropout(h))

    def _forward_triton(self, x: torch.Tensor, routing) -> torch.Tensor:
        # Inference only (no autograd): each base projection's fresh output gets its expert
        # deltas added in place by two fused kernels; tokens stay in their order.
        experts, gate = routing.experts[:, 0], routing.weights[:, 0]

        def proj(name: str, h: torch.Tensor) -> torch.Tensor:
            y = getattr(self, name)(h)
            if name in self.lora_A:
                a, b = self.lora_A[name], self.lora_B[name]
                gathered_lora_add_(y, h, a, b, experts, gate, self.scaling)
            return y

        h = self.act_fn(proj("gate_proj", x)) * proj("up_proj", x)
        return proj("down_proj", h)

    def _forward_grouped(self, x: torch.Tensor, routing, path: str) -> torch.Tensor:
        grouping = ExpertGrouping.from_experts(routing.experts[:, 0], self.num_experts)
        # The whole block runs in expert order: one permutation in, one out.
        xs = permute_rows(x, grouping.order, grouping.inverse)
        gs = permute_rows(routing.weights, grouping.order, grouping.inverse)

        # Without dropout, gate and up shrink the unsorted input so that autograd keeps x (the
        # router keeps it anyway) rather than the sorted copy.
        dropout_active = self.training and isinstance(self.dropout, nn.Dropout)

        def proj(name: str, h: torch.Tensor, h_drop: torch.Tensor, unsorted=None) -> torch.Tensor:
            y = getattr(self, name)(h)
            if name in self.lora_A:
                a, b = self.lora_A[name], self.lora_B[name]
                shrunk = None
                if unsorted is not None and not dropout_active:
                    shrunk = sorted_shrink(unsorted, a, grouping, path)
                y = y + sorted_lora_delta(
                    h_drop, a, b, gs, self.scaling, grouping, path, shrunk=shrunk
                ).to(y.dtype)
            return y

        xs_drop = self.dropout(xs) if dropout_active else xs
        gate_out = proj("gate_proj", xs, xs_drop, unsorted=x)
        hs = self.act_fn(gate_out) * proj("up_proj", xs, xs_drop, unsorted=x)
        ys = proj("down_proj", hs, self.dropout(hs))
        return permute_rows(ys, grouping.inverse, grouping.order)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, rank={self.rank}, "
            f"scaling={self.scaling:g}, gate_weighting={self.gate_weighting!r}"
        )
