"""PipeFusion's schedule as pure data: which blocks a stage owns, which tokens a patch holds, and the
(step, patch) work every stage does in order.

Every stage walks the *same* sequence of work items; only their timing differs (stage ``s`` is ``s``
items behind stage 0). The first ``warmup_steps`` steps are one item each over the whole latent
(``patch is None``): they run synchronously and fill the K/V buffers. After that a step is
``num_patches`` items, one per patch, and the last stage hands each updated patch back to stage 0,
so with ``num_patches >= stages`` stage 0 never waits: no bubble but the pipeline's first fill.
``simulate`` computes that timeline so the claim is tested without processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

from ..parallel_config import ParallelConfig
from .mesh import RankCoords


@dataclass(frozen=True)
class Work:
    """One unit of a stage's work: step ``step`` on patch ``patch`` (None = the whole latent)."""

    step: int
    patch: Optional[int]

    @property
    def is_warmup(self) -> bool:
        return self.patch is None


def split_even(total: int, parts: int) -> tuple[tuple[int, int], ...]:
    """``parts`` contiguous ``[start, stop)`` ranges covering ``range(total)``; sizes differ by at most one,
    the larger ones first."""
    if parts < 1:
        raise ValueError(f"cannot split into {parts} parts; need at least 1")
    if total < parts:
        raise ValueError(f"cannot split {total} items into {parts} non-empty parts; use at most {total} parts")
    base, extra = divmod(total, parts)
    bounds, start = [], 0
    for index in range(parts):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return tuple(bounds)


