"""Prompt formatting, tokenization and label masking.

Three templates are supported:

``vicuna_v1``
    LLaVA-1.5's conversation format::

        <s>{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

``chat_template``
    The processor's (or else the tokenizer's) own Jinja chat template.

``plain``
    LLaVA's stage-1 (projector alignment) format: each user turn is only its image block (its
    text is dropped), each answer follows directly and ends with eos::

        <s><image>{caption}</s>

Conversations are tokenized turn by turn and the token ids concatenated; the full text is never
re-tokenized and diffed against the parts, so the labels cannot drift from the inputs. Only the
answer tokens of assistant turns and the token that ends each answer (eos or the template's
end-of-turn token) are trained on; everything else, image tokens included, is -100.

The ``<image>`` placeholder of a human turn is replaced by `num_image_tokens` copies of the
model's image token id, as transformers' LLaVA expects the expanded tokens in ``input_ids``.
For every other multimodal family it is replaced by the block the family's own processor makes
of the image (``llava_mole.data.image_inputs``), which depends on the image's size: `encode` and
`prompt` then take ``image_size``.

Chat-template approach (``llava_mole.data.chat_segments``): the messages are rendered incrementally
(``apply_chat_template(messages[:k], tokenize=False)``); each rendering must extend the previous
one, and only the new suffix of each turn is tokenized. In an assistant suffix, the text before
the answer (the role header) is masked, the answer and the template's first special token after
it (its end-of-turn token) are trained, and what follows (e.g. a newline) is masked. If the
template emits no special token after an answer, the tokenizer's eos is appended so that the
model learns to stop. The generation prompt is the same prefix followed by the template's
generation header, so training and generation see identical prefix tokens.

Segment boundaries: a SentencePiece-style tokenizer adds a word-start marker to every segment it
encodes; for such tokenizers one leading space of a segment is dropped (the marker stands for it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .chat_segments import ChatTemplateSegments, EncodeError, Segment
from .formats import (
    IMAGE_PLACEHOLDER,
    IMAGE_PLACEHOLDER_MISMATCH,
    IMAGE_TOKENS_TRUNCATED,
    NO_LABELS_AFTER_TRUNCATION,
    TEMPLATE_MISMATCH,
    USER,
    normalise_role,
)
from .image_inputs import image_inputs_for
from .tokens import get_tokenizer, image_token_id, num_image_tokens

IGNORE_INDEX = -100

TemplateName = Literal["vicuna_v1", "chat_template", "plain"]
TEMPLATES: tuple[str, ...] = ("vicuna_v1", "chat_template", "plain")

VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
VICUNA_V1_ROLES = ("USER", "ASSISTANT")


@dataclass
class EncodedConversation:
    """Token ids and labels of one conversation.

    Attributes:
        input_ids: Token ids, image tokens expanded.
        labels: Same length; `IGNORE_INDEX` except on answer tokens and their end token.
        truncated: Whether the conversation was cut to ``max_length``.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


