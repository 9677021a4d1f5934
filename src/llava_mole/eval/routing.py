"""The routing picture of an evaluation: which experts each domain's tokens go to.

One teacher-forced forward per batch (prompt + reference answer, right padding) inside
:func:`llava_mole.adapters.observe.capture_routing` counts, per MoLE block, domain and token kind
(text / image / answer), the tokens sent to each expert; :func:`routing_picture` turns the
counts into shares. A position counts as ``answer`` when its *next* token is a reference-answer
token (the position that produces it), as generation's routing does.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters.observe import RoutingCapture
from ..adapters.state import TOKEN_KINDS
from ..data.tokens import get_tokenizer
from .batching import ImageInput, image_batch, model_device, model_dtype, pad_token_id

__all__ = ["RoutingRow", "routing_forward", "routing_picture"]


@dataclass
class RoutingRow:
    """One sample of a routing forward.

    Attributes:
        full: Prompt + reference answer ids.
        prompt_length: Length of the prompt part.
        image: Its image (None: text only).
        domain: Index of its domain.
    """

    full: torch.Tensor
    prompt_length: int
    image: ImageInput | None
    domain: int


def routing_forward(
    model: nn.Module,
    capture: RoutingCapture,
    rows: Sequence[RoutingRow],
    num_domains: int,
    processor: Any,
) -> None:
    """One teacher-forced forward of `rows` with their routing counted in `capture`."""
    if not rows:
        return
    device, dtype = model_device(model), model_dtype(model)
    length = max(len(r.full) for r in rows)
    ids = torch.full((len(rows), length), pad_token_id(get_tokenizer(processor)))
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    answer = torch.zeros((len(rows), length), dtype=torch.bool)
    for k, row in enumerate(rows):
        ids[k, : len(row.full)] = row.full
        mask[k, : len(row.full)] = 1  # padding is excluded from the counts through the mask
        answer[k, row.prompt_length - 1 : len(row.full) - 1] = True
    inputs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    inputs.update(
        image_batch(
            processor,
            [r.full for r in rows],
            [r.image for r in rows],
            length,
            left=False,
            image_mode="pad",
            dtype=dtype,
            device=device,
        )
    )
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        inputs["logits_to_keep"] = 1  # only the routing matters, skip the full LM head
    domains = torch.tensor([r.domain for r in rows], device=device)
    with capture.collecting(domains, num_domains, answer.to(device)), torch.no_grad():
        model(**inputs)


def routing_picture(
    stats: dict[int, torch.Tensor], domains: Sequence[str]
) -> dict[str, Any] | None:
    """Shares of tokens per expert, per block, domain and token kind, from the counts.

    Returns:
        ``{"experts": K, "domains": [...], "blocks": [{"block", "domain", "text", "image",
        "answer", "text_tokens", "image_tokens", "answer_tokens"}, ...]}`` (None where a kind
        has no tokens), or None without counts. ``text`` is every text token, answer-producing
        positions included (the paper's split); ``answer`` is that subset alone.
    """
    if not stats:
        return None
    experts = next(iter(stats.values())).shape[-1]
    blocks = []
    for block, counts in stats.items():
        for d, domain in enumerate(domains):
            entry: dict[str, Any] = {"block": int(block), "domain": domain}
            kinds = {kind: counts[d, t].double() for t, kind in enumerate(TOKEN_KINDS)}
            kinds["text"] = kinds["text"] + kinds["answer"]
            for kind, row in kinds.items():
                total = float(row.sum())
                # Counts are fractions 1/top_k per chosen expert: the row sum is the token count.
                entry[kind] = (row / total).tolist() if total > 0 else None
                entry[f"{kind}_tokens"] = int(round(total))
            blocks.append(entry)
    return {"experts": int(experts), "domains": list(domains), "blocks": blocks}
