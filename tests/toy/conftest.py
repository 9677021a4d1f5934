"""Shared fixtures for the tiny-model tests (everything offline)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from llava_mole.toy.tiny import make_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny model directory (no pretraining, no cache)."""
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0, pretrain=False, progress=False)
