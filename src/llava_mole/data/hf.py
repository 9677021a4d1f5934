"""Hugging Face `datasets` sources: memory-mapped reading, column mappings, embedded images.

A mixture entry can read a local Hugging Face dataset instead of a LLaVA JSON file:

* a ``.parquet`` or ``.arrow`` file, a ``save_to_disk`` folder of one split, or a ``.json`` /
  ``.jsonl`` file with a ``columns`` mapping, named by ``train:`` / ``test:``;
* ``hf: SOURCE`` with ``train:`` / ``test:`` naming *splits* of SOURCE: a ``save_to_disk``
  folder of a ``DatasetDict``, a folder of data files in the Hub layout (split names inferred
  from the file names, e.g. ``data/validation-00000-of-00001.parquet``), or the name of a dataset
  in the local Hugging Face cache (``lmms-lab/DocVQA``; with ``hf_config`` for its config).

Nothing is ever downloaded: the Hub is switched off (``HF_HUB_OFFLINE``) around every load, so a
name that is not in the cache is one clear error. Data files are converted once into the
`datasets` Arrow cache (``HF_DATASETS_CACHE``); ``.arrow`` files and ``save_to_disk`` folders are
memory-mapped in place.

Rows are read in batches of `BATCH_ROWS` from the memory-mapped Arrow table, and only the text
columns are turned into Python objects; an image stored in the dataset (a `datasets` ``Image``
feature, i.e. a ``{bytes, path}`` struct -- also what PIL images are stored as -- or a binary
column) becomes an `EmbeddedImage` reference whose bytes are read when the image is opened. An
image given only by its path (a string column, or a struct without bytes) is a file, checked
like the image of a LLaVA record.

Column roles (``columns: {role: column}``): ``question`` + ``answer`` and/or ``answers`` (a
single-turn QA sample), or ``conversations`` (LLaVA turns) or ``messages`` (chat schema);
``image`` or ``images`` (a list with at most one image); ``id``. Without a mapping, columns
named like the roles are used. Rows go through the same validation as JSON records
(`formats.parse_record`) and bad rows are counted skips with the same reasons, plus
`missing_answer` for a QA row without an answer.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .formats import (
    BAD_IMAGE_FIELD,
    BAD_TURN,
    IMAGE_PLACEHOLDER,
    DataConfigError,
    LoadReport,
    Sample,
    Skip,
    parse_record,
    resolve_image_path,
)
from .images import EmbeddedImage, ImageSource

__all__ = [
    "BATCH_ROWS",
    "COLUMN_ROLES",
    "HF_FILE_SUFFIXES",
    "ArrowImageColumn",
    "HFSource",
    "iter_hf_samples",
    "load_hf_samples",
    "open_hf_split",
    "resolve_columns",
]

BATCH_ROWS = 1024
"""Rows turned into Python objects at a time."""

COLUMN_ROLES: tuple[str, ...] = (
    "id",
    "question",
    "answer",
    "answers",
    "image",
    "images",
    "conversations",
    "messages",
)
TEXT_SCHEMAS: tuple[str, ...] = ("conversations", "messages", "question")
HF_FILE_SUFFIXES: dict[str, str] = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".json": "json",
    ".jsonl": "json",
}
MISSING_ANSWER = "missing_answer"
INSTALL_HINT = "pip install 'llava-mole[data]' (or: pip install 'datasets>=4,<6')"


def require_datasets() -> Any:
    """Imports `datasets`, or raises a one-line `DataConfigError` saying what to install."""
    try:
        import datasets
    except ImportError:
        raise DataConfigError(
            f"reading Hugging Face datasets needs the `datasets` package: {INSTALL_HINT}"
        ) from None
    return datasets


@contextmanager
def offline() -> Iterator[None]:
    """Switches the Hugging Face Hub off (env vars and the already-read constants)."""
    datasets = require_datasets()
    import huggingface_hub.constants as hub_constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    os.environ.update({k: "1" for k in saved_env})
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass(frozen=True)
class HFSource:
    """One split of a Hugging Face dataset.

    Attributes:
        location: A data file or ``save_to_disk`` folder (``split`` None), or, with ``split``,
            a ``DatasetDict`` folder, a folder of data files, or a cached dataset name.
        split: Split name, or None for a single-split file or folder.
        config: Config name of a cached Hub dataset (e.g. ``DocVQA``).
        cache_dir: `datasets` cache folder (default: ``HF_DATASETS_CACHE``).
    """

    location: str
    split: str | None = None
    config: str | None = None
    cache_dir: str | None = None

    @property
    def name(self) -> str:
        """``location[split]``, used in problem reports and image references."""
        return self.location if self.split is None else f"{self.location}[{self.split}]"


def _open_local(datasets: Any, path: Path, src: HFSource) -> Any:
    if path.is_file():
        builder = HF_FILE_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"unknown data file type {path.suffix!r}")
        if builder == "arrow":
            return datasets.Dataset.from_file(str(path))  # memory-mapped in place
        return datasets.load_dataset(
            builder, data_files=str(path), split="train", cache_dir=src.cache_dir
        )
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if src.split is None:
                raise ValueError(f"a DatasetDict folder: name a split ({', '.join(loaded)})")
            if src.split not in loaded:
                raise ValueError(f"no split {src.split!r} (splits: {', '.join(loaded)})")
            return loaded[src.split]
        return loaded
    return datasets.load_dataset(
        str(path), src.config, split=src.split or "train", cache_dir=src.cache_dir
    )


def open_hf_split(src: HFSource) -> Any:
    """Opens one split as a memory-mapped `datasets.Dataset`, without any download.

    Raises:
        DataConfigError: One line naming the source: missing `datasets`, a source that is
            neither a local path nor in the cache, a missing split, unreadable files.
    """
    datasets = require_datasets()
    path = Path(os.path.expanduser(src.location))
    try:
        with offline():
            if path.exists():
                ds = _open_local(datasets, path, src)
            else:
                ds = datasets.load_dataset(
                    src.location, src.config, split=src.split, cache_dir=src.cache_dir
                )
    except DataConfigError:
        raise
    except Exception as e:  # datasets raises many types; all mean "cannot use this source"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if path.exists():
            raise DataConfigError(f"cannot read Hugging Face dataset {src.name}: {first}") from None
        cache = src.cache_dir or datasets.config.HF_DATASETS_CACHE
        raise DataConfigError(
            f"Hugging Face dataset {src.name}: not a local path ({path.absolute()}) and not in "
            f"the local cache ({cache}); nothing is downloaded ({first})"
        ) from None
    if not isinstance(ds, datasets.Dataset):
        raise DataConfigError(f"{src.name}: expected one split, got {type(ds).__name__}")
    return ds


# ---------------------------------------------------------------------------------- columns


def resolve_columns(
    available: Sequence[str],
    explicit: Mapping[str, str | None] | None,
    dataset: str,
    candidates: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, str]:
    """Which column plays which role.

    Args:
        available: The dataset's column names.
        explicit: The mixture's ``columns`` mapping (role -> column, or None to leave a role
            out, e.g. ``image: null``); every named column must exist.
        dataset: Name for the error message.
        candidates: A preset's alternatives per role (the first present column is used; the
            preset's roles only). Without a preset, unmapped roles use a column of the role's
            name, if there is one (``columns: {image: null}`` leaves it out).

    Returns:
        role -> column, with one text schema (question, conversations or messages: an explicit
        one, else the first found in that order) and at most one of image/images.

    Raises:
        DataConfigError: A mapped column is missing, or the roles do not make a sample.
    """
    have = set(available)
    explicit = dict(explicit or {})
    roles: dict[str, str] = {}
    for role, column in explicit.items():
        if column is not None and column not in have:
            raise DataConfigError(
                f"column {column!r} (columns.{role}) is not in dataset {dataset}; "
                f"its columns: {', '.join(available)}"
            )
        if column is not None:
            roles[role] = column
    for role in COLUMN_ROLES:
        options = candidates.get(role, ()) if candidates else (role,)
        found = next((c for c in options if c in have), None)
        if role not in explicit and found is not None:
            roles[role] = found
    return _settle_roles(roles, explicit, dataset, available)


def _pick_one(roles: dict[str, str], group: Sequence[str], explicit: Mapping[str, Any]) -> None:
    """Keeps one role of `group`: an explicitly mapped one, else the first present."""
    chosen = [r for r in group if explicit.get(r) is not None] or [r for r in group if r in roles]
    for role in group:
        if chosen and role != chosen[0]:
            roles.pop(role, None)


def _settle_roles(
    roles: dict[str, str], explicit: Mapping[str, Any], dataset: str, available: Sequence[str]
) -> dict[str, str]:
    for group in (TEXT_SCHEMAS, ("image", "images")):
        if sum(explicit.get(r) is not None for r in group) > 1:
            raise DataConfigError(
                f"dataset {dataset}: columns maps more than one of {', '.join(group)}"
            )
        _pick_one(roles, group, explicit)
    columns = ", ".join(available)
    if not any(s in roles for s in TEXT_SCHEMAS):
        raise DataConfigError(
            f"dataset {dataset} has no 'question', 'conversations' or 'messages' column "
            f"(its columns: {columns}); map one with `columns:`"
        )
    if "question" not in roles:
        roles.pop("answer", None)
    elif not ({"answer", "answers"} & set(roles)):
        raise DataConfigError(
            f"dataset {dataset} has a question column but no 'answer' or 'answers' column "
            f"(its columns: {columns}); map one with `columns:`"
        )
    return roles


def _schema(roles: Mapping[str, str]) -> str:
    return next(s for s in TEXT_SCHEMAS if s in roles)


# ---------------------------------------------------------------------------------- images


class ArrowImageColumn:
    """The image column of a memory-mapped dataset: reads one image's bytes on demand.

    Holds the `datasets` table (which pickles as its file path, so DataLoader workers re-map
    the file instead of copying it).
    """

    def __init__(self, table: Any, column: str, name: str, is_list: bool) -> None:
        self.table = table
        self.column = column
        self.name = name
        self.is_list = is_list

    def image_bytes(self, row: int, item: int) -> bytes:
        value = self.table.column(self.column)[row].as_py()
        if self.is_list:
            value = value[item]
        if isinstance(value, dict):
            value = value.get("bytes")
        if not isinstance(value, bytes):
            raise ValueError(f"{self.name} row {row}: no image bytes")
        return value


def _image_kind(column_type: Any) -> str | None:
    """'struct' ({bytes, path}), 'binary', 'string' or 'null' (no images); None otherwise."""
    import pyarrow as pa

    if pa.types.is_null(column_type):
        return "null"
    if pa.types.is_struct(column_type) and column_type.get_field_index("bytes") >= 0:
        return "struct"
    if pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type):
        return "binary"
    if pa.types.is_string(column_type) or pa.types.is_large_string(column_type):
        return "string"
    return None


def _image_cells(array: Any, kind: str) -> list[tuple[bool, str | None] | None]:
    """Per cell: None (no image), or (has_bytes, path)."""
    import pyarrow.compute as pc

    if kind == "null":
        return [None] * len(array)
    if kind == "binary":
        return [(True, None) if v else None for v in pc.is_valid(array).to_pylist()]
    if kind == "string":
        return [None if p is None else (False, p) for p in array.to_pylist()]
    valid = pc.is_valid(array).to_pylist()
    has_bytes = pc.is_valid(pc.struct_field(array, "bytes")).to_pylist()
    has_path = array.type.get_field_index("path") >= 0
    paths = pc.struct_field(array, "path").to_pylist() if has_path else [None] * len(valid)
    return [
        (b, p) if v and (b or p) else None for v, b, p in zip(valid, has_bytes, paths, strict=True)
    ]


@dataclass
class _ImageReader:
    """Finds each row's image (single column or one-element list column) in a batch."""

    store: ArrowImageColumn
    kind: str

    def batch(self, column: Any) -> list[tuple[int, tuple[bool, str | None]] | int | None]:
        """Per row: None (no image), the number of images if more than one, or (item, cell)."""
        import pyarrow.compute as pc

        if not self.store.is_list:
            return [None if c is None else (0, c) for c in _image_cells(column, self.kind)]
        lengths = [n or 0 for n in pc.list_value_length(column).to_pylist()]
        cells = iter(_image_cells(pc.list_flatten(column), self.kind))
        out: list[tuple[int, tuple[bool, str | None]] | int | None] = []
        for n in lengths:
            row_cells = [next(cells) for _ in range(n)]
            present = [(k, c) for k, c in enumerate(row_cells) if c is not None]
            out.append(None if not present else present[0] if len(present) == 1 else len(present))
        return out


