"""LLaVA-format samples: the `Sample` type, skip reasons, load reports and turn checks.

A LLaVA dataset file is a JSON list (or JSONL, one record per line) of records like::

    {"id": "000001", "image": "coco/0001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

`llava_mole.data.records.validate_record` turns one raw record into a `Sample` or a `Skip` (a
counted reason, named here). It never raises on bad input, whatever the JSON value: bad samples
are data, not crashes. Whether a skip is fatal is decided by the caller (strict mode raises
`DataError` listing the problems).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .images import EmbeddedImage

IMAGE_PLACEHOLDER = "<image>"
"""The placeholder marking where the image goes in a human turn (LLaVA convention)."""

USER = "user"
ASSISTANT = "assistant"

# Accepted spellings of the two roles; everything else is rejected as `unknown_role`.
ROLE_ALIASES: dict[str, str] = {
    "human": USER,
    "user": USER,
    "gpt": ASSISTANT,
    "assistant": ASSISTANT,
}

# Skip reasons (the keys of `LoadReport.skipped`). Kept as constants so tests and reports agree.
NOT_A_DICT = "not_a_dict"
BAD_ID = "bad_id"
BAD_IMAGE_FIELD = "bad_image_field"
BAD_CONVERSATIONS = "bad_conversations"
BAD_TURN = "bad_turn"
UNKNOWN_ROLE = "unknown_role"
EMPTY_TEXT = "empty_text"
BAD_TURN_ORDER = "bad_turn_order"
IMAGE_PLACEHOLDER_MISMATCH = "image_placeholder_mismatch"
IMAGE_OUTSIDE_ROOT = "image_path_outside_root"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
IMAGE_TOO_LARGE = "image_too_large"
BAD_JSON_LINE = "bad_json_line"
NO_LABELS_AFTER_TRUNCATION = "no_labels_after_truncation"
IMAGE_TOKENS_TRUNCATED = "image_tokens_truncated"
TEMPLATE_MISMATCH = "chat_template_mismatch"


class DataError(ValueError):
    """Bad data: raised in strict mode, or when a whole file cannot be used."""


class DataConfigError(DataError):
    """Bad mixture configuration; the message is one line naming the file and the key."""


@dataclass
class Sample:
    """One validated conversation.

    Attributes:
        id: Sample id from the file (ints are converted to str; defaults to the record index).
        image: Path of the image (image folder / relative path), an
            `llava_mole.data.images.EmbeddedImage` (bytes inside a Hugging Face dataset, read
            when opened), or None for text-only samples.
        turns: Alternating ``(role, text)`` pairs, roles normalised to "user"/"assistant",
            starting with a user turn and ending with an assistant turn. The first user turn of
            an image sample contains exactly one ``<image>`` placeholder.
        domain: Domain tag (from the mixture), carried to the batch as ``domain_id``.
        source: The file the sample came from (for problem reports).
        index: Position of the record in `source`.
        meta: Extra fields of the record, e.g. ``answers`` (reference answers for VQA accuracy)
            or ``answer_type``.
    """

    id: str
    image: Path | EmbeddedImage | None
    turns: list[tuple[str, str]]
    domain: str = "default"
    source: str = ""
    index: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        return self.image is not None


@dataclass(frozen=True)
class Skip:
    """Why a record was not turned into a sample.

    Attributes:
        reason: Short machine-readable reason (a key of `LoadReport.skipped`).
        detail: Human-readable explanation.
    """

    reason: str
    detail: str


@dataclass
class LoadReport:
    """What loading kept and what it skipped.

    Attributes:
        per_domain: Number of dataset items per domain (after take/repeat and tokenization
            drops), in the mixture's domain order.
        skipped: Number of skipped samples per reason.
        problems: One line per skipped sample, naming the file and the sample index and id.
        warnings: Notes that are not per-sample problems (e.g. `take` larger than the data).
    """

    per_domain: dict[str, int] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add_skip(self, skip: Skip, *, source: str, index: int, sample_id: object = None) -> None:
        """Counts one skipped sample and records a problem line for it."""
        self.skipped[skip.reason] += 1
        self.problems.append(format_problem(source, index, sample_id, skip))

    def merge(self, other: LoadReport) -> None:
        """Adds the counts and problems of `other` to this report."""
        for domain, n in other.per_domain.items():
            self.per_domain[domain] = self.per_domain.get(domain, 0) + n
        self.skipped.update(other.skipped)
        self.problems.extend(other.problems)
        self.warnings.extend(other.warnings)

    @property
    def num_samples(self) -> int:
        return sum(self.per_domain.values())

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self, max_problems: int = 10) -> str:
        """Returns a short multi-line summary: kept samples per domain, skips by reason and the
        first `max_problems` problems."""
        lines = [f"loaded {self.num_samples} samples, skipped {self.num_skipped}"]
        for domain, n in self.per_domain.items():
            lines.append(f"  domain {domain}: {n}")
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped ({reason}): {n}")
        for problem in self.problems[:max_problems]:
            lines.append(f"  problem: {problem}")
        if len(self.problems) > max_problems:
            lines.append(f"  ... and {len(self.problems) - max_problems} more problems")
        for warning in self.warnings:
            lines.append(f"  warning: {warning}")
        return "\n".join(lines)

    def raise_if_problems(self, max_listed: int = 10) -> None:
        """Raises `DataError` listing the first `max_listed` problems, if there are any."""
        if not self.problems:
            return
        listed = "\n".join(f"  {p}" for p in self.problems[:max_listed])
        more = len(self.problems) - max_listed
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise DataError(
            f"{len(self.problems)} bad samples (strict mode; strict: false skips and counts "
            f"them):\n{listed}{tail}"
        )


def format_problem(source: str, index: int, sample_id: object, skip: Skip) -> str:
    """Formats one problem line: ``file: sample 3 (id='x'): reason: detail``."""
    sid = "" if sample_id is None else f" (id={sample_id!r:.80})"
    return f"{source}: sample {index}{sid}: {skip.reason}: {skip.detail}"


def normalise_role(role: object) -> str | None:
    """Returns "user"/"assistant" for an accepted role spelling, else None."""
    if not isinstance(role, str):
        return None
    return ROLE_ALIASES.get(role.strip().lower())


def check_turns(turns: Sequence[tuple[str, str]], has_image: bool) -> Skip | None:
    """Checks the structure of normalised turns.

    Args:
        turns: ``(role, text)`` pairs with normalised roles.
        has_image: Whether the sample has an image.

    Returns:
        None if the turns are valid, else the `Skip` describing the first problem.
    """
    if not turns:
        return Skip(BAD_CONVERSATIONS, "conversation is empty")
    for i, (role, text) in enumerate(turns):
        if role not in (USER, ASSISTANT):
            return Skip(UNKNOWN_ROLE, f"turn {i}: unknown role {role!r}")
        if not text.strip():
            return Skip(EMPTY_TEXT, f"turn {i}: empty text")
        expected = USER if i % 2 == 0 else ASSISTANT
        if role != expected:
            return Skip(
                BAD_TURN_ORDER,
                f"turn {i}: expected {expected!r}, got {role!r} "
                "(turns must alternate, starting with human)",
            )
    if turns[-1][0] != ASSISTANT:
        return Skip(BAD_TURN_ORDER, "conversation must end with an assistant (gpt) turn")
    counts = [text.count(IMAGE_PLACEHOLDER) for _, text in turns]
    if has_image and (counts[0] != 1 or sum(counts) != 1):
        return Skip(
            IMAGE_PLACEHOLDER_MISMATCH,
            f"sample has an image: expected exactly one {IMAGE_PLACEHOLDER} in the first human "
            f"turn, found {counts[0]} there and {sum(counts) - counts[0]} elsewhere",
        )
    if not has_image and sum(counts) != 0:
        return Skip(
            IMAGE_PLACEHOLDER_MISMATCH,
            f"sample has no image but {sum(counts)} {IMAGE_PLACEHOLDER} placeholder(s)",
        )
    return None
