"""How a MoLE block's LoRA experts reach their tokens: one strategy per dispatch path.

:class:`~llava_mole.adapters.mole.MoLEMLP` composes the SwiGLU block once,

    y = down(act(gate(x)) * up(x)),    P(h) = P_base(h) + delta_P(h)  for P in {gate, up, down},

and leaves the expert deltas to an :class:`ExpertDeltas` built for that forward from the
block's routing. For token ``n`` with chosen experts ``e`` and gate weights ``g`` (see
:func:`~llava_mole.adapters.dispatch.route`) every strategy computes the same

    delta_P(h)_n = sum_{(e, g) of n} g * (alpha / r) * B_P^e A_P^e dropout(h_n),

only the order of the work differs:

* :class:`SingleExpert` (``K = 1``, no router): plain LoRA, the same operations in the same
  order as :class:`~llava_mole.adapters.lora.LoRALinear` (its own dropout per projection);
* :class:`DenseExperts` (``dense``): every expert's rank-r shrink as one GEMM over ``K * r``
  columns, unchosen experts' columns zeroed by their gate, one expand GEMM;
* :class:`GroupedExperts` (``loop``, ``grouped_mm``): tokens sorted by expert once, the whole
  block run in that order (:meth:`ExpertDeltas.enter` / :meth:`ExpertDeltas.leave`), one
  per-expert GEMM per factor (``grouped_linear``);
* :class:`TritonExperts` (``triton``, inference only): the fused gather kernels of
  :mod:`.kernels` add each token's expert delta in place; tokens stay in their order.

This separates "which tokens meet which expert weights" from the MLP, as ScatterMoE separates
its ``ParallelExperts`` from the MoE layer (https://arxiv.org/abs/2403.08245). To add a path:
a subclass here, one entry in :data:`STRATEGIES`, and a rule in
:func:`~llava_mole.adapters.dispatch.choose_path`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .dispatch import (
    ExpertGrouping,
    Routing,
    dense_shrink,
    permute_rows,
    sorted_lora_delta,
    sorted_shrink,
)
from .kernels import gathered_lora_add_
from .lora import add_expand_, lora_shrink


class ExpertDeltas:
    """The expert LoRA deltas of one block forward (a base class; one subclass per path).

    Args:
        lora_a: ``{projection: (K, r, in)}`` expert down-projections.
        lora_b: ``{projection: (K, out, r)}`` expert up-projections.
        scaling: ``alpha / r``.
        fuse: the base projections are plain ``nn.Linear``, so their fresh outputs may be
            accumulated into in place (see :func:`~llava_mole.adapters.lora.add_expand_`).
    """

    #: Gate and up share one dropout draw of the block input; ``False``: each adapted
    #: projection draws its own (as separate ``LoRALinear`` layers do).
    shares_dropout = True

    def __init__(
        self,
        lora_a: Mapping[str, torch.Tensor],
        lora_b: Mapping[str, torch.Tensor],
        scaling: float,
        fuse: bool,
    ) -> None:
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.scaling = scaling
        self.fuse = fuse

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """The block input ``(N, d)`` in the row order the block runs in (default: as given).

        Called once per forward, before any :meth:`add`, with the block input.
        """
        return x

    def leave(self, y: torch.Tensor) -> torch.Tensor:
        """The block output back in the caller's row order."""
        return y

    def add(
        self, name: str, y: torch.Tensor, h: torch.Tensor, h_drop: torch.Tensor, of_input: bool
    ) -> torch.Tensor:
        """``y + delta_name(h)``; may write into ``y``, the base projection's fresh output.

        Args:
            name: the projection (``gate_proj``, ``up_proj``, ``down_proj``).
            y: ``P_base(h)``, ``(N, out)``.
            h: the projection's input ``(N, in)``, in :meth:`enter`'s order.
            h_drop: ``dropout(h)`` (``h`` itself where dropout is off).
            of_input: ``h`` is the (entered) block input, not the SwiGLU product.
        """
        raise NotImplementedError


class SingleExpert(ExpertDeltas):
    """One expert and no router: ``y + (alpha / r) * B A dropout(h)``, exactly plain LoRA."""

    shares_dropout = False

    def add(
        self, name: str, y: torch.Tensor, h: torch.Tensor, h_drop: torch.Tensor, of_input: bool
    ) -> torch.Tensor:
        a, b = self.lora_a[name][0], self.lora_b[name][0]
        return add_expand_(y, lora_shrink(h_drop, a, self.scaling), b, in_place=self.fuse)


