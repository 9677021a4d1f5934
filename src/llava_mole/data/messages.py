"""The chat ``messages`` schema (TRL / chat templates), converted to LLaVA records at read time.

A record in this schema looks like::

    {"id": "q1",
     "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
     "images": ["cat.png"]}

`to_llava_record` is the one place where it becomes the internal (LLaVA) representation: each
message becomes a ``{"from": role, "value": text}`` turn and ``images`` becomes ``image``; the
result then goes through the same validation as any LLaVA record (`records.validate_record`),
so both schemas have the same rules and the same counted skip reasons.

Conversion rules:

* ``content`` is a string (used as is; it may contain the ``<image>`` placeholder) or a list of
  parts: ``{"type": "text", "text": str}`` contributes its text, ``{"type": "image"}`` the
  ``<image>`` placeholder (other keys of an image part, e.g. ``"text": None`` from an Arrow
  struct, are ignored). Parts are joined with ``"\\n"``, so ``[image, text]`` gives LLaVA's
  ``"<image>\\nWhat is it?"``.
* ``images`` is a list of at most one image (one image per sample is supported); an empty list
  or null means a text-only sample. In JSON files the entries are paths relative to the image
  folder; `datasets` sources pass their image separately (`llava_mole.data.hf`).
* A ``system`` message is rejected (`unknown_role`): use the mixture's ``system`` prompt.

A record with ``conversations`` is a LLaVA record whatever else it holds (a ``messages`` field
next to it stays in ``Sample.meta``, as before this schema was read).

Skip reasons: `bad_conversations` (``messages`` not a non-empty list), `bad_turn` (a message or part of the wrong shape, an
unsupported part type), `unknown_role`, `bad_image_field` (``images`` not a list, more than
one image, or both ``image`` and ``images``); the turn structure is then checked as usual.
"""

from __future__ import annotations

from typing import Any

from .formats import (
    BAD_CONVERSATIONS,
    BAD_IMAGE_FIELD,
    BAD_TURN,
    IMAGE_PLACEHOLDER,
    UNKNOWN_ROLE,
    Skip,
    normalise_role,
)

__all__ = ["is_messages_record", "message_text", "messages_to_turns", "to_llava_record"]


def is_messages_record(record: dict[str, Any]) -> bool:
    """Whether a record uses the ``messages`` schema (and not LLaVA ``conversations``)."""
    return "messages" in record and "conversations" not in record


def message_text(content: object, i: int) -> str | Skip:
    """The text of one message's ``content`` (a string or a list of typed parts)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        return Skip(BAD_TURN, f"message {i}: content must be a string or a non-empty list")
    pieces: list[str] = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(IMAGE_PLACEHOLDER)
        elif kind == "text" and isinstance(part.get("text"), str):  # type: ignore[union-attr]
            pieces.append(part["text"])  # type: ignore[index]
        elif kind == "text":
            return Skip(BAD_TURN, f"message {i}, part {k}: a text part needs a string 'text'")
        else:
            return Skip(
                BAD_TURN,
                f"message {i}, part {k}: expected {{'type': 'text'|'image'}}, got {part!r:.60}",
            )
    return "\n".join(pieces)


def messages_to_turns(messages: object) -> list[dict[str, str]] | Skip:
    """``messages`` as LLaVA ``conversations`` turns (``{"from", "value"}``), or a `Skip`."""
    if not isinstance(messages, list) or not messages:
        return Skip(BAD_CONVERSATIONS, "messages must be a non-empty list")
    turns: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return Skip(BAD_TURN, f"message {i}: expected an object with 'role' and 'content'")
        role = message["role"]
        if isinstance(role, str) and role.strip().lower() == "system":
            return Skip(
                UNKNOWN_ROLE,
                f"message {i}: system messages are not supported (set the mixture's `system`)",
            )
        if normalise_role(role) is None:
            return Skip(UNKNOWN_ROLE, f"message {i}: unknown role {role!r:.40}")
        text = message_text(message["content"], i)
        if isinstance(text, Skip):
            return text
        turns.append({"from": role, "value": text})
    return turns


def _single_image(record: dict[str, Any]) -> tuple[bool, object] | Skip:
    """``(has_image, image)`` from the ``images`` list of a messages record."""
    images = record.get("images")
    if "image" in record and images:
        return Skip(BAD_IMAGE_FIELD, "record has both 'image' and 'images'")
    if images is None:
        return (False, None)
    if not isinstance(images, list):
        return Skip(BAD_IMAGE_FIELD, f"images must be a list, got {type(images).__name__}")
    if len(images) > 1:
        return Skip(BAD_IMAGE_FIELD, f"{len(images)} images: one image per sample is supported")
    return (True, images[0]) if images else (False, None)


def to_llava_record(record: dict[str, Any]) -> dict[str, Any] | Skip:
    """Converts a ``messages`` record to a LLaVA record; other records are returned unchanged.

    Args:
        record: A decoded JSON object (or a `datasets` row without its image column).

    Returns:
        ``{"conversations": [...], "image": path (if any), **other fields}``, the record itself
        if it is not in the messages schema (no ``messages``, or ``conversations`` present), or
        a `Skip`.
    """
    if not is_messages_record(record):
        return record
    turns = messages_to_turns(record["messages"])
    if isinstance(turns, Skip):
        return turns
    image = _single_image(record)
    if isinstance(image, Skip):
        return image
    out = {k: v for k, v in record.items() if k not in ("messages", "images")}
    out["conversations"] = turns
    if image[0]:
        out["image"] = image[1]
    return out
