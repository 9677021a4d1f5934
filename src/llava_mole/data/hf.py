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
columns are turned into Python objects (`llava_mole.data.hf_rows`); an image stored in the
dataset (a `datasets` ``Image`` feature, i.e. a ``{bytes, path}`` struct -- also what PIL images
are stored as -- or a binary column) becomes an `EmbeddedImage` reference whose bytes are read
when the image is opened (`llava_mole.data.hf_images`). An image given only by its path (a
string column, or a struct without bytes) is a file, checked like the image of a LLaVA record.
`load_hf_samples` keeps a `Sample` per valid row; `scan_hf_rows` keeps only the valid rows'
indices (`HFRows`, what mixtures use) and builds a row's `Sample` when it is asked for.

Column roles (``columns: {role: column}``): ``question`` + ``answer`` and/or ``answers`` (a
single-turn QA sample), or ``conversations`` (LLaVA turns) or ``messages`` (chat schema);
``image`` or ``images`` (a list with at most one image); ``id``. Without a mapping, columns
named like the roles are used. Rows go through the same validation as JSON records
(`records.parse_record`) and bad rows are counted skips with the same reasons, plus
`missing_answer` for a QA row without an answer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .formats import DataConfigError, LoadReport, Sample, Skip
from .hf_images import ArrowImageColumn
from .hf_rows import (
    BATCH_ROWS,
    MISSING_ANSWER,
    TEXT_SCHEMAS,
    HFRows,
    iter_hf_samples,
    scan_hf_rows,
)

__all__ = [
    "BATCH_ROWS",
    "COLUMN_ROLES",
    "HF_FILE_SUFFIXES",
    "ArrowImageColumn",
    "HFRows",
    "HFSource",
    "MISSING_ANSWER",
    "iter_hf_samples",
    "load_hf_samples",
    "open_hf_split",
    "resolve_columns",
    "scan_hf_rows",
]

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
HF_FILE_SUFFIXES: dict[str, str] = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".json": "json",
    ".jsonl": "json",
}
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
