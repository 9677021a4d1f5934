"""The study's results as typed objects; :meth:`StudyResults.to_json` is ``results.json``.

``results.json`` keeps the shape it had before these types existed (plots and external tools
read it); every object here converts itself with ``to_json()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .stats import ConvergenceFlag, ScoreSummary

__all__ = [
    "MACRO",
    "DerivedColumn",
    "Difference",
    "DomainItems",
    "RunOutput",
    "RunResult",
    "SettingScores",
    "SettingSetup",
    "StudyResults",
    "StudySetup",
    "Uncertainty",
]

MACRO = "macro"
"""The column of the mean over domains."""


@dataclass(frozen=True)
class DomainItems:
    """Per-item scores of one run on one domain, aligned by item id."""

    ids: list[str]
    scores: list[float]


@dataclass
class RunOutput:
    """One finished run as read from its folder (input of :func:`~.assemble.build_results`).

    Args:
        id: ``<setting>[/<domain>]/seed<k>``.
        setting: the setting's name.
        base: the built-in setting it derives from.
        domain: the domain of a per-domain run, else None.
        seed: the run's seed.
        run_dir: the run's folder.
        adapter: ``{"type", "rank", "mlp_rank", "alpha", "num_experts"}``.
        max_steps: planned optimizer steps.
        batch_size: samples per optimizer step.
        summary: the run's ``summary.json``.
        eval: the run's ``eval.json``.
        items: per-item scores by domain (``item_scores.json``), None where not recorded.
    """

    id: str
    setting: str
    base: str
    domain: str | None
    seed: int
    run_dir: str
    adapter: dict[str, Any]
    max_steps: int
    batch_size: int | None
    summary: dict[str, Any]
    eval: dict[str, Any]
    items: dict[str, DomainItems] | None = None


@dataclass(frozen=True)
class Difference:
    """``a - b`` of two settings on one column.

    Args:
        mean: difference of the seed means.
        spread: combined seed spread ``sqrt(std_a² + std_b²)`` (shown for reference).
        low: lower end of the bootstrap percentile interval (None: no replicates).
        high: upper end.
    """

    mean: float
    spread: float
    low: float | None = None
    high: float | None = None

    def to_json(self) -> dict[str, Any]:
        """``{"mean", "spread", "ci": [low, high] or None}``."""
        ci = None if self.low is None else [self.low, self.high]
        return {"mean": self.mean, "spread": self.spread, "ci": ci}


@dataclass(frozen=True)
class DerivedColumn:
    """Every difference the verdict uses on one column, and MoLE's recovered share.

    Args:
        contrasts: ``{contrast key: difference or None}`` (see :data:`~.rules.CONTRASTS`).
        recovered: ``mole_gain / drop`` when the drop is positive.
        recovered_ci: its percentile interval over the replicates with a positive drop.
        extra_vs_mix_lora: each extra setting minus the mixed baseline.
    """

    contrasts: dict[str, Difference | None]
    recovered: float | None
    recovered_ci: tuple[float, float] | None
    extra_vs_mix_lora: dict[str, Difference | None]

    def to_json(self) -> dict[str, Any]:
        """The contrasts by key, then ``recovered``, ``recovered_ci``, ``extra_vs_mix_lora``."""
        out: dict[str, Any] = {k: _json(v) for k, v in self.contrasts.items()}
        out["recovered"] = self.recovered
        out["recovered_ci"] = None if self.recovered_ci is None else list(self.recovered_ci)
        out["extra_vs_mix_lora"] = {k: _json(v) for k, v in self.extra_vs_mix_lora.items()}
        return out


@dataclass
class SettingScores:
    """One setting's :class:`ScoreSummary` per column (domains and macro), over ``seeds``.

    ``macro_seeds`` are the seeds with a score on every domain, the macro column's seeds (empty:
    all of ``seeds``).
    """

    columns: dict[str, ScoreSummary]
    seeds: list[int]
    macro_seeds: list[int] = field(default_factory=list)

    def macro_by_seed(self) -> dict[int, float]:
        """``{seed: macro score}`` for the seeds that have one."""
        seeds = self.macro_seeds or self.seeds
        scores = self.columns[MACRO].scores
        return dict(zip(seeds, scores, strict=True)) if len(seeds) == len(scores) else {}

    def to_json(self) -> dict[str, Any]:
        """``{column: summary, ..., "seeds": [...], "macro_seeds": [...]}``."""
        out: dict[str, Any] = {c: s.to_json() for c, s in self.columns.items()}
        out["seeds"] = list(self.seeds)
        out["macro_seeds"] = list(self.macro_seeds or self.seeds)
        return out


@dataclass
class RunResult:
    """What the report shows of one run (``results.json["runs"]``)."""

    id: str
    setting: str
    base: str
    domain: str | None
    seed: int
    run_dir: str
    adapter: dict[str, Any]
    max_steps: int
    steps: int | None
    batch_size: int | None
    loss_curve: list[list[float]]
    final_loss: float | None
    convergence: ConvergenceFlag
    wall_time_s: float | None
    tokens_per_s: float | None
    trainable_parameters: int | None
    scores: dict[str, float]
    eval_n: dict[str, int]
    eval_wall_time_s: float | None
    warnings: list[str] = field(default_factory=list)
    dev_curve: list[list[float]] = field(default_factory=list)
    missing_answers: dict[str, str] = field(default_factory=dict)
    """Each of ``warnings`` that is a missing answer -> the finding without its shares (the
    same line in every run that misses that answer; see ``eval.collapse.MissingAnswer``)."""

    @property
    def converged(self) -> bool | None:
        """The convergence flag's verdict (None: not judged)."""
        return self.convergence.converged

    def to_json(self) -> dict[str, Any]:
        """The run as in ``results.json`` (``convergence`` and ``converged`` included)."""
        out = dict(self.__dict__)
        out["convergence"] = self.convergence.to_json()
        keys = list(out)
        keys.insert(keys.index("convergence") + 1, "converged")
        out["converged"] = self.converged
        return {k: out[k] for k in keys}


