"""The report's *Seed stability* section: each setting's seed spread, and whether a MoLE
setting's spread is larger than mixed LoRA's beyond the variance-ratio interval
(:mod:`.spread`; issue 18's goal "MoLE's seed std <= mixed LoRA's")."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .settings import by_role
from .spread import SpreadRatio, f_quantiles, spread_ratio

if TYPE_CHECKING:
    from .results import SettingScores, StudyResults

__all__ = ["stability_lines"]


def stability_lines(results: StudyResults) -> list[str]:
    """Seed spread per setting, and each MoLE setting's against mixed LoRA's (issue 18)."""
    lines = ["## Seed stability", ""]
    scored = {s: v for s, v in results.scores.items() if len(v.seeds) > 1}
    if not scored:
        return lines + ["- one seed per setting: no spread to compare."]
    domains = results.setup.domains
    lines += [
        "Sample std over seeds of each setting's macro score, and of its most seed-sensitive "
        "domain.",
        "",
        "| setting | seeds | macro std | macro range | largest domain std |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in scored.items():
        macro = s.columns["macro"]
        worst = max(domains, key=lambda d: s.columns[d].std or 0.0)
        lines.append(
            f"| {name} | {len(s.seeds)} | {macro.std:.3f} | {macro.min:.3f}–{macro.max:.3f} "
            f"| {s.columns[worst].std:.3f} ({worst}) |"
        )
    lines += ["", *_per_seed_table(scored)]
    mixed = scored.get(by_role("mixed").name)
    moles = [n for n in scored if n in results.setup.settings and _is_mole(results, n)]
    if mixed is None or not moles:
        return lines
    lines.append("")
    ref = mixed.columns["macro"]
    confidence = results.uncertainty.confidence
    for name in moles:
        macro = scored[name].columns["macro"]
        verdict = "no larger than" if (macro.std or 0.0) <= (ref.std or 0.0) else "larger than"
        lines.append(
            f"- `{name}`: macro seed std {macro.std:.3f}, {verdict} mixed LoRA's ({ref.std:.3f}); "
            + _spread_clause(spread_ratio(macro.scores, ref.scores, confidence))
        )
    return lines + ["", _spread_note(len(scored[moles[0]].seeds), len(mixed.seeds), confidence)]


def _per_seed_table(scored: dict[str, SettingScores]) -> list[str]:
    """Each setting's macro score per seed (what the spread is computed from)."""
    seeds = sorted({seed for s in scored.values() for seed in s.seeds})
    lines = [
        "Macro score per seed:",
        "",
        "| setting | " + " | ".join(f"seed {k}" for k in seeds) + " |",
        "|---|" + "---:|" * len(seeds),
    ]
    for name, s in scored.items():
        by_seed = s.macro_by_seed()  # a seed without every domain's run has no macro score
        cells = [f"{by_seed[k]:.3f}" if k in by_seed else "–" for k in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _spread_note(n_mole: int, n_lora: int, confidence: float) -> str:
    """How the interval is made, and the ratio the study's seeds can resolve."""
    _, high = f_quantiles(n_mole - 1, n_lora - 1, confidence)
    return (
        "The ratio's interval is the F interval of a ratio of variances (normal seed scores; a "
        "failed seed makes them bimodal, and the interval then only a guide): with "
        f"{n_mole} + {n_lora} seeds a std ratio must exceed {math.sqrt(high):.1f} to be resolved "
        f"at {confidence:.0%}."
    )


def _spread_clause(spread: SpreadRatio) -> str:
    """``ratio r, 95% interval [a, b]: resolved / not resolved ...`` for one MoLE setting."""
    if spread.ratio is None:
        return "mixed LoRA's spread is 0, so no ratio."
    level = f"{spread.confidence:.0%}"
    head = f"std ratio {spread.ratio:.2f}, {level} interval [{spread.low:.2f}, {spread.high:.2f}]"
    seeds = " + ".join(str(n) for n in spread.seeds)
    if spread.verdict == "larger":
        return f"{head}: larger beyond the interval."
    if spread.verdict == "smaller":
        return f"{head}: smaller beyond the interval."
    more = (
        f"; {spread.seeds_needed} seeds per setting would resolve this ratio"
        if spread.seeds_needed
        else ""
    )
    return f"{head}: not resolved with {seeds} seeds{more}."


def _is_mole(results: StudyResults, setting: str) -> bool:
    adapter = results.setup.settings[setting].adapter or {}
    return adapter.get("type") == "mole"
