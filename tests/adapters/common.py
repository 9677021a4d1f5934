"""Settings shared by the adapter tests."""

from __future__ import annotations

from typing import Any

from llava_mole import MoLEConfig


def mole_cfg(**kw: Any) -> MoLEConfig:
    """A small MoLE config (rank 4, 3 experts, no dropout); ``kw`` overrides fields."""
    base = dict(rank=4, alpha=8, num_experts=3, dropout=0.0)
    base.update(kw)
    return MoLEConfig(**base)
