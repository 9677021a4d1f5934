"""Writing a MoLE trainer's checkpoints and adapters (a mixin of :class:`.trainer.MoLETrainer`).

* ``save_model``: the adapter only (every trained tensor, in full; under DeepSpeed / FSDP2
  gathered from the ranks, the frozen base never), with the optimizer step in its card;
* ``save_checkpoint_atomically``: ``checkpoint-N`` written under a temporary name and renamed
  once every file (adapter, optimizer, scheduler, RNG, trainer state) is on disk, so a
  half-written checkpoint is never taken as the latest; a full disk is one line naming the
  space one checkpoint needs;
* ``save_engine_optimizer``: DeepSpeed's ``global_stepN/`` partitions or FSDP2's
  ``optimizer.bin`` (frozen base weights excluded).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..adapters.io import fsync_dir, load_adapter, save_adapter
from . import distributed
from ._hf_compat import PREFIX_CHECKPOINT_DIR, SCHEDULER_NAME
from .checkpoints import (
    TEMP_PREFIX,
    folder_bytes,
    fsync_tree,
    is_write_failure,
    latest_checkpoint,
    rotate_checkpoints,
    write_failure,
)


class CheckpointWriting:
    """Checkpoint and adapter writing on top of a ``transformers.Trainer`` (mixed in first)."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The adapter (every trained tensor, in full) to ``output_dir`` from rank 0.

        Under DeepSpeed and FSDP this is a collective: every rank must call it (each holds a
        part); only the trainable tensors are gathered, never the frozen base.
        """
        output_dir = output_dir or self.args.output_dir
        tensors = distributed.gathered_adapter_tensors(self) if self.uses_engine else None
        if self.args.should_save:
            save_adapter(
                self.accelerator.unwrap_model(self.model),
                output_dir,
                self._extra_with_step(),
                tensors=tensors,
            )

    def save_engine_optimizer(self, output_dir: str) -> None:
        """Optimizer and scheduler state under DeepSpeed or FSDP2 (frozen base excluded)."""
        if self.is_deepspeed_enabled:
            # Optimizer partitions and the trainable tensors; the frozen base is not copied.
            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        else:
            from accelerate.utils import save_fsdp_optimizer

            save_fsdp_optimizer(
                self.accelerator.state.fsdp_plugin,
                self.accelerator,
                self.optimizer,
                self.model,
                output_dir,
            )
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _extra_with_step(self) -> dict[str, Any] | None:
        """The adapter's metadata plus the optimizer step it was saved at (for its card)."""
        if self.adapter_extra is None:
            return None
        training = {**self.adapter_extra.get("training", {}), "steps": self.state.global_step}
        return {**self.adapter_extra, "training": training}

    def save_checkpoint_atomically(self, run_dir: Path) -> None:
        """``checkpoint-N`` written under a temporary name, renamed once every file (adapter,
        optimizer, scheduler, RNG, trainer state) is on disk."""
        step = self.state.global_step
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        temp = run_dir / f"{TEMP_PREFIX}{step}-{self._temp_token()}"
        if self.args.should_save:
            shutil.rmtree(temp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        try:
            self.write_checkpoint_files(temp)
            if self.args.should_save:
                fsync_tree(temp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(temp, final)
                fsync_dir(run_dir)
        except Exception as err:
            if not is_write_failure(err):
                raise
            shutil.rmtree(temp, ignore_errors=True)
            raise write_failure(err, run_dir, self._checkpoint_bytes(run_dir)) from None
        if self.args.should_save:
            rotate_checkpoints(run_dir, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()

    def _temp_token(self) -> str:
        """A name part unique to this run's processes (rank 0's PID, shared with every rank)."""
        if getattr(self, "_token", None) is None:
            token = [str(os.getpid())]
            if self.args.world_size > 1:
                from accelerate.utils import broadcast_object_list

                broadcast_object_list(token)
            self._token = token[0]
        return self._token

    def _checkpoint_bytes(self, run_dir: Path) -> int:
        """About what one checkpoint takes: the last one's size, else adapter + 2 Adam moments."""
        last = folder_bytes(latest_checkpoint(run_dir))
        trainable = 4 * distributed.trainable_numel(self.model)
        return last or 3 * trainable + (1 << 20)

    def load_adapter_checkpoint(self, checkpoint: str, model: Any = None) -> None:
        """A checkpoint's adapter into ``model`` (default: the trainer's)."""
        model = model if model is not None else self.model
        load_adapter(self.accelerator.unwrap_model(model), checkpoint)
