"""Where a mixture entry's samples come from, and reading its valid ones.

A split of an entry is a LLaVA JSON / JSONL file or a Hugging Face source
(`llava_mole.data.mixture.DatasetSpec.source`). `check_paths` names the mixture key of a missing
file or folder; `entry_samples` reads the entry's valid samples (config errors name the key).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..paths import not_found_or, path_problem
from .convert import PRESETS
from .formats import DataConfigError, LoadReport, Sample
from .hf import HFRows, HFSource, load_hf_samples, open_hf_split, resolve_columns, scan_hf_rows
from .records import load_llava_file

if TYPE_CHECKING:
    from .mixture import DatasetSpec, MixtureConfig

__all__ = ["check_paths", "entry_samples"]


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


def check_paths(cfg: MixtureConfig, i: int, split: str, source: Path | HFSource) -> None:
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


def entry_samples(
    cfg: MixtureConfig, i: int, split: str, source: Path | HFSource, lazy: bool, **kw: Any
) -> list[Sample] | HFRows:
    """The valid samples of entry `i`: a list (JSON, or datasets read eagerly) or `HFRows`."""
    spec = cfg.datasets[i]
    if isinstance(source, HFSource):
        where = f"{cfg.path}: datasets[{i}].{split}"
        return _load_hf_entry(where, spec, source, lazy=lazy, **kw)
    return load_llava_file(source, spec.image_folder, domain=spec.domain, **kw)
