"""Dataset mixtures: the YAML schema, its validation, sample selection and `build_datasets`.

See ``docs/data.md`` for the schema with an example. Everything is deterministic given the
mixture's seed: ``select: random`` draws with a generator seeded by (seed, dataset name, split).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..eval.metrics import ALL_METRICS, METRICS
from ..paths import not_found_or, path_problem
from ..schema import did_you_mean
from .collate import InstructDataset
from .convert import PRESETS
from .formats import DataConfigError, LoadReport, Sample, load_llava_file
from .hf import (
    COLUMN_ROLES,
    HFRows,
    HFSource,
    load_hf_samples,
    open_hf_split,
    resolve_columns,
    scan_hf_rows,
)
from .images import DEFAULT_MAX_PIXELS, IMAGE_MODES, image_checker
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
from .templates import TEMPLATES

KNOWN_METRICS: tuple[str, ...] = tuple(METRICS)
"""The default (official) metrics; a mixture may also name a lenient variant (`ALL_METRICS`)."""
SPLITS: tuple[str, ...] = ("train", "test")
SELECT_MODES: tuple[str, ...] = ("first", "random")

__all__ = [
    "KNOWN_METRICS",
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

_TOP_KEYS = ("datasets", "seed", "template", "system", "max_length", "image_mode", "strict")
_DATASET_KEYS = (
    "name",
    "domain",
    "train",
    "test",
    "image_folder",
    "take",
    "select",
    "repeat",
    "test_take",
    "metric",
    "hf",
    "hf_config",
    "columns",
    "preset",
    "prompt_suffix",
)
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
class MixtureConfig:
    """A validated mixture file.

    Attributes:
        path: The YAML file.
        datasets: The datasets, in file order.
        seed: Seed of random selection.
        template: Prompt template (``vicuna_v1`` or ``chat_template``).
        system: System prompt of ``vicuna_v1``; None: LLaVA-1.5's ("A chat between a curious
            user..."), ``""``: none (e.g. for a model never trained with one).
        max_length: Truncation length in tokens.
        image_mode: ``pad`` or ``resize``.
        strict: Raise on any bad sample instead of skipping it.
    """

    path: Path
    datasets: list[DatasetSpec]
    seed: int = 0
    template: str = "vicuna_v1"
    system: str | None = None
    max_length: int = 2048
    image_mode: str = "pad"
    strict: bool = False

    @property
    def domains(self) -> list[str]:
        """Domain names in order of first appearance in the file (defines ``domain_id``)."""
        return list(dict.fromkeys(d.domain for d in self.datasets))

    @property
    def metrics(self) -> dict[str, str]:
        """Evaluation metric of each domain."""
        return {d.domain: d.metric for d in self.datasets}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Checker:
    """Builds one-line `DataConfigError`s: ``file: key.path: message``."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)

    def fail(self, key: str, message: str) -> DataConfigError:
        return DataConfigError(f"{self.name}: {key}: {message}")

    def unknown_keys(self, data: Mapping[Any, Any], allowed: Sequence[str], prefix: str) -> None:
        for key in data:
            if key not in allowed:
                where = f"{prefix}{key}" if prefix else str(key)
                raise self.fail(where, f"unknown key{did_you_mean(str(key), allowed)}")

    def choice(self, value: object, key: str, choices: Sequence[str]) -> str:
        if not isinstance(value, str) or value not in choices:
            raise self.fail(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def take(self, value: object, key: str) -> Take:
        if value == "all" and isinstance(value, str):
            return "all"
        if _is_int(value) and value >= 1:  # type: ignore[operator]
            return int(value)  # type: ignore[arg-type]
        if isinstance(value, float) and 0.0 < value <= 1.0:
            return value
        raise self.fail(key, f"expected 'all', an int >= 1 or a fraction in (0, 1], got {value!r}")

    def positive_int(self, value: object, key: str) -> int:
        if not _is_int(value) or value < 1:  # type: ignore[operator]
            raise self.fail(key, f"expected an int >= 1, got {value!r}")
        return int(value)  # type: ignore[arg-type]

    def string(self, value: object, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string, got {value!r}")
        return value


def _resolve(base: Path, value: str) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def _columns(check: _Checker, value: object, key: str) -> dict[str, str | None] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise check.fail(key, f"expected a mapping of role: column, got {value!r:.80}")
    check.unknown_keys(value, COLUMN_ROLES, f"{key}.")
    for role, column in value.items():
        if column is not None:
            check.string(column, f"{key}.{role}")
    return dict(value)


def _hf_keys(check: _Checker, base: Path, prefix: str, entry: Mapping[str, Any]) -> dict:
    """The Hugging Face keys of an entry (hf, hf_config, columns, preset, prompt_suffix)."""
    out: dict[str, Any] = {"columns": _columns(check, entry.get("columns"), f"{prefix}.columns")}
    if "hf" in entry:
        value = check.string(entry["hf"], f"{prefix}.hf")
        local = _resolve(base, value)
        out["hf"] = str(local) if local.exists() else value
    if "hf_config" in entry:
        if "hf" not in entry:
            raise check.fail(f"{prefix}.hf_config", "only an 'hf' entry takes a config name")
        out["hf_config"] = check.string(entry["hf_config"], f"{prefix}.hf_config")
    preset = entry.get("preset")
    if preset is not None:
        preset = check.choice(preset, f"{prefix}.preset", tuple(PRESETS))
        out["preset"] = preset
    suffix = entry.get("prompt_suffix", PRESETS[preset].prompt_suffix if preset else None)
    if suffix is not None and not isinstance(suffix, str):
        raise check.fail(f"{prefix}.prompt_suffix", f"expected a string, got {suffix!r:.80}")
    out["prompt_suffix"] = suffix or None
    return out


def _dataset_spec(check: _Checker, base: Path, prefix: str, entry: object) -> DatasetSpec:
    """Validates one ``datasets`` entry (schema only)."""
    if not isinstance(entry, dict):
        raise check.fail(prefix, f"expected a mapping, got {entry!r:.80}")
    check.unknown_keys(entry, _DATASET_KEYS, f"{prefix}.")
    if "domain" not in entry:
        raise check.fail(f"{prefix}.domain", "required key missing")
    domain = check.string(entry["domain"], f"{prefix}.domain")
    hf = _hf_keys(check, base, prefix, entry)
    values = {s: entry.get(s) for s in SPLITS}
    if values["train"] is None and values["test"] is None:
        what = "split name" if "hf" in hf else "file"
        raise check.fail(prefix, f"needs a 'train' and/or a 'test' {what}")
    named = {s: None if v is None else check.string(v, f"{prefix}.{s}") for s, v in values.items()}
    files = {s: None if v is None or "hf" in hf else _resolve(base, v) for s, v in named.items()}
    if "hf" in hf:
        hf.update(train_split=named["train"], test_split=named["test"])
    folder = entry.get("image_folder")
    if folder is not None:
        folder = _resolve(base, check.string(folder, f"{prefix}.image_folder"))
    preset = hf.get("preset")
    default_metric = PRESETS[preset].metric if preset else "exact_match"
    plain_json = all(
        f is None or (f.suffix.lower() not in HF_ONLY_SUFFIXES and not f.is_dir())
        for f in files.values()
    )
    if "prompt_suffix" in entry and plain_json and "hf" not in hf and hf["columns"] is None:
        raise check.fail(
            f"{prefix}.prompt_suffix", "applies to question/answer columns (hf, columns, preset)"
        )
    return DatasetSpec(
        name=check.string(
            entry.get("name", entry.get("hf") or named["train"] or named["test"]), f"{prefix}.name"
        ),
        domain=domain,
        train=files["train"],
        test=files["test"],
        image_folder=folder,
        take=check.take(entry.get("take", "all"), f"{prefix}.take"),
        select=check.choice(entry.get("select", "first"), f"{prefix}.select", SELECT_MODES),
        repeat=check.positive_int(entry.get("repeat", 1), f"{prefix}.repeat"),
        test_take=check.take(entry.get("test_take", "all"), f"{prefix}.test_take"),
        metric=check.choice(
            entry.get("metric", default_metric), f"{prefix}.metric", tuple(ALL_METRICS)
        ),
        **hf,
    )


def load_mixture(path: str | os.PathLike[str]) -> MixtureConfig:
    """Reads and validates a mixture YAML file (schema only; data files are opened later).

    Args:
        path: The YAML file.

    Returns:
        The validated configuration.

    Raises:
        DataConfigError: With a one-line message naming the file and the offending key.
    """
    path = Path(path)
    check = _Checker(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        missing = f"mixture file not found: {path}"
        raise DataConfigError(not_found_or(path, "file", missing)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataConfigError(f"cannot read mixture file {path}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise DataConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise DataConfigError(f"{path}: expected a mapping with a 'datasets' list at top level")
    check.unknown_keys(data, _TOP_KEYS, "")

    cfg = MixtureConfig(path=path, datasets=[])
    if "seed" in data:
        if not _is_int(data["seed"]):
            raise check.fail("seed", f"expected an int, got {data['seed']!r}")
        cfg.seed = int(data["seed"])
    if "template" in data:
        cfg.template = check.choice(data["template"], "template", TEMPLATES)
    if "system" in data:
        if not isinstance(data["system"], str):
            raise check.fail("system", f"expected a string ('' for none), got {data['system']!r}")
        if cfg.template != "vicuna_v1":
            raise check.fail("system", "only the vicuna_v1 template takes a system prompt")
        cfg.system = data["system"]
    if "max_length" in data:
        cfg.max_length = check.positive_int(data["max_length"], "max_length")
    if "image_mode" in data:
        cfg.image_mode = check.choice(data["image_mode"], "image_mode", IMAGE_MODES)
    if "strict" in data:
        if not isinstance(data["strict"], bool):
            raise check.fail("strict", f"expected true or false, got {data['strict']!r}")
        cfg.strict = data["strict"]

    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise check.fail("datasets", f"expected a non-empty list, got {datasets!r:.80}")
    base = path.parent
    metric_of: dict[str, str] = {}
    for i, entry in enumerate(datasets):
        spec = _dataset_spec(check, base, f"datasets[{i}]", entry)
        if metric_of.setdefault(spec.domain, spec.metric) != spec.metric:
            raise check.fail(
                f"datasets[{i}].metric",
                f"domain {spec.domain!r} already uses metric {metric_of[spec.domain]!r}, "
                f"got {spec.metric!r}",
            )
        cfg.datasets.append(spec)
    return cfg


def _mixture(mixture: str | os.PathLike[str] | MixtureConfig) -> MixtureConfig:
    return mixture if isinstance(mixture, MixtureConfig) else load_mixture(mixture)


def _load_hf_entry(
    where: str,
    spec: DatasetSpec,
    source: HFSource,
    *,
    check_image: Any,
    report: LoadReport,
    allow_outside_images: bool,
    lazy: bool,
) -> list[Sample] | HFRows:
    """The valid samples of one Hugging Face split (`HFRows` if `lazy`, else a list); config
    errors are prefixed with `where`."""
    folder = spec.image_folder
    local = Path(source.location)
    if folder is None and local.exists():
        folder = local if local.is_dir() else local.parent
    try:
        ds = open_hf_split(source)
        candidates = PRESETS[spec.preset].columns if spec.preset else None
        roles = resolve_columns(ds.column_names, spec.columns, source.name, candidates)
        return (scan_hf_rows if lazy else load_hf_samples)(
            ds,
            roles,
            name=source.name,
            domain=spec.domain,
            report=report,
            image_root=folder,
            allow_outside_images=allow_outside_images,
            check_image=check_image,
            prompt_suffix=spec.prompt_suffix,
        )
    except DataConfigError as e:
        raise DataConfigError(f"{where}: {e}") from None


def _check_paths(cfg: MixtureConfig, i: int, split: str, source: Path | HFSource) -> None:
    """One line naming the key when a split file or the image folder is missing."""
    if isinstance(source, Path) and path_problem(source, "file"):
        missing = f"file not found: {source}"
        raise DataConfigError(
            f"{cfg.path}: datasets[{i}].{split}: {not_found_or(source, 'file', missing)}"
        )
    folder = cfg.datasets[i].image_folder
    if folder is not None and path_problem(folder, "folder"):
        missing = f"folder not found: {folder}"
        raise DataConfigError(
            f"{cfg.path}: datasets[{i}].image_folder: {not_found_or(folder, 'folder', missing)}"
        )


def _entry_samples(
    cfg: MixtureConfig, i: int, split: str, source: Path | HFSource, lazy: bool, **kw: Any
) -> list[Sample] | HFRows:
    """The valid samples of entry `i`: a list (JSON, or datasets read eagerly) or `HFRows`."""
    spec = cfg.datasets[i]
    if isinstance(source, HFSource):
        where = f"{cfg.path}: datasets[{i}].{split}"
        return _load_hf_entry(where, spec, source, lazy=lazy, **kw)
    return load_llava_file(source, spec.image_folder, domain=spec.domain, **kw)


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
        _check_paths(cfg, i, split, source)
        valid = _entry_samples(
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
