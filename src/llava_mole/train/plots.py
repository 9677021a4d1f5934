"""PNG plots of a training run from its ``logs.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(path: str | Path) -> list[dict]:
    """The training log records that carry a loss (one per logging step)."""
    path = Path(path)
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(record, dict) and "loss" in record:
            # After a crash and resume, steps past the checkpoint are logged again: keep the last.
            by_step[record.get("step", len(by_step))] = record
    return [by_step[step] for step in sorted(by_step)]


def plot_training(log_path: str | Path, out_path: str | Path, title: str = "") -> Path | None:
    """Loss curves (total, LM, per domain) and expert load over training, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    if not records:
        return None
    steps = [r["step"] for r in records]
    loads = sorted(
        {k for r in records for k in r if k.startswith("expert_load/")},
        key=lambda k: int(k.split("/")[1]),
    )
    domains = sorted({k for r in records for k in r if k.startswith("domain_loss/")})
    fig, axes = plt.subplots(1, 2 if loads else 1, figsize=(11 if loads else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, [r["loss"] for r in records], label="total loss", color="black")
    if any("lm_loss" in r for r in records):
        ax.plot(steps, [r.get("lm_loss") for r in records], label="LM loss", linestyle="--")
    for key in domains:
        ax.plot(steps, [r.get(key) for r in records], label=key.split("/", 1)[1], alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.legend(fontsize=8)
    if loads:
        ax = axes[0][1]
        for key in loads:
            ax.plot(steps, [r.get(key) for r in records], label=f"expert {key.split('/')[1]}")
        ax.axhline(1 / len(loads), color="grey", linestyle=":", label="uniform")
        ax.set_xlabel("step")
        ax.set_ylabel("share of tokens")
        ax.set_title("expert load (mean over MoLE blocks)")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
