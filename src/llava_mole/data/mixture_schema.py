"""The mixture YAML as :mod:`llava_mole.schema` sections: every key's type, range and default.

```yaml
seed: 0                      # MixtureSettings: the top-level keys
template: vicuna_v1
max_length: 2048
datasets:                    # DatasetEntry: one entry as written
  - {domain: science, train: a.json, test: a.json, take: 1000, select: random}
  - {domain: docs, hf: lmms-lab/DocVQA, hf_config: DocVQA, test: validation, preset: docvqa}
```

:class:`MixtureSettings` holds the top-level settings; they are also the attributes of
:class:`~llava_mole.data.mixture.MixtureConfig` (which inherits them). :class:`DatasetEntry` is
one ``datasets`` entry as written (paths not yet resolved; ``train``/``test`` are split names
of an ``hf`` entry); :class:`MixtureFile` is the whole file. :func:`check_rules` holds the
rules across keys; the one rule that looks at the files (``prompt_suffix``) is applied where
the paths are resolved (:func:`llava_mole.data.mixture.load_mixture`). :func:`read_mixture_yaml`
reads the file (``mixture file not found: ...``, ``invalid YAML at line N: ...``).

Problems are :class:`~llava_mole.schema.SchemaError`\\ s, one line naming the dotted key::

    datasets[1].take: expected 'all', an integer >= 1 or a fraction in (0, 1] (got -3)
    datasets[0].tkae: unknown key (did you mean 'take'?)
    max_length: must be >= 1 (got 0)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import BeforeValidator, PlainValidator, PrivateAttr, model_validator
from pydantic_core import PydanticCustomError

from ..eval.metrics import ALL_METRICS
from ..paths import not_found_or
from ..schema import SCHEMA_CONFIG, Bool, Int, Schema, SchemaError, Str, at_least, section
from .convert import PRESETS
from .formats import DataConfigError
from .hf import COLUMN_ROLES
from .images import IMAGE_MODES
from .selection import Take
from .templates import TEMPLATES

__all__ = [
    "SELECT_MODES",
    "SPLITS",
    "Columns",
    "DatasetEntry",
    "MixtureFile",
    "MixtureSettings",
    "SETTINGS",
    "check_rules",
    "read_mixture_yaml",
]

SPLITS: tuple[str, ...] = ("train", "test")
SELECT_MODES: tuple[str, ...] = ("first", "random")
DEFAULT_METRIC = "exact_match"


# ---- value types ---------------------------------------------------------------------------


def _take(value: Any) -> Take:
    """``"all"``, a count >= 1 or a fraction in (0, 1] (a bool or a numeric string is none)."""
    if isinstance(value, str) and value == "all":
        return "all"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, float) and 0.0 < value <= 1.0:
        return value
    raise PydanticCustomError("take", "expected 'all', an integer >= 1 or a fraction in (0, 1]")


def _text(value: Any) -> str:
    if isinstance(value, str) and value.strip():
        return value
    raise PydanticCustomError("text", "expected a non-empty string")


def _system_prompt(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise PydanticCustomError("system", "expected a string ('' for none)")


def _non_empty_list(value: Any) -> Any:
    if not isinstance(value, list) or not value:
        raise PydanticCustomError("datasets", "expected a non-empty list")
    return value


def _role_mapping(value: Any) -> Any:
    if value is not None and (not isinstance(value, dict) or not value):
        raise PydanticCustomError("columns", "expected a mapping of role: column")
    return value


TakeValue = Annotated[Take, PlainValidator(_take)]
"""How much of a split to use: ``all``, a count >= 1 or a fraction in (0, 1]."""
Text = Annotated[str, PlainValidator(_text)]
"""A non-empty string."""
GivenText = Annotated[str | None, PlainValidator(_text)]
"""A non-empty string where the key is given (``null`` too is refused); ``None`` when absent."""
SystemPrompt = Annotated[str | None, PlainValidator(_system_prompt)]
"""A string (``''``: no system prompt) where given; ``None`` when absent (LLaVA-1.5's)."""


# ---- sections ------------------------------------------------------------------------------


@dataclass
class MixtureSettings:
    """The top-level settings of a mixture (every key but ``datasets``).

    Attributes:
        seed: Seed of random selection.
        template: Prompt template (``vicuna_v1`` or ``chat_template``).
        system: System prompt of ``vicuna_v1``; None: LLaVA-1.5's ("A chat between a curious
            user..."), ``""``: none (e.g. for a model never trained with one).
        max_length: Truncation length in tokens.
        image_mode: ``pad`` or ``resize``.
        strict: Raise on any bad sample instead of skipping it.
    """

    __pydantic_config__ = SCHEMA_CONFIG

    seed: Int = 0
    template: Literal[TEMPLATES] = "vicuna_v1"  # type: ignore[valid-type]
    system: SystemPrompt = None
    max_length: Annotated[Int, at_least(1)] = 2048
    image_mode: Literal[IMAGE_MODES] = "pad"  # type: ignore[valid-type]
    strict: Bool = False


SETTINGS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MixtureSettings))
"""The top-level keys besides ``datasets``."""


