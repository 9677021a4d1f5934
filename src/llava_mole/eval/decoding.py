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
from PIL import Image
from torch import nn
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from llava_mole.adapters.state import RoutingTrace, trace_routing
from llava_mole.data.images import pixel_values
from llava_mole.data.templates import get_tokenizer

__all__ = ["DecodeParams", "Generation", "StreamEvent", "TokenInfo", "generate_batch"]

ImageInput = Image.Image | torch.Tensor
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
# Batch inputs
# ---------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (where its inputs go)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    """Floating dtype of the model (pixel values are cast to it)."""
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _pad_token_id(tokenizer: Any) -> int:
    """The pad id: the tokenizer's pad token, else its eos, else 0."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pad)


def _stop_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """Token ids that end an answer: the generation config's eos id(s) and the tokenizer's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _pixels(
    images: Sequence[ImageInput | None],
    processor: Any,
    image_mode: str,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Stacks the pixel values of the images of a batch, in batch order (None: no image).

    LLaVA fills the image tokens of the batch in order with the stacked images, so rows without
    an image simply contribute nothing.
    """
    present = [img for img in images if img is not None]
    if not present:
        return None
    image_processor = getattr(processor, "image_processor", None)
    tensors = []
    for img in present:
        if isinstance(img, torch.Tensor):
            tensors.append(img)
        else:
            if image_processor is None:
                raise ValueError("an image was given but the processor has no image_processor")
            tensors.append(pixel_values([img], image_processor, image_mode)[0])  # type: ignore[arg-type]
    return torch.stack(tensors).to(device=device, dtype=dtype)


def _left_pad(prompts: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads 1-D id tensors into ``(input_ids, attention_mask)``.

    Left padding keeps the last prompt token of every row at the same position, so the first
    generated token of each row follows its own prompt directly.
    """
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, length - len(prompt) :] = prompt
            mask[row, length - len(prompt) :] = 1
    return ids, mask


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


def _held_back(text: str, stops: Sequence[str]) -> str:
    """The part of `text` that is final: without a trailing partial character, whitespace, or
    a tail that could still grow into a stop string."""
    text = text.rstrip("\ufffd")
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
        stop_ids: set[int],
        params: Sequence[DecodeParams],
        *,
        track_text: bool,
        on_event: Callable[[StreamEvent], None] | None,
        cancelled: Callable[[int], bool] | None,
        prompt_info: Callable[[int], list[TokenInfo] | None],
    ) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
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
        if token in self.stop_ids:
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
        if row.finish is not None:
            final = self.text(row)
        else:
            final = _held_back(row.raw.lstrip(), row.params.stop)
        delta = final[len(row.emitted) :] if final.startswith(row.emitted) else ""
        row.emitted += delta
        prompt = self.prompt_info(index) if self.step == 0 else None
        assert self.on_event is not None
        self.on_event(StreamEvent(index, delta, info, row.finish, prompt))

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
        images: One PIL image, pixel tensor ``(3, H, W)`` or None per prompt (None: no images).
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
    pad_id = _pad_token_id(tokenizer)
    device, dtype = _model_device(model), _model_dtype(model)
    chunk = [torch.as_tensor(p, dtype=torch.long) for p in prompts]
    ids, mask = _left_pad(chunk, pad_id)
    inputs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    pixels = _pixels(images, processor, image_mode, dtype, device)
    if pixels is not None:
        inputs["pixel_values"] = pixels
    routing = routing or prompt_routing
    track = routing or on_event is not None or any(p.stop for p in rows)
    with trace_routing(model) if routing else nullcontext() as trace:
        image_id = getattr(getattr(model, "config", None), "image_token_id", None)
        monitor = _RowMonitor(
            tokenizer,
            _stop_ids(model, tokenizer),
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
