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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from llava_mole.adapters.observe import RoutingTrace, trace_routing
from llava_mole.data.templates import get_tokenizer
from llava_mole.eval.batching import (
    ImageInput,
    image_batch,
    left_pad,
    model_device,
    model_dtype,
    pad_token_id,
    stop_ids,
)

__all__ = ["DecodeParams", "Generation", "StreamEvent", "TokenInfo", "generate_batch"]

GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily (dividing by them would overflow the logits)."""


@dataclass(frozen=True)
class DecodeParams:
    """Decoding settings of one row.

    Attributes:
        max_new_tokens: Most tokens generated (the end token included).
        temperature: 0 (below `GREEDY_BELOW`): greedy; else sampling at this temperature.
        top_p: Nucleus sampling mass (1: off). Ignored when greedy.
        stop: Strings that end the answer; the answer is cut before the first one.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class TokenInfo:
    """One token: its id, its text and, with routing, its top expert per MoLE block.

    Attributes:
        id: Token id.
        text: Text the token adds (answer tokens: the decoded increment; prompt tokens: the
            token decoded alone, ``<image>`` for image tokens).
        experts: Highest-probability expert in each MoLE block, in block order (None: no
            routing asked).
        kind: ``answer``, ``text`` (prompt text) or ``image``.
    """

    id: int
    text: str
    experts: list[int] | None = None
    kind: str = "answer"


@dataclass
class StreamEvent:
    """What one decoding step produced for one row (see ``on_event`` of `generate_batch`).

    Attributes:
        row: Row of the batch.
        delta: New answer text that is final (stripped like the answer; held back while it may
            still turn into a stop string or an incomplete character).
        token: The new answer token (None for the end token).
        finish_reason: ``stop``, ``length`` or ``cancelled`` on the row's last event, else None.
        prompt: The prompt tokens with their routing, on the row's first event when asked.
    """

    row: int
    delta: str
    token: TokenInfo | None
    finish_reason: str | None = None
    prompt: list[TokenInfo] | None = None


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


# ---------------------------------------------------------------------------
# Per-row sampling and stopping
# ---------------------------------------------------------------------------


class _RowSampling(LogitsProcessor):
    """Per-row temperature and nucleus filter; greedy rows keep only their arg-max token."""

    def __init__(self, params: Sequence[DecodeParams], device: torch.device) -> None:
        self.greedy = torch.tensor([p.greedy for p in params], device=device).unsqueeze(1)
        temps = [1.0 if p.greedy else p.temperature for p in params]
        self.temps = torch.tensor(temps, device=device).unsqueeze(1)
        self.top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        scores = scores / self.temps
        order, index = scores.sort(dim=-1, descending=True)
        probs = order.softmax(dim=-1)
        # A token is dropped when the more likely tokens already hold top_p (the first stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= self.top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, index, drop_sorted)
        best = torch.zeros_like(drop).scatter(1, scores.argmax(dim=-1, keepdim=True), True)
        drop = torch.where(self.greedy, ~best, drop)
        return scores.masked_fill(drop, float("-inf"))


@dataclass
class _Row:
    """Decoding progress of one row."""

    params: DecodeParams
    ids: list[int] = field(default_factory=list)
    tokens: list[TokenInfo] = field(default_factory=list)
    raw: str = ""  # decoded answer tokens (tracked text only)
    cut: int | None = None  # stop-string position in raw.lstrip()
    emitted: str = ""
    generated: int = 0
    finish: str | None = None


UTF8_CONTINUATION = 3
"""Most bytes that can still complete a character (a UTF-8 sequence has at most 4 bytes)."""


def _held_back(text: str, stops: Sequence[str]) -> str:
    """`text` without a trailing whitespace run or a tail that could still grow into a stop
    string."""
    keep = len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                keep = min(keep, len(text) - k)
                break
    return text[:keep].rstrip()


