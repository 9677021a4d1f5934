"""Plain LoRA on a frozen linear layer (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

``y = W x + b + (alpha / r) * B A dropout(x)`` with ``A`` (r x in) Kaiming-uniform and ``B``
(out x r) zero, so a fresh adapter leaves the model unchanged. MoLE experts reuse
:func:`init_lora_pair` and :func:`lora_delta`, so the baseline and the experts share one code path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def init_lora_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    """Initialise LoRA factors in place: ``A`` like ``nn.Linear`` (Kaiming-uniform), ``B`` zero.

    Args:
        a: down-projection(s), shape ``(..., r, in)``; leading dims are independent experts.
        b: up-projection(s), shape ``(..., out, r)``.
    """
    with torch.no_grad():
        flat = a.view(-1, a.shape[-1])
        for row_block in flat.split(a.shape[-2]):
            nn.init.kaiming_uniform_(row_block, a=math.sqrt(5))
        b.zero_()


def lora_delta(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """LoRA update ``scaling * B (gate * A x)`` computed in the adapter's dtype.

    Args:
        x: inputs ``(N, in)`` (dropout already applied).
        a: ``(r, in)``; b: ``(out, r)``.
        scaling: ``alpha / r``.
        gate: optional per-row weight ``(N, 1)`` folded into the rank-r activations (cheaper
            than scaling the ``out``-wide result).

    Returns:
        ``(N, out)`` in ``x``'s dtype.
    """
    h = F.linear(x.to(a.dtype), a)
    h = h * scaling if gate is None else h * (gate.to(h.dtype) * scaling)
    return F.linear(h, b).to(x.dtype)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    Args:
        base: the linear layer to adapt (frozen in place).
        rank: LoRA rank ``r``.
        alpha: scale numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout probability on the LoRA input.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.scaling = float(alpha) / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, **factory))
        if base.weight.device.type != "meta":
            init_lora_pair(self.lora_A, self.lora_B)
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        # Code that inspects ``module.weight`` (dtype/device probes in transformers) keeps working.
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + lora_delta(self.dropout(x), self.lora_A, self.lora_B, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scaling * B A`` (out x in), in the base weight's dtype."""
        return (self.lora_B.float() @ self.lora_A.float() * self.scaling).to(self.base.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (inference speed); undo with :meth:`unmerge`."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}"
