"""The one decoding loop: a batched ``model.generate`` call with per-row settings.

:func:`generate_batch` decodes a batch of ready-made prompts (left padding, KV cache) and gives
each row its own token limit, temperature, nucleus ``top_p`` and stop strings; it can report
every new token as it is produced (streaming) and, for MoLE adapters, the expert each token went
to in every MoLE block. Greedy rows are decoded exactly as plain greedy ``generate`` would, so
:func:`llava_mole.eval.generate.generate_answers` (evaluation, ``predict``) and the server
(:mod:`llava_mole.serve`) share this code.

Routing of a generated token is the routing of the position that produced it (the position
holding the previous token; the last prompt token for the first answer token), the positions
``evaluate`` counts as ``answer`` tokens. Routing of a prompt token is that of its own position.
Each row's settings, events, sampling and stopping are :mod:`llava_mole.eval.rows`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessorList, StoppingCriteriaList

from llava_mole.adapters.observe import RoutingTrace, trace_routing
from llava_mole.data.tokens import get_tokenizer
from llava_mole.eval.batching import (
    ImageInput,
    image_batch,
    left_pad,
    model_device,
    model_dtype,
    pad_token_id,
    stop_ids,
)
from llava_mole.eval.rows import DecodeParams, RowMonitor, RowSampling, StreamEvent, TokenInfo

__all__ = ["DecodeParams", "Generation", "StreamEvent", "TokenInfo", "generate_batch"]


@dataclass
class Generation:
    """The answer of one row.

    Attributes:
        text: Decoded answer (special tokens skipped, stripped, cut before a stop string).
        token_ids: Answer token ids (the end token excluded).
        finish_reason: ``stop`` (end token or stop string), ``length`` or ``cancelled``.
        completion_tokens: Tokens generated for the row, the end token included.
        tokens: Answer tokens with text and routing (when routing or streaming was asked).
        prompt_tokens: Prompt tokens with routing (when prompt routing was asked).
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    completion_tokens: int
    tokens: list[TokenInfo] | None = None
    prompt_tokens: list[TokenInfo] | None = None


def _prompt_tokens(
    trace: RoutingTrace | None, prompts: Sequence[torch.Tensor], tokenizer: Any, image_id: Any
) -> Callable[[int], list[TokenInfo] | None]:
    """A function giving a row's prompt tokens with their routing (from the prompt forward)."""
    cache: dict[int, list[TokenInfo] | None] = {}

    def info(row: int) -> list[TokenInfo] | None:
        if row not in cache:
            top = None if trace is None or not trace.forwards else trace.top_experts(0)
            if top is None:
                cache[row] = None
            else:
                ids = prompts[row].tolist()
                experts = top[row, top.shape[1] - len(ids) :].tolist()
                cache[row] = [
                    TokenInfo(t, "<image>", e, "image")
                    if t == image_id
                    else TokenInfo(t, tokenizer.decode([t]), e, "text")
                    for t, e in zip(ids, experts)
                ]
        return cache[row]

    return info


# ---------------------------------------------------------------------------
# The decoding call
# ---------------------------------------------------------------------------


