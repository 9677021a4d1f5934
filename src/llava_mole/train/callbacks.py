"""Trainer callbacks: JSONL log, router-collapse warning, stop-after-N-steps, dense warmup."""

from __future__ import annotations

import json
import logging
from collections import deque
from pathlib import Path

from transformers import TrainerCallback

from ..adapters.state import set_dense_routing

logger = logging.getLogger("llava_mole.train")


class JsonlLogger(TrainerCallback):
    """Appends every log dict (with its step) to ``<output_dir>/logs.jsonl`` on the main process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class RouterCollapseMonitor(TrainerCallback):
    """Warns when an expert's token share stays below ``threshold`` over ``window`` log steps."""

    def __init__(self, threshold: float, window: int) -> None:
        self.threshold = threshold
        self.window = max(int(window), 1)
        self.history: deque[list[float]] = deque(maxlen=self.window)
        self.warned: set[int] = set()
        self.warnings: list[str] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        loads = [v for k, v in sorted(logs.items()) if k.startswith("expert_load/")]
        if not loads:
            return
        self.history.append(loads)
        if len(self.history) < self.window:
            return
        for k in range(len(loads)):
            mean = sum(h[k] for h in self.history) / len(self.history)
            if mean < self.threshold and k not in self.warned:
                message = (
                    f"router collapse: expert {k} received {mean:.1%} of tokens over the last "
                    f"{self.window} logged steps (threshold {self.threshold:.1%}) at step {state.global_step}"
                )
                logger.warning(message)
                self.warnings.append(message)
                self.warned.add(k)


class StopAfterSteps(TrainerCallback):
    """Ends the invocation after ``steps`` optimizer steps, saving a checkpoint first."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.steps and state.global_step >= self.steps and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True
        return control


class DenseRoutingWarmup(TrainerCallback):
    """Dense MoLE routing for the first ``share`` of the optimizer steps, then top-k.

    Decided at the start of every optimizer step from the step counter, so a resumed run
    continues in the right phase; ``share == 0`` keeps top-k routing throughout (see
    ``llava_mole.adapters.state.set_dense_routing`` for the dense phase's gradient).
    """

    def __init__(self, share: float) -> None:
        self.share = float(share)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            set_dense_routing(model, state.global_step < self.share * state.max_steps)