class ConversationEncoder(ChatTemplateSegments):
    """Turns ``(role, text)`` turns into token ids and labels for one processor and template.

    Args:
        processor: The model's processor (or a bare tokenizer for text-only use).
        template: ``vicuna_v1`` or ``chat_template``.
        max_length: Truncation length (None: no truncation).
        system: System prompt of ``vicuna_v1`` (None: LLaVA-1.5's; ``""``: none).
    """

    def __init__(
        self,
        processor: Any,
        template: TemplateName | str = "vicuna_v1",
        max_length: int | None = None,
        system: str | None = None,
    ) -> None:
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        self.processor = processor
        self.template = template
        self.max_length = max_length
        self.system = VICUNA_V1_SYSTEM if system is None else system
        self.tokenizer = get_tokenizer(processor)
        self.eos_id: int | None = self.tokenizer.eos_token_id
        self.bos_id: int | None = self.tokenizer.bos_token_id
        self.special_ids = set(self.tokenizer.all_special_ids)
        self._image_id: int | None = None
        self._num_image: int | None = None
        # The family's processor-built image block (None: LLaVA-1.5's fixed expansion).
        self.images = image_inputs_for(processor)
        self._image_size: tuple[int, int] | None = None
        probe = self.tokenizer.convert_ids_to_tokens(
            self.tokenizer.encode("a", add_special_tokens=False)
        )
        # SentencePiece-style tokenizers prefix each encoded segment with a word-start marker.
        self._marker_prefix = bool(probe) and str(probe[0]).startswith("\u2581")
        if template in ("vicuna_v1", "plain") and self.eos_id is None:
            raise ValueError(f"the {template} template needs a tokenizer with an eos token")
        if template == "chat_template":
            self._chat_template = getattr(processor, "chat_template", None) or getattr(
                self.tokenizer, "chat_template", None
            )
            if not self._chat_template:
                raise ValueError(
                    "template 'chat_template' selected but neither the processor nor the "
                    "tokenizer has a chat template"
                )
            self._list_content = self._detect_list_content()

    # ----------------------------------------------------------------- image tokens
    @property
    def image_token_id(self) -> int:
        if self._image_id is None:
            self._image_id = image_token_id(self.processor)
        return self._image_id

    @property
    def num_image_tokens(self) -> int:
        if self._num_image is None:
            self._num_image = num_image_tokens(self.processor)
        return self._num_image

    # ----------------------------------------------------------------- public API
    def encode(
        self, turns: Sequence[tuple[str, str]], image_size: tuple[int, int] | None = None
    ) -> EncodedConversation:
        """Encodes a full conversation (ending with an assistant turn) for training.

        Args:
            turns: ``(role, text)`` pairs, roles "user"/"assistant" (or human/gpt).
            image_size: ``(width, height)`` of the sample's image, for families whose
                processor builds the image block (None: no image; LLaVA-1.5 ignores it).

        Returns:
            The ids and labels, truncated to ``max_length``.

        Raises:
            EncodeError: If the sample must be dropped (reason in ``.reason``).
        """
        ids, labels = self._ids_and_labels(_normalise(turns), False, image_size)
        n_image_blocks = sum(IMAGE_PLACEHOLDER in text for _, text in turns)

        truncated = False
        if self.max_length is not None and len(ids) > self.max_length:
            if n_image_blocks:
                last_image = self._image_end(ids, image_size) - 1
                if last_image >= self.max_length:
                    raise EncodeError(
                        IMAGE_TOKENS_TRUNCATED,
                        f"max_length {self.max_length} cuts the image tokens "
                        f"(image ends at token {last_image + 1}, sequence has {len(ids)})",
                    )
            ids, labels, truncated = ids[: self.max_length], labels[: self.max_length], True
        if all(label == IGNORE_INDEX for label in labels):
            raise EncodeError(
                NO_LABELS_AFTER_TRUNCATION,
                f"no answer tokens left within max_length {self.max_length} "
                f"(sequence has {len(ids)} tokens)",
            )
        return EncodedConversation(ids, labels, truncated)

    def prompt(
        self, turns: Sequence[tuple[str, str]], image_size: tuple[int, int] | None = None
    ) -> list[int]:
        """Encodes a generation prompt: the turns (ending with a user turn) followed by the
        assistant prefix. Not truncated.

        Args:
            turns: ``(role, text)`` pairs ending with a user turn.
            image_size: ``(width, height)`` of the image (see `encode`).

        Returns:
            Token ids, identical to the training ids of the same prefix.
        """
        return self.prompt_encoded(turns, image_size).input_ids

    def prompt_encoded(
        self, turns: Sequence[tuple[str, str]], image_size: tuple[int, int] | None = None
    ) -> EncodedConversation:
        """`prompt` with labels on the earlier answers (for per-token inputs such as
        PaliGemma's ``token_type_ids``, which must match training's)."""
        turns = _normalise(turns)
        if not turns or turns[-1][0] != USER:
            raise ValueError("a generation prompt must end with a user turn")
        ids, labels = self._ids_and_labels(turns, True, image_size)
        return EncodedConversation(ids, labels)

    def _ids_and_labels(
        self, turns: list[tuple[str, str]], generation: bool, size: tuple[int, int] | None
    ) -> tuple[list[int], list[int]]:
        """Concatenated segment ids and labels, the image tokens checked."""
        n_blocks = sum(IMAGE_PLACEHOLDER in text for _, text in turns)
        placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
        if self.images is not None and placeholders != (size is not None):
            given = "one image" if size is not None else "no image"
            raise EncodeError(
                IMAGE_PLACEHOLDER_MISMATCH,
                f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {given} "
                f"({self.images.family.name} needs exactly one placeholder per image)",
            )
        self._image_size = size
        try:
            segments = self._segments(turns, generation)
        finally:
            self._image_size = None
        ids: list[int] = []
        labels: list[int] = []
        for seg in segments:
            ids.extend(seg.ids)
            labels.extend(seg.ids if seg.trained else [IGNORE_INDEX] * len(seg.ids))
        if self.images is None:
            self._check_image_tokens(ids, n_blocks)
        elif size is not None and not self._image_end(ids, size):
            raise EncodeError(TEMPLATE_MISMATCH, "the image block is missing from the prompt")
        return ids, labels

    def _image_end(self, ids: list[int], size: tuple[int, int] | None = None) -> int:
        """Position just after the (last) image block."""
        if self.images is None:
            return max(i for i, t in enumerate(ids) if t == self.image_token_id) + 1
        assert size is not None
        return self.images.image_end(ids, size)

    # ----------------------------------------------------------------- helpers
    def _encode_text(self, text: str) -> list[int]:
        if self._marker_prefix and text.startswith(" "):
            text = text[1:]
        if not text:
            return []
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _encode_with_image(self, text: str, marker: str) -> list[int]:
        """Encodes text, replacing each `marker` by the expanded image token block."""
        parts = text.split(marker)
        ids = self._encode_text(parts[0])
        for part in parts[1:]:
            if self.images is None:
                ids.extend([self.image_token_id] * self.num_image_tokens)
            else:
                assert self._image_size is not None  # checked by _ids_and_labels
                ids.extend(self.images.block_ids(self._image_size))
            ids.extend(self._encode_text(part))
        return ids

    def _check_image_tokens(self, ids: list[int], n_blocks: int) -> None:
        if n_blocks == 0 and self._image_id is None:
            return  # text-only and the image token was never needed
        found = sum(1 for t in ids if t == self.image_token_id)
        if found != n_blocks * self.num_image_tokens:
            raise EncodeError(
                TEMPLATE_MISMATCH,
                f"expected {n_blocks * self.num_image_tokens} image tokens, found {found}",
            )

    def _segments(self, turns: list[tuple[str, str]], generation: bool) -> list[Segment]:
        if self.template == "vicuna_v1":
            return self._vicuna_segments(turns, generation)
        if self.template == "plain":
            return self._plain_segments(turns)
        return self._chat_segments(turns, generation)

    def _vicuna_segments(self, turns: list[tuple[str, str]], generation: bool) -> list[Segment]:
        user, assistant = VICUNA_V1_ROLES
        segments = [Segment([self.bos_id] if self.bos_id is not None else [], False)]
        for i, (role, text) in enumerate(turns):
            if role == USER:
                lead = f"{self.system} " if i == 0 and self.system else ""
                prompt = f"{lead}{user}: {text} {assistant}:"
                segments.append(Segment(self._encode_with_image(prompt, IMAGE_PLACEHOLDER), False))
            else:
                answer = self._encode_text(f" {text}") + [self.eos_id]  # type: ignore[list-item]
                segments.append(Segment(answer, True))
        return segments

    def _plain_segments(self, turns: list[tuple[str, str]]) -> list[Segment]:
        """LLaVA's stage-1 format: user turns keep only their image blocks; answers end in eos."""
        segments = [Segment([self.bos_id] if self.bos_id is not None else [], False)]
        for role, text in turns:
            if role == USER:
                blocks = IMAGE_PLACEHOLDER * text.count(IMAGE_PLACEHOLDER)
                segments.append(Segment(self._encode_with_image(blocks, IMAGE_PLACEHOLDER), False))
            else:
                answer = self._encode_text(text) + [self.eos_id]  # type: ignore[list-item]
                segments.append(Segment(answer, True))
        return segments


