"""Presets for the public Hugging Face layouts of the paper's datasets, and `write_mixture`.

A preset names, per dataset, the columns of its usual Hub layouts, its metric, its domain, the
short-answer prompt the published evaluations use and which splits to train and test on:

=========  ==========================================  ================  ==============
preset     layouts (Hub names)                         metric            domain
=========  ==========================================  ================  ==============
vqav2      HuggingFaceM4/VQAv2, lmms-lab/VQAv2          vqa_accuracy      general
textvqa    facebook/textvqa, lmms-lab/textvqa           vqa_accuracy      general
docvqa     lmms-lab/DocVQA (config DocVQA)              anls              document
chartqa    HuggingFaceM4/ChartQA, lmms-lab/ChartQA      relaxed_accuracy  chart
pathvqa    flaviagiammarino/path-vqa                    pathvqa           biomedical
=========  ==========================================  ================  ==============

In a mixture, ``preset: docvqa`` fills ``columns`` (the first column of each role's list that
the dataset has), ``metric`` and ``prompt_suffix``; explicit keys win. ``llava-mole convert``
(:func:`write_mixture`) opens each local dataset, picks its splits, resolves the columns and
writes a ready mixture YAML with everything spelt out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .formats import DataConfigError
from .hf import HFSource, open_hf_split, require_datasets, resolve_columns

__all__ = ["PRESETS", "Preset", "available_splits", "mixture_entry", "write_mixture"]

SHORT_ANSWER = "Answer the question using a single word or phrase."
"""LLaVA-1.5's (and lmms-eval's) short-answer instruction for VQAv2, TextVQA and DocVQA."""


@dataclass(frozen=True)
class Preset:
    """Columns, metric and splits of one public dataset.

    Attributes:
        name: Preset name (the mixture's ``preset`` value).
        domain: Default domain tag.
        metric: Metric of the domain.
        columns: role -> candidate column names, first present wins.
        prompt_suffix: Line appended to each question (the evaluation's answer-format prompt).
        train_splits: Split names to train on, in order of preference.
        test_splits: Split names to evaluate on (with answers), in order of preference.
        hub: The Hub layouts this describes (documentation only: nothing is downloaded).
        hub_config: Config name to use when the source is a cached Hub dataset.
    """

    name: str
    domain: str
    metric: str
    columns: dict[str, tuple[str, ...]]
    prompt_suffix: str | None
    train_splits: tuple[str, ...] = ("train",)
    test_splits: tuple[str, ...] = ("validation", "val", "test")
    hub: tuple[str, ...] = field(default=())
    hub_config: str | None = None


PRESETS: dict[str, Preset] = {
    "vqav2": Preset(
        "vqav2",
        "general",
        "vqa_accuracy",
        {
            "question": ("question",),
            "answer": ("multiple_choice_answer",),
            "answers": ("answers",),  # 10 x {"answer", "answer_confidence", "answer_id"}
            "image": ("image",),
            "id": ("question_id",),
        },
        SHORT_ANSWER,
        test_splits=("validation", "val", "testdev"),
        hub=("HuggingFaceM4/VQAv2", "lmms-lab/VQAv2"),
    ),
    "textvqa": Preset(
        "textvqa",
        "general",
        "vqa_accuracy",
        {
            "question": ("question",),
            "answers": ("answers",),  # 10 strings
            "image": ("image",),
            "id": ("question_id",),
        },
        SHORT_ANSWER,
        test_splits=("validation", "val"),
        hub=("facebook/textvqa", "lmms-lab/textvqa"),
    ),
    "docvqa": Preset(
        "docvqa",
        "document",
        "anls",
        {
            "question": ("question",),
            "answers": ("answers",),
            "image": ("image",),
            "id": ("questionId", "question_id"),
        },
        SHORT_ANSWER,
        test_splits=("validation", "val"),
        hub=("lmms-lab/DocVQA",),
        hub_config="DocVQA",
    ),
    "chartqa": Preset(
        "chartqa",
        "chart",
        "relaxed_accuracy",
        {
            "question": ("query", "question"),
            "answer": ("label", "answer"),  # HuggingFaceM4: label is a one-element list
            "image": ("image",),
        },
        "Answer the question with a single word.",  # lmms-eval's ChartQA prompt
        test_splits=("test", "val", "validation"),
        hub=("HuggingFaceM4/ChartQA", "lmms-lab/ChartQA"),
    ),
    "pathvqa": Preset(
        "pathvqa",
        "biomedical",
        "pathvqa",
        {"question": ("question",), "answer": ("answer",), "image": ("image",)},
        None,
        test_splits=("test", "validation", "val"),
        hub=("flaviagiammarino/path-vqa",),
    ),
}


def available_splits(location: str, config: str | None = None) -> list[str] | None:
    """Split names of a dataset without reading its rows; None for a single-split source
    (a data file or a ``save_to_disk`` folder of one split).

    Raises:
        DataConfigError: The source cannot be read (see `llava_mole.data.hf.open_hf_split`).
    """
    path = Path(os.path.expanduser(location))
    if path.is_file() or (path / "state.json").is_file():
        return None
    if (path / "dataset_dict.json").is_file():
        return list(json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"])
    datasets = require_datasets()
    from .hf import offline

    try:
        with offline():
            builder = datasets.load_dataset_builder(
                str(path) if path.exists() else location, config
            )
    except Exception as e:  # noqa: BLE001 - one line below
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataConfigError(f"cannot read Hugging Face dataset {location}: {first}") from None
    files = getattr(builder.config, "data_files", None)
    if files:
        return list(files)
    return list(builder.info.splits or [])


def _pick_splits(preset: Preset, splits: Sequence[str], role: str | None) -> dict[str, str]:
    chosen: dict[str, str] = {}
    train = next((s for s in preset.train_splits if s in splits), None)
    test = next((s for s in preset.test_splits if s in splits and s != train), None)
    for name, split in (("train", train), ("test", test)):
        if split is not None and role in (None, name):
            chosen[name] = split
    return chosen


def mixture_entry(
    preset: Preset, location: str, *, role: str | None = None, config: str | None = None
) -> tuple[dict[str, Any], dict[str, int]]:
    """One mixture entry for a local dataset in a preset's layout.

    Args:
        preset: The dataset's preset.
        location: A folder with splits (``DatasetDict`` or Hub-layout data files), a cached Hub
            dataset name, or a single-split file / folder (then `role` is required).
        role: ``train`` or ``test``: use the source only for that mixture split.
        config: Config name of a cached Hub dataset.

    Returns:
        The entry (with the resolved ``columns``) and the row count of each mixture split.

    Raises:
        DataConfigError: No usable split, or a column of the layout is missing.
    """
    path = Path(os.path.expanduser(location))
    where = str(path.resolve()) if path.exists() else location
    if config is None and not path.exists():
        config = preset.hub_config
    splits = available_splits(where, config)
    if splits is None and role is None:
        raise DataConfigError(
            f"{location} holds one split: say which, e.g. {preset.name}:test={location}"
        )
    chosen = {role: None} if splits is None else _pick_splits(preset, splits, role)  # type: ignore[dict-item]
    if not chosen:
        wanted = preset.train_splits + preset.test_splits
        raise DataConfigError(
            f"{location}: no split named {', '.join(wanted)} (it has: {', '.join(splits or [])})"
        )
    entry: dict[str, Any] = {"name": preset.name, "domain": preset.domain}
    if splits is not None:
        entry["hf"] = where
        if config:
            entry["hf_config"] = config
    counts: dict[str, int] = {}
    columns: dict[str, str] | None = None
    for name, split in chosen.items():
        src = HFSource(where, split, config)
        ds = open_hf_split(src)
        roles = resolve_columns(ds.column_names, None, src.name, preset.columns)
        if columns is not None and roles != columns:
            raise DataConfigError(f"{src.name}: columns {roles} differ from the other split's")
        columns = roles
        entry[name] = where if split is None else split
        counts[name] = len(ds)
    entry["columns"] = columns
    entry["metric"] = preset.metric
    if preset.prompt_suffix:
        entry["prompt_suffix"] = preset.prompt_suffix
    return entry, counts


def parse_source(spec: str) -> tuple[Preset, str | None, str]:
    """``PRESET[:train|:test]=SOURCE`` -> (preset, role, source); bad specs are one line."""
    key, sep, source = spec.partition("=")
    name, _, role = key.partition(":")
    if not sep or not source or name not in PRESETS or role not in ("", "train", "test"):
        raise DataConfigError(
            f"bad dataset {spec!r}: expected PRESET=SOURCE or PRESET:train|test=SOURCE "
            f"with PRESET one of {', '.join(PRESETS)}"
        )
    return PRESETS[name], role or None, source


def write_mixture(
    sources: Sequence[str], out: str | os.PathLike[str], *, template: str = "vicuna_v1"
) -> dict[str, Any]:
    """Writes a ready mixture YAML for local datasets in the presets' layouts.

    Args:
        sources: ``PRESET[:train|:test]=SOURCE`` strings (see `parse_source`).
        out: The YAML file to write.
        template: The mixture's prompt template.

    Returns:
        ``{"path": out, "entries": [...], "counts": [{"train": rows, "test": rows}, ...]}``.

    Raises:
        DataConfigError: A bad source spec, an unreadable dataset or a missing column (one
            line); nothing is written then.
    """
    entries, counts = [], []
    for spec in sources:
        preset, role, source = parse_source(spec)
        entry, n = mixture_entry(preset, source, role=role)
        entries.append(entry)
        counts.append(n)
    if not entries:
        raise DataConfigError("no datasets given")
    lines = [f"#   {e['name']}: {c}" for e, c in zip(entries, counts, strict=True)]
    header = "# Written by `llava-mole convert`; rows per split:\n" + "\n".join(lines) + "\n"
    body = yaml.safe_dump(
        {"template": template, "datasets": entries}, sort_keys=False, allow_unicode=True
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + body, encoding="utf-8")
    return {"path": out, "entries": entries, "counts": counts}
