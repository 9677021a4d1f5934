"""Checkpoint folders of a run: which are complete, which are intact, and write failures.

A checkpoint ``checkpoint-N/`` holds the adapter (``save_adapter`` format), the optimizer,
scheduler and RNG state and ``trainer_state.json``. The optimizer state is ``optimizer.pt``
(one process, DDP), ``optimizer.bin`` (FSDP2) or DeepSpeed's ``latest`` tag with its
``global_stepN/`` partitions (one file per rank). It is written under a temporary name and
renamed when every file is on disk, so a *complete* checkpoint has every file. A complete
checkpoint can still be *damaged* later (a truncated copy, a zero-byte file, bit rot, a NaN
written by a diverging run): before resuming, :func:`pick_checkpoint` reads every file and
falls back to the newest intact one, saying which and why, instead of resuming silently with
a fresh optimizer or stopping on a ``PytorchStreamReader`` traceback.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..adapters.inject import AdapterError
from ..adapters.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    fsync_dir,
    read_adapter_config,
    read_adapter_tensors,
)

TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
FSDP_OPTIMIZER = "optimizer.bin"
DEEPSPEED_TAG = "latest"
SCHEDULER = "scheduler.pt"
NEEDED = (CONFIG_NAME, WEIGHTS_NAME, TRAINER_STATE, SCHEDULER)
TEMP_PREFIX = f".tmp-{PREFIX_CHECKPOINT_DIR}-"


def checkpoint_step(path: Path) -> int | None:
    """``N`` of a ``checkpoint-N`` directory, else ``None``."""
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    if path.is_dir() and path.name.startswith(prefix) and path.name[len(prefix) :].isdigit():
        return int(path.name[len(prefix) :])
    return None


def is_complete_checkpoint(path: Path) -> bool:
    """Adapter and trainer state present: the folder was renamed from its temporary name.

    Whether every file also reads back is :func:`checkpoint_problem`'s question.
    """
    return all((path / name).is_file() for name in (CONFIG_NAME, WEIGHTS_NAME, TRAINER_STATE))


def _checkpoints(run_dir: str | os.PathLike | None) -> list[Path]:
    """``checkpoint-N`` directories, newest first."""
    if not run_dir or not Path(run_dir).is_dir():
        return []
    steps = [(s, p) for p in Path(run_dir).iterdir() if (s := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(steps, reverse=True)]


def latest_checkpoint(run_dir: str | os.PathLike | None) -> Path | None:
    """The newest complete ``checkpoint-N`` directory of a run (temporary ones are ignored)."""
    return next((p for p in _checkpoints(run_dir) if is_complete_checkpoint(p)), None)


def read_trainer_state(path: Path) -> dict:
    """``trainer_state.json`` of a checkpoint; :class:`AdapterError` names the file if bad."""
    file = path / TRAINER_STATE
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{file}: unreadable ({err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise AdapterError(f"{file}: no global_step")
    return state


def optimizer_files(path: Path) -> list[Path] | str:
    """The files holding a checkpoint's optimizer state, or why there are none."""
    for name in (OPTIMIZER, FSDP_OPTIMIZER):
        if (path / name).is_file():
            return [path / name]
    tag_file = path / DEEPSPEED_TAG
    if not tag_file.is_file():
        return f"{OPTIMIZER} is missing"
    try:
        tag = tag_file.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        return f"{DEEPSPEED_TAG} is unreadable ({err})"
    folder = path / tag
    files = sorted(folder.glob("*.pt")) if tag and folder.is_dir() else []
    if not any("optim_states" in f.name for f in files):
        return f"DeepSpeed optimizer partitions are missing ({DEEPSPEED_TAG} names {tag!r})"
    return files


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from exactly, or ``None`` when every file reads back."""
    missing = [name for name in NEEDED if not (path / name).is_file()]
    if missing:
        return f"{missing[0]} is missing"
    optimizer = optimizer_files(path)
    if isinstance(optimizer, str):
        return optimizer
    rng = list(path.glob("rng_state*.pth"))
    if not rng:
        return "rng_state.pth is missing"
    try:
        read_trainer_state(path)
        read_adapter_config(path)
        tensors = read_adapter_tensors(path)
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"adapter tensor {name!r} is not finite (NaN/Inf)"
    except AdapterError as err:
        return str(err)
    for file in (*optimizer, path / SCHEDULER, *rng):
        problem = _archive_problem(file)
        if problem:
            return f"{file.relative_to(path)} is unreadable ({problem})"
    return None


def _archive_problem(file: Path) -> str | None:
    """A ``torch.save`` file is a zip archive: read every member back and check its CRC.

    This finds truncated, zero-byte and corrupted files without unpickling anything.
    """
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return str(err) or type(err).__name__
    return f"member {bad} is corrupt" if bad else None


@dataclass
class CheckpointChoice:
    """The checkpoint to resume from and the damaged newer ones that were passed over."""

    path: Path | None
    passed_over: list[tuple[Path, str]] = field(default_factory=list)


def pick_checkpoint(run_dir: str | os.PathLike) -> CheckpointChoice:
    """The newest checkpoint every file of which reads back (see :func:`checkpoint_problem`)."""
    choice = CheckpointChoice(None)
    for path in _checkpoints(run_dir):
        if not any(path.iterdir()):
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            choice.path = path
            return choice
        choice.passed_over.append((path, problem))
    return choice


def rotate_checkpoints(run_dir: Path, limit: int | None, keep_temp: Path | None = None) -> None:
    """Keep the newest ``limit`` checkpoints; remove leftover temporary folders."""
    if limit and limit >= 1:
        for path in _checkpoints(run_dir)[limit:]:
            shutil.rmtree(path, ignore_errors=True)
    for leftover in run_dir.glob(f"{TEMP_PREFIX}*"):
        if leftover.is_dir() and leftover != keep_temp:
            shutil.rmtree(leftover, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(root)


# ---- write failures --------------------------------------------------------------------------

_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# What torch's zip writer and safetensors say when the OS refused a write.
_WRITE_MESSAGES = (
    "no space left",
    "disk quota",
    "read-only file system",
    "unexpected pos",
    "file write failed",
    "input/output error",
    "file too large",
)


class CheckpointWriteError(OSError):
    """A checkpoint or final adapter could not be written; the message says where and why."""


def is_write_failure(err: BaseException) -> bool:
    """Whether ``err`` (an OSError, or what torch / safetensors wrap one in) is a failed write."""
    for inner in (err, err.__cause__, err.__context__):
        if isinstance(inner, OSError) and inner.errno in _WRITE_ERRNOS:
            return True
    text = str(err).lower()
    return any(message in text for message in _WRITE_MESSAGES)


def _reason(err: BaseException) -> str:
    for inner in (err, err.__cause__, err.__context__):
        if isinstance(inner, OSError) and inner.errno in _WRITE_ERRNOS:
            text = os.strerror(inner.errno)
            return f"disk full: {text}" if inner.errno in _FULL_ERRNOS else text
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    full = any(m in first.lower() for m in ("no space left", "disk quota", "unexpected pos"))
    return f"disk full: {first[:160]}" if full else first[:160]


def write_failure(err: BaseException, folder: Path, needed_bytes: int) -> CheckpointWriteError:
    """One line: which folder, what the OS said, free space and about how much is needed."""
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    except OSError:
        free = -1
    mib = 1024 * 1024
    free_text = f"{free / mib:.1f} MiB free" if free >= 0 else "free space unknown"
    return CheckpointWriteError(
        f"cannot write {folder} ({_reason(err)}): {free_text}, about {needed_bytes / mib:.1f} "
        "MiB needed; the temporary files were removed and the last complete checkpoint is kept"
    )


def folder_bytes(path: Path | None) -> int:
    """Total size of the files under ``path`` (0 if it does not exist)."""
    if path is None or not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