def _image_reader(ds: Any, roles: Mapping[str, str], name: str) -> _ImageReader | None:
    import pyarrow as pa

    role = "image" if "image" in roles else "images" if "images" in roles else None
    if role is None:
        return None
    column_type = ds.data.schema.field(roles[role]).type
    is_list = pa.types.is_list(column_type) or pa.types.is_large_list(column_type)
    kind = _image_kind(column_type.value_type if is_list else column_type)
    if kind is None:
        raise DataConfigError(
            f"dataset {name}: column {roles[role]!r} (columns.{role}) has type {column_type}, "
            "not an image ({bytes, path}), bytes or a path"
        )
    store = ArrowImageColumn(ds.data, roles[role], f"{name}:{roles[role]}", is_list)
    return _ImageReader(store, kind)


# ---------------------------------------------------------------------------------- rows


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
    schema = _schema(roles)
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
    name: str
    domain: str
    image_root: Path | None
    allow_outside_images: bool
    check_image: Callable[[ImageSource], Skip | None] | None
    prompt_suffix: str | None


def _row_image(
    cell: Any, row: int, reader: _ImageReader | None, ctx: _RowContext
) -> ImageSource | Skip | None:
    if cell is None or reader is None:
        return None
    item, (has_bytes, path) = cell
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
    row: Mapping[str, Any], index: int, cell: Any, reader: _ImageReader | None, roles, ctx
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
    if getattr(ds, "_indices", None) is not None:  # a selected/shuffled view: make rows real
        ds = ds.flatten_indices()
    ctx = _RowContext(name, domain, image_root, allow_outside_images, check_image, prompt_suffix)
    reader = _image_reader(ds, roles, name)
    image_column = reader.store.column if reader is not None else None
    text_columns = sorted({c for r, c in roles.items() if r not in ("image", "images")})
    table = ds.data.table
    for start in range(0, table.num_rows, BATCH_ROWS):
        batch = table.slice(start, BATCH_ROWS)
        rows = batch.select(text_columns).to_pylist()
        cells = reader.batch(batch.column(image_column)) if reader else [None] * len(rows)
        for offset, (row, cell) in enumerate(zip(rows, cells, strict=True)):
            index = start + offset
            raw_id = row.get(roles["id"]) if "id" in roles else None
            yield index, _row_sample(row, index, cell, reader, roles, ctx), raw_id


def load_hf_samples(
    ds: Any,
    roles: Mapping[str, str],
    *,
    name: str,
    domain: str = "default",
    report: LoadReport | None = None,
    **kwargs: Any,
) -> list[Sample]:
    """The valid samples of a dataset split; skips are counted in `report` (see
    `iter_hf_samples` for the arguments). ``report.per_domain[domain]`` counts the samples."""
    report = report if report is not None else LoadReport()
    samples: list[Sample] = []
    for index, result, raw_id in iter_hf_samples(ds, roles, name=name, domain=domain, **kwargs):
        if isinstance(result, Skip):
            sid = raw_id if isinstance(raw_id, (str, int)) else None
            report.add_skip(result, source=name, index=index, sample_id=sid)
        else:
            samples.append(result)
    report.per_domain[domain] = report.per_domain.get(domain, 0) + len(samples)
    return samples
