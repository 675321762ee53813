"""PipeFusion stages cut by measured block times, for when FLOPs mislead.

``models/block_sizes.py`` cuts the stages by each block's FLOPs, which is right where matmuls dominate (a
GPU at full size). Where they do not, equal FLOPs are not equal time: on CPU a Flux double block takes
about 1.5x a single block of the same FLOPs (two streams of norms, modulation and rotary), so a FLOP cut
leaves stage 0 the slower one. ``block_seconds`` times every block of a loaded adapter on a patch of a
request's latent, and ``measured_split`` turns the times into a ``ParallelConfig.stage_split``.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..models.adapter import Adapter
from ..request import GenerationRequest
from ..sampling import prepare_plan
from .pipefusion_schedule import split_balanced


@torch.no_grad()
def block_seconds(adapter: Adapter, request: GenerationRequest, repeats: int = 3, patches: int = 1) -> list[float]:
    """The median wall time of each transformer block's forward on one of ``patches`` patches of ``request``'s
    latent (what a PipeFusion item runs: a joint prompt's tokens weigh more against a patch than against the
    whole latent) with the prompt, at its first sigma (one untimed pass first, so that caches settle)."""
    plan = prepare_plan(adapter, request)
    n = plan.x.shape[1] // patches  # the first patch's image tokens
    sigma = plan.model_sigmas[0] * plan.x.new_ones(plan.x.shape[0])  # (B,)
    # (B, N, C) -> (B, n, C): the first patch
    model_in = plan.prediction.model_input(plan.x[:, :n].to(adapter.device), plan.call_sigmas[0])
    state = adapter.embed(model_in, plan.image_ids[:n], plan.positive, sigma)
    adapter.run_blocks(state, 0, len(adapter.blocks))  # untimed
    seconds = []
    for index in range(len(adapter.blocks)):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = adapter.run_blocks(state, index, index + 1)
            times.append(time.perf_counter() - start)
        seconds.append(statistics.median(times))
        state = out
    return seconds


def measured_split(seconds: list[float], stages: int) -> tuple[int, ...]:
    """The ``stage_split`` (first block of each stage after the first) whose slowest stage is as fast as any."""
    return tuple(start for start, _ in split_balanced(seconds, stages)[1:])
