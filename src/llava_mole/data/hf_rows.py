"""Rows of a Hugging Face dataset as samples: read in batches, or lazily by row index.

`iter_hf_samples` validates every row of a split, `BATCH_ROWS` at a time, turning only the text
columns of the current batch into Python objects. `HFRows` (built by `scan_hf_rows`) keeps only
the indices of the valid rows (8 bytes each) and builds the `Sample` of a row when it is asked
for, from the memory-mapped table: the same `Sample` that the eager reader builds (its image a
reference into the table, or the checked path), without checking the image again.

Rows go through the same validation as JSON records (`records.parse_record`) and bad rows are
counted skips with the same reasons, plus `missing_answer` for a QA row without an answer.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .formats import (
    BAD_IMAGE_FIELD,
    BAD_TURN,
    IMAGE_PLACEHOLDER,
    LoadReport,
    Sample,
    Skip,
)
from .hf_images import ImageReader, image_reader
from .images import EmbeddedImage, ImageSource
from .records import parse_record, resolve_image_path

__all__ = [
    "BATCH_ROWS",
    "MISSING_ANSWER",
    "TEXT_SCHEMAS",
    "HFRows",
    "decode_rows",
    "iter_hf_samples",
    "scan_hf_rows",
]

BATCH_ROWS = 1024
"""Rows turned into Python objects at a time."""

TEXT_SCHEMAS: tuple[str, ...] = ("conversations", "messages", "question")
MISSING_ANSWER = "missing_answer"


def schema_of(roles: Mapping[str, str]) -> str:
    """The text schema of a column mapping: question, conversations or messages."""
    return next(s for s in TEXT_SCHEMAS if s in roles)


def answer_texts(value: object) -> list[str] | None:
    """Answers in a cell: a string, a list of strings, or VQAv2's list of ``{"answer": str}``
    dicts; ``[]`` for null, None if the cell holds anything else."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        return None
    out = []
    for item in value:
        item = item.get("answer") if isinstance(item, dict) else item
        if not isinstance(item, str):
            return None
        out.append(item)
    return out


def _qa_record(
    row: Mapping[str, Any], roles: Mapping[str, str], has_image: bool, prompt_suffix: str | None
) -> dict[str, Any] | Skip:
    """A LLaVA record for a question/answer row.

    The trained answer is the ``answer`` cell (its first entry if a list), else the most common
    of ``answers`` (ties: the first one). References (``answers`` in the record, used by
    evaluation) are the ``answers`` cell, or an ``answer`` list of several entries.
    """
    question = row[roles["question"]]
    if not isinstance(question, str):
        return Skip(
            BAD_TURN, f"question ({roles['question']!r}) must be a string, got {question!r:.40}"
        )
    cells = {r: answer_texts(row[roles[r]]) for r in ("answer", "answers") if r in roles}
    for role, texts in cells.items():
        if texts is None:
            return Skip(
                BAD_TURN, f"{role} ({roles[role]!r}) must be text, got {row[roles[role]]!r:.60}"
            )
    given = cells.get("answer") or []
    refs = cells.get("answers") or (given if len(given) > 1 else [])
    answer = given[0] if given else Counter(refs).most_common(1)[0][0] if refs else None
    if answer is None:
        where = " or ".join(repr(roles[r]) for r in cells)
        return Skip(MISSING_ANSWER, f"no answer in {where}")
    if has_image and IMAGE_PLACEHOLDER not in question:
        question = f"{IMAGE_PLACEHOLDER}\n{question}"
    if prompt_suffix:
        question = f"{question}\n{prompt_suffix}"
    record: dict[str, Any] = {
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    }
    if refs:
        record["answers"] = list(refs)
    return record


def _row_record(
    row: Mapping[str, Any], roles: Mapping[str, str], has_image: bool, prompt_suffix: str | None
) -> dict[str, Any] | Skip:
    schema = schema_of(roles)
    if schema == "question":
        record = _qa_record(row, roles, has_image, prompt_suffix)
    else:
        record = {schema: row[roles[schema]]}
        if "answers" in roles:
            refs = answer_texts(row[roles["answers"]])
            if refs:
                record["answers"] = refs
    if isinstance(record, dict) and "id" in roles and row[roles["id"]] is not None:
        record["id"] = row[roles["id"]]
    return record


