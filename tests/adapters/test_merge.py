"""Merging (adapters/merge.py): plain LoRA folds into the base weights, MoLE refuses."""

from __future__ import annotations

import pytest
import torch

from llava_mole import apply_mole
from llava_mole.adapters import AdapterError, merge_lora, merge_mole, unmerge_lora
from tests.adapters.common import mole_cfg
from tests.tiny_models import llava_batch, randomize_adapter


def test_merge_and_unmerge_lora(llava):
    apply_mole(llava, mole_cfg(mode="lora"))
    randomize_adapter(llava)
    batch = llava_batch()
    before = llava(**batch).logits
    assert merge_lora(llava) == 2 * 7
    merged = llava(**batch).logits
    assert torch.allclose(before, merged, atol=1e-5)
    unmerge_lora(llava)
    assert torch.allclose(before, llava(**batch).logits, atol=1e-5)
    with pytest.raises(AdapterError, match="router picks the expert per token"):
        merge_mole(llava)
