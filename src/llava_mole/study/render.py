"""``report.md`` and the main table, rendered from :class:`~llava_mole.study.results.StudyResults`.

Pure text; the figures are drawn by :mod:`llava_mole.study.plots` from ``results.json``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .results import Difference
from .rules import CONTRAST, CONTRASTS
from .settings import by_role
from .stability import stability_lines

if TYPE_CHECKING:
    from .results import StudyResults
    from .stats import ScoreSummary

__all__ = ["render_report", "render_table"]


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cell(stat: ScoreSummary | None) -> str:
    if stat is None or stat.mean is None:
        return "–"
    return f"{stat.mean:.3f} ± {stat.std:.3f}"


def _diff_cell(diff: Difference | None) -> str:
    return "–" if diff is None else f"{diff.mean:+.3f} ± {diff.spread:.3f}"


def _ci_cell(diff: Difference | None) -> str:
    if diff is None:
        return "–"
    if diff.low is None:
        return f"{diff.mean:+.3f}"
    return f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]"


def render_table(results: StudyResults) -> str:
    """The main table: rows = settings, columns = domains + macro, cells ``mean ± std``."""
    columns = results.columns
    lines = [
        "| setting | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for setting in results.settings:
        cells = [_cell(results.scores[setting].columns.get(c)) for c in columns]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _derived_table(results: StudyResults) -> str:
    c = CONTRAST
    header = (
        f"| | drop = {c['drop'].formula} | MoLE gain = {c['mole_gain'].formula} | recovered "
        f"| {c['x2_vs_single'].formula} | rank-K·r − {by_role('method').name} |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for col in results.columns:
        d = results.derived[col]
        c = d.contrasts
        recovered = "–" if d.recovered is None else f"{100 * d.recovered:.0f}%"
        lines.append(
            f"| {col} | {_diff_cell(c['drop'])} | {_diff_cell(c['mole_gain'])} | {recovered} "
            f"| {_diff_cell(c['x2_vs_single'])} | {_diff_cell(c['rank_kr_vs_mole'])} |"
        )
    return "\n".join(lines)


def _interval_table(results: StudyResults) -> list[str]:
    """Every contrast the verdict reads, with its bootstrap interval, and the recovered share."""
    u = results.uncertainty
    level = f"{100 * u.confidence:g}%"
    with_items = [f"{d} {n}" for d, n in u.items.items() if n]
    without = [d for d, n in u.items.items() if not n]
    resampled = (
        f"test items resampled within each domain ({', '.join(with_items)}), the same draw for "
        "every setting; "
        if with_items
        else ""
    )
    if without:
        resampled += f"only seeds on {', '.join(without)} (no per-item scores recorded); "
    out = [
        f"Mean difference [{level} paired-bootstrap percentile interval] ({u.samples} "
        f"replicates, seed {u.seed}: {resampled}seeds resampled per setting).",
        "",
        "| | " + " | ".join(f"{c.formula}" for c in CONTRASTS) + " | recovered |",
        "|---|" + "---:|" * (len(CONTRASTS) + 1),
    ]
    for col in results.columns:
        d = results.derived[col]
        rec = "–" if d.recovered is None else f"{100 * d.recovered:.0f}%"
        if d.recovered is not None and d.recovered_ci is not None:
            low, high = d.recovered_ci
            rec += f" [{100 * low:.0f}%, {100 * high:.0f}%]"
        cells = [_ci_cell(d.contrasts.get(c.key)) for c in CONTRASTS]
        out.append(f"| {col} | " + " | ".join(cells) + f" | {rec} |")
    return out


def _setup_table(results: StudyResults) -> str:
    lines = [
        "| setting | adapter | steps | batch | epochs | trainable params | runs | s/run "
        "| tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in results.setup.settings.items():
        a = s.adapter
        mlp_rank = a.get("mlp_rank")
        mlp = f", MLP r={mlp_rank}" if mlp_rank not in (None, a["rank"]) else ""
        kind = (
            f"MoLE K={a['num_experts']} r={a['rank']} α={a['alpha']:g}"
            if a["type"] == "mole"
            else f"LoRA r={a['rank']}{mlp} α={a['alpha']:g}"
        )
        params = "–" if s.trainable_parameters is None else f"{s.trainable_parameters:,}"
        wall = "–" if s.mean_wall_time_s is None else f"{s.mean_wall_time_s:.1f}"
        speed = "–" if s.mean_tokens_per_s is None else f"{s.mean_tokens_per_s:.0f}"
        lines.append(
            f"| {name} | {kind} | {s.max_steps} | {s.batch_size} | {_fmt(s.epochs, 1)} "
            f"| {params} | {s.runs} "
            f"| {wall} | {speed} |"
        )
    return "\n".join(lines)


def _steps_control_line(results: StudyResults) -> list[str]:
    """What the 2x control doubles: the distinct samples seen, or only the steps."""
    mixed, steps = (results.setup.settings.get(by_role(r).name) for r in ("mixed", "steps_control"))
    if mixed is None or steps is None or not mixed.train_samples or mixed.epochs is None:
        return []
    name, base = by_role("steps_control").name, by_role("mixed").name
    n, n2 = mixed.train_samples, steps.train_samples or mixed.train_samples
    if n2 > n:
        return [
            f"- `{name}` is a **2× samples** control: twice the steps of `{base}` over "
            f"{n2:,} distinct training samples instead of {n:,} ({n2 / n:.2f}×; the study "
            "mixture's train `take`, doubled).",
            "",
        ]
    if mixed.epochs >= 1:
        return [
            f"- `{name}` is a **2× steps** control: twice the steps of `{base}` over the same "
            f"{n:,} training samples ({2 * mixed.epochs:.1f} instead of {mixed.epochs:.1f} "
            "epochs), not twice the data (the mixture takes all its files have: give its "
            "datasets a smaller `take` for a 2× samples control).",
            "",
        ]
    ratio = min(2 * mixed.epochs, 1.0) / mixed.epochs
    return [
        f"- `{name}` sees {ratio:.2f}× the distinct training samples of `{base}` ({n:,} "
        f"available, {mixed.epochs:.2f} epochs in `{base}`): a 2× samples control.",
        "",
    ]


def _routing_recipe(dense_warmup: float) -> str:
    """The setup line that says how MoLE's routers were trained."""
    if not dense_warmup:
        return "- MoLE routing: top-1 from the first step (the paper's recipe)"
    return (
        f"- MoLE routing: dense (every expert, weighted by its router probability) for the first "
        f"{dense_warmup:.0%} of the steps, then top-1 (`train.router_dense_warmup = "
        f"{dense_warmup:g}`); plain LoRA has no router"
    )


