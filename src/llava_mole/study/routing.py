"""The routing picture of a MoLE setting over its seeds (from each run's ``eval.json``).

Expert numbering is arbitrary in each run, so expert shares are never averaged over seeds; the
*separation* of the domains is computed within each run and then averaged.
"""

from __future__ import annotations

import statistics
from typing import Any

__all__ = ["PICTURE_KINDS", "routing_summary", "domain_separation"]

# Token kinds of a routing picture (see ``eval.generate``): ``answer`` is a subset of ``text``.
PICTURE_KINDS = ("text", "image", "answer")


def domain_separation(blocks: list[dict[str, Any]], block: int, kind: str) -> float | None:
    """Mean pairwise total-variation distance of the domains' expert shares in one block.

    ``TV(p, q) = 0.5 * sum_k |p_k - q_k|`` for the expert shares ``p``, ``q`` of two domains'
    tokens of one ``kind``: 0 = routed alike, 1 = disjoint experts.
    """
    rows = [b[kind] for b in blocks if b["block"] == block and b.get(kind) is not None]
    pairs = [
        0.5 * sum(abs(x - y) for x, y in zip(p, q))
        for i, p in enumerate(rows)
        for q in rows[i + 1 :]
    ]
    return statistics.fmean(pairs) if pairs else None


def routing_summary(evals: list[tuple[int, dict[str, Any] | None]]) -> dict[str, Any] | None:
    """The routing picture of one MoLE setting over its seeds.

    Expert numbering is arbitrary in each run (expert 0 of one seed has nothing to do with
    expert 0 of another), so shares are never averaged over seeds: the cells show the first
    seed's routing, and the separation is computed within each seed, then averaged.

    Args:
        evals: ``(seed, routing statistics or None)`` of each run of the setting.
    """
    pictures = sorted(((seed, e) for seed, e in evals if e), key=lambda item: item[0])
    if not pictures:
        return None
    shown_seed, shown = pictures[0]
    experts = shown["experts"]
    blocks = []
    for entry in sorted(
        shown["blocks"], key=lambda b: (b["block"], shown["domains"].index(b["domain"]))
    ):
        blocks.append(
            {
                "block": entry["block"],
                "domain": entry["domain"],
                **{kind: entry.get(kind) for kind in PICTURE_KINDS},
                **{f"{k}_tokens": entry.get(f"{k}_tokens", 0) for k in PICTURE_KINDS},
            }
        )
    separation = []
    per_seed = []
    for block in sorted({b["block"] for b in blocks}):
        row: dict[str, Any] = {"block": block}
        seed_row: dict[str, Any] = {"block": block}
        for kind in PICTURE_KINDS:
            values = [domain_separation(p["blocks"], block, kind) for _, p in pictures]
            values = [v for v in values if v is not None]
            row[kind] = statistics.fmean(values) if values else None
            seed_row[kind] = values or None
        separation.append(row)
        per_seed.append(seed_row)
    return {
        "experts": experts,
        "domains": list(shown["domains"]),
        "seeds": len(pictures),
        "shown_seed": shown_seed,
        "blocks": blocks,
        # Mean over seeds of each seed's mean pairwise total-variation distance between the
        # domains' expert shares per block: 0 = every domain uses the experts alike, 1 = domains
        # use disjoint experts.
        "separation": separation,
        "separation_per_seed": per_seed,
    }