def generate_batch(
    model: nn.Module,
    processor: Any,
    prompts: Sequence[torch.Tensor | Sequence[int]],
    images: Sequence[ImageInput | None] | None = None,
    params: DecodeParams | Sequence[DecodeParams] = DecodeParams(),
    *,
    image_mode: str = "pad",
    routing: bool = False,
    prompt_routing: bool = False,
    on_event: Callable[[StreamEvent], None] | None = None,
    cancelled: Callable[[int], bool] | None = None,
    seed: int | None = None,
) -> list[Generation]:
    """Decodes one batch of prompts in a single ``model.generate`` call.

    Args:
        model: A LLaVA-style model or causal LM in eval mode.
        processor: Its processor (or tokenizer).
        prompts: Prompt ids ending with the assistant prefix, image tokens expanded.
        images: One PIL image, pixel tensor ``(3, H, W)`` (LLaVA-1.5) or None per prompt (None:
            no images).
        params: Settings for all rows, or one per row.
        image_mode: ``pad`` or ``resize``, for PIL images.
        routing: Report each answer token's expert per MoLE block (MoLE adapters only).
        prompt_routing: Also report every prompt token's expert (implies `routing`).
        on_event: Called from inside ``generate`` with each row's `StreamEvent` per step; an
            exception it raises ends the call.
        cancelled: ``cancelled(row)``: end the row early (e.g. its client left).
        seed: Seeds torch's generator before sampling (only used when a row samples).

    Returns:
        One `Generation` per prompt, in order.

    Raises:
        ValueError: Lengths differ, empty batch, or routing asked of a model without MoLE blocks.
    """
    rows = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
    images = [None] * len(prompts) if images is None else images
    if not prompts or len(images) != len(prompts) or len(rows) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts, {len(images)} images, {len(rows)} params")
    tokenizer = get_tokenizer(processor)
    pad_id = pad_token_id(tokenizer)
    chunk = [torch.as_tensor(p, dtype=torch.long) for p in prompts]
    inputs = _batch_inputs(model, processor, chunk, images, image_mode, pad_id)
    routing = routing or prompt_routing
    track = routing or on_event is not None or any(p.stop for p in rows)
    with trace_routing(model) if routing else nullcontext() as trace:
        image_id = getattr(getattr(model, "config", None), "image_token_id", None)
        monitor = RowMonitor(
            tokenizer,
            stop_ids(model, tokenizer),
            rows,
            track_text=track,
            on_event=on_event,
            cancelled=cancelled,
            prompt_info=_prompt_tokens(
                trace if prompt_routing else None, chunk, tokenizer, image_id
            ),
        )
        monitor.trace = trace
        _run_generate(model, inputs, rows, monitor, pad_id, seed)
    prompt_info = monitor.prompt_info
    return [
        Generation(
            monitor.text(row),
            row.ids,
            row.finish or "length",
            row.generated,
            row.tokens if track else None,
            prompt_info(k) if prompt_routing else None,
        )
        for k, row in enumerate(monitor.rows)
    ]


def _batch_inputs(
    model: nn.Module,
    processor: Any,
    prompts: Sequence[torch.Tensor],
    images: Sequence[ImageInput | None],
    image_mode: str,
    pad_id: int,
) -> dict[str, Any]:
    """``input_ids``, ``attention_mask`` (left padding) and the image inputs on the model."""
    device, dtype = model_device(model), model_dtype(model)
    ids, mask = left_pad(prompts, pad_id)
    inputs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    inputs.update(
        image_batch(
            processor,
            prompts,
            images,
            ids.shape[1],
            left=True,
            image_mode=image_mode,
            dtype=dtype,
            device=device,
        )
    )
    return inputs


def _run_generate(
    model: nn.Module,
    inputs: dict[str, Any],
    rows: Sequence[DecodeParams],
    monitor: RowMonitor,
    pad_id: int,
    seed: int | None,
) -> None:
    """The ``model.generate`` call: greedy unless a row samples (then per-row sampling)."""
    sampling: dict[str, Any] = {"do_sample": False}
    if not all(p.greedy for p in rows):
        device = inputs["input_ids"].device
        # Transformers' own warpers are switched off; RowSampling does it per row.
        sampling = {
            "do_sample": True,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "logits_processor": LogitsProcessorList([RowSampling(rows, device)]),
        }
        if seed is not None:
            torch.manual_seed(seed)
    with torch.no_grad():
        model.generate(
            **inputs,
            **sampling,
            use_cache=True,
            max_new_tokens=max(p.max_new_tokens for p in rows),
            pad_token_id=pad_id,
            stopping_criteria=StoppingCriteriaList([monitor]),
        )
