"""Dynamic batching: requests that arrive together are decoded in one ``generate`` call.

One worker thread owns the model. It waits for a job, then keeps collecting jobs for at most
``batch_wait_s`` (or until ``max_batch_size``), and decodes the batch with
:func:`llava_mole.eval.decoding.generate_batch`, each row with its own limits and sampling.
Jobs arriving while a batch runs wait in the queue and form the next batch. Results (and, for
streaming jobs, every step's :class:`~llava_mole.eval.decoding.StreamEvent`) are handed back to
the event loop of the request through an ``asyncio.Queue``.

A batch that raises is retried one job at a time (jobs that already streamed tokens fail), so a
failing request fails alone and the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from llava_mole.adapters.state import get_state
from llava_mole.eval.decoding import DecodeParams, Generation, StreamEvent, generate_batch

from .inputs import Prepared

__all__ = ["BatchEngine", "Job", "QueueFullError"]

log = logging.getLogger("llava_mole.serve")


class QueueFullError(Exception):
    """The queue holds ``max_queue`` waiting jobs already."""


@dataclass
class Job:
    """One request waiting for, or being, decoded.

    Items put on ``events``: ``("event", StreamEvent)`` (streaming jobs, per step),
    ``("done", Generation)`` or ``("error", Exception)``, the last item of a job.
    """

    inputs: Prepared
    params: DecodeParams
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    routing: bool = False
    prompt_routing: bool = False
    seed: int | None = None
    fault: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    started: bool = False
    finished: bool = False

    def deliver(self, kind: str, payload: Any) -> None:
        """Hand an item to the request's event loop (thread-safe)."""
        if kind != "event":
            self.finished = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass


class InjectedFault(RuntimeError):
    """Raised inside ``generate`` for a request holding the fault marker (tests only)."""


class BatchEngine:
    """The generation worker and its queue.

    Args:
        model: The model, in eval mode (see `loaded_for_inference`).
        processor: Its processor.
        image_mode: ``pad`` or ``resize``.
        max_batch_size: Most jobs per ``generate`` call.
        batch_wait_s: How long the first job of a batch waits for more.
        max_queue: Most waiting jobs; `submit` raises `QueueFullError` beyond.
        fault_marker: Test hook: a job whose text holds it raises inside ``generate``.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        *,
        image_mode: str = "pad",
        max_batch_size: int = 16,
        batch_wait_s: float = 0.02,
        max_queue: int = 64,
        fault_marker: str | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or batch_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, batch_wait_s >= 0")
        self.model = model
        self.processor = processor
        self.image_mode = image_mode
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue
        self.fault_marker = fault_marker or None
        state = get_state(model)
        self.num_blocks = 0 if state is None else state.num_blocks
        self.num_experts = 0 if state is None else state.config.num_experts
        self._queue: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running: list[Job] = []
        self.counters = {
            "generate_calls": 0,
            "requests_done": 0,
            "requests_failed": 0,
            "largest_batch": 0,
        }

    @property
    def has_routing(self) -> bool:
        """Whether the model has MoLE blocks (routing can be reported)."""
        return self.num_blocks > 0

    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="generate", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker (its current batch ends at the next step); waiting jobs fail."""
        self._stop.set()
        for job in list(self._running):
            job.cancelled = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.deliver("error", RuntimeError("the server is shutting down"))

    def submit(self, job: Job) -> None:
        """Queue a job.

        Raises:
            QueueFullError: ``max_queue`` jobs are waiting already.
        """
        if self._queue.qsize() >= self.max_queue:
            raise QueueFullError(f"{self._queue.qsize()} requests are waiting (--max-queue)")
        job.fault = bool(self.fault_marker and self.fault_marker in job.inputs.text)
        self._queue.put(job)

    def stats(self) -> dict[str, Any]:
        """Counters for ``/health``: batched ``generate`` calls, finished requests, queue."""
        return {**self.counters, "queued": self._queue.qsize()}

    # ---- worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [job for job in self._collect(first) if not job.cancelled]
            self._running = batch
            if batch:
                self._execute(batch)
            self._running = []

    def _collect(self, first: Job) -> list[Job]:
        """The first job and whatever arrives within the wait window (up to the batch size)."""
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _execute(self, batch: list[Job]) -> None:
        """Decode a batch; after a failure, retry its jobs alone so that only bad ones fail."""
        try:
            self._generate(batch)
            return
        except Exception as err:  # noqa: BLE001 - reported to the requests, the worker lives
            if len(batch) == 1:
                self._fail(batch[0], err)
                return
            log.warning(
                "a batch of %d failed (%s); retrying its requests one by one", len(batch), err
            )
            failed = err
        for job in batch:
            if job.finished:
                continue
            if job.started:  # tokens were streamed already: they cannot be sent twice
                self._fail(job, failed)
                continue
            try:
                self._generate([job])
            except Exception as err:  # noqa: BLE001
                self._fail(job, err)

    def _fail(self, job: Job, err: Exception) -> None:
        if not isinstance(err, InjectedFault):
            log.error("generation failed: %s", err, exc_info=err)
        self.counters["requests_failed"] += 1
        job.deliver("error", err)

    def _generate(self, batch: list[Job]) -> None:
        """One ``generate_batch`` call for the batch; results go to the jobs."""
        self.counters["generate_calls"] += 1
        self.counters["largest_batch"] = max(self.counters["largest_batch"], len(batch))
        listen = any(job.stream or job.fault for job in batch)

        def on_event(event: StreamEvent) -> None:
            job = batch[event.row]
            if job.fault:
                raise InjectedFault("injected fault: the request holds the fault marker")
            if job.stream and not job.cancelled:
                job.started = True
                job.deliver("event", event)

        seeds = [job.seed for job in batch if job.seed is not None]
        results: list[Generation] = generate_batch(
            self.model,
            self.processor,
            [job.inputs.prompt for job in batch],
            [job.inputs.image for job in batch],
            [job.params for job in batch],
            image_mode=self.image_mode,
            routing=self.has_routing and any(job.routing for job in batch),
            prompt_routing=self.has_routing and any(job.prompt_routing for job in batch),
            on_event=on_event if listen else None,
            cancelled=lambda row: batch[row].cancelled,
            seed=seeds[0] if seeds else None,
        )
        for job, result in zip(batch, results, strict=True):
            self.counters["requests_done"] += 1
            job.deliver("done", result)
