"""One run per folder, finished runs stay finished, damaged checkpoints, real disk-full errors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file

from llava_mole.cli import main
from llava_mole.train.checkpoints import (
    checkpoint_problem,
    is_write_failure,
    pick_checkpoint,
    write_failure,
)
from llava_mole.train.config import ConfigError, load_train_config
from llava_mole.train.lock import LOCK_NAME, RunLockedError, run_lock
from llava_mole.train.run import train
from tests.train.test_train import base_overrides

REPO = Path(__file__).resolve().parents[2]


def _run(world, out, **kw):
    return train(load_train_config(None, base_overrides(world, out, **kw)))


def _set_args(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _same_adapter(a: Path, b: Path) -> bool:
    x, y = (
        load_file(str(a / "adapter_model.safetensors")),
        load_file(str(b / "adapter_model.safetensors")),
    )
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


def test_a_second_run_on_a_busy_folder_refuses_naming_the_holder(tiny_world, tmp_path, capsys):
    out = tmp_path / "run"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
    }
    items = base_overrides(tiny_world, out, max_steps=400, save_steps=0)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("{}\n")
    first = subprocess.Popen(
        [sys.executable, "-m", "llava_mole.cli", "train", str(cfg), *_set_args(items)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        lock = out / LOCK_NAME
        deadline = time.time() + 120
        while time.time() < deadline and not (lock.is_file() and lock.read_text().strip()):
            assert first.poll() is None, first.stderr.read().decode()
            time.sleep(0.05)
        code = main(["train", str(cfg), *_set_args(items)])
        err = capsys.readouterr().err
        assert code == 2
        assert f"in use by another run (pid {first.pid} on " in err.splitlines()[0], err
    finally:
        first.kill()
        first.wait()
    # The holder was killed: its lock is released by the kernel and the next run takes over.
    (out / "run_config.yaml").unlink(missing_ok=True)
    result = _run(tiny_world, out)
    assert result.completed
    assert "taking over the lock" in capsys.readouterr().out


def test_lock_is_exclusive_and_released_on_exit(tmp_path):
    with run_lock(tmp_path, log=lambda _: None):
        holder = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from llava_mole.train.lock import run_lock\nwith run_lock({str(tmp_path)!r}): pass",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])},
        )
        assert holder.returncode != 0 and "RunLockedError" in holder.stderr
        assert f"pid {os.getpid()}" in holder.stderr
    with run_lock(tmp_path, log=lambda _: None):  # released: taken again
        pass
    assert (tmp_path / LOCK_NAME).read_text() == ""
    with pytest.raises(RunLockedError), run_lock(tmp_path), run_lock(tmp_path):
        pass


def test_a_finished_run_is_recognised_and_left_unchanged(tiny_world, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(tiny_world, out, save_steps=3).completed
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != LOCK_NAME}
    again = _run(tiny_world, out, save_steps=3)
    assert again.completed and "already complete" in capsys.readouterr().out
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != LOCK_NAME}
    assert before == after
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]

    # Killed after the final adapter but before summary.json: finalised, not trained further.
    (out / "summary.json").unlink()
    (out / "adapter_model.safetensors").unlink()
    result = _run(tiny_world, out, save_steps=3)
    assert result.completed and result.summary["steps"] == 6
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert _same_adapter(out, out / "checkpoint-6")

    # A larger max_steps continues the run explicitly.
    longer = _run(tiny_world, out, save_steps=3, max_steps=9)
    assert longer.completed and longer.summary["steps"] == 9
    assert (out / "checkpoint-9").is_dir() and not _same_adapter(out, out / "checkpoint-6")
    assert "continuing" in capsys.readouterr().out


def test_a_moved_run_folder_is_the_same_run(tiny_world, tmp_path, capsys):
    out = tmp_path / "run"
    assert not _run(tiny_world, out, save_steps=2, stop_after_steps=2).completed
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    result = _run(tiny_world, moved, save_steps=2)
    assert result.completed and result.summary["resumed_from"].endswith("checkpoint-2")
    assert f"resuming {moved} from checkpoint-2 (step 2 of 6)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "err",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        OSError(errno.EROFS, "Read-only file system"),
        OSError(errno.EIO, "Input/output error"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 239744 vs 239636"),
        RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
        Exception(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        ),
    ],
)
def test_write_failures_are_recognised_in_every_wrapping(tmp_path, err):
    assert is_write_failure(err)
    message = str(write_failure(err, tmp_path, 3 << 20))
    assert str(tmp_path) in message and "MiB free" in message and "3.0 MiB needed" in message
    assert not is_write_failure(RuntimeError("shape mismatch"))


@pytest.fixture(scope="module")
def interrupted(tiny_world, tmp_path_factory):
    """A run stopped after step 4 (checkpoints 2 and 4) and the same run uninterrupted."""
    root = tmp_path_factory.mktemp("interrupted")
    assert not _run(tiny_world, root / "half", save_steps=2, stop_after_steps=4).completed
    assert _run(tiny_world, root / "full", save_steps=2).completed
    return root


def _damaged_copy(interrupted: Path, tmp_path: Path, damage) -> Path:
    out = tmp_path / f"run-{uuid.uuid4().hex[:6]}"
    shutil.copytree(interrupted / "half", out)
    damage(out / "checkpoint-4")
    return out


@pytest.mark.parametrize(
    "damage,reason",
    [
        (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
        (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt is unreadable"),
        (lambda c: (c / "adapter_model.safetensors").write_bytes(b""), "unreadable safetensors"),
        (
            lambda c: (c / "trainer_state.json").write_text("{oops"),
            "trainer_state.json: unreadable",
        ),
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_to_an_intact_one(
    tiny_world, interrupted, tmp_path, capsys, damage, reason
):
    out = _damaged_copy(interrupted, tmp_path, damage)
    problem = checkpoint_problem(out / "checkpoint-4")
    assert problem and reason in problem
    assert pick_checkpoint(out).path.name == "checkpoint-2"
    result = _run(tiny_world, out, save_steps=2)
    said = capsys.readouterr().out
    line = next(x for x in said.splitlines() if x.startswith("checkpoint-4 is damaged ("))
    assert reason in line and line.endswith("resuming from checkpoint-2"), line
    assert result.completed and result.summary["resumed_from"].endswith("checkpoint-2")
    assert _same_adapter(
        out, interrupted / "full"
    )  # the uninterrupted result, not a fresh optimizer


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_no_intact_checkpoint_is_one_clear_error(tiny_world, interrupted, tmp_path):
    out = _damaged_copy(interrupted, tmp_path, lambda c: None)
    for name in ("checkpoint-2", "checkpoint-4"):
        (out / name / "scheduler.pt").unlink()
    with pytest.raises(ConfigError, match="no intact checkpoint to resume from .checkpoint-4"):
        _run(tiny_world, out, save_steps=2)


def test_nan_stop_names_the_checkpoint_it_verified(tiny_world, interrupted, tmp_path, monkeypatch):
    from llava_mole.train.trainer import MoLETrainer, NonFiniteLossError

    out = _damaged_copy(interrupted, tmp_path, lambda c: None)
    # A NaN written into the newest checkpoint's adapter: it is not "the last good checkpoint".
    adapter = out / "checkpoint-4" / "adapter_model.safetensors"
    original = MoLETrainer.compute_loss

    def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(self, model, inputs, return_outputs, num_items_in_batch)
        if self.state.global_step == 4:
            from safetensors.torch import save_file

            tensors = load_file(str(adapter))
            first = next(iter(tensors))
            tensors[first] = tensors[first] * float("nan")
            save_file(tensors, str(adapter))
            return loss * float("nan")
        return loss

    monkeypatch.setattr(MoLETrainer, "compute_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"last good checkpoint .*checkpoint-2 is intact"):
        _run(tiny_world, out, save_steps=2)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 8 MiB tmpfs (root and mount permission needed; skipped with the reason otherwise)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_on_a_real_tmpfs_is_one_line_and_keeps_the_checkpoint(
    tiny_world, small_tmpfs, tmp_path, capsys
):
    out = small_tmpfs / "run"
    items = base_overrides(tiny_world, out, save_steps=2)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("{}\n")
    assert main(["train", str(cfg), *_set_args(items + ["train.stop_after_steps=2"])]) == 0
    checkpoint = sum(p.stat().st_size for p in (out / "checkpoint-2").rglob("*") if p.is_file())
    free = shutil.disk_usage(small_tmpfs).free
    # Leave less room than one more checkpoint needs.
    (small_tmpfs / "filler").write_bytes(b"\0" * max(0, free - checkpoint // 2))
    capsys.readouterr()
    code = main(["train", str(cfg), *_set_args(items)])
    err = capsys.readouterr().err
    assert code == 2, err
    first = next(x for x in err.splitlines() if "llava-mole train: error:" in x)
    first = first[first.index("llava-mole train: error:") :]
    assert "cannot write" in first and "disk full" in first and "MiB free" in first, err
    assert "Traceback" not in err
    assert not list(out.glob(".tmp-checkpoint-*"))
    assert pick_checkpoint(out).path.name == "checkpoint-2"
    assert not (out / "summary.json").exists()
    (small_tmpfs / "filler").unlink()
    assert main(["train", str(cfg), *_set_args(items)]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
