"""The private transformers / accelerate internals `train/_hf_compat.py` relies on still exist
with the parameters it uses (supported range: transformers>=5.0,<6), and its hooks are used."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import accelerate
import pytest
import transformers
from packaging.version import Version
from transformers import Trainer, TrainingArguments

from llava_mole.train import _hf_compat
from llava_mole.train._hf_compat import PRIVATE_API, CompatTrainer
from llava_mole.train.arguments import RECIPE_DEFAULTS, RENAMED, trainer_fields
from llava_mole.train.callbacks import DenseRoutingWarmup
from llava_mole.train.trainer import MoLETrainer

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_installed_transformers_is_in_the_pinned_range():
    pin = re.search(r'"transformers>=([\d.]+),<([\d.]+)"', PYPROJECT.read_text())
    assert pin, "pyproject.toml pins transformers as >=X,<Y"
    low, high = (Version(v) for v in pin.groups())
    assert low <= Version(transformers.__version__) < high


@pytest.mark.parametrize("name", sorted(PRIVATE_API))
def test_each_private_trainer_method_exists_with_the_parameters_used(name):
    method = getattr(Trainer, name, None)
    assert callable(method), f"transformers.Trainer.{name} is gone"
    params = [p for p in inspect.signature(method).parameters if p != "self"]
    assert tuple(params[: len(PRIVATE_API[name])]) == PRIVATE_API[name], (name, params)


def test_every_override_in_compat_trainer_is_listed():
    overridden = {
        name
        for name, value in vars(CompatTrainer).items()
        if name.startswith("_") and not name.startswith("__") and callable(value)
    }
    assert overridden <= set(PRIVATE_API)


def test_private_constants_and_classes_exist():
    assert _hf_compat.TRAINER_STATE_NAME == "trainer_state.json"
    assert _hf_compat.SCHEDULER_NAME == "scheduler.pt"
    assert _hf_compat.PREFIX_CHECKPOINT_DIR == "checkpoint"
    shared = accelerate.PartialState._shared_state
    assert isinstance(shared, dict)


def test_the_private_trainer_methods_are_overridden_only_in_compat():
    # MoLETrainer implements public hooks; the private names belong to CompatTrainer.
    own = set(vars(MoLETrainer))
    assert not own & set(PRIVATE_API), own & set(PRIVATE_API)


def test_stateful_callbacks_and_step_hook_are_as_used():
    from transformers.trainer_callback import ExportableState, TrainerCallback

    assert hasattr(ExportableState, "state")
    assert "on_step_begin" in vars(TrainerCallback)
    assert issubclass(DenseRoutingWarmup, TrainerCallback)


def test_renamed_and_fixed_fields_are_trainer_fields():
    fields = trainer_fields()
    for name in [*RENAMED, *RECIPE_DEFAULTS]:
        assert name in fields, name
    assert set(TrainingArguments.__dataclass_fields__) == set(fields)
