"""Which runs an output folder holds, and what an invocation does with it.

A folder is *fresh*, holds an interrupted run to *resume* (from its newest intact checkpoint),
a run whose last checkpoint is the end of its schedule to *finalize*, or a *complete* run
(final adapter + ``summary.json``) that is left unchanged. A folder whose ``run_config.yaml``
differs from the config asked for holds another run and is refused, except for the settings in
:data:`RESUME_FREE_KEYS` and a larger explicit ``train.max_steps``, which continues a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..adapters.io import WEIGHTS_NAME
from .checkpoints import checkpoint_problem, latest_checkpoint, pick_checkpoint, read_trainer_state
from .config import ConfigError, TrainConfig

RUN_CONFIG = "run_config.yaml"
SUMMARY = "summary.json"
# Settings that may change between an interrupted run and its resumption.
RESUME_FREE_KEYS = frozenset(
    {
        "train.resume",
        "train.stop_after_steps",
        "train.logging_steps",
        "train.save_steps",
        "train.save_total_limit",
        "train.num_workers",
        "train.report_to",
        "train.collapse_threshold",
        "train.collapse_window",
        "train.dist_timeout",
        "adapter.dispatch",
        # Trainer fields that only change what is reported, never what is trained.
        "train.disable_tqdm",
        "train.run_name",
        "train.logging_dir",
        "output_dir",  # a run folder that was moved is the same run
    }
)
# Settings a plain-LoRA adapter (``adapter.type: lora``) has no use for: changing them does
# not change what such a run trains, so they never make it stale.
MOLE_ONLY_KEYS = frozenset(
    {
        "adapter.num_experts",
        "adapter.top_k",
        "adapter.normalize_top_k",
        "adapter.balance_coef",
        "adapter.router_z_coef",
        "adapter.gate_weighting",
        "adapter.balance_loss",
        "adapter.router",
        "train.router_lr",
        "train.router_dense_warmup",
    }
)


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


@dataclass
class RunPlan:
    """What an invocation does with its output folder.

    ``kind``: ``fresh`` (nothing to continue), ``resume`` (from ``checkpoint``), ``finalize``
    (``checkpoint`` is at the end of the schedule: write the final adapter and summary, train
    nothing) or ``complete`` (final adapter and summary exist: change nothing).
    """

    kind: str
    checkpoint: Path | None = None
    summary: dict[str, Any] | None = None


def _saved_changes(out: Path, config: TrainConfig) -> list[tuple[str, Any, Any]]:
    saved = out / RUN_CONFIG
    if not saved.is_file():
        return []
    try:
        data = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{saved}: invalid YAML ({str(err).splitlines()[0]})") from None
    return config_changes(data if isinstance(data, dict) else {}, config)


def _longer_schedule(changes: list[tuple[str, Any, Any]]) -> tuple[Any, Any] | None:
    """``(old, new)`` when the only change is a larger explicit ``train.max_steps``."""
    if len(changes) == 1 and changes[0][0] == "train.max_steps":
        _, old, new = changes[0]
        if isinstance(old, int) and isinstance(new, int) and new > old > 0:
            return old, new
    return None


def _pick(out: Path) -> Path | None:
    """The newest intact checkpoint, saying which newer ones were damaged and why."""
    choice = pick_checkpoint(out)
    if choice.path is None and choice.passed_over:
        path, problem = choice.passed_over[0]
        raise ConfigError(
            f"output_dir {out}: no intact checkpoint to resume from ({path.name}: {problem}); "
            "move the checkpoints away to start the run over"
        )
    for path, problem in choice.passed_over:
        print(f"{path.name} is damaged ({problem}); resuming from {choice.path.name}", flush=True)
    return choice.path


def plan_run(config: TrainConfig) -> RunPlan:
    """Decide how to use ``output_dir``; refuse another run's folder with one line."""
    out = Path(config.output_dir)
    if not out.is_dir():
        return RunPlan("fresh")
    resume = config.train.resume
    finished = (out / SUMMARY).is_file() and (out / WEIGHTS_NAME).is_file()
    has_checkpoints = latest_checkpoint(out) is not None
    held = "checkpoints" if has_checkpoints else "a finished run"
    if resume is False and (finished or has_checkpoints):
        raise ConfigError(
            f"output_dir {out} already holds {held}; use a new output_dir or set "
            "train.resume=auto to continue (or recognise) that run"
        )
    changes = _saved_changes(out, config)
    longer = _longer_schedule(changes)
    if changes and longer is None and (finished or has_checkpoints):
        key, before, now = changes[0]
        raise ConfigError(
            f"output_dir {out} holds {held} of another run ({key}: {before!r} there, "
            f"{now!r} here); use a new output_dir"
        )
    if isinstance(resume, str) and resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"train.resume: checkpoint not found: {path}")
        problem = checkpoint_problem(path)
        if problem:
            raise ConfigError(f"train.resume: {path} cannot be resumed from ({problem})")
        return RunPlan("resume", path)
    if finished and longer is None:
        return RunPlan("complete", summary=_read_summary(out))
    checkpoint = _pick(out) if (has_checkpoints or any(out.glob("checkpoint-*"))) else None
    if checkpoint is None:
        if longer is not None:
            raise ConfigError(
                f"train.max_steps: {out} has no intact checkpoint to continue from "
                f"(set train.save_steps > 0 for runs you may extend)"
            )
        return RunPlan("fresh")
    state = read_trainer_state(checkpoint)
    at_end = state["global_step"] >= (state.get("max_steps") or 0) > 0
    if longer is not None:
        print(f"continuing {out} from step {state['global_step']} to {longer[1]} steps", flush=True)
    elif at_end:
        return RunPlan("finalize", checkpoint)
    return RunPlan("resume", checkpoint)


def _read_summary(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / SUMMARY).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{out / SUMMARY}: unreadable ({err})") from None


def config_changes(
    saved: dict[str, Any], config: TrainConfig, ignore: frozenset[str] = RESUME_FREE_KEYS
) -> list[tuple[str, Any, Any]]:
    """The settings in which ``config`` differs from a run's saved ``run_config.yaml``.

    A key the saved file lacks (written before that setting existed) counts as its default,
    so adding a setting does not orphan earlier runs; router and expert settings
    (:data:`MOLE_ONLY_KEYS`) do not count when both are plain-LoRA runs.

    Args:
        saved: the parsed ``run_config.yaml``.
        config: the configuration asked for now.
        ignore: dotted keys that may differ.

    Returns:
        ``(dotted key, saved value, value now)`` for each difference, sorted by key.
    """
    defaults = _flatten(TrainConfig().to_dict())
    before, now = _flatten(saved), _flatten(config.to_dict())
    if before.get("adapter.type", defaults["adapter.type"]) == now["adapter.type"] == "lora":
        ignore = ignore | MOLE_ONLY_KEYS
    changes = []
    for key in sorted(set(before) | set(now)):
        old = before.get(key, defaults.get(key))
        if key not in ignore and old != now.get(key):
            changes.append((key, old, now.get(key)))
    return changes