class DenseExperts(ExpertDeltas):
    """All ``K`` experts' shrinks as one ``K * r``-wide GEMM, gated per token (any top-k)."""

    def __init__(
        self,
        lora_a: Mapping[str, torch.Tensor],
        lora_b: Mapping[str, torch.Tensor],
        scaling: float,
        fuse: bool,
        routing: Routing,
    ) -> None:
        super().__init__(lora_a, lora_b, scaling, fuse)
        # Scale and cast the gate once for the three projections (fewer small kernels: at
        # generation sizes on GPU the block's time is mostly kernel launches).
        dtype = next(iter(lora_a.values())).dtype
        self.gate = (routing.dense_weights() * scaling).to(dtype)

    def add(
        self, name: str, y: torch.Tensor, h: torch.Tensor, h_drop: torch.Tensor, of_input: bool
    ) -> torch.Tensor:
        shrunk, b_cat = dense_shrink(h_drop, self.lora_a[name], self.lora_b[name], self.gate)
        return add_expand_(y, shrunk, b_cat, in_place=self.fuse)


class GroupedExperts(ExpertDeltas):
    """Top-1 tokens grouped by expert; the block runs in expert order (``loop``, ``grouped_mm``).

    Args:
        path: ``"loop"`` or ``"grouped_mm"`` (see :func:`~.dispatch.grouped_linear`).
        dropout_active: LoRA dropout draws masks in this forward. Without it, gate and up
            shrink the unsorted input (:func:`~.dispatch.sorted_shrink`) so that autograd keeps
            ``x``, which the router keeps anyway, rather than its sorted copy.
    """

    def __init__(
        self,
        lora_a: Mapping[str, torch.Tensor],
        lora_b: Mapping[str, torch.Tensor],
        scaling: float,
        fuse: bool,
        routing: Routing,
        num_experts: int,
        path: str,
        dropout_active: bool,
    ) -> None:
        super().__init__(lora_a, lora_b, scaling, fuse)
        self.grouping = ExpertGrouping.from_experts(routing.experts[:, 0], num_experts)
        self.weights = routing.weights
        self.path = path
        self.dropout_active = dropout_active
        self.unsorted: torch.Tensor | None = None
        self.gate_sorted: torch.Tensor | None = None

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        # One permutation in (and one out, in :meth:`leave`) for the whole block.
        g = self.grouping
        self.unsorted = x
        sorted_rows = permute_rows(x, g.order, g.inverse)
        self.gate_sorted = permute_rows(self.weights, g.order, g.inverse)
        return sorted_rows

    def leave(self, y: torch.Tensor) -> torch.Tensor:
        return permute_rows(y, self.grouping.inverse, self.grouping.order)

    def add(
        self, name: str, y: torch.Tensor, h: torch.Tensor, h_drop: torch.Tensor, of_input: bool
    ) -> torch.Tensor:
        a, b = self.lora_a[name], self.lora_b[name]
        shrunk = None
        if of_input and not self.dropout_active:
            shrunk = sorted_shrink(self.unsorted, a, self.grouping, self.path)
        delta = sorted_lora_delta(
            h_drop, a, b, self.gate_sorted, self.scaling, self.grouping, self.path, shrunk=shrunk
        )
        return y + delta.to(y.dtype)


class TritonExperts(ExpertDeltas):
    """Top-1 inference (no autograd): two fused kernels add each token's delta to ``y`` in place.

    The kernels apply no dropout (``h``, not ``h_drop``): this path is used only where dropout
    draws nothing (evaluation, or no dropout configured).
    """

    def __init__(
        self,
        lora_a: Mapping[str, torch.Tensor],
        lora_b: Mapping[str, torch.Tensor],
        scaling: float,
        fuse: bool,
        routing: Routing,
    ) -> None:
        super().__init__(lora_a, lora_b, scaling, fuse)
        self.experts = routing.experts[:, 0]
        self.gate = routing.weights[:, 0]

    def add(
        self, name: str, y: torch.Tensor, h: torch.Tensor, h_drop: torch.Tensor, of_input: bool
    ) -> torch.Tensor:
        a, b = self.lora_a[name], self.lora_b[name]
        gathered_lora_add_(y, h, a, b, self.experts, self.gate, self.scaling)
        return y


#: Dispatch path (as :func:`~.dispatch.choose_path` names it) -> strategy class.
STRATEGIES: dict[str, type[ExpertDeltas]] = {
    "dense": DenseExperts,
    "loop": GroupedExperts,
    "grouped_mm": GroupedExperts,
    "triton": TritonExperts,
}


def expert_deltas(
    path: str,
    lora_a: Mapping[str, torch.Tensor],
    lora_b: Mapping[str, torch.Tensor],
    scaling: float,
    fuse: bool,
    routing: Routing,
    num_experts: int,
    dropout_active: bool,
) -> ExpertDeltas:
    """The strategy of ``path`` for one forward of a ``num_experts`` block with ``routing``."""
    cls = STRATEGIES[path]
    if cls is GroupedExperts:
        return GroupedExperts(
            lora_a, lora_b, scaling, fuse, routing, num_experts, path, dropout_active
        )
    return cls(lora_a, lora_b, scaling, fuse, routing)
