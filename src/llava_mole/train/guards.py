"""Numerical faults: a non-finite loss or gradient stops the run or skips the step."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback

from . import distributed

logger = logging.getLogger("llava_mole.train")


class NonFiniteLossError(RuntimeError):
    """A NaN/Inf loss or gradient under ``nan_policy: stop``."""


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (one host synchronisation).

    One fused norm per tensor instead of an ``isfinite`` pass each: a non-finite element makes
    its tensor's norm non-finite. A norm can also overflow on finite values, so only then are
    the elements checked one by one.
    """
    norms = torch._foreach_norm(tensors)
    if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class GradientGuard(TrainerCallback):
    """Checks gradients before each optimizer step (non-finite -> stop or skip)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self._trainable: list[torch.nn.Parameter] | None = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        if self._trainable is None:
            self._trainable = [p for p in trainer.model.parameters() if p.requires_grad]
        # FSDP2: each rank checks its gradient shards and the ranks agree (one all-reduce).
        # DeepSpeed keeps gradients in its own buffers (p.grad is None) and steps in backward.
        grads = [_local(p.grad) for p in self._trainable if p.grad is not None]
        skip = getattr(trainer, "_skip_pending", False)
        sharded = trainer.is_fsdp_enabled
        if (grads or sharded) and not skip:
            finite = _all_finite(grads) if grads else True
            if sharded:
                finite = distributed.all_ranks_true(finite, trainer.args.device)
            if not finite:
                step = state.global_step + 1
                if trainer.nan_policy == "stop":
                    raise NonFiniteLossError(trainer._nan_message("gradient", step))
                logger.warning("non-finite gradient at step %d: skipping the step", step)
                skip = True
        if skip:
            # AdamW leaves parameters without a gradient untouched: a true skip.
            for p in trainer.model.parameters():
                p.grad = None
            trainer.skipped_steps.append(state.global_step + 1)
            trainer._skip_pending = False
        return control


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP2), else the tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
