"""Running the study's runs: resume, a spawn process pool, progress with an ETA, per-run logs.

Finished work is never redone: a run with a ``summary.json`` is not trained again and a run
with an ``eval.json`` is not evaluated again, so re-running an interrupted study continues it
(partially trained runs resume from their checkpoints through the trainer). A finished run
whose saved config differs from the plan is refused (:func:`check_stale`).
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..eval.generate import evaluate
from ..train.resume import RESUME_FREE_KEYS, config_changes
from ..train.run import train
from .config import EvalSection, StudyConfig
from .errors import StudyConfigError, StudyWorkersError
from .items import read_item_scores, write_item_scores
from .plan import EVAL, ITEMS, SUMMARY, RunSpec
from .results import RunOutput

__all__ = ["check_stale", "collect_runs", "run_all"]

# Keys that may differ between the run already on disk and the study's plan without making
# the stored result stale (they change logging or speed, not the trained adapter).
_CHANGE_FREE = RESUME_FREE_KEYS | {"output_dir"}


def check_stale(spec: RunSpec) -> None:
    """Refuse to reuse a finished run that was trained with another config than planned now."""
    saved = spec.run_dir / "run_config.yaml"
    if not (spec.run_dir / SUMMARY).is_file() or not saved.is_file():
        return
    before = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    changes = config_changes(before, spec.config, ignore=_CHANGE_FREE)
    if changes:
        key, old, now = changes[0]
        raise StudyConfigError(
            f"{spec.run_dir}: this finished run was trained with {key}={old!r}, "
            f"the study now asks {now!r}; use a new output folder or delete the run"
        )


@dataclass
class _Job:
    """What a (possibly remote) worker needs to do one run."""

    spec: RunSpec
    model: Path
    eval: EvalSection
    progress: bool
    log_to_file: bool


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout/stderr (file descriptors, so C and tqdm too) to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _execute(job: _Job) -> dict[str, Any]:
    """Train (unless finished) and evaluate (unless evaluated) one run; score its items.

    Args:
        job: the run and the evaluation settings.

    Returns:
        ``{"id", "trained", "evaluated", "seconds"}``.
    """
    spec = job.spec
    started = time.perf_counter()
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    trained = evaluated = False
    context = (
        _output_to(spec.run_dir / "study.log") if job.log_to_file else contextlib.nullcontext()
    )
    with context:
        if not (spec.run_dir / SUMMARY).is_file():
            (spec.run_dir / EVAL).unlink(missing_ok=True)  # an eval of an older adapter
            result = train(spec.config)
            if not result.completed:
                raise RuntimeError(f"{spec.id}: training stopped before the end")
            trained = True
        if not (spec.run_dir / EVAL).is_file():
            _evaluate(job)
            evaluated = True
    return {
        "id": spec.id,
        "trained": trained,
        "evaluated": evaluated,
        "seconds": time.perf_counter() - started,
    }


def _evaluate(job: _Job) -> None:
    """Evaluate the run's adapter (with routing statistics) and write its per-item scores."""
    spec = job.spec
    given = {"batch_size": job.eval.batch_size, "max_new_tokens": job.eval.max_new_tokens}
    evaluate(
        job.model,
        spec.run_dir,
        mixture=spec.eval_mixture,
        split=job.eval.split,
        out=spec.run_dir / EVAL,
        limit=job.eval.limit,
        routing=True,
        progress=job.progress,
        **{k: v for k, v in given.items() if v is not None},  # else the eval's defaults
    )
    write_item_scores(spec.run_dir, spec.eval_mixture)


def _init_worker(threads: int, parent: int | None = None) -> None:
    """Pool initializer: share the cores among the workers instead of oversubscribing them,
    and end the worker when the study process is gone (:func:`_exit_with_parent`)."""
    import torch

    torch.set_num_threads(threads)
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """Exit this worker once its parent ``parent`` has died (it is re-parented).

    A worker outliving a killed ``llava-mole compare`` would go on training its queued runs
    into the study folder, where a new study (or a re-run) trains the same runs: two writers
    of one run folder. Its current run stays unfinished (no ``summary.json``), so a re-run
    resumes or redoes it.
    """
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(3)


