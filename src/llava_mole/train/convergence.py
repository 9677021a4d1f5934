"""Training to convergence: a held-out dev split, a dev score, and early stopping on it.

A study that compares runs at one step count measures undertraining as much as data conflict
(issue 18): a mixed run that needs more steps than a single-domain one looks "conflicted". Here
each run can instead train until its dev score stops improving and keep its best weights.

Dev split
    :func:`carve_dev` takes ``per_domain`` samples of each domain out of the training samples
    (a seeded choice, independent of the training order), so the dev items are never trained
    on and every domain is represented equally however unequal the mixture is.
Dev score
    :func:`teacher_forced_exact` scores an item 1 when, under teacher forcing, the argmax at
    every labelled position is the label (answer tokens and the end token). That is exactly
    the event "greedy decoding reproduces the reference answer": if the first ``t`` greedy
    tokens equal the reference, the model sees the same prefix as under teacher forcing, so
    token ``t+1`` is the same argmax. One forward per batch instead of a generation loop. The
    run's score is the macro mean over domains.
Stopping rule
    Every ``every`` steps the run is judged by its smoothed score ``s``, the mean of the last
    ``smooth`` dev scores (fewer at the start), compared with the best so far ``b``: ``s > b +
    min_delta`` is an improvement (best weights saved); otherwise a strike. After ``patience``
    strikes in a row the learning rate is cut, ``lr <- decay_factor * lr`` (on top of the
    schedule), and the strikes restart, at most ``decays`` times; the next ``patience`` strikes
    stop training. ``train.max_steps`` is the budget. The final adapter is the best one. The
    rule's state (best, strikes, learning-rate scale) is rebuilt from the logged dev scores of
    the Trainer's log history, so a resumed run continues it exactly. With ``hold > 0`` no
    strike is counted during the first ``hold`` share of the budget (the best weights are
    still kept), so neither a cut nor a stop can come before it.
Why decay before stopping
    At a high learning rate the weights wander around a minimum, and the dev score of one
    evaluation is noisy; stopping at the first plateau then ends a run at a random point of
    that walk, and the seed spread of the study measures where each run happened to stop
    (issue 18, skills world: runs stopped at 1100 steps scored 0.59-0.72 on a domain that runs
    trained to 2500 steps scored 0.90-0.94 on). A cut learning rate settles the walk first, as
    in reduce-on-plateau schedules. Smoothing serves the same end: the best of many noisy
    scores is mostly a lucky one (a domain at 59 of 60 dev items once), which later, better
    weights then cannot beat; the mean of a few evaluations is much less often a spike.
Why hold
    Some runs sit on a plateau early (skills world: a dev "count" score flat at 0.5 for 1,700
    steps, three shapes not yet told from two) and then learn. Counted as strikes, that
    plateau cuts the learning rate twice before the run starts learning, and the run then
    learns at 0.09x the rate and is stopped on its next plateau: a bimodal seed failure made
    by the rule, not by the model. Holding the strikes for the first part of the budget
    leaves such runs their full learning rate until they have had time to leave the plateau.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from ..adapters.state import set_routing_domains

IGNORE_INDEX = -100
DEV_KEY = "dev/score"
BEST_FILE = "dev-best.safetensors"

__all__ = [
    "ConvergenceRule",
    "DevEarlyStopping",
    "DevScore",
    "carve_dev",
    "teacher_forced_exact",
]


@dataclass(frozen=True)
class ConvergenceRule:
    """When a run has converged.

    Attributes:
        every: Steps between dev evaluations.
        patience: Evaluations in a row without improvement that end the run.
        min_delta: An improvement must exceed the best score by more than this.
        decays: Learning-rate cuts on a plateau before a plateau ends the run.
        decay_factor: Each cut multiplies the learning rate by this.
        smooth: Dev scores averaged into the judged score.
        hold: Share of the budget (``max_steps``) during which no strike is counted: no
            learning-rate cut and no stop before it.
    """

    every: int = 100
    patience: int = 3
    min_delta: float = 0.0
    decays: int = 0
    decay_factor: float = 0.3
    smooth: int = 1
    hold: float = 0.0

    def __post_init__(self) -> None:
        if min(self.every, self.patience, self.smooth) < 1 or min(self.min_delta, self.decays) < 0:
            raise ValueError(
                "convergence: every, patience and smooth must be >= 1, min_delta and decays "
                f">= 0, got {self}"
            )
        if not 0 < self.decay_factor < 1:
            raise ValueError(f"convergence: decay_factor must be in (0, 1), got {self}")
        if not 0 <= self.hold < 1:
            raise ValueError(f"convergence: hold must be in [0, 1), got {self}")


@dataclass(frozen=True)
class DevScore:
    """Teacher-forced exact match on the dev split.

    Attributes:
        per_domain: Score of each domain (domain name -> share of exact items).
        counts: Dev items per domain.
    """

    per_domain: dict[str, float]
    counts: dict[str, int]

    @property
    def macro(self) -> float:
        return float(np.mean(list(self.per_domain.values()))) if self.per_domain else 0.0


def carve_dev(domains: Sequence[str], per_domain: int, seed: int) -> tuple[list[int], list[int]]:
    """Splits item indices into training and dev indices, ``per_domain`` dev items per domain.

    Args:
        domains: The domain of each training item.
        per_domain: Dev items per domain (a domain with fewer than twice as many items keeps
            half of them for training).
        seed: Seed of the choice.

    Returns:
        ``(train, dev)`` index lists, each ascending.
    """
    if per_domain < 1:
        raise ValueError(f"dev items per domain must be >= 1, got {per_domain}")
    rng = np.random.default_rng([seed, 7919])
    dev: list[int] = []
    by_domain: dict[str, list[int]] = {}
    for i, d in enumerate(domains):
        by_domain.setdefault(d, []).append(i)
    for d in sorted(by_domain):
        items = np.asarray(by_domain[d])
        take = min(per_domain, len(items) // 2)
        dev.extend(items[rng.permutation(len(items))[:take]].tolist())
    chosen = set(dev)
    return [i for i in range(len(domains)) if i not in chosen], sorted(dev)


@torch.no_grad()
def teacher_forced_exact(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], domains: Sequence[str]
) -> DevScore:
    """Per-domain teacher-forced exact match (see the module docstring).

    Args:
        model: The model (put in eval mode for the call; its mode is restored).
        batches: Collated batches with ``labels`` and ``domain_ids``.
        domains: Domain names, indexed by ``domain_ids``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    exact = np.zeros(len(domains))
    total = np.zeros(len(domains), dtype=np.int64)
    try:
        for batch in batches:
            labels, domain_ids = batch["labels"], batch["domain_ids"]
            inputs = {
                k: v.to(device) for k, v in batch.items() if k not in ("labels", "domain_ids")
            }
            inputs.pop("loss_positions", None)
            set_routing_domains(model, [domains[i] for i in domain_ids.tolist()])  # router=domain
            logits = model(**inputs).logits[:, :-1]
            target = labels[:, 1:].to(device)
            wrong = (logits.argmax(-1) != target) & (target != IGNORE_INDEX)
            ok = (~wrong.any(dim=1)).cpu().numpy()
            for d, good in zip(domain_ids.tolist(), ok.tolist()):
                exact[d] += good
                total[d] += 1
    finally:
        model.train(was_training)
    kept = [k for k in range(len(domains)) if total[k] > 0]
    return DevScore(
        {domains[k]: float(exact[k] / total[k]) for k in kept},
        {domains[k]: int(total[k]) for k in kept},
    )