def split_balanced(costs: Sequence[float], parts: int) -> tuple[tuple[int, int], ...]:
    """``parts`` contiguous ``[start, stop)`` ranges over ``costs`` whose costliest range is as cheap as any
    split allows; among those the most even (least sum of squared costs), ties giving earlier ranges more
    items, so equal costs split like ``split_even``."""
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} items into {parts} non-empty parts; use 1 to {n} parts")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    inf = float("inf")
    # least possible costliest range: bottleneck[k][i] over the first i items in k ranges
    bottleneck = [[inf] * (n + 1) for _ in range(parts + 1)]
    bottleneck[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            bottleneck[k][i] = min(max(bottleneck[k - 1][j], prefix[i] - prefix[j]) for j in range(k - 1, i))
    limit = bottleneck[parts][n] * (1 + 1e-9)
    # least sum of squares of the items i.. in k ranges, no range over the limit
    squares = [[inf] * (n + 1) for _ in range(parts + 1)]
    squares[0][n] = 0.0
    for k in range(1, parts + 1):
        for i in range(n - k, -1, -1):
            squares[k][i] = min((squares[k - 1][j] + (prefix[j] - prefix[i]) ** 2
                                 for j in range(i + 1, n - k + 2) if prefix[j] - prefix[i] <= limit), default=inf)
    bounds, start = [], 0
    for k in range(parts, 0, -1):
        best = squares[k][start]
        stop = max(j for j in range(start + 1, n - k + 2) if prefix[j] - prefix[start] <= limit
                   and squares[k - 1][j] + (prefix[j] - prefix[start]) ** 2 <= best * (1 + 1e-9))
        bounds.append((start, stop))
        start = stop
    return tuple(bounds)


def split_stages(num_blocks: int, degree: int,
                 costs: Optional[Sequence[float]] = None) -> tuple[tuple[int, int], ...]:
    """Transformer blocks ``[start, stop)`` per pipeline stage. With each block's ``costs`` (its FLOPs, from
    ``models.block_sizes``) the stages are balanced by cost; without, by count: 5 blocks over 2 -> (0,3), (3,5)."""
    if degree > num_blocks:
        raise ValueError(f"pipefusion_degree {degree} exceeds the model's {num_blocks} transformer blocks; "
                         f"use pipefusion_degree <= {num_blocks}")
    if costs is None:
        return split_even(num_blocks, degree)
    if len(costs) != num_blocks:
        raise ValueError(f"{len(costs)} block costs for {num_blocks} blocks")
    return split_balanced(costs, degree)


def spec_stages(spec: Any, degree: int) -> tuple[tuple[int, int], ...]:
    """The stages of ``spec``'s blocks, balanced by their cost; the one split every rank and the pool use."""
    from ..models.block_sizes import block_costs

    return split_stages(spec.num_blocks, degree, block_costs(spec))


def parallel_stages(parallel: ParallelConfig, spec: Any) -> tuple[tuple[int, int], ...]:
    """The stages ``parallel`` cuts ``spec``'s blocks into: at its ``stage_split`` (measured block times), else
    balanced by cost. Every rank, the pool's weight shipping and the loaders ask this."""
    if not parallel.stage_split:
        return spec_stages(spec, parallel.pipefusion_degree)
    parallel.validate_split(spec.num_blocks)
    starts = (0,) + tuple(parallel.stage_split)
    return tuple(zip(starts, starts[1:] + (spec.num_blocks,)))


def stage_blocks(parallel: ParallelConfig, rank: int, spec: Any) -> Optional[tuple[int, int]]:
    """The blocks ``[start, stop)`` that ``rank``'s PipeFusion stage runs, which is all it needs to load;
    ``None`` without PipeFusion (every rank runs every block)."""
    if parallel.pipefusion_degree == 1:
        return None
    return parallel_stages(parallel, spec)[RankCoords.of(rank, parallel).pipefusion]


def patch_bounds(num_tokens: int, num_patches: int) -> tuple[tuple[int, int], ...]:
    """Image-token ranges ``[start, stop)`` of each patch (tokens are row-major, so patches are bands)."""
    if num_tokens < num_patches:
        raise ValueError(f"{num_patches} patches need at least {num_patches} image tokens, the latent has "
                         f"{num_tokens}; use fewer patches or a larger image")
    return split_even(num_tokens, num_patches)


def stage_work(steps: int, warmup_steps: int, num_patches: int) -> Iterator[Work]:
    """The work items every stage runs, in order: whole-latent warm-up steps, then patch by patch."""
    warmup = min(warmup_steps, steps)
    for step in range(warmup):
        yield Work(step, None)
    for step in range(warmup, steps):
        for patch in range(num_patches):
            yield Work(step, patch)


def resumed_work(items: Sequence[Work], first_step: int, rewarm: bool) -> list[Work]:
    """The items of a run resumed before step ``first_step``: those from it on; with ``rewarm`` (the K/V of
    the steps before is not at hand) that step runs once over the whole latent, refilling every buffer."""
    later = [work for work in items if work.step >= first_step]
    if not rewarm or not later or later[0].is_warmup:
        return later
    return [Work(first_step, None)] + [work for work in later if work.step > first_step]


def producer_of_input(work: Work, warmup_steps: int, whole_steps: frozenset[int] = frozenset()) -> Work:
    """The last-stage item whose sampler update stage 0 needs before it can start ``work``.

    Patch ``p`` of step ``i`` starts from patch ``p`` after step ``i - 1``; the step after the warm-up
    (or after a re-warm step of a resumed run, in ``whole_steps``) starts from the whole latent it wrote.
    """
    assert work.step > 0, "step 0 starts from the initial noise"
    previous = work.step - 1
    whole = previous < warmup_steps or previous in whole_steps
    return Work(previous, None if whole else work.patch)


def simulate(num_stages: int, steps: int, warmup_steps: int, num_patches: int,
             warmup_cost: Optional[float] = None) -> dict[tuple[int, Work], tuple[float, float]]:
    """Start and end time of every (stage, work) when a patch item costs 1 and communication is free.

    ``warmup_cost`` (default ``num_patches``) is the cost of a whole-latent item. Each item waits for
    the same item on the previous stage, the stage's previous item, and (on stage 0) the last stage's
    update of its input. Used to test that patch steps overlap with no bubble.
    """
    whole = float(num_patches) if warmup_cost is None else warmup_cost
    times: dict[tuple[int, Work], tuple[float, float]] = {}
    items = list(stage_work(steps, warmup_steps, num_patches))
    free = [0.0] * num_stages  # when each stage finishes its previous item
    for work in items:
        for stage in range(num_stages):
            ready = free[stage]
            if stage > 0:
                ready = max(ready, times[(stage - 1, work)][1])
            elif work.step > 0:
                ready = max(ready, times[(num_stages - 1, producer_of_input(work, warmup_steps))][1])
            end = ready + (whole if work.is_warmup else 1.0)
            times[(stage, work)] = (ready, end)
            free[stage] = end
    return times
