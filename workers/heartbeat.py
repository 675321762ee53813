"""The driver's side of the ranks' heartbeat: one ping in flight per rank, answers kept as ``Beat``s.

A running job's ``World.gather`` calls ``poll`` between its waits; ``beats`` and ``answers`` are
read by the pool's status without waiting on any rank (a stuck rank cannot slow the status down).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional, Sequence

from .liveness import Beat, first_beats

logger = logging.getLogger(__name__)


class Heartbeats:
    """Heartbeats of one world's ranks during one collective call."""

    def __init__(self, actors: Sequence[Any], interval_s: float = 1.0) -> None:
        now = time.monotonic()
        self._actors = list(actors)
        self._interval_s = interval_s
        self._beats = list(first_beats(len(self._actors), now))
        self._answers: list[Optional[dict[str, Any]]] = [None] * len(self._actors)
        self._dead = [False] * len(self._actors)
        self._pending: dict[Any, int] = {}
        self._sent_at = [float("-inf")] * len(self._actors)
        self._lock = threading.Lock()

    def poll(self) -> None:
        """Collect the answers that arrived, then ping every rank whose last ping was answered."""
        import ray

        with self._lock:
            now = time.monotonic()
            if self._pending:
                ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0)
                for ref in ready:
                    rank = self._pending.pop(ref)
                    try:
                        answer = ray.get(ref, timeout=0)
                    except Exception as exc:  # noqa: BLE001 - the job's own call reports the death
                        logger.debug("rank %d heartbeat failed: %s", rank, exc)
                        self._dead[rank] = True
                        continue
                    self._answers[rank] = answer
                    self._beats[rank] = self._beats[rank].heard(now, answer.get("step"))
            waiting = set(self._pending.values())
            for rank, actor in enumerate(self._actors):
                if rank in waiting or self._dead[rank] or now - self._sent_at[rank] < self._interval_s:
                    continue
                self._pending[actor.ping.remote()] = rank
                self._sent_at[rank] = now

    def beats(self) -> tuple[Beat, ...]:
        with self._lock:
            return tuple(self._beats)

    def answers(self) -> tuple[tuple[Optional[dict[str, Any]], float, bool], ...]:
        """Per rank: the last ping answer (None before the first), its age in seconds, dead or not."""
        with self._lock:
            now = time.monotonic()
            return tuple((a, now - b.seen_at, d) for a, b, d in zip(self._answers, self._beats, self._dead))