def _normalise(turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for role, text in turns:
        norm = normalise_role(role)
        if norm is None:
            raise ValueError(f"unknown role {role!r}")
        out.append((norm, text))
    return out


def encode_conversation(
    turns: Sequence[tuple[str, str]],
    processor: Any,
    template: TemplateName | str = "vicuna_v1",
    max_length: int | None = None,
) -> EncodedConversation:
    """Encodes one conversation for training (see `ConversationEncoder.encode`).

    Args:
        turns: ``(role, text)`` pairs ending with an assistant turn.
        processor: The model's processor.
        template: ``vicuna_v1`` or ``chat_template``.
        max_length: Truncation length.

    Returns:
        Ids and labels.

    Raises:
        EncodeError: If the sample must be dropped.
    """
    return ConversationEncoder(processor, template, max_length).encode(turns)


def prompt_format(template: str, system: str | None) -> dict[str, Any]:
    """JSON record of a prompt format, stored with trained adapters (``extra.prompt``).

    Args:
        template: ``vicuna_v1`` or ``chat_template``.
        system: the ``vicuna_v1`` system prompt used (ignored for ``chat_template``).
    """
    return {"template": template, "system": system if template == "vicuna_v1" else None}


def build_prompt_for_generation(
    question_turns: Sequence[tuple[str, str]] | str,
    processor: Any,
    template: TemplateName | str = "vicuna_v1",
    system: str | None = None,
    image_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Builds the input ids of a generation prompt, ending with the assistant prefix.

    Args:
        question_turns: ``(role, text)`` turns ending with a user turn (earlier QA pairs
            allowed), or a single question string. ``<image>`` is expanded to image tokens.
        processor: The model's processor.
        template: ``vicuna_v1`` or ``chat_template``.
        system: ``vicuna_v1`` system prompt (None: LLaVA-1.5's; ``""``: none).
        image_size: ``(width, height)`` of the image, for processor-built image blocks.

    Returns:
        A 1-D LongTensor of input ids (no labels); add a batch dimension for ``generate``.
    """
    if isinstance(question_turns, str):
        question_turns = [(USER, question_turns)]
    encoder = ConversationEncoder(processor, template, system=system)
    ids = encoder.prompt(question_turns, image_size)
    return torch.tensor(ids, dtype=torch.long)
