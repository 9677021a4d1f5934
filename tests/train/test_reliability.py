"""Crash safety: SIGKILL at random moments, a failing disk, router-collapse warnings."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_mole.adapters.io import read_adapter_tensors
from llava_mole.cli import main
from llava_mole.train.callbacks import RouterCollapseMonitor
from llava_mole.train.checkpoints import is_complete_checkpoint, latest_checkpoint
from tests.train.test_train import base_overrides, logged_losses

REPO = Path(__file__).resolve().parents[2]


def _cli_args(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tiny_world, tmp_path):
    steps = [
        "train.max_steps=40",
        "train.save_steps=1",
        "train.save_total_limit=2",
        "adapter.dropout=0.1",
    ]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("{}\n")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
    }

    def command(out):
        items = base_overrides(tiny_world, out) + steps
        return [sys.executable, "-m", "llava_mole.cli", "train", str(cfg)] + _cli_args(items)

    # The reference runs in the same kind of process (same thread count): a matmul's float
    # result may differ in the last bit between thread counts.
    reference = tmp_path / "reference"
    subprocess.run(
        command(reference),
        env=env,
        cwd=tmp_path,
        check=True,
        timeout=600,
        stdout=subprocess.DEVNULL,
    )
    out = tmp_path / "killed"
    cmd = command(out)
    rng = random.Random(0)
    kills = 0
    for _attempt in range(6):
        proc = subprocess.Popen(
            cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        # Wait for training to be under way (a checkpoint newer than the one we started from).
        start_ckpt = latest_checkpoint(out)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if latest_checkpoint(out) != start_ckpt:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))  # lands during a step or during a checkpoint write
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        latest = latest_checkpoint(out)
        assert latest is not None and is_complete_checkpoint(latest)
        assert read_adapter_tensors(latest)  # the latest checkpoint always loads
    assert kills >= 2
    subprocess.run(cmd, env=env, cwd=tmp_path, check=True, timeout=600, stdout=subprocess.DEVNULL)
    a = load_file(str(reference / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert logged_losses(reference) == logged_losses(out)


def test_disk_full_while_saving_keeps_previous_checkpoint(
    tiny_world, tmp_path, monkeypatch, capsys
):
    import llava_mole.adapters.io as io

    calls = {"n": 0}
    real_save = io.save_file

    def failing_save(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(io, "save_file", failing_save)
    out = tmp_path / "full"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("{}\n")
    code = main(["train", str(cfg)] + _cli_args(base_overrides(tiny_world, out, save_steps=2)))
    assert code == 2
    err = capsys.readouterr().err
    assert "disk full" in err and "Traceback" not in err
    assert latest_checkpoint(out).name == "checkpoint-2"
    assert read_adapter_tensors(out / "checkpoint-2")
    assert not any(p.name.endswith(".tmp") for p in (out / "checkpoint-2").iterdir())


def test_router_collapse_is_reported():
    monitor = RouterCollapseMonitor(threshold=0.05, window=3)

    class State:
        global_step = 30

    for _ in range(3):
        monitor.on_log(
            None,
            State(),
            None,
            logs={"loss": 1.0, "expert_load/0": 0.97, "expert_load/1": 0.01, "expert_load/2": 0.02},
        )
    assert len(monitor.warnings) == 2
    assert "expert 1 received 1.0% of tokens" in monitor.warnings[0]
    balanced = RouterCollapseMonitor(threshold=0.05, window=3)
    for _ in range(5):
        balanced.on_log(
            None,
            State(),
            None,
            logs={"expert_load/0": 0.4, "expert_load/1": 0.3, "expert_load/2": 0.3},
        )
    assert balanced.warnings == []


def test_half_written_checkpoint_is_never_latest(tmp_path):
    (tmp_path / ".tmp-checkpoint-9").mkdir()
    (tmp_path / "checkpoint-8").mkdir()  # incomplete: no adapter or trainer state
    good = tmp_path / "checkpoint-4"
    good.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json"):
        (good / name).write_text("{}")
    assert latest_checkpoint(tmp_path) == good


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd"])
def test_image_paths_escaping_the_folder_are_rejected(tmp_path, bad):
    import json

    from llava_mole.data.formats import LoadReport
    from llava_mole.data.records import load_llava_file

    (tmp_path / "images").mkdir()
    data = tmp_path / "data.json"
    record = {
        "id": "x",
        "image": bad,
        "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
    }
    data.write_text(json.dumps([record]))
    report = LoadReport()
    samples = load_llava_file(data, tmp_path / "images", report=report)
    assert samples == [] and sum(report.skipped.values()) == 1