@dataclass
class _RowContext:
    """How rows become samples. ``trusted``: the rows were validated before (`HFRows`), so an
    image path is joined to `image_root` without checking the file again."""

    name: str
    domain: str
    image_root: Path | None
    allow_outside_images: bool
    check_image: Callable[[ImageSource], Skip | None] | None
    prompt_suffix: str | None
    trusted: bool = False


def _row_image(
    cell: Any, row: int, reader: ImageReader | None, ctx: _RowContext
) -> ImageSource | Skip | None:
    if cell is None or reader is None:
        return None
    item, (has_bytes, path) = cell
    if not has_bytes and ctx.trusted:  # what `resolve_image_path` returned when validating
        return Path(str(path)) if ctx.image_root is None else ctx.image_root / str(path)
    if not has_bytes:
        return resolve_image_path(
            str(path),
            ctx.image_root,
            allow_outside_images=ctx.allow_outside_images,
            check_image=ctx.check_image,
        )
    image = EmbeddedImage(reader.store, row, item)
    problem = ctx.check_image(image) if ctx.check_image is not None else None
    return image if problem is None else problem


def _row_sample(
    row: Mapping[str, Any], index: int, cell: Any, reader: ImageReader | None, roles, ctx
) -> Sample | Skip:
    if isinstance(cell, int):  # checked first, as for a JSON record's `images`
        return Skip(BAD_IMAGE_FIELD, f"{cell} images: one image per sample is supported")
    has_image = cell is not None and reader is not None
    record = _row_record(row, roles, has_image, ctx.prompt_suffix)
    if isinstance(record, Skip):
        return record
    parsed = parse_record(record, index=index, has_image=has_image)
    if isinstance(parsed, Skip):
        return parsed
    image = _row_image(cell, index, reader, ctx)
    if isinstance(image, Skip):
        return image
    return Sample(
        id=parsed.id,
        image=image,  # type: ignore[arg-type]
        turns=parsed.turns,
        domain=ctx.domain,
        source=ctx.name,
        index=index,
        meta=parsed.meta,
    )


def iter_hf_samples(
    ds: Any,
    roles: Mapping[str, str],
    *,
    name: str,
    domain: str = "default",
    image_root: Path | None = None,
    allow_outside_images: bool = False,
    check_image: Callable[[ImageSource], Skip | None] | None = None,
    prompt_suffix: str | None = None,
) -> Iterator[tuple[int, Sample | Skip, object]]:
    """Yields ``(index, sample_or_skip, raw_id)`` for every row, reading `BATCH_ROWS` at a time.

    Only the text columns of the current batch become Python objects; images stay in the
    memory-mapped table (`EmbeddedImage`) unless `check_image` opens them.

    Args:
        ds: A `datasets.Dataset` (see `open_hf_split`).
        roles: role -> column (see `resolve_columns`).
        name: Source name for problem reports and image references.
        domain: Domain tag of the samples.
        image_root: Folder that relative image *paths* (images without bytes) resolve against.
        allow_outside_images: Accept such paths outside `image_root`.
        check_image: Image check (e.g. `llava_mole.data.images.image_checker()`).
        prompt_suffix: Line appended to each question of a question/answer dataset.
    """
    ds = flat_rows(ds)
    ctx = _RowContext(name, domain, image_root, allow_outside_images, check_image, prompt_suffix)
    reader = image_reader(ds, roles, name)
    table = ds.data.table
    for start in range(0, table.num_rows, BATCH_ROWS):
        rows, cells = decode_rows(table, start, BATCH_ROWS, roles, reader)
        for offset, (row, cell) in enumerate(zip(rows, cells, strict=True)):
            index = start + offset
            raw_id = row.get(roles["id"]) if "id" in roles else None
            yield index, _row_sample(row, index, cell, reader, roles, ctx), raw_id


def flat_rows(ds: Any) -> Any:
    """`ds` with real rows: a selected or shuffled view is flattened (its rows written out)."""
    return ds.flatten_indices() if getattr(ds, "_indices", None) is not None else ds


