"""LLaVA-format records: the `Sample` type, validation of raw JSON records and load reports.

A LLaVA dataset file is a JSON list (or JSONL, one record per line) of records like::

    {"id": "000001", "image": "coco/0001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

`validate_record` turns one raw record into a `Sample` or a `Skip` (a counted reason). It never
raises on bad input, whatever the JSON value: bad samples are data, not crashes. Whether a skip
is fatal is decided by the caller (strict mode raises `DataError` listing the problems).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..paths import not_found_or

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

_RESERVED_KEYS = ("id", "image", "conversations")


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


def is_inside(rel: str) -> bool:
    """Whether relative path `rel` stays inside its root folder.

    The check is lexical (no symlink resolution) so that image folders made of symlinks, common
    on shared clusters, keep working; absolute paths and ``..`` escapes are rejected.
    """
    if os.path.isabs(rel) or rel.startswith(("/", "\\")):
        return False
    norm = os.path.normpath(rel.replace("\\", "/"))
    return norm != ".." and not norm.startswith("../") and norm != "."


def _is_json_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ParsedRecord(NamedTuple):
    """The text side of a valid record: what `parse_record` checked."""

    id: str
    image: str | None
    turns: list[tuple[str, str]]
    meta: dict[str, Any]


def parse_record(
    record: object, *, index: int, has_image: bool | None = None
) -> ParsedRecord | Skip:
    """Checks the id, the image field's type and the conversation of one raw record.

    Both schemas are accepted: LLaVA ``conversations`` and the chat ``messages`` schema, which
    `llava_mole.data.messages.to_llava_record` converts first. Never raises on bad input.

    Args:
        record: The decoded JSON value (or a `datasets` row).
        index: Position of the record (the id when the record has none).
        has_image: Whether the sample has an image; None: whether the record names one.

    Returns:
        The id, raw image path (None if absent), normalised turns and the other fields, or the
        `Skip` naming the first problem.
    """
    from .messages import to_llava_record  # messages.py builds on this module

    if not isinstance(record, dict):
        return Skip(NOT_A_DICT, f"expected an object, got {type(record).__name__}")
    converted = to_llava_record(record)
    if isinstance(converted, Skip):
        return converted
    record = converted

    raw_id = record.get("id", index)
    if not (isinstance(raw_id, str) or _is_json_int(raw_id)):
        return Skip(BAD_ID, f"id must be a string or an int, got {type(raw_id).__name__}")

    raw_image = record.get("image")
    if raw_image is not None and (not isinstance(raw_image, str) or not raw_image.strip()):
        return Skip(
            BAD_IMAGE_FIELD, f"image must be a non-empty string path, got {raw_image!r:.80}"
        )

    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        return Skip(BAD_CONVERSATIONS, "conversations must be a non-empty list")
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return Skip(BAD_TURN, f"turn {i}: expected an object with 'from' and 'value'")
        if not isinstance(turn["value"], str):
            return Skip(BAD_TURN, f"turn {i}: value must be a string")
        role = normalise_role(turn["from"])
        if role is None:
            return Skip(UNKNOWN_ROLE, f"turn {i}: unknown role {turn['from']!r:.40}")
        turns.append((role, turn["value"]))

    image_present = raw_image is not None if has_image is None else has_image
    problem = check_turns(turns, has_image=image_present)
    if problem is not None:
        return problem
    meta = {k: v for k, v in record.items() if k not in _RESERVED_KEYS}
    return ParsedRecord(str(raw_id), raw_image, turns, meta)


def resolve_image_path(
    raw_image: str,
    image_root: Path | None,
    *,
    allow_outside_images: bool = False,
    check_image: Callable[[Path], Skip | None] | None = None,
) -> Path | Skip:
    """Resolves a record's image path against `image_root` and checks the file.

    Returns:
        The image file, or a `Skip` (`bad_image_field`, `image_path_outside_root`,
        `missing_image`, or what `check_image` returns).
    """
    if "\x00" in raw_image:
        return Skip(BAD_IMAGE_FIELD, "image path contains a NUL byte")
    if not allow_outside_images and not is_inside(raw_image):
        return Skip(IMAGE_OUTSIDE_ROOT, f"image path {raw_image!r:.200} escapes the folder")
    if image_root is None and not os.path.isabs(raw_image):
        return Skip(MISSING_IMAGE, "sample has an image but no image folder is configured")
    image = Path(raw_image) if image_root is None else image_root / raw_image
    try:
        exists = image.is_file()
    except (OSError, ValueError):  # e.g. name too long
        exists = False
    if not exists:
        return Skip(MISSING_IMAGE, not_found_or(image, "file", f"image file not found: {image}"))
    if check_image is not None:
        problem = check_image(image)
        if problem is not None:
            return problem
    return image


def validate_record(
    record: object,
    *,
    index: int,
    source: str = "",
    image_root: Path | None = None,
    domain: str = "default",
    allow_outside_images: bool = False,
    check_image: Callable[[Path], Skip | None] | None = None,
) -> Sample | Skip:
    """Validates one raw record (LLaVA ``conversations`` or chat ``messages``). Never raises.

    Args:
        record: The decoded JSON value.
        index: Position of the record in its file (used as id when the record has none).
        source: File name, stored in the sample for problem reports.
        image_root: Folder that relative image paths are resolved against. Required for samples
            with an image (a missing root skips them as `missing_image`).
        domain: Domain tag given to the sample.
        allow_outside_images: Accept absolute image paths and paths escaping `image_root`.
        check_image: Optional check of the image file (existence is always checked); returns a
            `Skip` for unusable files, e.g. `llava_mole.data.images.check_image_file`.

    Returns:
        A `Sample`, or a `Skip` naming the first problem found.
    """
    parsed = parse_record(record, index=index)
    if isinstance(parsed, Skip):
        return parsed
    image: Path | None = None
    if parsed.image is not None:
        resolved = resolve_image_path(
            parsed.image,
            image_root,
            allow_outside_images=allow_outside_images,
            check_image=check_image,
        )
        if isinstance(resolved, Skip):
            return resolved
        image = resolved
    return Sample(
        id=parsed.id,
        image=image,
        turns=parsed.turns,
        domain=domain,
        source=source,
        index=index,
        meta=parsed.meta,
    )


def iter_records(path: Path) -> Iterator[tuple[int, object]]:
    """Yields ``(index, record)`` from a JSON list or a JSONL file.

    A ``.jsonl`` file is read line by line; a line that is not valid JSON is yielded as a
    `Skip` (reason `bad_json_line`) so that it is counted like any bad sample. Any other file
    must hold a JSON list; if it does not parse, `DataError` names the file and the position.

    Args:
        path: The dataset file.

    Returns:
        An iterator of ``(index, record_or_skip)``.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        missing = f"dataset file not found: {path}"
        raise DataError(not_found_or(path, "file", missing)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read dataset file {path}: {e}") from None

    if path.suffix.lower() == ".jsonl":
        index = 0
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                yield index, json.loads(line)
            except json.JSONDecodeError as e:
                yield index, Skip(BAD_JSON_LINE, f"invalid JSON: {e.msg}")
            index += 1
        return

    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    yield from enumerate(data)


def load_llava_file(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    *,
    domain: str = "default",
    allow_outside_images: bool = False,
    check_image: Callable[[Path], Skip | None] | None = None,
    report: LoadReport | None = None,
) -> list[Sample]:
    """Loads and validates a LLaVA JSON/JSONL file, skipping (and counting) bad samples.

    Args:
        path: The dataset file.
        image_root: Folder of the images (defaults to the file's folder).
        domain: Domain tag given to every sample.
        allow_outside_images: Accept image paths outside `image_root`.
        check_image: Optional image-file check (see `validate_record`).
        report: Report that collects skips, problems and the per-domain count of valid samples
            (a fresh one is used if None).

    Returns:
        The valid samples, in file order.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    report = report if report is not None else LoadReport()
    samples: list[Sample] = []
    for index, record in iter_records(path):
        if isinstance(record, Skip):
            report.add_skip(record, source=str(path), index=index)
            continue
        result = validate_record(
            record,
            index=index,
            source=str(path),
            image_root=root,
            domain=domain,
            allow_outside_images=allow_outside_images,
            check_image=check_image,
        )
        if isinstance(result, Skip):
            sid = record.get("id") if isinstance(record, dict) else None
            sid = sid if isinstance(sid, (str, int)) else None
            report.add_skip(result, source=str(path), index=index, sample_id=sid)
        else:
            samples.append(result)
    report.per_domain[domain] = report.per_domain.get(domain, 0) + len(samples)
    return samples
