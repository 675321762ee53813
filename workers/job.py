"""A submitted generation: its state, its step events while it runs, then its latent or its error."""

from __future__ import annotations

import dataclasses
import enum
import queue
import threading
import time
from typing import Callable, Iterator, Optional

import torch

from comfyui_xdit.request import GenerationRequest
from comfyui_xdit.resume import Checkpoint, CheckpointPart, CheckpointParts
from comfyui_xdit.sampling import GenerationCancelled, StepEvent

_END = object()


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Job:
    """Handle on one request in the pool. Thread-safe; made by ``XDiTPool.submit``.

    ``events()`` yields ``StepEvent``s (step, total, preview latent or None) until the job ends;
    ``result()`` returns the LATENT (B, C, H, W) or raises the job's error (``WorkerError`` naming
    rank and host, ``GenerationCancelled``, ...); ``cancel()`` stops every rank at the same step.
    When a rank dies and the pool retries the job once, the job resumes from the last step whose checkpoint
    arrived (``checkpoint``; PipeFusion's is put together from every rank's part; the events go on from
    there, the latent is the uninterrupted run's); a data-parallel job starts again from step 1.
    """

    def __init__(self, job_id: str, request: GenerationRequest, default_timeout_s: float,
                 on_cancel: Callable[["Job"], None]) -> None:
        self.id = job_id
        self.request = request
        self.checkpoint: Optional[Checkpoint] = None  # the last finished step's state, for a resumed retry
        self._parts = CheckpointParts()  # PipeFusion's checkpoints arrive in parts, one per rank
        self.last_step, self.last_total = 0, 0  # the newest step event posted, for a resumed retry's catch-up
        self._default_timeout_s = default_timeout_s
        self._on_cancel = on_cancel
        self._lock = threading.Lock()
        self._state = JobState.QUEUED
        self._events: "queue.Queue[object]" = queue.Queue()
        self._done = threading.Event()
        self._latent: Optional[torch.Tensor] = None
        self._error: Optional[BaseException] = None
        self.cancel_requested = False
        self.attempts = 0

    # ---- caller side ---------------------------------------------------------------------------
    @property
    def state(self) -> JobState:
        return self._state

    def done(self) -> bool:
        return self._done.is_set()

    def events(self, timeout: Optional[float] = None) -> Iterator[StepEvent]:
        """Step events as they come; ends when the job ends. ``timeout``: the longest wait for the
        next event (default: the job's timeout); ``TimeoutError`` when exceeded."""
        wait = self._default_timeout_s if timeout is None else timeout
        while True:
            try:
                item = self._events.get(timeout=wait)
            except queue.Empty:
                raise TimeoutError(f"job {self.id}: no step event within {wait:.0f}s") from None
            if item is _END:
                self._events.put(_END)  # later callers of events() end too
                return
            yield item  # type: ignore[misc]

    def poll_events(self) -> list[StepEvent]:
        """Every event that arrived since the last call, without waiting."""
        out = []
        while True:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return out
            if item is _END:
                self._events.put(_END)
                return out
            out.append(item)  # type: ignore[arg-type]

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until the job ends (default: the job's timeout); True when it has."""
        return self._done.wait(self._default_timeout_s if timeout is None else timeout)

    def result(self, timeout: Optional[float] = None) -> torch.Tensor:
        """The final LATENT; raises the job's error, or ``TimeoutError`` if it is still running."""
        wait = self._default_timeout_s if timeout is None else timeout
        if not self._done.wait(wait):
            raise TimeoutError(f"job {self.id} still {self._state.value} after {wait:.0f}s")
        if self._error is not None:
            raise self._error
        assert self._latent is not None
        return self._latent

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        self.wait(timeout)
        return self._error

    def cancel(self) -> None:
        """Ask every rank to stop at the same next step; a queued job never starts."""
        with self._lock:
            if self._done.is_set() or self.cancel_requested:
                return
            self.cancel_requested = True
        self._on_cancel(self)

    # ---- pool side -----------------------------------------------------------------------------
    def _start(self) -> bool:
        """QUEUED -> RUNNING unless cancelled meanwhile (then it ends as cancelled)."""
        with self._lock:
            if self.cancel_requested:
                self._end(JobState.CANCELLED, error=GenerationCancelled(f"job {self.id} cancelled before it started"))
                return False
            self._state = JobState.RUNNING
            self.started_at = time.monotonic()
            return True

    def _post(self, event: "StepEvent | CheckpointPart") -> None:
        if isinstance(event, CheckpointPart):  # a PipeFusion rank's share of a step's state
            whole = self._parts.add(event)
            if whole is not None:
                self.checkpoint = whole
            return
        self.last_step, self.last_total = max(self.last_step, event.step), event.total
        if event.checkpoint is not None:  # kept for a retry; callers of events() get the step and preview
            self.checkpoint = event.checkpoint
            event = dataclasses.replace(event, checkpoint=None)
        self._events.put(event)

    def _catch_up(self, calls: int) -> None:
        """Step events (without previews) for the steps a retry resumes after but whose events were lost with
        the world (PipeFusion's parts can be ahead of rank 0's events), so progress stays continuous."""
        for step in range(self.last_step + 1, calls + 1):
            self._post(StepEvent(step, self.last_total, None))

    def _finish(self, latent: torch.Tensor) -> None:
        with self._lock:
            self._latent = latent
            self._end(JobState.DONE)

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            state = JobState.CANCELLED if isinstance(error, GenerationCancelled) else JobState.FAILED
            self._end(state, error=error)

    def _end(self, state: JobState, error: Optional[BaseException] = None) -> None:
        if self._done.is_set():
            return
        self._state, self._error = state, error
        self._events.put(_END)
        self._done.set()