def decode_rows(
    table: Any, start: int, count: int, roles: Mapping[str, str], reader: ImageReader | None
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Rows ``start .. start + count`` of a pyarrow `table`: their text columns as Python
    objects and their image cells (see `ImageReader.batch`); image bytes are not read."""
    batch = table.slice(start, count)
    text_columns = sorted({c for r, c in roles.items() if r not in ("image", "images")})
    rows = batch.select(text_columns).to_pylist()
    if reader is None:
        return rows, [None] * len(rows)
    return rows, reader.batch(batch.column(reader.store.column))


class HFRows:
    """The valid rows of one split; the `Sample` of a row is built when it is asked for.

    Holds the `datasets` table (memory-mapped; it pickles as its file path, so DataLoader
    workers re-map the file), the column roles, the image reader and `rows`, the indices of
    the valid rows (int64). A sample is the one `iter_hf_samples` yields for that row; image
    paths were checked when the rows were validated and are not checked again.

    Attributes:
        rows: Row index of each valid sample (positions index this array).
        id_hashes: ``hash(sample.id)`` of each valid sample (int64), for the duplicate-id
            check of the mixture; None once dropped.
        domain: Domain of every sample.
    """

    lazy = True

    def __init__(
        self,
        data: Any,
        roles: Mapping[str, str],
        ctx: _RowContext,
        reader: ImageReader | None,
        rows: np.ndarray,
        id_hashes: np.ndarray | None = None,
    ) -> None:
        self.data = data
        self.roles = dict(roles)
        self.ctx = ctx
        self.reader = reader
        self.rows = rows
        self.id_hashes = id_hashes
        self.domain = ctx.domain

    def __len__(self) -> int:
        return len(self.rows)

    def _build(self, row: dict[str, Any], index: int, cell: Any) -> Sample:
        result = _row_sample(row, index, cell, self.reader, self.roles, self.ctx)
        if isinstance(result, Skip):  # the table is immutable: it was valid when scanned
            raise RuntimeError(f"{self.ctx.name} row {index} no longer valid: {result.detail}")
        return result

    def sample(self, position: int) -> Sample:
        """The sample at `position` (reads that one row)."""
        index = int(self.rows[position])
        rows, cells = decode_rows(self.data.table, index, 1, self.roles, self.reader)
        return self._build(rows[0], index, cells[0])

    def iter_samples(self, positions: np.ndarray) -> Iterator[Sample]:
        """The samples at `positions`, in that order.

        Rows are decoded in spans of at most `BATCH_ROWS`: a span starts at the next wanted row
        and reaches the last of the following wanted rows that fall within `BATCH_ROWS` of it,
        so ascending positions read each batch once and scattered ones read single rows.
        """
        wanted = self.rows[positions]
        table = self.data.table
        lo = hi = 0
        rows: list[dict[str, Any]] = []
        cells: list[Any] = []
        for i, index in enumerate(wanted.tolist()):
            if not lo <= index < hi:
                ahead = wanted[i : i + BATCH_ROWS]
                inside = (ahead >= index) & (ahead < index + BATCH_ROWS)
                run = len(ahead) if inside.all() else int(np.argmin(inside))
                lo, hi = index, int(ahead[:run].max()) + 1
                rows, cells = decode_rows(table, lo, hi - lo, self.roles, self.reader)
            yield self._build(rows[index - lo], index, cells[index - lo])

    def domains(self, positions: np.ndarray) -> list[str]:
        return [self.domain] if len(positions) else []


def scan_hf_rows(
    ds: Any,
    roles: Mapping[str, str],
    *,
    name: str,
    domain: str = "default",
    report: LoadReport | None = None,
    **kwargs: Any,
) -> HFRows:
    """Validates every row (as `load_hf_samples` does: skips counted in `report`, and
    ``report.per_domain[domain]`` counts the valid rows) and keeps only the valid rows' indices
    and id hashes (see `iter_hf_samples` for the arguments)."""
    report = report if report is not None else LoadReport()
    ds = flat_rows(ds)
    valid, hashes = array("q"), array("q")
    for index, result, raw_id in iter_hf_samples(ds, roles, name=name, domain=domain, **kwargs):
        if isinstance(result, Skip):
            sid = raw_id if isinstance(raw_id, (str, int)) else None
            report.add_skip(result, source=name, index=index, sample_id=sid)
        else:
            valid.append(index)
            hashes.append(hash(result.id))
    report.per_domain[domain] = report.per_domain.get(domain, 0) + len(valid)
    ctx = _RowContext(
        name,
        domain,
        kwargs.get("image_root"),
        kwargs.get("allow_outside_images", False),
        None,
        kwargs.get("prompt_suffix"),
        trusted=True,
    )
    rows = np.frombuffer(valid, dtype=np.int64) if valid else np.zeros(0, dtype=np.int64)
    ids = np.frombuffer(hashes, dtype=np.int64) if hashes else np.zeros(0, dtype=np.int64)
    return HFRows(ds.data, roles, ctx, image_reader(ds, roles, name), rows, ids)