def _routing_rows(picture: dict, sep: dict) -> list[str]:
    """One table row per token kind of one block."""
    rows = []
    for kind in ("image", "text", "answer"):
        if sep.get(kind) is None and kind == "answer":
            continue  # older results, or no answer positions recorded
        cells = []
        for domain in picture["domains"]:
            entry = next(
                b for b in picture["blocks"] if b["block"] == sep["block"] and b["domain"] == domain
            )
            shares = entry.get(kind)
            if shares is None:
                cells.append("–")
            else:
                top = max(range(len(shares)), key=shares.__getitem__)
                cells.append(f"E{top} {100 * shares[top]:.0f}%")
        rows.append(
            f"| {sep['block']} | {kind} | " + " | ".join(cells) + f" | {_fmt(sep[kind], 2)} |"
        )
    return rows


def _routing_section(results: StudyResults) -> list[str]:
    out = ["## Routing", ""]
    if not results.routing:
        return out + ["No MoLE runs in this study.", ""]
    if "routing.png" in results.plots.values():
        out += ["![routing](routing.png)", ""]
    for setting, picture in results.routing.items():
        if picture is None:
            out += [f"{setting}: no routing statistics recorded.", ""]
            continue
        out += [
            f"**{setting}** ({picture['experts']} experts). Cells: the expert most used by the "
            f"domain's tokens and its share, in the run with seed {picture.get('shown_seed')} "
            "(expert numbers are arbitrary in each run, so shares are not averaged over seeds). "
            "Token kinds: image, text (all text tokens) and answer (the text positions that "
            "predict the reference answer, where the domain-specific mapping is produced). "
            "*Separation*: mean pairwise total-variation distance between the domains' expert "
            "shares (0 = all domains routed alike, 1 = disjoint experts), computed in each run "
            f"and averaged over the {picture['seeds']} seed(s).",
            "",
            "| block | tokens | " + " | ".join(picture["domains"]) + " | separation |",
            "|---|---|" + "---|" * len(picture["domains"]) + "---:|",
        ]
        for sep in picture["separation"]:
            out += _routing_rows(picture, sep)
        out.append("")
    return out


def _setup_lines(results: StudyResults) -> list[str]:
    setup = results.setup
    return [
        "# LLaVA-MoLE data-conflict study",
        "",
        "## Setup",
        "",
        f"- model: `{setup.model}`",
        f"- mixture: `{setup.mixture}`; domains: {', '.join(setup.domains)}",
        f"- seeds: {setup.seeds} (cells are mean ± sample std over seeds)",
        f"- single-domain steps: {setup.single_steps}; learning rate: {setup.learning_rate}",
        f"- shared adapter: rank r = {setup.rank}, alpha = {setup.alpha:g}, experts "
        f"K = {setup.num_experts}; mixture steps: {setup.max_steps}",
        _routing_recipe(setup.router_dense_warmup or 0.0),
        f"- evaluation: {setup.eval['split']} split, limit {setup.eval['limit']} per "
        f"domain, {setup.eval['max_new_tokens']} new tokens",
        "",
        _setup_table(results),
        "",
        *_steps_control_line(results),
    ]


