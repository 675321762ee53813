"""One rank of the engine: a loaded model plus how this rank takes part in sampling."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

import torch

from .conditioning import Conditioning
from .models.adapter import Adapter
from .parallel_config import ParallelConfig
from .request import GenerationRequest
from .sampling import OnStep, ShouldStop, SamplingPlan, finish, prepare_plan, run_loop

logger = logging.getLogger(__name__)


class Engine:
    """Samples a ``GenerationRequest`` on one rank; the serial engine is the world-size-1 case. ``batch_cfg``:
    run both CFG branches as one forward where ComfyUI batches them (``cond_batch.py``); False: two forwards."""

    def __init__(self, adapter: Adapter, parallel: ParallelConfig = ParallelConfig(), rank: int = 0,
                 batch_cfg: bool = True) -> None:
        if not parallel.is_serial:
            raise ValueError(f"Engine is the serial engine; parallel config {parallel} needs the parallel engine")
        self.adapter = adapter
        self.parallel = parallel
        self.rank = rank
        self.batch_cfg = batch_cfg

    @torch.no_grad()
    def generate(self, request: GenerationRequest, on_step: Optional[OnStep] = None,
                 should_stop: Optional[ShouldStop] = None) -> torch.Tensor:
        """Sample ``request``; returns a LATENT (B, C, H, W) float32 in ComfyUI's convention."""
        plan = replace(prepare_plan(self.adapter, request), batch_cfg=self.batch_cfg)
        if plan.total_calls <= 0:  # denoise == 0: ComfyUI hands the input back untouched
            return request.latent.clone()
        x = run_loop(self.adapter, plan, self._velocity(plan), on_step, should_stop)
        return finish(self.adapter, plan, x)

    def _velocity(self, plan: SamplingPlan):
        def velocity(x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
            return self.adapter.velocity(x, plan.image_ids, cond, sigma)

        return velocity
