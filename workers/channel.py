"""The job channel: a tiny actor between the pool and the ranks, carrying step events and stop decisions.

Rank 0 posts step events without waiting for an answer; the pool drains them. Every rank asks
``should_stop(job, step)`` at the start of each step, and the first answer given for a step is the
answer every rank gets for it: a cancel that arrives while the ranks are inside step ``i`` takes
effect for all of them at step ``i + 1``. So no rank leaves a collective the others are still in.
"""

from __future__ import annotations

from typing import Any


class JobChannel:
    """Per-job event queues, cancel requests, and the memoised per-step stop answers."""

    def __init__(self) -> None:
        self._events: dict[str, list[Any]] = {}
        self._cancelled: set[str] = set()
        self._answers: dict[str, dict[int, bool]] = {}

    def open(self, job: str) -> None:
        self._events[job] = []
        self._answers[job] = {}

    def close(self, job: str) -> None:
        self._events.pop(job, None)
        self._answers.pop(job, None)
        self._cancelled.discard(job)

    def post(self, job: str, event: Any) -> None:
        if job in self._events:
            self._events[job].append(event)

    def drain(self, job: str) -> list[Any]:
        events = self._events.get(job, [])
        self._events[job] = []
        return events

    def cancel(self, job: str) -> None:
        self._cancelled.add(job)

    def should_stop(self, job: str, step: int) -> bool:
        answers = self._answers.setdefault(job, {})
        if step not in answers:
            answers[step] = job in self._cancelled
        return answers[step]

    def ping(self) -> bool:
        return True
