"""Reading LLaVA dataset files: raw JSON records -> `Sample` or a counted `Skip`.

A file is a JSON list or JSONL (:func:`iter_records`); each record is checked by
:func:`parse_record` (id, image field, conversation; the chat ``messages`` schema is converted
first), its image path resolved inside the image folder (:func:`resolve_image_path`, a lexical
check: :func:`is_inside`), and :func:`load_llava_file` counts every skip in a `LoadReport`.
Nothing here raises on bad records; an unreadable or malformed *file* is a `DataError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from ..paths import not_found_or
from .formats import (
    BAD_CONVERSATIONS,
    BAD_ID,
    BAD_IMAGE_FIELD,
    BAD_JSON_LINE,
    BAD_TURN,
    IMAGE_OUTSIDE_ROOT,
    MISSING_IMAGE,
    NOT_A_DICT,
    UNKNOWN_ROLE,
    DataError,
    LoadReport,
    Sample,
    Skip,
    check_turns,
    normalise_role,
)
from .messages import to_llava_record

# Record fields that are not carried over into `Sample.meta`.
_RESERVED_KEYS = ("id", "image", "conversations")


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
