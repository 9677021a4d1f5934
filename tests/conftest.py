"""Shared fixtures: the tiny models of :mod:`tests.tiny_models` and one tiny world per session.

The builders live in ``tests/tiny_models.py`` (import them from there); the names are also
importable from here for code written against the older location.
"""

from __future__ import annotations

import pytest

from tests.tiny_models import (  # noqa: F401  (re-exported for older imports)
    IMAGE_TOKEN_ID,
    NUM_IMAGE_TOKENS,
    build_llama,
    build_llava,
    llava_batch,
    randomize_adapter,
    tiny_llama_config,
    tiny_llava_config,
)


@pytest.fixture
def llava():
    return build_llava()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A tiny (not pretrained) LLaVA model directory and a small 3-domain synthetic data set."""
    from llava_mole.toy.synthetic import make_data
    from llava_mole.toy.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny_world")
    model_dir = make_tiny(root / "model", seed=0, pretrain=False, progress=False)
    data_dir = make_data(root / "data", samples_per_domain=24, test_per_domain=6, seed=0)
    return {
        "model": model_dir,
        "data": data_dir,
        "mixture": data_dir / "mixture.yaml",
        "root": root,
    }