class _RowMonitor(StoppingCriteria):
    """Called once per decoding step: records each row's new token, ends rows, reports events."""

    def __init__(
        self,
        tokenizer: Any,
        end_ids: set[int],
        params: Sequence[DecodeParams],
        *,
        track_text: bool,
        on_event: Callable[[StreamEvent], None] | None,
        cancelled: Callable[[int], bool] | None,
        prompt_info: Callable[[int], list[TokenInfo] | None],
    ) -> None:
        self.tokenizer = tokenizer
        self.end_ids = end_ids
        self.rows = [_Row(p) for p in params]
        self.track_text = track_text
        self.on_event = on_event
        self.cancelled = cancelled
        self.prompt_info = prompt_info
        self.trace: RoutingTrace | None = None
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, -1].tolist()
        experts = None
        if self.trace is not None:
            top = self.trace.top_experts()
            experts = None if top is None else top[:, -1].tolist()
        for index, row in enumerate(self.rows):
            if row.finish is None:
                self._advance(
                    index, row, int(new[index]), None if experts is None else experts[index]
                )
        self.step += 1
        return torch.tensor([row.finish is not None for row in self.rows], device=input_ids.device)

    def _advance(self, index: int, row: _Row, token: int, experts: list[int] | None) -> None:
        row.generated += 1
        info = None
        if token in self.end_ids:
            row.finish = "stop"
        else:
            row.ids.append(token)
            piece = ""
            if self.track_text:
                raw = self.tokenizer.decode(row.ids, skip_special_tokens=True)
                fallback = self.tokenizer.decode([token], skip_special_tokens=True)
                piece = raw[len(row.raw) :] if raw.startswith(row.raw) else fallback
                row.raw = raw
                row.cut = _stop_position(raw.lstrip(), row.params.stop)
            info = TokenInfo(token, piece, experts)
            if self.track_text:
                row.tokens.append(info)
            if row.cut is not None:
                row.finish = "stop"
            elif row.generated >= row.params.max_new_tokens:
                row.finish = "length"
            elif self.cancelled is not None and self.cancelled(index):
                row.finish = "cancelled"
        if self.on_event is not None:
            self._emit(index, row, info)

    def _emit(self, index: int, row: _Row, info: TokenInfo | None) -> None:
        final = self.text(row) if row.finish is not None else self._settled(row)
        delta = final[len(row.emitted) :] if final.startswith(row.emitted) else ""
        row.emitted += delta
        prompt = self.prompt_info(index) if self.step == 0 else None
        assert self.on_event is not None
        self.on_event(StreamEvent(index, delta, info, row.finish, prompt))

    def _settled(self, row: _Row) -> str:
        """The part of an unfinished answer that later tokens cannot change.

        A trailing replacement character may be the start of a character whose other bytes
        are still to come; the text of all but the last three tokens is settled once the full
        text extends it (by then any such character is complete, or invalid for good).
        """
        visible = row.raw.lstrip()
        settled = visible.rstrip("\ufffd")
        if len(row.ids) > UTF8_CONTINUATION:
            older = self.tokenizer.decode(row.ids[:-UTF8_CONTINUATION], skip_special_tokens=True)
            older = older.lstrip()
            if len(older) > len(settled) and visible.startswith(older):
                settled = older
        return _held_back(settled, row.params.stop)

    def text(self, row: _Row) -> str:
        """The row's answer text."""
        if not self.track_text:
            return self.tokenizer.decode(row.ids, skip_special_tokens=True).strip()
        visible = row.raw.lstrip()
        return (visible if row.cut is None else visible[: row.cut]).strip()


def _stop_position(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string starts in `text` (None: none occurs)."""
    found = [pos for pos in (text.find(s) for s in stops if s) if pos >= 0]
    return min(found) if found else None


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
        monitor = _RowMonitor(
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
    monitor: _RowMonitor,
    pad_id: int,
    seed: int | None,
) -> None:
    """The ``model.generate`` call: greedy unless a row samples (then per-row sampling)."""
    sampling: dict[str, Any] = {"do_sample": False}
    if not all(p.greedy for p in rows):
        device = inputs["input_ids"].device
        # Transformers' own warpers are switched off; _RowSampling does it per row.
        sampling = {
            "do_sample": True,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "logits_processor": LogitsProcessorList([_RowSampling(rows, device)]),
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
