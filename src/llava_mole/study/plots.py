"""PNG figures of a data-conflict study, drawn from ``results.json`` alone.

``scores.png`` (per-domain scores by setting), ``loss_curves.png`` (training loss of every
setting) and ``routing.png`` (the paper's routing figure: expert load per layer and domain,
separately for image and text tokens). Figures are drawn on matplotlib's Agg canvas without
pyplot, so nothing global changes and no display is needed.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .settings import by_role

__all__ = ["loss_limits", "plot_all", "plot_loss_curves", "plot_routing", "plot_scores"]

_COLOURS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3"]
_STYLES = ["-", "--", ":", "-."]


def _figure(width: float, height: float) -> Figure:
    # Constrained layout keeps titles, outside legends and rotated tick labels from overlapping.
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, bbox_inches="tight")
    return path


def plot_scores(results: dict[str, Any], path: str | Path) -> Path:
    """Grouped bars of mean score per domain (and macro) per setting; std error bars, seed dots.

    Args:
        results: the study results (``scores``, ``domains``, ``settings``).
        path: the PNG to write.

    Returns:
        ``path``.
    """
    columns = results["domains"] + ["macro"]
    settings = results["settings"]
    fig = _figure(max(6.0, 1.6 * len(columns) * max(1, len(settings)) / 3), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(settings))
    for i, setting in enumerate(settings):
        colour = _COLOURS[i % len(_COLOURS)]
        labelled = False
        for j, col in enumerate(columns):
            stat = results["scores"][setting][col]
            if stat["mean"] is None:
                continue
            x = j - 0.4 + width * (i + 0.5)
            ax.bar(
                x,
                stat["mean"],
                width,
                yerr=stat["std"],
                color=colour,
                alpha=0.8,
                capsize=3,
                label=None if labelled else setting,
            )
            labelled = True
            seeds = stat["scores"]
            offsets = [(k - (len(seeds) - 1) / 2) * width * 0.15 for k in range(len(seeds))]
            ax.scatter([x + o for o in offsets], seeds, s=10, color="black", zorder=3, linewidths=0)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylabel("score")
    ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
    ax.set_title("Scores by setting (bars: mean ± std over seeds; dots: seeds)")
    fig.legend(loc="outside lower center", fontsize=8, ncols=min(5, max(1, len(settings))))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, Path(path))


def _mean_curve(curves: list[list[list[float]]]) -> tuple[list[float], list[float]]:
    """Mean loss over seeds at the steps every curve logged."""
    common = set.intersection(*({p[0] for p in c} for c in curves)) if curves else set()
    steps = sorted(common)
    lookup = [{p[0]: p[1] for p in c} for c in curves]
    return steps, [statistics.fmean(d[s] for d in lookup) for s in steps]


def loss_limits(
    curves: list[list[list[float]]], skip: float = 0.1, low: float = 2, high: float = 98
) -> tuple[float, float] | None:
    """Robust y limits for loss curves: the ``low``-``high`` percentile range, padded by 10%.

    The first ``skip`` share of each curve's logged points (at least its first point) is left
    out: the loss right after initialisation can be several times the rest of the curve and
    would squash the range where the settings differ.

    Args:
        curves: ``[[step, loss], ...]`` per run.
        skip: share of each curve's first points left out.
        low: lower percentile.
        high: upper percentile.

    Returns:
        ``(bottom, top)``, or None without points.
    """
    values = []
    for curve in curves:
        losses = [p[1] for p in curve if p[1] is not None]
        start = max(1, int(skip * len(losses))) if len(losses) > 1 else 0
        values += losses[start:]
    if not values:
        return None
    bottom, top = np.percentile(values, [low, high])
    pad = 0.1 * (top - bottom) or 0.05 * abs(top) or 0.05
    return float(bottom - pad), float(top + pad)


def _draw_curves(ax: Any, results: dict[str, Any], key: str) -> bool:
    """Each setting's ``run[key]`` curves: mean over seeds (bold), each seed (thin).

    Single-domain runs are drawn per domain (one line style per domain). Returns whether
    anything was drawn.
    """
    drawn = False
    for i, setting in enumerate(results["settings"]):
        colour = _COLOURS[i % len(_COLOURS)]
        runs = [r for r in results["runs"] if r["setting"] == setting]
        groups: dict[str | None, list[list[list[float]]]] = {}
        for run in runs:
            if run.get(key):
                groups.setdefault(run["domain"], []).append(run[key])
        for g, (domain, curves) in enumerate(groups.items()):
            style = _STYLES[g % len(_STYLES)] if domain is not None else "-"
            for curve in curves:
                ax.plot(
                    [p[0] for p in curve],
                    [p[1] for p in curve],
                    color=colour,
                    linestyle=style,
                    linewidth=0.6,
                    alpha=0.35,
                )
            steps, mean = _mean_curve(curves)
            label = f"{setting} ({domain})" if domain is not None else setting
            ax.plot(steps, mean, color=colour, linestyle=style, linewidth=2, label=label)
            drawn = True
    return drawn


def _curves_figure(results: dict[str, Any], key: str) -> tuple[Figure, Any, bool]:
    """A figure with every setting's ``run[key]`` curves over the optimizer steps."""
    fig = _figure(8.0, 4.5)
    ax = fig.add_subplot()
    drawn = _draw_curves(ax, results, key)
    ax.set_xlabel("optimizer step")
    return fig, ax, drawn


def _finish_curves(ax: Any, drawn: bool, empty: str) -> None:
    if drawn:
        ax.legend(fontsize=7, ncols=2)
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)