def _clock(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class _Progress:
    """Elapsed time and an ETA from the runs finished so far, weighted by their steps."""

    def __init__(self, specs: list[RunSpec], enabled: bool) -> None:
        self.enabled = enabled
        self.total = len(specs)
        self.started = time.perf_counter()
        self.pending_steps = {s.id: self._work(s) for s in specs}
        self.work_done = 0.0
        self.time_spent = 0.0

    @staticmethod
    def _work(spec: RunSpec) -> float:
        # Training dominates; an evaluation-only run counts as a fraction of a step budget.
        if (spec.run_dir / SUMMARY).is_file():
            return 0.0 if (spec.run_dir / EVAL).is_file() else 0.1 * spec.steps
        return float(spec.steps)

    def eta(self) -> str:
        remaining = sum(self.pending_steps.values())
        if remaining == 0:
            return "0m00s"
        if self.work_done == 0:
            return "unknown"
        return "~" + _clock(self.time_spent / self.work_done * remaining)

    def done(self, spec: RunSpec, seconds: float, wall: bool) -> None:
        work = self.pending_steps.pop(spec.id, 0.0)
        if work > 0:
            self.work_done += work
            # In parallel the wall clock, not the summed run times, is what the ETA must track.
            self.time_spent = (
                time.perf_counter() - self.started if wall else self.time_spent + seconds
            )

    def say(self, text: str) -> None:
        if self.enabled:
            elapsed = _clock(time.perf_counter() - self.started)
            print(f"[study] {text} | elapsed {elapsed}, ETA {self.eta()}", flush=True)


def _describe(spec: RunSpec) -> str:
    """One line naming the run for progress output."""
    adapter = spec.config.adapter
    mlp = f", MLP r={adapter.mlp_rank}" if adapter.mlp_rank not in (None, adapter.rank) else ""
    kind = (
        f"MoLE K={adapter.num_experts} r={adapter.rank}"
        if adapter.type == "mole"
        else f"LoRA r={adapter.rank}{mlp}"
    )
    domain = f" domain {spec.domain}" if spec.domain else ""
    return f"{spec.setting}{domain} seed {spec.seed} ({kind}, {spec.steps} steps)"


def _status(spec: RunSpec) -> str:
    """What a run still needs: ``training``, ``evaluating`` or nothing (``done``)."""
    if (spec.run_dir / SUMMARY).is_file():
        return "done" if (spec.run_dir / EVAL).is_file() else "evaluating"
    return "training"


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    """torch's thread count set to ``threads`` (None: unchanged) for the block, then restored."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _job(study: StudyConfig, spec: RunSpec, progress: bool, log_to_file: bool) -> _Job:
    return _Job(spec, study.model, study.eval, progress, log_to_file)


def _run_serial(study: StudyConfig, specs: list[RunSpec], meter: _Progress, progress: bool) -> None:
    """Every run in this process, one after the other."""
    for i, spec in enumerate(specs, 1):
        status = _status(spec)
        meter.say(f"run {i}/{len(specs)} {_describe(spec)}: {status}")
        if status == "done":
            meter.done(spec, 0.0, wall=False)
            continue
        outcome = _execute(_job(study, spec, progress, log_to_file=not progress))
        meter.done(spec, outcome["seconds"], wall=False)
    meter.say(f"all {len(specs)} runs finished")


def _dead_pool(spec: RunSpec) -> StudyWorkersError:
    return StudyWorkersError(
        f"the study's worker processes stopped abruptly (run {spec.id} did not "
        "finish): a worker was killed (out of memory?), or a script calling "
        'run_study lacks `if __name__ == "__main__":` (workers start with '
        "spawn); finished runs are kept, run the study again to continue"
    )


def _run_pool(study: StudyConfig, specs: list[RunSpec], meter: _Progress) -> None:
    """The unfinished runs in a spawn process pool of ``study.workers`` processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = study.threads or max(1, (cores or 1) // study.workers)
    todo = [s for s in specs if _status(s) != "done"]
    for spec in specs:
        if spec not in todo:
            meter.done(spec, 0.0, wall=False)
    meter.say(
        f"{len(specs) - len(todo)}/{len(specs)} runs already done; {len(todo)} to go on "
        f"{study.workers} workers x {threads} threads (per-run output in <run>/study.log)"
    )
    finished = len(specs) - len(todo)
    with futures.ProcessPoolExecutor(
        max_workers=study.workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(threads, os.getpid()),
    ) as pool:
        pending = {pool.submit(_execute, _job(study, s, False, True)): s for s in todo}
        try:
            for future in futures.as_completed(pending):
                spec = pending[future]
                try:
                    outcome = future.result()
                except futures.process.BrokenProcessPool as err:
                    raise _dead_pool(spec) from err
                except BaseException:
                    print(f"[study] run {spec.id} failed; see {spec.run_dir}/study.log", flush=True)
                    raise
                finished += 1
                meter.done(spec, outcome["seconds"], wall=True)
                meter.say(f"finished {finished}/{len(specs)}: {_describe(spec)}")
        except BaseException:
            # Do not start queued runs; finished ones are on disk and a re-run continues.
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def run_all(study: StudyConfig, specs: list[RunSpec], progress: bool) -> None:
    """Execute every run: in this process (one worker) or in a spawn process pool.

    Args:
        study: the study (``workers``, model, eval settings).
        specs: the planned runs.
        progress: print progress lines and the trainer's output (else into ``study.log``).
    """
    meter = _Progress(specs, progress)
    if study.workers == 1:
        with _threads(study.threads):
            _run_serial(study, specs, meter, progress)
    else:
        _run_pool(study, specs, meter)


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``."""
    return json.loads(path.read_text(encoding="utf-8"))


def collect_runs(specs: list[RunSpec]) -> list[RunOutput]:
    """Read each finished run's ``summary.json``, ``eval.json`` and per-item scores.

    Runs evaluated before per-item scores were recorded get them now, from their predictions.

    Args:
        specs: the planned runs (all finished).

    Returns:
        One :class:`~llava_mole.study.results.RunOutput` per run.
    """
    records = []
    for spec in specs:
        adapter = spec.config.adapter
        if not (spec.run_dir / ITEMS).is_file():
            write_item_scores(spec.run_dir, spec.eval_mixture)
        records.append(
            RunOutput(
                id=spec.id,
                setting=spec.setting,
                base=spec.base,
                domain=spec.domain,
                seed=spec.seed,
                run_dir=str(spec.run_dir),
                adapter={
                    "type": adapter.type,
                    "rank": adapter.rank,
                    "mlp_rank": adapter.mlp_rank,
                    "alpha": adapter.alpha,
                    "num_experts": adapter.num_experts if adapter.type == "mole" else 1,
                },
                max_steps=spec.steps,
                batch_size=spec.config.train.per_device_batch_size
                * spec.config.train.gradient_accumulation,
                summary=_read_json(spec.run_dir / SUMMARY),
                eval=_read_json(spec.run_dir / EVAL),
                items=read_item_scores(spec.run_dir),
            )
        )
    return records
