"""Per-row decoding: each row's settings, its token events, and the per-step sampling and
stopping that :func:`llava_mole.eval.decoding.generate_batch` hands to ``model.generate``.

* :class:`RowSampling` (a logits processor): per-row temperature and nucleus ``top_p``; greedy
  rows keep only their arg-max token, so they decode exactly as plain greedy ``generate``.
* :class:`RowMonitor` (a stopping criterion, called once per step): records each row's new
  token and its routing, ends rows (end token, stop string, token limit, cancellation) and
  reports :class:`StreamEvent` s, holding back text that may still become a stop string or an
  incomplete character.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

from llava_mole.adapters.observe import RoutingTrace

__all__ = ["DecodeParams", "RowMonitor", "RowSampling", "StreamEvent", "TokenInfo"]

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


class RowSampling(LogitsProcessor):
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
class Row:
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


def held_back(text: str, stops: Sequence[str]) -> str:
    """`text` without a trailing whitespace run or a tail that could still grow into a stop
    string."""
    keep = len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                keep = min(keep, len(text) - k)
                break
    return text[:keep].rstrip()


class RowMonitor(StoppingCriteria):
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
        self.rows = [Row(p) for p in params]
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

    def _advance(self, index: int, row: Row, token: int, experts: list[int] | None) -> None:
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
                row.cut = stop_position(raw.lstrip(), row.params.stop)
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

    def _emit(self, index: int, row: Row, info: TokenInfo | None) -> None:
        final = self.text(row) if row.finish is not None else self._settled(row)
        delta = final[len(row.emitted) :] if final.startswith(row.emitted) else ""
        row.emitted += delta
        prompt = self.prompt_info(index) if self.step == 0 else None
        assert self.on_event is not None
        self.on_event(StreamEvent(index, delta, info, row.finish, prompt))

    def _settled(self, row: Row) -> str:
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
        return held_back(settled, row.params.stop)

    def text(self, row: Row) -> str:
        """The row's answer text."""
        if not self.track_text:
            return self.tokenizer.decode(row.ids, skip_special_tokens=True).strip()
        visible = row.raw.lstrip()
        return (visible if row.cut is None else visible[: row.cut]).strip()


def stop_position(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string starts in `text` (None: none occurs)."""
    found = [pos for pos in (text.find(s) for s in stops if s) if pos >= 0]
    return min(found) if found else None
