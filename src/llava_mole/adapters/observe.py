"""Watching a MoLE model route: per-forward traces, routing statistics, scoped captures.

The blocks record into the model's :class:`~.state.MoLEState`; this module switches that
recording on and off and reads it back:

* :func:`trace_routing`: the expert(s) of every token in every forward of a block of code
  (``generate`` included);
* :func:`set_token_tags`, :func:`enable_routing_stats`, :func:`routing_stats`: expert counts
  per block, domain and token kind (:data:`~.state.TOKEN_KINDS`), accumulated over forwards;
* :func:`capture_routing`: the same counts for a block of code, leaving the caller's
  statistics and tags as they were;
* :func:`routing_summary`: balance loss and expert load of the latest forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .state import MoLEState, get_state


class RoutingTrace:
    """The experts every MoLE block chose in every model forward inside :func:`trace_routing`.

    Attributes:
        num_blocks: Number of MoLE blocks of the model.
        num_experts: Experts per block.
        forwards: One ``{block: experts (B, T, top_k) int64}`` per model forward, in order
            (a ``generate`` call: the prompt forward, then one forward per new token).
    """

    def __init__(self, num_blocks: int, num_experts: int) -> None:
        self.num_blocks = num_blocks
        self.num_experts = num_experts
        self.forwards: list[dict[int, torch.Tensor]] = []

    def add(self, block: int, experts: torch.Tensor, batch_shape: tuple[int, ...]) -> None:
        """Record the experts ``(N, top_k)`` one block chose for an input of ``batch_shape``."""
        if not self.forwards:  # blocks called outside a model forward
            self.forwards.append({})
        shape = tuple(batch_shape) if len(batch_shape) == 2 else (1, experts.shape[0])
        self.forwards[-1][block] = experts.detach().reshape(*shape, experts.shape[-1])

    def top_experts(self, forward: int = -1) -> torch.Tensor | None:
        """``(B, T, num_blocks)`` highest-probability expert of each token of one forward, on the
        CPU (None: no forward recorded, or not every block ran in it)."""
        if not self.forwards or len(self.forwards[forward]) != self.num_blocks:
            return None
        record = self.forwards[forward]
        return torch.stack([record[b][..., 0] for b in sorted(record)], dim=-1).cpu()


@contextmanager
def trace_routing(model: nn.Module) -> Iterator[RoutingTrace]:
    """Records, per forward and MoLE block, the expert(s) each token went to.

    Example::

        with trace_routing(model) as trace:
            model.generate(**inputs)
        prompt_experts = trace.top_experts(0)  # (B, T_prompt, blocks)

    Nests with routing statistics and costs no extra kernels (the routers' choices are kept).

    Raises:
        ValueError: The model has no MoLE blocks.
    """
    state = get_state(model)
    if state is None:
        raise ValueError("the model has no MoLE blocks (apply_mole with mode='mole' first)")
    trace = RoutingTrace(state.num_blocks, state.config.num_experts)
    previous, state.trace = state.trace, trace
    try:
        yield trace
    finally:
        state.trace = previous


def routing_summary(model: nn.Module) -> dict[str, Any]:
    """Detached routing numbers of the latest forward: balance loss and mean expert load."""
    state = get_state(model)
    if state is None or not state.loads:
        return {}
    balance = state.balance_loss()
    loads = torch.stack(state.loads)
    return {
        "balance_loss": float(balance.detach()) if balance is not None else None,
        "expert_load": loads.mean(0).tolist(),
        "expert_load_per_block": loads.tolist(),
    }


def set_token_tags(
    model: nn.Module,
    domain_ids: torch.Tensor | None,
    num_domains: int = 1,
    answer_mask: torch.Tensor | None = None,
) -> None:
    """Tag the samples of the next forwards for routing statistics.

    Args:
        model: the adapted model.
        domain_ids: ``(B,)`` domain index of each sample.
        num_domains: how many domains the statistics distinguish.
        answer_mask: optional ``(B, T)`` bool, true at the positions whose next token is part of
            the answer (counted as ``"answer"`` instead of ``"text"``).
    """
    state = get_state(model)
    if state is None:
        return
    state.domain_ids = domain_ids
    state.num_domains = max(int(num_domains), 1)
    state.answer_mask = answer_mask


def enable_routing_stats(model: nn.Module, enabled: bool = True, reset: bool = True) -> None:
    """Accumulate expert counts per block, domain and token kind (:data:`TOKEN_KINDS`)."""
    state = get_state(model)
    if state is None:
        raise ValueError("the model has no MoLE blocks (apply_mole with mode='mole' first)")
    state.collect_stats = enabled
    if reset:
        state.stats = {}


def routing_stats(model: nn.Module) -> dict[int, torch.Tensor]:
    """Accumulated counts: ``{block: tensor (num_domains, 3 [text, image, answer], K)}``."""
    state = get_state(model)
    return {} if state is None else {b: t.detach().cpu() for b, t in sorted(state.stats.items())}


@dataclass
class RoutingCapture:
    """The routing statistics gathered inside :func:`capture_routing`.

    Attributes:
        state: The model's MoLE state (statistics are off except inside `collecting`).
    """

    state: MoLEState

    @contextmanager
    def collecting(
        self,
        domain_ids: torch.Tensor | None,
        num_domains: int = 1,
        answer_mask: torch.Tensor | None = None,
    ) -> Iterator[None]:
        """Counts the routing of the forwards in the block, tagged as :func:`set_token_tags`."""
        state = self.state
        state.domain_ids, state.num_domains = domain_ids, max(int(num_domains), 1)
        state.answer_mask = answer_mask
        state.collect_stats = True
        try:
            yield
        finally:
            state.collect_stats = False

    @property
    def stats(self) -> dict[int, torch.Tensor]:
        """Counts so far, as :func:`routing_stats`: ``{block: (num_domains, 3, K)}``."""
        return {b: t.detach().cpu() for b, t in sorted(self.state.stats.items())}


@contextmanager
def capture_routing(model: nn.Module) -> Iterator[RoutingCapture]:
    """Measures routing in a block without disturbing the caller's statistics and tags.

    On entry the state's statistics (``collect_stats``, ``stats``) and token tags
    (``domain_ids``, ``num_domains``, ``answer_mask``) are saved, counting is switched off and
    the counts emptied; forwards inside ``capture.collecting(...)`` are counted; on exit (also
    on an exception) everything saved is put back. Example::

        with capture_routing(model) as capture:
            with capture.collecting(domain_ids, num_domains, answer_mask):
                model(**inputs)
            counts = capture.stats

    Raises:
        ValueError: The model has no MoLE blocks.
    """
    state = get_state(model)
    if state is None:
        raise ValueError("the model has no MoLE blocks (apply_mole with mode='mole' first)")
    saved = (
        state.collect_stats,
        state.stats,
        state.domain_ids,
        state.num_domains,
        state.answer_mask,
    )
    state.collect_stats, state.stats = False, {}
    try:
        yield RoutingCapture(state)
    finally:
        (
            state.collect_stats,
            state.stats,
            state.domain_ids,
            state.num_domains,
            state.answer_mask,
        ) = saved
