"""The explicit channel between MoLE blocks and the training loss.

Every MoLE block appends its routing terms (balance loss, z-loss, expert load) to one
:class:`MoLEState` shared by the model. The state is reset by a forward pre-hook on the adapted
model, so each model forward starts clean (``generate()`` included), and blocks record nothing
while autograd recomputes them during backward (non-reentrant activation checkpointing): a
recomputed forward never counts the loss twice. The trainer reads the loss with
:func:`mole_aux_loss` right after the forward. What the blocks record for inspection (traces,
routing statistics) is read through :mod:`.observe`.

Balance losses (``P_k`` mean router probability, ``f_k`` share of routed tokens, real tokens only):

* ``switch`` (Switch Transformer, https://arxiv.org/abs/2101.03961): ``K * sum_k f_k P_k`` per
  block, averaged over blocks. Equals 1 for a perfectly balanced router.
* ``official`` (LLaVA-MoLE release): per sample, probabilities and choices of all blocks' real
  tokens are pooled, ``sum_k mean(p_k) * mean(onehot_k)``, averaged over the batch.

Under data parallelism (DDP, DeepSpeed, FSDP) :func:`mole_aux_terms` computes these over the
*global* micro-batch of all processes (one all-reduce of the per-block counts per forward), so N
processes with per-device batch B train exactly as one process with batch N * B.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import MoLEConfig
from .dispatch import Routing

if TYPE_CHECKING:
    from .observe import RoutingTrace

STATE_ATTR = "_mole_state"
# Token kinds of the routing statistics: prompt text, image, and the positions that predict an
# answer token (where a domain-specific answer is produced; only known when the caller marks
# them with ``set_token_tags(..., answer_mask=...)``; text otherwise).
TOKEN_KINDS = ("text", "image", "answer")


def _in_backward() -> bool:
    """True while the autograd engine runs (e.g. checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


class MoLEState:
    """Per-forward routing terms and optional cumulative routing statistics of one model."""

    def __init__(self, config: MoLEConfig, num_blocks: int, image_token_id: int | None) -> None:
        self.config = config
        self.num_blocks = num_blocks
        self.image_token_id = image_token_id
        self.domain_ids: torch.Tensor | None = None
        self.answer_mask: torch.Tensor | None = None
        self.num_domains = 1
        self.collect_stats = False
        self.dense_routing = False
        self.route_experts: torch.Tensor | None = None  # (B,) for router="domain"
        self.stats: dict[int, torch.Tensor] = {}
        self.trace: RoutingTrace | None = None  # set by :func:`trace_routing`
        self.begin_forward(None, None)

    # ---- lifecycle -------------------------------------------------------------------------
    def begin_forward(
        self, attention_mask: torch.Tensor | None, input_ids: torch.Tensor | None
    ) -> None:
        """Start a model forward: drop the previous forward's terms, remember token masks."""
        self.token_mask = attention_mask.bool() if attention_mask is not None else None
        self.image_mask = None
        if input_ids is not None and self.image_token_id is not None:
            self.image_mask = input_ids == self.image_token_id
        self.balance: list[torch.Tensor] = []
        self.z_loss: list[torch.Tensor] = []
        self._z_sums: list[torch.Tensor] = []
        self.loads: list[torch.Tensor] = []
        self._pooled: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if self.trace is not None:
            self.trace.forwards.append({})

    def _align(self, mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
        # With a KV cache the mask covers past + current tokens; the block sees the current ones.
        if mask is None or mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < seq:
            return None
        return mask[:, -seq:]

    # ---- recording ---------------------------------------------------------------------------
    def record(
        self, block: int, logits: torch.Tensor, routing: Routing, batch_shape: tuple[int, ...]
    ) -> None:
        """Record one block's routing for the current forward.

        Args:
            block: index of the MoLE block.
            logits: router logits ``(N, K)``.
            routing: the block's :class:`Routing`.
            batch_shape: leading shape of the block input, ``(B, T)`` or ``(N,)``.
        """
        if self.trace is not None and not _in_backward():
            self.trace.add(block, routing.experts, batch_shape)
        if not torch.is_grad_enabled() and not self.collect_stats:
            # Inference (generate, evaluation): nothing reads the loss terms, and computing
            # them would launch a dozen small kernels per block per decoding step.
            return
        k = routing.probs.shape[-1]
        batch, seq = (
            (batch_shape[0], batch_shape[1]) if len(batch_shape) == 2 else (1, logits.shape[0])
        )
        real = self._align(self.token_mask, batch, seq)
        real = (
            torch.ones(batch, seq, device=logits.device, dtype=torch.float32)
            if real is None
            else real.to(device=logits.device, dtype=torch.float32)
        )
        probs = routing.probs.view(batch, seq, k)
        chosen = routing.one_hot().view(batch, seq, k) / routing.experts.shape[-1]
        weight = real.unsqueeze(-1)
        p_sum = (probs * weight).sum(1)  # (B, K)
        c_sum = (chosen * weight).sum(1)  # (B, K)
        n = real.sum(1)  # (B,)
        total = n.sum().clamp_min(1.0)
        load = c_sum.sum(0) / total
        balance = k * (load * (p_sum.sum(0) / total)).sum()
        z_loss = z_sum = None
        if self.config.router_z_coef > 0:
            z = torch.logsumexp(logits.float(), dim=-1).pow(2).view(batch, seq)
            z_sum = (z * real).sum()
            z_loss = z_sum / total
        # Checkpoint recomputation must save the same tensors as the first forward, so the terms
        # are computed either way; they are only kept from the first forward.
        if _in_backward():
            return
        self.loads.append(load.detach())
        self.balance.append(balance)
        self._pooled.append((p_sum, c_sum, n))
        if z_loss is not None:
            self.z_loss.append(z_loss)
            self._z_sums.append(z_sum)
        if self.collect_stats:
            self._accumulate_stats(block, chosen.detach(), real, batch, seq)

    def _accumulate_stats(
        self, block: int, chosen: torch.Tensor, real: torch.Tensor, batch: int, seq: int
    ) -> None:
        k = chosen.shape[-1]
        device = chosen.device
        is_image = self._align(self.image_mask, batch, seq)
        kind = (
            torch.zeros(batch, seq, dtype=torch.long, device=device)
            if is_image is None
            else is_image.to(device=device, dtype=torch.long)
        )
        is_answer = self._align(self.answer_mask, batch, seq)
        if is_answer is not None:
            kind = torch.where(is_answer.to(device), 2, kind)
        domain = torch.zeros(batch, dtype=torch.long, device=device)
        if self.domain_ids is not None and self.domain_ids.numel() == batch:
            domain = self.domain_ids.to(device)
        n_kinds = len(TOKEN_KINDS)
        slot = (domain.view(batch, 1) * n_kinds + kind).reshape(-1)
        counts = torch.zeros(self.num_domains * n_kinds, k, device=device)
        counts.index_add_(0, slot, (chosen * real.unsqueeze(-1)).reshape(-1, k))
        counts = counts.view(self.num_domains, n_kinds, k)
        if block in self.stats and self.stats[block].shape == counts.shape:
            self.stats[block] += counts
        else:
            self.stats[block] = counts

    # ---- reading -----------------------------------------------------------------------------
    def balance_loss(self) -> torch.Tensor | None:
        if not self.balance:
            return None
        if self.config.balance_loss == "switch":
            return torch.stack(self.balance).mean()
        per_sample, has_tokens = self._official_per_sample()
        # Mean over samples that have real tokens, without a host sync.
        return (per_sample * has_tokens).sum() / has_tokens.sum().clamp_min(1)

    def aux_loss(self) -> torch.Tensor | None:
        """``balance_coef * balance + router_z_coef * z`` of the latest forward, or ``None``."""
        balance = self.balance_loss()
        if balance is None:
            return None
        total = self.config.balance_coef * balance
        if self.z_loss:
            total = total + self.config.router_z_coef * torch.stack(self.z_loss).mean()
        return total

    def aux_terms(self, sync: Callable[[torch.Tensor], torch.Tensor] | None = None, world: int = 1):
        """Auxiliary loss, balance loss and expert load of the latest forward (:class:`AuxTerms`).

        Args:
            sync: ``None`` (this process's tokens), or a function returning the sum of a
                detached tensor over the data-parallel processes: every term is then computed
                from the global micro-batch's counts.
            world: number of data-parallel processes (used with ``sync``).

        With ``sync``, each returned loss has the global value on every process, and a gradient
        that, averaged over the processes (as DDP, DeepSpeed and FSDP average gradients), is the
        gradient of the global loss: ``world`` times the local tokens' share of it.
        """
        if not self.balance:
            return AuxTerms(None, None, None)
        if sync is None:
            return AuxTerms(self.aux_loss(), self.balance_loss(), torch.stack(self.loads).mean(0))
        k = self._pooled[0][0].shape[-1]
        p_blocks = torch.stack([t[0].sum(0) for t in self._pooled]).float()  # (L, K), has grad
        c_blocks = torch.stack([t[1].sum(0) for t in self._pooled]).float().detach()
        n_blocks = torch.stack([t[2].sum() for t in self._pooled]).float().detach()  # (L,)
        parts = [p_blocks.detach().reshape(-1), c_blocks.reshape(-1), n_blocks]
        official = self.config.balance_loss != "switch"
        if official:
            per_sample, has_tokens = self._official_per_sample()
            o_sum = (per_sample * has_tokens).sum()
            parts += [o_sum.detach().view(1), has_tokens.sum().detach().view(1)]
        z_sums = torch.stack(self._z_sums).float() if self._z_sums else None
        if z_sums is not None:
            parts.append(z_sums.detach())
        flat = sync(torch.cat(parts))
        blocks = p_blocks.shape[0]
        sizes = [blocks * k, blocks * k, blocks] + ([1, 1] if official else [])
        sizes += [blocks] if z_sums is not None else []
        pieces = list(torch.split(flat, sizes))
        p_all = pieces[0].view(blocks, k)
        n_all = pieces[2].clamp_min(1.0).unsqueeze(-1)
        load = pieces[1].view(blocks, k) / n_all  # each expert's share of the global tokens
        if official:
            count = pieces[4].clamp_min(1.0).squeeze()
            value = pieces[3].squeeze() / count
            local = o_sum / count * world
        else:
            value = (k * (load * p_all / n_all).sum(-1)).mean()
            local = (k * (load * p_blocks / n_all).sum(-1)).mean() * world
        balance = value + (local - local.detach())
        loss = self.config.balance_coef * balance
        if z_sums is not None:
            z_value = (pieces[-1] / n_all.squeeze(-1)).mean()
            z_local = (z_sums / n_all.squeeze(-1)).mean() * world
            loss = loss + self.config.router_z_coef * (z_value + (z_local - z_local.detach()))
        return AuxTerms(loss, balance, load.mean(0))

    def _official_per_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        p_sum = torch.stack([t[0] for t in self._pooled]).sum(0)
        c_sum = torch.stack([t[1] for t in self._pooled]).sum(0)
        n = torch.stack([t[2] for t in self._pooled]).sum(0)
        denom = n.clamp_min(1).unsqueeze(-1)
        return ((p_sum / denom) * (c_sum / denom)).sum(-1), (n > 0).float()


@dataclass
class AuxTerms:
    """The routing terms of one forward (``None`` without MoLE blocks or before a forward).

    Attributes:
        loss: ``balance_coef * balance + router_z_coef * z`` (add it to the LM loss).
        balance: the balance loss alone.
        load: ``(K,)`` each expert's share of the routed tokens, averaged over blocks.
    """

    loss: torch.Tensor | None
    balance: torch.Tensor | None
    load: torch.Tensor | None


def get_state(model: nn.Module) -> MoLEState | None:
    """The :class:`MoLEState` of a model adapted with ``apply_mole`` (unwrapping DDP etc.)."""
    seen = 0
    while model is not None and seen < 8:
        state = model.__dict__.get(STATE_ATTR)
        if state is not None:
            return state
        model = getattr(model, "module", None)  # DDP / accelerate wrappers
        seen += 1
    return None


def mole_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Weighted auxiliary loss of the model's latest forward (``None`` without MoLE blocks).

    Add it to the language-model loss. Exact under non-reentrant activation checkpointing.
    """
    state = get_state(model)
    return None if state is None else state.aux_loss()


def mole_aux_terms(
    model: nn.Module,
    sync: Callable[[torch.Tensor], torch.Tensor] | None = None,
    world: int = 1,
) -> AuxTerms:
    """Auxiliary loss, balance loss and expert load of the model's latest forward.

    Args:
        model: an adapted model (a model without MoLE blocks gives ``AuxTerms(None, None, None)``).
        sync: sums a detached tensor over the data-parallel processes (e.g. an all-reduce);
            ``None`` keeps the terms local (what :func:`mole_aux_loss` returns).
        world: number of data-parallel processes.
    """
    state = get_state(model)
    return AuxTerms(None, None, None) if state is None else state.aux_terms(sync, world)


def set_routing_domains(model: nn.Module, domains: Sequence[str]) -> None:
    """Name the domain of each sample of the next forwards (for ``router="domain"`` adapters).

    Every token of sample ``b`` then goes to the expert of ``domains[b]``
    (``config.router_domains``). Does nothing for other adapters.

    Args:
        model: a model adapted with ``apply_mole``.
        domains: one domain name per sample of the batch.

    Raises:
        ValueError: a domain the adapter has no expert for.
    """
    state = get_state(model)
    if state is None or state.config.router != "domain":
        return
    index = {name: i for i, name in enumerate(state.config.router_domains)}
    unknown = sorted(set(domains) - set(index))
    if unknown:
        raise ValueError(
            f"domain {unknown[0]!r} has no expert in this domain-routed adapter "
            f"(its domains: {list(state.config.router_domains)})"
        )
    state.route_experts = torch.tensor([index[d] for d in domains], dtype=torch.long)


def set_dense_routing(model: nn.Module, enabled: bool) -> None:
    """Switch the MoLE blocks of ``model`` between top-k and dense routing (training only).

    Dense routing sends every token to all ``K`` experts, each weighted by its router
    probability: ``P(h) + sum_k p_k (alpha / r) B_P^k A_P^k h``. The router's LM gradient is then
    ``dL/dz_k = p_k (s_k - sum_j p_j s_j)`` with ``s_k = <dL/dy, delta_k>``: it compares every
    expert with the mixture, where top-1 only reinforces or weakens the expert already chosen
    (the dense-to-sparse gate of EvoMoE, arXiv 2112.14397). The balance loss has no gradient
    in this phase (every expert's load is ``1/K``). Blocks in eval mode always route top-k.

    Args:
        model: a model adapted with ``apply_mole`` (a model without MoLE blocks is left as is).
        enabled: dense (``True``) or the configured top-k (``False``).
    """
    state = get_state(model)
    if state is not None:
        state.dense_routing = bool(enabled)
