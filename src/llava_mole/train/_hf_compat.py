"""Every use of private ``transformers.Trainer`` / accelerate internals, in one place.

The stock Trainer offers no public hook for what this project needs at four points, so
:class:`CompatTrainer` overrides these private methods and turns each into a public hook of
:class:`~.trainer.MoLETrainer`:

============================================  ===============================================
private internal                              why
============================================  ===============================================
``Trainer._get_train_sampler``                LLaVA's modality/length-grouped sampler
                                              (``train_sampler``)
``Trainer._save_checkpoint`` (+ its parts     atomic checkpoints: written under a temporary
``_get_output_dir``, ``_save_optimizer_and_   name, renamed when complete
scheduler``, ``_save_scaler``,                (``save_checkpoint_atomically``)
``_save_rng_state``, ``TRAINER_STATE_NAME``)
``Trainer._save_optimizer_and_scheduler``     DeepSpeed / FSDP2 optimizer files without the
                                              frozen base (``save_engine_optimizer``)
``Trainer._prepare_for_training``             resuming once an engine holds the model
                                              (``after_prepare``)
``Trainer._load_from_checkpoint``             checkpoints hold the adapter only
                                              (``load_adapter_checkpoint``)
``Trainer._load_best_model``                  unused (no evaluation-based selection)
``PartialState._shared_state``                FSDP2 on CPU processes (:mod:`.distributed`)
============================================  ===============================================

:data:`PRIVATE_API` lists each internal with the parameters relied on;
``tests/train/test_hf_compat.py`` checks them against the installed transformers (supported
range: ``transformers>=5.0,<6`` as pinned in ``pyproject.toml``), so an upgrade that removes
or changes one fails there, by name, instead of silently in a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerState
from transformers.trainer import SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

__all__ = [
    "PREFIX_CHECKPOINT_DIR",
    "PRIVATE_API",
    "SCHEDULER_NAME",
    "TRAINER_STATE_NAME",
    "CompatTrainer",
    "load_checkpoint_state",
    "set_shared_distributed_type",
]

# Trainer method -> the parameters (after ``self``) this module calls or overrides it with.
PRIVATE_API: dict[str, tuple[str, ...]] = {
    "_get_train_sampler": ("train_dataset",),
    "_save_checkpoint": ("model", "trial"),
    "_get_output_dir": ("trial",),
    "_save_optimizer_and_scheduler": ("output_dir",),
    "_save_scaler": ("output_dir",),
    "_save_rng_state": ("output_dir",),
    "_prepare_for_training": ("max_steps", "train_dataloader", "resume_from_checkpoint"),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_load_optimizer_and_scheduler": ("checkpoint",),
    "_load_scaler": ("checkpoint",),
    "_load_best_model": (),
}


class CompatTrainer(Trainer):
    """A ``Trainer`` whose private steps call public hooks (see the module docstring).

    Subclasses implement ``save_checkpoint_atomically(run_dir)``, ``uses_engine``,
    ``save_engine_optimizer(output_dir)``, ``after_prepare()`` and
    ``load_adapter_checkpoint(checkpoint, model)``; ``train_sampler`` (``None``: the stock
    sampler) replaces the training sampler.
    """

    train_sampler: Any = None

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
        if self.train_sampler is not None:
            return self.train_sampler
        return super()._get_train_sampler(*args, **kwargs)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self.save_checkpoint_atomically(Path(self._get_output_dir(trial=trial)))

    def write_checkpoint_files(self, folder: Path) -> None:
        """What the stock ``_save_checkpoint`` writes (adapter, optimizer, scheduler, scaler,
        RNG, trainer state with its stateful callbacks), into ``folder``."""
        self.store_flos()
        self.save_model(str(folder), _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(folder))
            self._save_scaler(str(folder))
            self._save_rng_state(str(folder))
        if self.args.should_save:
            for callback in self.callback_handler.callbacks + [self.control]:
                if isinstance(callback, ExportableState):
                    self.state.stateful_callbacks[callback.__class__.__name__] = callback.state()
            self.state.save_to_json(str(folder / TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.uses_engine:
            self.save_engine_optimizer(output_dir)
        else:
            super()._save_optimizer_and_scheduler(output_dir)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        # Engines: the stock resume would load a DeepSpeed checkpoint strictly (its module state
        # holds the trainable tensors only) and an FSDP one from a full-model file this trainer
        # does not write; resume here instead, once the engine holds the model.
        engine = self.uses_engine
        model, train_dataloader = super()._prepare_for_training(
            max_steps, train_dataloader, None if engine else resume_from_checkpoint
        )
        if engine and resume_from_checkpoint is not None:
            if self.is_deepspeed_enabled:
                from transformers.integrations.deepspeed import deepspeed_load_checkpoint

                deepspeed_load_checkpoint(
                    self.model_wrapped, resume_from_checkpoint, load_module_strict=False
                )
            else:
                self._load_from_checkpoint(resume_from_checkpoint, self.model_wrapped)
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
            self._load_scaler(resume_from_checkpoint)
        self.after_prepare()
        return model, train_dataloader

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        self.load_adapter_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:  # pragma: no cover - evaluation-based selection unused
        return


def load_checkpoint_state(trainer: Trainer, checkpoint: Path) -> None:
    """Load a checkpoint's adapter and trainer state without training (finalizing a run)."""
    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))


def set_shared_distributed_type(distributed_type: Any) -> None:
    """Make accelerate's process-wide state report ``distributed_type`` (FSDP2 on CPU)."""
    from accelerate import PartialState

    PartialState._shared_state["distributed_type"] = distributed_type
