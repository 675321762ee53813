"""Stall detection: is every rank of a running job still alive and still making progress?

Pure logic, no Ray. The driver keeps one ``Beat`` per rank, refreshed from the rank's heartbeat
(a ``ping`` answered by the actor's second thread while ``generate`` runs, with the step that rank
last started). ``find_stall`` says which rank is stuck, if any:

- silent: the rank answered no heartbeat for ``stall_s`` (SIGSTOP, a frozen host, a process that
  holds the GIL): its process cannot even answer, so it is the culprit;
- behind: the rank answers, but has sat at one step for ``stall_s`` while another rank is already
  past it (a collective that never returns on that rank; the others wait for it in the next one).

A world whose ranks all answer and all sit at the same step is slow, not stuck: that case is
bounded by ``Timeouts.step_s`` and by the process group's own collective timeout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence


@dataclass(frozen=True)
class Beat:
    """What the driver last heard from one rank (times are the driver's ``time.monotonic()``)."""

    rank: int
    seen_at: float  # last heartbeat answer (or when the watch began, before the first answer)
    step: Optional[int] = None  # the step the rank last started, None before its first
    step_at: float = 0.0  # when the driver first saw the rank at ``step``

    def heard(self, now: float, step: Optional[int]) -> "Beat":
        """This beat after an answer at ``now`` reporting ``step``."""
        moved = step != self.step
        return replace(self, seen_at=now, step=step, step_at=now if moved else self.step_at)


@dataclass(frozen=True)
class Stall:
    rank: int
    reason: str  # says what was seen, with the numbers


def first_beats(ranks: int, now: float) -> tuple[Beat, ...]:
    return tuple(Beat(rank=r, seen_at=now, step=None, step_at=now) for r in range(ranks))


def find_stall(beats: Sequence[Beat], now: float, stall_s: float) -> Optional[Stall]:
    """The stuck rank of ``beats`` at ``now``, or None; a silent rank is named before a lagging one."""
    silent = [b for b in beats if now - b.seen_at > stall_s]
    if silent:
        worst = min(silent, key=lambda b: b.seen_at)
        where = f"at step {worst.step}" if worst.step is not None else "before its first step"
        return Stall(worst.rank, f"no heartbeat for {now - worst.seen_at:.0f}s (limit {stall_s:g}s), last seen {where}")
    known = [b for b in beats if b.step is not None]
    if len(known) < 2:
        return None
    ahead = max(known, key=lambda b: b.step)  # type: ignore[arg-type, return-value]
    behind = [b for b in known if b.step < ahead.step and now - b.step_at > stall_s]  # type: ignore[operator]
    if behind:
        worst = min(behind, key=lambda b: (b.step, b.step_at))
        return Stall(worst.rank, f"stuck at step {worst.step} for {now - worst.step_at:.0f}s (limit {stall_s:g}s) "
                                 f"while rank {ahead.rank} is at step {ahead.step}")
    return None


def describe_beats(beats: Sequence[Beat], now: float) -> str:
    """One line per rank for timeout messages: where each rank was and when it last answered."""
    return "; ".join(f"rank {b.rank}: step {b.step if b.step is not None else '-'}, answered {now - b.seen_at:.0f}s ago"
                     for b in beats)