def _verdict_lines(results: StudyResults) -> list[str]:
    verdict = results.verdict
    lines = ["## Verdict", ""] + [f"- {line}" for line in verdict.lines] + ["", "Per domain:", ""]
    for col, judged in verdict.columns.items():
        texts = [j.text for j in judged.values() if j.label not in ("not_run", "not_applicable")]
        lines.append(f"- **{col}**: " + ("; ".join(texts) if texts else "nothing to compare") + ".")
    lines += ["", "Rules applied:", ""]
    return lines + [f"{i}. {rule}" for i, rule in enumerate(verdict.rules, 1)]


def _convergence_lines(results: StudyResults) -> list[str]:
    conv = results.setup.convergence
    lines = [
        "## Convergence",
        "",
        f"A run is *still improving* when its mean loss over the last {100 * conv['tail']:.0f}% "
        f"of logged steps is more than {100 * conv['tolerance']:.1f}% below the mean of the "
        "window before.",
        "",
    ]
    dev = [r for r in results.runs if r.convergence.rule == "dev"]
    if dev:
        lines[4:4] = [
            "Runs trained to convergence (`train.dev_per_domain`) are judged by their dev split "
            "instead: converged when early stopping ended them (a dev plateau first cuts the "
            "learning rate, `train.dev_decays` times, then ends the run; no plateau counts "
            "within the first `train.dev_hold` of the budget), still improving when "
            "they used their whole budget; their final weights are those of the best dev score "
            "(the mean of the last `train.dev_smooth` dev scores).",
            "",
        ]
    still = [r for r in results.runs if r.converged is False]
    for run in still:
        c = run.convergence
        if c.rule == "dev":
            lines.append(
                f"- `{run.id}`: used its budget of {run.max_steps} steps, best dev "
                f"score {c.tail_mean:.3f} at step {c.best_step}"
            )
            continue
        lines.append(
            f"- `{run.id}`: last-window loss {c.tail_mean:.4f}, "
            f"{100 * c.relative_drop:.1f}% below the window before"
        )
    for run in dev:
        if run.converged:
            c = run.convergence
            cuts = ", ".join(str(step) for step in c.lr_cuts)
            lines.append(
                f"- `{run.id}`: converged at step {c.stopped_at} (best dev score "
                f"{c.tail_mean:.3f} at step {c.best_step}"
                + (f"; learning rate cut at step {cuts})" if cuts else ")")
            )
    if not still:
        lines.append("- no judged run was still improving at the end.")
    if results.not_judged:
        lines.append(
            f"- not judged (fewer than 4 logged loss points): {len(results.not_judged)} run(s)"
        )
    if "loss_curves.png" in results.plots.values():
        lines += ["", "![loss curves](loss_curves.png)"]
    if "dev_curves.png" in results.plots.values():
        lines += ["", "![dev curves](dev_curves.png)"]
    return lines


def _warning_lines(results: StudyResults) -> list[str]:
    """Silent failures found in the runs (answer collapse, missing answers, dead experts, router
    collapse). A missing answer that a single-domain run misses too is a limit of the base or
    the data, not of a run: it is listed once, with the runs that miss it."""
    found = [(r, w) for r in results.runs for w in r.warnings]
    lines = ["## Silent failures", ""]
    if not found:
        return lines + [
            "- none found (answer collapse, missing answers, dead or monopolising experts)."
        ]
    shared: dict[str, list[str]] = {}
    for run, warning in found:
        if warning in run.missing_answers:
            shared.setdefault(run.missing_answers[warning], []).append(run.id)
    single = by_role("single").name
    shared = {
        what: ids
        for what, ids in shared.items()
        if any(r.id in ids and r.setting == single for r in results.runs)
    }
    lines += [
        f"- `{run.id}`: {warning}"
        for run, warning in found
        if run.missing_answers.get(warning) not in shared
    ]
    for what, ids in shared.items():
        lines.append(
            f"- {what}, in {len(ids)} run(s), single-domain ones too (a limit of the base or the "
            f"data, not of mixing): " + ", ".join(f"`{i}`" for i in ids)
        )
    return lines


def render_report(results: StudyResults) -> str:
    """``report.md``: setup, main table, differences with intervals, verdict, convergence,
    routing."""
    lines = _setup_lines(results) + ["## Scores", "", results.table, ""]
    if "scores.png" in results.plots.values():
        lines += ["![scores](scores.png)", ""]
    lines += [
        "## Drop and recovery",
        "",
        "Differences of means ± combined spread `sqrt(std_a² + std_b²)`.",
        "",
        _derived_table(results),
        "",
        *_interval_table(results),
        "",
    ]
    lines += _verdict_lines(results) + [""] + stability_lines(results)
    lines += [""] + _convergence_lines(results) + [""] + _warning_lines(results)
    lines += [""] + _routing_section(results)
    return "\n".join(lines).rstrip() + "\n"
