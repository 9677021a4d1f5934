"""Fixtures of the study tests: a tiny two-domain world and hand-made study results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml


def write_study(path: Path, world: dict[str, Path], **changes: Any) -> Path:
    """Write a tiny study YAML (1 seed, 4 steps, batch 4, eval limit 4) next to ``path``."""
    doc: dict[str, Any] = {
        "model": str(world["model"]),
        "mixture": str(world["mixture"]),
        "seeds": [0],
        "adapter": {"rank": 1, "alpha": 2, "num_experts": 3, "dropout": 0.0},
        "train": {
            "learning_rate": 2.0e-3,
            "max_steps": 4,
            "per_device_batch_size": 4,
            "logging_steps": 1,
        },
        "eval": {"batch_size": 8, "max_new_tokens": 4, "limit": 4},
    }
    doc.update(changes)
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def study_world(tmp_path_factory) -> dict[str, Path]:
    """A tiny untrained LLaVA and a mixture of two of the three synthetic datasets."""
    from llava_mole.toy.synthetic import make_data
    from llava_mole.toy.tiny import make_tiny

    root = tmp_path_factory.mktemp("study_world")
    model = make_tiny(root / "model", seed=0, pretrain=False, progress=False)
    data = make_data(root / "data", samples_per_domain=16, test_per_domain=4, seed=0)
    mixture = yaml.safe_load((data / "mixture.yaml").read_text(encoding="utf-8"))
    mixture["datasets"] = mixture["datasets"][:2]  # general + document
    two = data / "mixture-two.yaml"
    two.write_text(yaml.safe_dump(mixture, sort_keys=False), encoding="utf-8")
    return {"root": root, "model": model, "data": data, "mixture": two}
