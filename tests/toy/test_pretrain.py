"""Stage-1 captioning pretraining: it helps, it is deterministic, and it is cached."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from llava_mole.toy import pretrain, tiny

pytestmark = pytest.mark.slow  # end to end; `-m 'not slow'` leaves it out

STEPS = 30


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def pretrained(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAVA_MOLE_CACHE", str(cache))
        start = time.perf_counter()
        out = tiny.make_tiny(
            tmp_path_factory.mktemp("pre"), seed=0, pretrain_steps=STEPS, progress=False
        )
        return out, time.perf_counter() - start


def test_pretraining_beats_random_init(pretrained: tuple[Path, float]) -> None:
    out, _ = pretrained
    marker = json.loads((out / tiny.MARKER_FILE).read_text())
    assert marker["pretrain"] is True and marker["pretrain_steps"] == STEPS
    assert marker["final_pretrain_loss"] < marker["heldout_caption_loss_init"]

    processor = AutoProcessor.from_pretrained(out)
    trained = AutoModelForImageTextToText.from_pretrained(out)
    random_init, _ = tiny.build_tiny(seed=0)
    # Held-out captions: an image stream the pretraining never saw.
    heldout = pretrain.synthetic_caption_set(processor, n_per_domain=16, seed=0, stream=7)
    pad = processor.tokenizer.pad_token_id
    loss_random = pretrain.caption_loss(random_init, heldout, pad)
    loss_trained = pretrain.caption_loss(trained, heldout, pad)
    assert loss_random > 5.0  # about log(vocab) at init
    assert loss_trained < 0.5 * loss_random, (loss_trained, loss_random)


def test_cache_is_reused(pretrained: tuple[Path, float], cache: Path, tmp_path: Path) -> None:
    first, first_seconds = pretrained
    cached = cache / "tiny" / tiny.cache_key(0, STEPS)
    assert (cached / tiny.MARKER_FILE).is_file()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAVA_MOLE_CACHE", str(cache))
        assert tiny.tiny_cache_dir(0, STEPS) == cached
        start = time.perf_counter()
        second = tiny.make_tiny(tmp_path / "second", seed=0, pretrain_steps=STEPS, progress=False)
        seconds = time.perf_counter() - start
    marker = json.loads((second / tiny.MARKER_FILE).read_text())
    assert marker["from_cache"] == str(cached)
    assert seconds < first_seconds / 3
    assert (second / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()


def test_pretraining_is_deterministic() -> None:
    cfg = pretrain.PretrainConfig(steps=3, batch_size=4, train_images=12, heldout_per_domain=2)
    states = []
    for _ in range(2):
        model, processor = tiny.build_tiny(seed=1)
        result = pretrain.pretrain_captions(model, processor, cfg, seed=1, progress=False)
        assert result.steps == 3 and result.heldout_loss_final == result.heldout_loss_final
        states.append(model.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_pretraining_runs_on_a_fixed_thread_count(tmp_path: Path, monkeypatch) -> None:
    """The build must not depend on the machine's core count (reductions split by thread)."""
    seen: list[int] = []
    real = pretrain.pretrain_captions

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setenv("LLAVA_MOLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrain, "pretrain_captions", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tiny.make_tiny(tmp_path / "m", seed=1, pretrain_steps=2, progress=False)
        assert torch.get_num_threads() == 1  # restored
    finally:
        torch.set_num_threads(before)
    assert seen == [tiny.PRETRAIN_THREADS]
    assert json.loads((out / tiny.MARKER_FILE).read_text())["pretrain_threads"] == 2