class _OrderedColumns(Schema):
    """Remembers the order the roles were written in (the first missing column is named)."""

    _order: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _remember_order(cls, data: Any, handler: Any) -> Any:
        columns = handler(data)
        if isinstance(data, dict):
            columns._order = tuple(data)
        return columns

    def mapping(self) -> dict[str, str | None]:
        """Role -> column (None: leave the role out), as written."""
        return {role: getattr(self, role) for role in self._order}


Columns: type[_OrderedColumns] = pydantic.create_model(  # type: ignore[call-overload]
    "Columns",
    __base__=_OrderedColumns,
    __doc__="A ``columns`` mapping: one optional key per role of `llava_mole.data.hf.COLUMN_ROLES`.",
    **{role: (Text | None, None) for role in COLUMN_ROLES},
)


class DatasetEntry(Schema):
    """One ``datasets`` entry as written (see :class:`~llava_mole.data.mixture.DatasetSpec`).

    Attributes:
        domain: Domain tag of all its samples (required).
        hf: A Hugging Face source: a local ``save_to_disk`` folder / file, or a cached dataset
            name; ``train``/``test`` then name its splits.
        hf_config: Config name of a cached Hub dataset (``hf`` entries only).
        columns: Column of each role, or None to leave a role out.
        preset: A `llava_mole.data.convert.PRESETS` name (columns, metric, prompt suffix).
        prompt_suffix: Line appended to every question (``null``/``''``: none, not the preset's).
        train: Train-split file (or split name of ``hf``).
        test: Test-split file (or split name of ``hf``).
        image_folder: Image folder (absent: each split file's own folder).
        name: Display name (absent: ``hf``, else ``train``, else ``test`` as written).
        take: How much of the train split to use.
        select: ``first`` or ``random``.
        repeat: Upsampling factor of the train split.
        test_take: How much of the test split to use.
        metric: A `llava_mole.eval.metrics.ALL_METRICS` name (absent: the preset's, else
            ``exact_match``).
    """

    domain: Text
    hf: GivenText = None
    hf_config: GivenText = None
    columns: Annotated[Columns | None, BeforeValidator(_role_mapping)] = None  # type: ignore[valid-type]
    preset: Literal[tuple(PRESETS)] | None = None  # type: ignore[valid-type]
    prompt_suffix: Str | None = None
    train: Text | None = None
    test: Text | None = None
    image_folder: Text | None = None
    name: GivenText = None
    take: TakeValue = "all"
    select: Literal[SELECT_MODES] = "first"  # type: ignore[valid-type]
    repeat: Annotated[Int, at_least(1)] = 1
    test_take: TakeValue = "all"
    metric: Literal[tuple(ALL_METRICS)] = DEFAULT_METRIC  # type: ignore[valid-type]

    def given(self, key: str) -> bool:
        """Whether the entry names ``key`` (even as ``null``)."""
        return key in self.model_fields_set

    def display_name(self) -> str:
        """``name``, else ``hf``, else ``train``, else ``test`` (as written)."""
        return self.name or self.hf or self.train or self.test or ""

    def metric_name(self) -> str:
        """``metric``, else the preset's, else ``exact_match``."""
        if self.given("metric") or self.preset is None:
            return self.metric
        return PRESETS[self.preset].metric

    def question_suffix(self) -> str | None:
        """``prompt_suffix`` where given, else the preset's; ``''`` is None."""
        if self.given("prompt_suffix"):
            return self.prompt_suffix or None
        return (PRESETS[self.preset].prompt_suffix if self.preset else None) or None

    def column_mapping(self) -> dict[str, str | None] | None:
        """``columns`` as a plain mapping, in the order written."""
        return None if self.columns is None else self.columns.mapping()


@section
class MixtureFile(MixtureSettings):
    """A whole mixture file: :class:`MixtureSettings` and a non-empty ``datasets`` list."""

    datasets: Annotated[list[DatasetEntry], BeforeValidator(_non_empty_list)] = dataclasses.field(
        kw_only=True
    )


# ---- the file ------------------------------------------------------------------------------


def read_mixture_yaml(path: Path) -> dict[str, Any]:
    """The file's top-level mapping; one-line `DataConfigError` if unreadable or not YAML."""
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
    return data


# ---- rules across keys ---------------------------------------------------------------------


def check_rules(mixture: MixtureFile) -> None:
    """The rules that tie keys together (each key's own type and range are checked already).

    Raises:
        SchemaError: ``system`` without ``vicuna_v1``; an entry with neither split, or an
            ``hf_config`` without ``hf``; two metrics for one domain.
    """
    if mixture.system is not None and mixture.template != "vicuna_v1":
        raise SchemaError("system: only the vicuna_v1 template takes a system prompt")
    metric_of: dict[str, str] = {}
    for i, entry in enumerate(mixture.datasets):
        where = f"datasets[{i}]"
        if entry.hf_config is not None and entry.hf is None:
            raise SchemaError(f"{where}.hf_config: only an 'hf' entry takes a config name")
        if entry.train is None and entry.test is None:
            what = "split name" if entry.hf is not None else "file"
            raise SchemaError(f"{where}: needs a 'train' and/or a 'test' {what}")
        metric = entry.metric_name()
        if metric_of.setdefault(entry.domain, metric) != metric:
            raise SchemaError(
                f"{where}.metric: domain {entry.domain!r} already uses metric "
                f"{metric_of[entry.domain]!r} (got {metric!r})"
            )
