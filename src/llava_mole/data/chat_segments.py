"""The chat-template half of the prompt encoder (see ``llava_mole.data.templates``).

The messages are rendered incrementally (``apply_chat_template(messages[:k], tokenize=False)``);
each rendering must extend the previous one, and only the new suffix of each turn is tokenized.
In an assistant suffix, the text before the answer (the role header) is masked, the answer and
the template's first special token after it (its end-of-turn token) are trained, and what
follows (e.g. a newline) is masked; without such a token the tokenizer's eos is appended. The
generation prompt is the same prefix followed by the template's generation header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .formats import ASSISTANT, IMAGE_PLACEHOLDER, TEMPLATE_MISMATCH, USER

__all__ = ["PROBE", "ChatTemplateSegments", "EncodeError", "Segment"]

PROBE = "zqx probe text"


class EncodeError(Exception):
    """A conversation cannot be turned into a training example.

    Attributes:
        reason: Skip reason, e.g. `no_labels_after_truncation` or `image_tokens_truncated`.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Segment:
    """Token ids of one piece of a conversation, and whether they carry labels."""

    ids: list[int]
    trained: bool


class ChatTemplateSegments:
    """Mixin of `ConversationEncoder`: segments of a conversation under a Jinja chat template.

    Uses the encoder's ``tokenizer``, ``processor``, ``images``, ``special_ids``, ``eos_id``,
    ``_chat_template``, ``_list_content``, ``_encode_text`` and ``_encode_with_image``.
    """

    tokenizer: Any
    processor: Any
    images: Any
    special_ids: set[int]
    eos_id: int | None
    _chat_template: str
    _list_content: bool

    def _encode_text(self, text: str) -> list[int]:  # pragma: no cover - the encoder's
        raise NotImplementedError

    def _encode_with_image(self, text: str, marker: str) -> list[int]:  # pragma: no cover
        raise NotImplementedError

    def _render(self, messages: list[dict[str, Any]], generation: bool) -> str:
        rendered = self.tokenizer.apply_chat_template(
            messages,
            chat_template=self._chat_template,
            tokenize=False,
            add_generation_prompt=generation,
        )
        if not isinstance(rendered, str):
            raise ValueError(f"apply_chat_template returned {type(rendered).__name__}, not str")
        return rendered

    def _detect_list_content(self) -> bool:
        """Whether the chat template wants OpenAI-style content lists (processor templates)."""
        try:
            if PROBE in self._render([{"role": USER, "content": PROBE}], False):
                return False
        except Exception:  # templates iterating over content fail on strings
            pass
        message = {"role": USER, "content": [{"type": "text", "text": PROBE}]}
        if PROBE in self._render([message], False):
            return True
        raise ValueError("the chat template renders neither string nor list message content")

    def _message(self, role: str, text: str) -> dict[str, Any]:
        if not self._list_content:
            return {"role": role, "content": text}
        content: list[dict[str, str]] = []
        for k, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k > 0:
                content.append({"type": "image"})
            if part.strip():
                content.append({"type": "text", "text": part.strip()})
        return {"role": role, "content": content}

    @property
    def _image_marker(self) -> str:
        if not self._list_content:
            return IMAGE_PLACEHOLDER
        if self.images is not None:  # what the template renders for an image
            return self.images.placeholder
        return getattr(self.processor, "image_token", None) or IMAGE_PLACEHOLDER

    def _suffix(self, rendered: str, previous: str) -> str:
        if not rendered.startswith(previous):
            raise EncodeError(
                TEMPLATE_MISMATCH,
                "the chat template is not incremental: rendering a longer conversation changed "
                "the text of earlier turns",
            )
        return rendered[len(previous) :]

    def _chat_segments(self, turns: list[tuple[str, str]], generation: bool) -> list[Segment]:
        segments: list[Segment] = []
        messages: list[dict[str, Any]] = []
        previous = ""
        for role, text in turns:
            if role == ASSISTANT:
                header = self._suffix(self._render(messages, True), previous)
            messages.append(self._message(role, text))
            rendered = self._render(messages, False)
            new = self._suffix(rendered, previous)
            if role == USER:
                segments.append(Segment(self._encode_with_image(new, self._image_marker), False))
            else:
                segments.extend(self._assistant_segments(new, header, text))
            previous = rendered
        if generation:
            header = self._suffix(self._render(messages, True), previous)
            segments.append(Segment(self._encode_text(header.rstrip(" ")), False))
        return segments

    def _assistant_segments(self, new: str, gen_header: str, answer: str) -> list[Segment]:
        """Splits an assistant suffix into masked header, trained answer + end token, masked
        tail."""
        start = len(gen_header) if new.startswith(gen_header) else 0
        pos = new.find(answer, start)
        if pos < 0:
            answer = answer.strip()
            pos = new.find(answer, start)
        if pos < 0:
            raise EncodeError(TEMPLATE_MISMATCH, "the chat template altered the answer text")
        header, tail = new[:pos], new[pos + len(answer) :]
        # Trailing spaces of the header belong to the answer, matching the generation prompt,
        # which ends without them.
        stripped = header.rstrip(" ")
        answer = header[len(stripped) :] + answer
        answer_ids = self._encode_text(answer)
        tail_ids = self._encode_text(tail)
        end = next((k for k, t in enumerate(tail_ids) if t in self.special_ids), None)
        if end is None:
            trained = answer_ids + ([self.eos_id] if self.eos_id is not None else [])
            rest = tail_ids
        else:
            trained, rest = answer_ids + tail_ids[: end + 1], tail_ids[end + 1 :]
        return [
            Segment(self._encode_text(stripped), False),
            Segment(trained, True),
            Segment(rest, False),
        ]