@dataclass
class _Progress:
    best: float = float("-inf")
    best_step: int = 0
    strikes: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)
    converged_at: int | None = None
    decayed_at: list[int] = field(default_factory=list)
    lr_scale: float = 1.0


class DevEarlyStopping(TrainerCallback):
    """Evaluates the dev score every ``rule.every`` steps, saves the best weights, stops the
    run after ``rule.patience`` evaluations without improvement (see the module docstring).

    Args:
        rule: The stopping rule.
        score: Computes the dev score of a model.
        output_dir: Where ``dev-best.safetensors`` (the best trainable weights) is written.
        log: Adds numbers to the Trainer's log (``trainer.log``), so they reach logs.jsonl and
            the log history a resume rebuilds the rule from.
    """

    def __init__(
        self,
        rule: ConvergenceRule,
        score: Callable[[nn.Module], DevScore],
        output_dir: str | Path,
        log: Callable[[dict[str, float]], None],
    ) -> None:
        self.rule, self.score, self.log = rule, score, log
        self.best_path = Path(output_dir) / BEST_FILE
        self.progress = _Progress()
        self.hold_steps = 0  # ``rule.hold`` of the run's budget, set when training begins

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        """Replays the logged dev scores of a resumed run through the rule, and puts the rule's
        learning-rate scale on top of the schedule."""
        self.progress = _Progress()
        self.hold_steps = int(self.rule.hold * max(state.max_steps, 0))
        for record in state.log_history:
            if DEV_KEY in record:
                self._judge(int(record["step"]), float(record[DEV_KEY]))
        if self.progress.converged_at is not None and control is not None:
            control.should_training_stop = True  # resumed after it had converged
        if self.rule.decays and lr_scheduler is not None:
            self._scale_schedule(lr_scheduler)

    def _scale_schedule(self, scheduler) -> None:
        """Multiplies each lambda of a ``LambdaLR`` schedule by ``progress.lr_scale``. The
        scale is read at every scheduler step, so a resumed run (its scheduler state loaded,
        its scale replayed) gets the same learning rates."""
        scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise ValueError(
                f"train.dev_decays: cutting the learning rate needs a LambdaLR schedule, got "
                f"{type(scheduler).__name__} (set train.dev_decays: 0)"
            )
        # Marked on the functions, not the scheduler: its state_dict saves its attributes.
        scheduler.lr_lambdas = [self._scaled(f) for f in scheduler.lr_lambdas]

    def _scaled(self, factor: Callable[[int], float]) -> Callable[[int], float]:
        if getattr(factor, "dev_scaled", False):
            return factor

        def scaled(step: int) -> float:
            return factor(step) * self.progress.lr_scale

        scaled.dev_scaled = True
        return scaled

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.rule.every and step < state.max_steps:
            return control
        result = self.score(model)
        # The rule judges the logged value: a replay from the log history (a resume, the end of
        # the run) must reach the same decisions. Raw macros of different domain scores can
        # differ in the last bit only (0.95 + 1.0 + 0.98333 vs 0.96667 + 0.96667 + 1.0).
        value = round(result.macro, 6)
        should_log = control.should_log  # the Trainer's on_log resets it: keep this step's loss
        self.log({DEV_KEY: value} | {f"dev/{d}": v for d, v in result.per_domain.items()})
        control.should_log = should_log
        if self._judge(step, value):
            trainable = {
                n: p.detach().cpu().contiguous()
                for n, p in model.named_parameters()
                if p.requires_grad
            }
            save_file(trainable, str(self.best_path), metadata={"step": str(step)})
        if self.progress.converged_at is not None:
            control.should_training_stop = True
        return control

    def _judge(self, step: int, value: float) -> bool:
        """Applies the rule to one evaluation; True when it is the new best."""
        p = self.progress
        p.curve.append((step, value))
        recent = [v for _, v in p.curve[-self.rule.smooth :]]
        smoothed = sum(recent) / len(recent)
        if smoothed > p.best + self.rule.min_delta or not p.curve[:-1]:
            p.best, p.best_step, p.strikes = smoothed, step, 0
            return True
        if step <= self.hold_steps:
            return False  # held: a plateau this early is not counted
        p.strikes += 1
        if p.strikes < self.rule.patience:
            return False
        if len(p.decayed_at) < self.rule.decays:
            p.decayed_at.append(step)
            p.lr_scale *= self.rule.decay_factor
            p.strikes = 0
        else:
            p.converged_at = step
        return False

    def restore_best(self, model: nn.Module) -> int:
        """Loads the best weights into `model`; returns their step."""
        if not self.best_path.is_file():
            raise FileNotFoundError(f"{self.best_path}: no dev-best weights were saved")
        with safe_open(str(self.best_path), "pt") as handle:
            step = int(handle.metadata()["step"])
        if step != self.progress.best_step:
            raise RuntimeError(
                f"{self.best_path} holds step {step}, but the dev curve's best is step "
                f"{self.progress.best_step}"
            )
        params = dict(model.named_parameters())
        weights = load_file(str(self.best_path))
        unknown = sorted(set(weights) - set(params))
        if unknown:
            raise RuntimeError(f"{self.best_path}: unknown parameters {unknown[:3]}")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        return step

    def summary(self) -> dict[str, object]:
        """The numbers a run's summary reports."""
        p = self.progress
        return {
            "best_step": p.best_step,
            "best_dev_score": p.best,
            "converged_at": p.converged_at,
            "lr_decayed_at": list(p.decayed_at),
            "hold_steps": self.hold_steps,
            "dev_curve": [[s, v] for s, v in p.curve],
            "rule": json.loads(json.dumps(self.rule.__dict__)),
        }
