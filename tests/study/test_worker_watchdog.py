"""A study's pool workers end when the study process is killed (no orphan keeps training)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

# A parent that starts the study's pool (same initializer), parks a long task on its worker,
# writes the worker's pid, then waits to be killed.
PARENT = textwrap.dedent(
    """
    import concurrent.futures as futures, multiprocessing, os, sys, time
    from llava_mole.study import runner

    def park(path):
        open(path, "w").write(str(os.getpid()))
        time.sleep(120)

    if __name__ == "__main__":
        with futures.ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=runner._init_worker,
            initargs=(1, os.getpid()),
        ) as pool:
            pool.submit(park, sys.argv[1])
            time.sleep(120)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_exit_when_the_study_process_is_killed(tmp_path: Path):
    script, marker = tmp_path / "parent.py", tmp_path / "worker.pid"
    script.write_text(PARENT, encoding="utf-8")
    parent = subprocess.Popen([sys.executable, str(script), str(marker)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (marker.is_file() and marker.read_text()) and time.monotonic() < deadline:
            assert parent.poll() is None, "the parent died before its worker started"
            time.sleep(0.2)
        worker = int(marker.read_text())
        assert _alive(worker)
        parent.send_signal(signal.SIGKILL)  # as `kill -9`: no cleanup runs in the parent
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), "the worker outlived the killed study process"
    finally:
        if parent.poll() is None:
            parent.kill()
