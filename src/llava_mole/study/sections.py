"""The study YAML's own sections, as schema sections (:mod:`llava_mole.schema`).

Each is a pydantic dataclass: unknown keys are refused with a "did you mean", values are
type-checked strictly (numeric strings accepted for floats) and ranges are field metadata.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

from .. import schema
from . import settings as registry

__all__ = [
    "BootstrapSection",
    "ConvergenceSection",
    "EvalSection",
    "ExtraSetting",
    "PlotsSection",
    "StudyFile",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SETTINGS = registry.SETTINGS


def _setting_name(name: str) -> str:
    """A setting name is also a folder name: letters, digits, ``_ . -``."""
    if not _NAME.match(name):
        raise PydanticCustomError("setting_name", "letters, digits, _ . - only")
    return name


@schema.section
class EvalSection:
    """How every run is evaluated.

    ``null`` (the default of every key but ``split``) takes the evaluation's own default,
    ``llava_mole.eval.settings.EVAL_DEFAULTS``: one place for them.

    Args:
        split: mixture split to evaluate on (``test`` or ``train``).
        batch_size: samples per generation batch.
        max_new_tokens: maximum answer length in tokens.
        limit: at most this many samples per domain (``None``: all).
    """

    split: Literal["test", "train"] = "test"
    batch_size: Annotated[schema.Int | None, schema.at_least(1)] = None
    max_new_tokens: Annotated[schema.Int | None, schema.at_least(1)] = None
    limit: Annotated[schema.Int | None, schema.at_least(1)] = None


@schema.section
class ConvergenceSection:
    """When a run counts as still improving at the end.

    Args:
        tail: share of the logged steps forming the final window, in (0, 0.5].
        tolerance: a run is flagged when the mean loss of the final window is more than this
            (relative) below the mean of the equal-length window just before it.
    """

    tail: Annotated[schema.Float, schema.between(0, 0.5, low_open=True)] = 0.2
    tolerance: Annotated[schema.Float, schema.at_least(0)] = 0.02


@schema.section
class BootstrapSection:
    """The paired bootstrap behind every confidence interval (see :mod:`.stats`).

    Args:
        samples: bootstrap replicates ``B``.
        confidence: coverage of the percentile intervals (0.95: the 2.5th-97.5th percentiles).
        seed: seed of the resampling (the same seed gives the same intervals).
    """

    samples: Annotated[schema.Int, schema.at_least(100)] = 2000
    confidence: Annotated[schema.Float, schema.between(0.5, 1, high_open=True)] = 0.95
    seed: schema.Int = 0


@schema.section
class ExtraSetting:
    """A further configuration: a built-in setting with changed adapter/train keys.

    The changes are applied to the study's shared sections first and the base setting's rule
    after, so ``{base: mix_lora_2x, train: {max_steps: 600}}`` trains 1200 steps and
    ``{base: mix_lora_rank_kr, adapter: {num_experts: 4}}`` uses MLP rank 4r.

    Args:
        name: the setting's name in tables, plots and run folders.
        base: a built-in setting (:data:`llava_mole.study.settings.SETTINGS`).
        adapter: changed ``adapter`` keys.
        train: changed ``train`` keys.
    """

    name: Annotated[schema.Str, AfterValidator(_setting_name)]
    base: Literal[registry.SETTINGS]  # type: ignore[valid-type]
    adapter: dict[str, Any] | None = None
    train: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.adapter = dict(self.adapter or {})
        self.train = dict(self.train or {})


@schema.section
class PlotsSection:
    """How the figures are drawn.

    Args:
        loss_scale: y axis of ``loss_curves.png``: ``linear`` (limits from the 2nd-98th
            percentile of the losses after each run's first 10% of logged steps) or ``log``.
    """

    loss_scale: Literal["linear", "log"] = "linear"


@schema.section
class StudyFile:
    """The study YAML as written (see :func:`load_study`); checked further there."""

    model: schema.Str
    mixture: schema.Str
    seeds: list[schema.Int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    adapter: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    # None: ``same_steps`` when the runs train to convergence (``train.dev_per_domain``: the
    # budget is then only a cap, the same for every run), else ``equal_exposure``.
    single_steps: Literal["equal_exposure", "same_steps"] | None = None
    settings: list[schema.Str] = dataclasses.field(default_factory=lambda: list(SETTINGS))
    extra_settings: list[ExtraSetting] | None = None
    eval: EvalSection | None = None
    convergence: ConvergenceSection | None = None
    bootstrap: BootstrapSection | None = None
    plots: PlotsSection | None = None
    workers: Annotated[schema.Int, schema.at_least(1)] = 1
    threads: Annotated[schema.Int | None, schema.at_least(1)] = None
