"""One run per output folder: an exclusive lock held for the whole run.

Two jobs writing one ``output_dir`` (a job started twice, two seeds by mistake) would leave one
run's adapter beside the other's config and interleave their logs. The lock is an advisory
``flock`` on ``<output_dir>/.llava-mole.lock``: the kernel releases it when the holding
process ends in any way (exit, exception, SIGKILL), so a lock never outlives its process on
this machine. The file also names its holder (PID, host, start time): a second run refuses
with one line naming it, and a run that finds the file of a process that is gone takes it
over and says so. Under ``torchrun`` only global rank 0 takes the lock (every rank shares it).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".llava-mole.lock"


class RunLockedError(RuntimeError):
    """Another live process holds the output folder's lock."""


def _holder(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {since}"


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def run_lock(directory: str | os.PathLike, log=print) -> Iterator[None]:
    """Hold ``directory``'s run lock for the body; refuse if a live process holds it.

    Args:
        directory: the run's output folder (created if needed).
        log: where the take-over note goes.

    Raises:
        RunLockedError: the folder is in use by another run (the message names it).
    """
    if not _is_rank_zero():
        yield
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLockedError(
            f"output_dir {directory} is in use by another run ({_describe(_holder(path))}); "
            "wait for it to finish or use another output_dir"
        ) from None
    try:
        previous = _holder(path)
        if previous.get("pid") not in (None, os.getpid()):
            # We hold the flock, so the process that wrote this record no longer does.
            log(
                f"taking over the lock of a run that ended without releasing it ({_describe(previous)})"
            )
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        yield
    finally:
        try:
            os.ftruncate(fd, 0)  # an empty record: released cleanly
        except OSError:
            pass
        os.close(fd)  # releases the flock
