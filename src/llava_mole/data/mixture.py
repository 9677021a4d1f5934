"""Dataset mixtures: `load_mixture`, sample selection and `build_datasets`.

The YAML's keys, types, ranges and defaults are `llava_mole.data.mixture_schema`'s; see
``docs/data.md`` for the schema with an example. Everything is deterministic given the
mixture's seed: ``select: random`` draws with a generator seeded by (seed, dataset name, split).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import schema
from ..eval.metrics import METRICS
from ..schema import SchemaError
from .collate import InstructDataset
from .formats import DataConfigError, LoadReport, Sample
from .hf import HFRows, HFSource
from .images import DEFAULT_MAX_PIXELS, image_checker
from .mixture_schema import (
    SELECT_MODES,
    SETTINGS,
    SPLITS,
    DatasetEntry,
    MixtureFile,
    MixtureSettings,
    check_rules,
    read_mixture_yaml,
)
from .mixture_sources import check_paths, entry_samples
from .selection import (
    ListTable,
    Part,
    SampleView,
    Take,
    note_duplicate_ids,
    select_positions,
    select_samples,
    take_count,
)

KNOWN_METRICS: tuple[str, ...] = tuple(METRICS)
"""The default (official) metrics; a mixture may also name a lenient variant (`ALL_METRICS`)."""

__all__ = [
    "KNOWN_METRICS",
    "SELECT_MODES",
    "SPLITS",
    "DatasetSpec",
    "MixtureConfig",
    "SampleView",
    "Take",
    "build_datasets",
    "load_mixture",
    "load_split",
    "select_samples",
    "take_count",
]

HF_ONLY_SUFFIXES = (".parquet", ".arrow")


@dataclass
class DatasetSpec:
    """One dataset of a mixture (paths already resolved against the YAML folder).

    Attributes:
        name: Display name (default: the train, else test, path as written in the YAML).
        domain: Domain tag of all its samples.
        train: Train-split file, or None.
        test: Test-split file, or None.
        image_folder: Image folder (None: each split file's own folder).
        take: How much of the train split to use: "all", a count or a fraction.
        select: "first" or "random".
        repeat: Upsampling factor of the train split.
        test_take: How much of the test split to use.
        metric: Evaluation metric name (a key of `llava_mole.eval.metrics.ALL_METRICS`).
        hf: Hugging Face source whose splits ``train_split`` / ``test_split`` name (a local
            folder, resolved, or a cached dataset name as written); None for file entries.
        hf_config: Config name of a cached Hub dataset.
        train_split: Split of `hf` used as the train split.
        test_split: Split of `hf` used as the test split.
        columns: Column mapping (role -> column, None to leave a role out), or None.
        preset: Preset name (`llava_mole.data.convert.PRESETS`), or None.
        prompt_suffix: Line appended to every question of a question/answer dataset.
    """

    name: str
    domain: str
    train: Path | None = None
    test: Path | None = None
    image_folder: Path | None = None
    take: Take = "all"
    select: str = "first"
    repeat: int = 1
    test_take: Take = "all"
    metric: str = "exact_match"
    hf: str | None = None
    hf_config: str | None = None
    train_split: str | None = None
    test_split: str | None = None
    columns: dict[str, str | None] | None = None
    preset: str | None = None
    prompt_suffix: str | None = None

    def source(self, split: str) -> Path | HFSource | None:
        """Where `split` comes from: a LLaVA JSON/JSONL file, a Hugging Face source, or None.

        A file is read as a Hugging Face dataset when it is a ``.parquet`` / ``.arrow`` file or
        a folder (``save_to_disk``), or when the entry has ``columns`` or a ``preset``; any other
        file is LLaVA JSON / JSONL; a file that does not exist is returned as a path (its error
        names it).
        """
        if self.hf is not None:
            name = self.train_split if split == "train" else self.test_split
            return None if name is None else HFSource(self.hf, name, self.hf_config)
        file = self.train if split == "train" else self.test
        if file is None or not file.exists():
            return file
        mapped = self.columns is not None or self.preset is not None
        if file.is_dir() or file.suffix.lower() in HF_ONLY_SUFFIXES or mapped:
            return HFSource(str(file))
        return file  # any other file is LLaVA JSON (a list) or JSONL, as before


@dataclass
class MixtureConfig(MixtureSettings):
    """A validated mixture file: its settings (`MixtureSettings`: ``seed``, ``template``,
    ``system``, ``max_length``, ``image_mode``, ``strict``) and datasets.

    Attributes:
        path: The YAML file.
        datasets: The datasets, in file order.
    """

    path: Path = field(kw_only=True)
    datasets: list[DatasetSpec] = field(kw_only=True)

    @property
    def domains(self) -> list[str]:
        """Domain names in order of first appearance in the file (defines ``domain_id``)."""
        return list(dict.fromkeys(d.domain for d in self.datasets))

    @property
    def metrics(self) -> dict[str, str]:
        """Evaluation metric of each domain."""
        return {d.domain: d.metric for d in self.datasets}


def _resolve(base: Path, value: str) -> Path:
    """``value`` (``~`` expanded) as a path; a relative one is taken from ``base``."""
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def _spec(entry: DatasetEntry, base: Path, where: str) -> DatasetSpec:
    """The resolved `DatasetSpec` of a validated entry; relative paths are taken from ``base``.

    Raises:
        SchemaError: ``prompt_suffix`` on an entry read as LLaVA JSON (no question column).
    """
    hf = None
    if entry.hf is not None:
        local = _resolve(base, entry.hf)
        hf = str(local) if local.exists() else entry.hf  # else a cached dataset's name
    named = {"train": entry.train, "test": entry.test}
    files = {
        s: None if v is None or hf is not None else _resolve(base, v) for s, v in named.items()
    }
    plain_json = all(
        f is None or (f.suffix.lower() not in HF_ONLY_SUFFIXES and not f.is_dir())
        for f in files.values()
    )
    if entry.given("prompt_suffix") and plain_json and hf is None and entry.columns is None:
        raise SchemaError(
            f"{where}.prompt_suffix: applies to question/answer columns (hf, columns, preset)"
        )
    folder = entry.image_folder
    return DatasetSpec(
        name=entry.display_name(),
        domain=entry.domain,
        train=files["train"],
        test=files["test"],
        image_folder=None if folder is None else _resolve(base, folder),
        take=entry.take,
        select=entry.select,
        repeat=entry.repeat,
        test_take=entry.test_take,
        metric=entry.metric_name(),
        hf=hf,
        hf_config=entry.hf_config,
        train_split=named["train"] if hf is not None else None,
        test_split=named["test"] if hf is not None else None,
        columns=entry.column_mapping(),
        preset=entry.preset,
        prompt_suffix=entry.question_suffix(),
    )


def load_mixture(path: str | os.PathLike[str]) -> MixtureConfig:
    """Reads and validates a mixture YAML file (schema only; data files are opened later).

    The keys, their types, ranges and defaults are `llava_mole.data.mixture_schema`'s.
    Relative paths are taken relative to the YAML's folder.

    Args:
        path: The YAML file.

    Returns:
        The validated configuration.

    Raises:
        DataConfigError: With a one-line message naming the file and the offending key
            (``mix.yaml: datasets[1].take: expected 'all', ... (got -3)``).
    """
    path = Path(path)
    data = read_mixture_yaml(path)
    try:
        raw = schema.validate(MixtureFile, data)
        check_rules(raw)
        datasets = [_spec(e, path.parent, f"datasets[{i}]") for i, e in enumerate(raw.datasets)]
    except SchemaError as err:
        raise DataConfigError(f"{path}: {err}") from None
    settings = {name: getattr(raw, name) for name in SETTINGS}
    return MixtureConfig(path=path, datasets=datasets, **settings)


def _mixture(mixture: str | os.PathLike[str] | MixtureConfig) -> MixtureConfig:
    return mixture if isinstance(mixture, MixtureConfig) else load_mixture(mixture)


def load_split(
    mixture: str | os.PathLike[str] | MixtureConfig,
    split: str = "train",
    seed: int | None = None,
    strict: bool | None = None,
    *,
    allow_outside_images: bool = False,
    verify_images: bool = True,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    lazy: bool | None = None,
) -> tuple[Sequence[Sample], LoadReport]:
    """Loads, validates and selects the samples of one split of a mixture.

    For the train split, ``take``/``select`` pick the samples and ``repeat`` repeats them; for
    the test split, ``test_take``/``select`` pick them (no repeat). Datasets without a file for
    the split are left out.

    Hugging Face entries are read lazily by default: every row is validated once (skips are
    counted as usual), only the indices of the valid rows are kept, and the result is a
    `SampleView` that builds a row's `Sample` when it is accessed. A mixture of LLaVA JSON
    files only gives a list, exactly as before.

    Args:
        mixture: The YAML file or a loaded `MixtureConfig`.
        split: "train" or "test".
        seed: Overrides the mixture's seed.
        strict: Overrides the mixture's ``strict``: raise `DataError` listing the first 10
            problems instead of skipping bad samples.
        allow_outside_images: Accept image paths outside the image folder.
        verify_images: Open and ``verify()`` every image now (header and checksums, no full
            decode); if False only existence is checked and broken images are handled by the
            dataset's fallback at training time.
        max_image_pixels: Images larger than this are skipped (`image_too_large`).
        lazy: None: a `SampleView` when some entry is a Hugging Face dataset, else a list;
            True: always a `SampleView`; False: always a list (a `Sample` per row kept).
            The samples, their order and the report are the same in every case.

    Returns:
        The samples (repeats included, datasets in file order) and a report whose
        ``per_domain`` counts them.

    Raises:
        DataConfigError: Bad split name or missing file/folder.
        DataError: Bad samples in strict mode, or an unreadable dataset file.
    """
    cfg = _mixture(mixture)
    if split not in SPLITS:
        raise DataConfigError(f"split must be one of {SPLITS}, got {split!r}")
    seed = cfg.seed if seed is None else seed
    check = image_checker(max_image_pixels) if verify_images else None
    report = LoadReport()
    counts = {d: 0 for d in cfg.domains}
    samples: list[Sample] = []
    parts: list[Part] = []
    for i, spec in enumerate(cfg.datasets):
        source = spec.source(split)
        if source is None:
            continue
        check_paths(cfg, i, split, source)
        valid = entry_samples(
            cfg,
            i,
            split,
            source,
            lazy is not False,
            check_image=check,
            report=report,
            allow_outside_images=allow_outside_images,
        )
        note_duplicate_ids(valid, f"datasets[{i}] ({spec.name})", report)
        if isinstance(valid, HFRows):
            valid.id_hashes = None  # only needed for that check: 8 bytes per row less
        take = spec.take if split == "train" else spec.test_take
        repeat = spec.repeat if split == "train" else 1
        if take != "all" and not isinstance(take, float) and take > len(valid):
            report.warnings.append(
                f"datasets[{i}] ({spec.name}): take {take} but only {len(valid)} valid samples"
            )
        key = f"{seed}:{spec.name}:{spec.domain}:{split}"
        positions = select_positions(len(valid), take, spec.select, key)
        table = valid if isinstance(valid, HFRows) else ListTable(valid)
        parts.extend([Part(table, positions)] * repeat)
        if isinstance(valid, list):  # the same samples as `select_samples` picks
            samples.extend([valid[p] for p in positions.tolist()] * repeat)
        counts[spec.domain] += len(positions) * repeat
    report.per_domain = counts  # selected items, not valid samples
    if strict if strict is not None else cfg.strict:
        report.raise_if_problems()
    view = SampleView(parts)
    if lazy or (lazy is None and view.lazy):
        return view, report
    return samples, report


def build_datasets(
    mixture_yaml: str | os.PathLike[str] | MixtureConfig,
    processor: Any,
    split: str = "train",
    seed: int | None = None,
    strict: bool | None = None,
    *,
    allow_outside_images: bool = False,
    verify_images: bool = True,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    lazy: bool | None = None,
) -> tuple[InstructDataset, LoadReport]:
    """Builds the dataset of one split of a mixture.

    Args:
        mixture_yaml: The mixture YAML file (or a loaded `MixtureConfig`).
        processor: The model's processor, loaded from the model dir.
        split: "train" or "test".
        seed: Overrides the mixture's seed.
        strict: Overrides the mixture's ``strict``.
        allow_outside_images: Accept image paths outside the image folders.
        verify_images: Verify images at load time (see `load_split`).
        max_image_pixels: Image size limit.
        lazy: None: Hugging Face entries are read lazily (see `load_split`) and then also
            encoded lazily -- the dataset keeps each item's position, token length, modality
            and domain (small integer arrays) and tokenizes the item again in ``__getitem__``
            -- while JSON-only mixtures are encoded up front and keep their token ids, as
            before (unless they have more than `collate.LAZY_MIN_ITEMS` items); True: both lazy;
            False: both eager (a `Sample` per row, token ids kept). Same items either way.

    Returns:
        The dataset (``dataset.domains`` is the mixture's domain list) and the load report;
        ``report.per_domain`` counts the items of the dataset, ``report.skipped`` counts both
        the samples rejected at load time and those dropped at tokenization (e.g.
        `no_labels_after_truncation`).

    Raises:
        DataConfigError: Bad configuration or missing file.
        DataError: Bad samples in strict mode.
    """
    cfg = _mixture(mixture_yaml)
    strict = cfg.strict if strict is None else strict
    # Strictness is applied once, at the end, so that the error lists load-time problems and
    # tokenization drops together.
    samples, report = load_split(
        cfg,
        split,
        seed,
        strict=False,
        allow_outside_images=allow_outside_images,
        verify_images=verify_images,
        max_image_pixels=max_image_pixels,
        lazy=lazy,
    )
    dataset = InstructDataset(
        samples,
        processor,
        template=cfg.template,
        system=cfg.system,
        max_length=cfg.max_length,
        image_mode=cfg.image_mode,
        domains=cfg.domains,
        max_image_pixels=max_image_pixels,
        lazy=lazy,
    )
    report.per_domain = dict(dataset.report.per_domain)
    report.skipped.update(dataset.report.skipped)
    report.problems.extend(dataset.report.problems)
    if strict:
        report.raise_if_problems()
    return dataset, report