def plot_loss_curves(results: dict[str, Any], path: str | Path) -> Path:
    """Training loss of every setting: mean over seeds (bold), each seed (thin).

    Single-domain runs are drawn per domain (one line style per domain).

    Args:
        results: the study results (``runs``, ``settings``, ``domains``).
        path: the PNG to write.

    Returns:
        ``path``.
    """
    fig, ax, drawn = _curves_figure(results, "loss_curve")
    scale = results.get("study", {}).get("plots", {}).get("loss_scale", "linear")
    if scale == "log":
        ax.set_yscale("log")
    limits = loss_limits([r["loss_curve"] for r in results["runs"] if r["loss_curve"]])
    if limits is not None and scale != "log":
        ax.set_ylim(*limits)
    ax.set_ylabel("training loss" + (" (log scale)" if scale == "log" else ""))
    ax.set_title("Training loss (bold: mean over seeds; thin: seeds)")
    _finish_curves(ax, drawn, "no loss logged")
    return _save(fig, Path(path))


def plot_dev_curves(results: dict[str, Any], path: str | Path) -> Path:
    """Dev score (``train.dev_per_domain`` runs) of every setting over the steps.

    Means over seeds end where the shortest seed stopped; each seed's own curve (thin) ends
    where early stopping ended it.

    Args:
        results: the study results.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    fig, ax, drawn = _curves_figure(results, "dev_curve")
    ax.set_ylabel("dev score (teacher-forced exact match, macro)")
    ax.set_title("Dev score (bold: mean over seeds; thin: seeds, each until it stopped)")
    _finish_curves(ax, drawn, "no dev scores logged")
    return _save(fig, Path(path))


def _stacked_shares(
    ax: Any, entries: dict[str, list[float] | None], domains: list[str], experts: int, legend: bool
) -> None:
    """One stacked bar per domain: the share of its tokens sent to each expert."""
    bottoms = [0.0] * len(domains)
    for k in range(experts):
        heights = [
            entries.get(d)[k] if entries.get(d) is not None else 0.0  # type: ignore[index]
            for d in domains
        ]
        ax.bar(
            range(len(domains)),
            heights,
            bottom=bottoms,
            color=_COLOURS[k % len(_COLOURS)],
            label=f"expert {k}" if legend else None,
            width=0.7,
        )
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for x, d in enumerate(domains):
        if entries.get(d) is None:
            ax.text(x, 0.5, "n/a", ha="center", va="center", fontsize=7, rotation=90)


def plot_routing(results: dict[str, Any], path: str | Path, setting: str | None = None) -> Path:
    """The routing figure: rows = token kind (image, text, and answer positions when recorded),
    columns = layers (MoLE blocks).

    Each panel has one stacked bar per domain: the share of that domain's tokens sent to each
    expert, in one run (the first seed's: expert numbers are arbitrary per run, so shares are
    not averaged over seeds).

    Args:
        results: the study results (``routing``).
        path: the PNG to write.
        setting: the MoLE setting to draw (default: the registry's MoLE setting).

    Returns:
        ``path``.

    Raises:
        KeyError: ``setting`` has no routing picture.
    """
    setting = setting or by_role("method").name
    picture = results["routing"][setting]
    if picture is None:
        raise KeyError(f"{setting}: no routing statistics")
    blocks = sorted({b["block"] for b in picture["blocks"]})
    domains = picture["domains"]
    experts = picture["experts"]
    kinds = ["image", "text"]
    if any(b.get("answer") is not None for b in picture["blocks"]):
        kinds.append("answer")
    fig = _figure(max(6.0, 2.3 * len(blocks)), 2.6 * len(kinds))
    axes = fig.subplots(len(kinds), len(blocks), squeeze=False, sharey=True)
    for row, kind in enumerate(kinds):
        for col, block in enumerate(blocks):
            ax = axes[row][col]
            entries = {b["domain"]: b.get(kind) for b in picture["blocks"] if b["block"] == block}
            _stacked_shares(ax, entries, domains, experts, legend=row == 0 and col == 0)
            ax.set_xticks(range(len(domains)), domains, rotation=30, fontsize=7, ha="right")
            ax.tick_params(axis="x", length=0)
            ax.set_ylim(0, 1)
            if row == 0:
                ax.set_title(f"layer {block}", fontsize=9)
            if col == 0:
                label = "answer positions" if kind == "answer" else f"{kind} tokens"
                ax.set_ylabel(f"{label}\nexpert share")
    fig.suptitle(
        f"Expert load per layer and domain ({setting}, seed {picture.get('shown_seed', 0)})"
    )
    fig.legend(loc="outside lower center", fontsize=8, ncols=min(experts, 6))
    return _save(fig, Path(path))


def plot_all(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Draw every figure the results support into ``out_dir``.

    Args:
        results: the study results.
        out_dir: the study folder.

    Returns:
        ``{"scores": path, "loss_curves": path, "dev_curves": path, "routing": path}``
        (``dev_curves`` only when runs trained to convergence; ``routing`` only when a MoLE
        setting recorded routing; ``mix_mole`` is preferred).
    """
    out = Path(out_dir)
    paths = {
        "scores": plot_scores(results, out / "scores.png"),
        "loss_curves": plot_loss_curves(results, out / "loss_curves.png"),
    }
    if any(run.get("dev_curve") for run in results["runs"]):
        paths["dev_curves"] = plot_dev_curves(results, out / "dev_curves.png")
    candidates = [s for s, p in results["routing"].items() if p is not None]
    if candidates:
        method = by_role("method").name
        setting = method if method in candidates else candidates[0]
        paths["routing"] = plot_routing(results, out / "routing.png", setting)
    return paths