@dataclass
class SettingSetup:
    """How one setting was trained (the report's setup table).

    ``train_samples`` is the number of distinct training samples of one run (summed over its
    domains), ``epochs`` = ``max_steps * batch_size / train_samples``.
    """

    base: str
    adapter: dict[str, Any]
    max_steps: int
    batch_size: int | None
    trainable_parameters: int | None
    runs: int
    mean_wall_time_s: float | None
    mean_tokens_per_s: float | None
    train_samples: int | None = None
    epochs: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The fields as a mapping."""
        return dict(self.__dict__)


@dataclass
class StudySetup:
    """The study's shared setup (the report's setup section)."""

    model: str
    mixture: str
    domains: list[str]
    seeds: list[int]
    single_steps: str
    learning_rate: float | None
    max_steps: int | None
    router_dense_warmup: float
    rank: int
    alpha: float
    num_experts: int
    eval: dict[str, Any]
    convergence: dict[str, float]
    settings: dict[str, SettingSetup]

    def to_json(self) -> dict[str, Any]:
        """The fields as a mapping (settings converted)."""
        out = dict(self.__dict__)
        out["settings"] = {k: v.to_json() for k, v in self.settings.items()}
        return out


@dataclass(frozen=True)
class Uncertainty:
    """How the intervals were computed.

    Args:
        samples: bootstrap replicates.
        confidence: interval coverage.
        seed: resampling seed.
        items: test items resampled per domain (0: per-item scores missing on that domain, so
            only seeds were resampled there).
    """

    samples: int
    confidence: float
    seed: int
    items: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        """The fields as a mapping."""
        return dict(self.__dict__)


@dataclass
class StudyResults:
    """Everything the report shows; ``to_json()`` is ``results.json``."""

    study: dict[str, Any]
    setup: StudySetup
    domains: list[str]
    settings: list[str]
    scores: dict[str, SettingScores]
    derived: dict[str, DerivedColumn]
    uncertainty: Uncertainty
    runs: list[RunResult]
    routing: dict[str, dict[str, Any] | None]
    verdict: Any  # verdict.Verdict (typed there; not imported here to keep layers one-way)
    table: str = ""
    plots: dict[str, str] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        """The domains, then the macro average."""
        return [*self.domains, MACRO]

    @property
    def still_improving(self) -> list[str]:
        """Ids of runs flagged as still improving at the end."""
        return [r.id for r in self.runs if r.converged is False]

    @property
    def not_judged(self) -> list[str]:
        """Ids of runs with too few loss points for the flag."""
        return [r.id for r in self.runs if r.converged is None]

    def to_json(self) -> dict[str, Any]:
        """``results.json``: the shape of earlier versions, plus ``uncertainty`` and intervals."""
        out: dict[str, Any] = {
            "study": self.study,
            "setup": self.setup.to_json(),
            "domains": list(self.domains),
            "settings": list(self.settings),
            "scores": {s: v.to_json() for s, v in self.scores.items()},
            "derived": {c: d.to_json() for c, d in self.derived.items()},
            "uncertainty": self.uncertainty.to_json(),
            "runs": [r.to_json() for r in self.runs],
            "still_improving": self.still_improving,
            "not_judged": self.not_judged,
            "routing": self.routing,
            "verdict": self.verdict.to_json(),
            "table": self.table,
        }
        if self.plots:
            out["plots"] = dict(self.plots)
        return out


def _json(value: Difference | None) -> dict[str, Any] | None:
    return None if value is None else value.to_json()
