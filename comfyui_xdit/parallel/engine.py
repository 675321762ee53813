"""One rank of the hybrid-parallel engine: same ``generate`` as the serial ``Engine``, same latent.

Every rank builds the same sampling plan from the request (noise, sigmas, starting tokens are
deterministic), so every rank holds the same ``x``. Each step, the guidance branches' velocities are
computed sequence-parallel inside the rank's ring x ulysses group (both in one forward of batch 2B
where ComfyUI batches them, ``cond_batch.py``; with CFG parallel, one branch per cfg rank), gathered
whole onto every rank, and the sampler step is applied identically
everywhere. PipeFusion (pipefusion_degree > 1) runs its own loop (``pipefusion.py``), with ring x
ulysses inside each stage; ``_run`` is the dispatch point. With data_degree > 1 each data group runs
that loop on its chunk of the batch's images (``data_parallel.py``) and the chunks are gathered at the
end; the stop vote spans the whole world, so every group stops at the same step.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator, Optional

import torch

from ..attention import AttentionBackend
from ..conditioning import Conditioning
from ..models.adapter import Adapter
from ..parallel_config import ParallelConfig
from ..request import GenerationRequest
from ..sampling import (GenerationCancelled, OnStep, SamplingPlan, ShouldStop, apply_cfg, denoised_from, finish,
                        prepare_plan, resume_point, step_event)
from .cfg_parallel import branch_velocities
from .comm import CommCounter, agree_any
from .data_parallel import batch_rows, gather_rows
from .mesh import SEQUENCE_AXES, Mesh
from .pipefusion import OnPart, PipeFusionLoop
from .sequence_parallel import SequenceParallelVelocity, SequenceShard
from .usp_attention import USPAttention

logger = logging.getLogger(__name__)


class ParallelEngine:
    """Samples a request as one rank of ``mesh``; ``counter`` (optional) records the bytes it sends; ``batch_cfg``:
    both CFG branches of a rank in one forward where ComfyUI batches them (``cond_batch.py``), else two."""

    def __init__(self, adapter: Adapter, parallel: ParallelConfig, mesh: Mesh,
                 counter: Optional[CommCounter] = None, batch_cfg: bool = True) -> None:
        if mesh.parallel != parallel:
            raise ValueError(f"mesh was built for {mesh.parallel.describe()}, engine asked for {parallel.describe()}; "
                             f"build the mesh from the same ParallelConfig")
        self.adapter = adapter
        self.parallel = parallel
        self.mesh = mesh
        self.rank = mesh.rank
        self.counter = counter
        self.batch_cfg = batch_cfg

    @torch.no_grad()
    def generate(self, request: GenerationRequest, on_step: Optional[OnStep] = None,
                 should_stop: Optional[ShouldStop] = None, on_part: Optional[OnPart] = None) -> torch.Tensor:
        """Sample ``request``; returns a LATENT (B, C, H, W) float32 on CPU, identical on every rank.

        ``should_stop`` may be given on any subset of ranks; all ranks stop at the same step. ``on_part``
        (every rank's): PipeFusion's per-rank share of each step's checkpoint, when the request asks for them.
        """
        if request.parallel != self.parallel:
            raise ValueError(f"request asks for {request.parallel.describe()} but this engine runs "
                             f"{self.parallel.describe()}; build the engine from request.parallel")
        plan = replace(prepare_plan(self.adapter, request), batch_cfg=self.batch_cfg)
        batch = plan.x.shape[0]
        self.parallel.validate_for(self.mesh.world_size, self.adapter.num_heads, plan.x.shape[1], request.cfg,
                                   num_blocks=len(self.adapter.blocks), batch_size=batch)
        if plan.total_calls == 0:  # denoise == 0: ComfyUI hands the input back untouched
            return request.latent.clone()
        if self.parallel.data_degree > 1:
            if plan.resume is not None:  # each group's rows are elsewhere
                raise ValueError(f"resuming is available without data parallel only, not for "
                                 f"{self.parallel.describe()}; run the request again from its first step")
            plan = replace(plan, checkpoints=False)
        degree = self.parallel.data_degree
        mine = plan if degree == 1 else plan.rows(*batch_rows(batch, degree, self.mesh.coords.data))
        x = self._run(mine, on_step, should_stop, on_part)  # (rows, N, C): this data group's images
        if self.counter is not None:
            self.counter.begin_step(-1)
        x = gather_rows(x, batch, self.mesh.group(("data",)), degree, self.counter)  # (B, N, C)
        return finish(self.adapter, plan, x)

    # ---- the loops ------------------------------------------------------------------------------
    def _run(self, plan: SamplingPlan, on_step: Optional[OnStep], should_stop: Optional[ShouldStop],
             on_part: Optional[OnPart] = None) -> torch.Tensor:
        """Dispatch point: one loop per parallel strategy; each installs its own attention backend in the
        adapter's seam (see ``_attention``) and returns the final tokens (B, N, C) on every rank."""
        if self.parallel.pipefusion_degree > 1:
            return self._run_pipefusion(plan, on_step, should_stop, on_part)
        return self._run_sequence(plan, on_step, should_stop)

    def _run_pipefusion(self, plan: SamplingPlan, on_step: Optional[OnStep],
                        should_stop: Optional[ShouldStop], on_part: Optional[OnPart]) -> torch.Tensor:
        """Blocks in pipeline stages, the latent in patches, ring x ulysses inside each stage. The loop
        installs its stale-K/V backend per item and restores the seam when it returns."""
        loop = PipeFusionLoop(self.adapter, self.parallel, self.mesh, self.counter)
        return loop.run(plan, on_step, should_stop, on_part)

    def _run_sequence(self, plan: SamplingPlan, on_step: Optional[OnStep],
                      should_stop: Optional[ShouldStop]) -> torch.Tensor:
        """Whole-latent steps; each model forward is split over ring x ulysses, branches over cfg."""
        usp = USPAttention.for_device(self.mesh.group(("ulysses",)), self.mesh.group(("ring",)), self.adapter.device,
                                      self.adapter.dtype, self.counter)
        with self._attention(usp):
            return self._sequence_loop(plan, on_step, should_stop)

    def _sequence_loop(self, plan: SamplingPlan, on_step: Optional[OnStep],
                       should_stop: Optional[ShouldStop]) -> torch.Tensor:
        shard = SequenceShard(self.mesh.index(SEQUENCE_AXES), self.mesh.size(SEQUENCE_AXES))
        velocity = SequenceParallelVelocity(self.adapter, shard, self.mesh.group(SEQUENCE_AXES), self.counter)
        x, state = plan.begin(plan.x.to(self.adapter.device))
        inpaint = plan.inpaint.to(x.device) if plan.inpaint is not None else None
        step_noise = plan.step_noise(x.device)  # every rank steps the whole latent: each draws the same
        x, state, first = resume_point(plan, x, state, step_noise)
        image_ids = plan.image_ids
        for i in range(first, plan.total_calls):
            if self.counter is not None:
                self.counter.begin_step(i)
            self._check_stop(should_stop, i, x.device)
            sigma = plan.call_sigmas[i]
            sigma_batch = plan.model_sigmas[i] * x.new_ones(x.shape[0])  # what the adapter is told
            seen = inpaint.model_input(x, sigma) if inpaint is not None else x  # what the sampler shows the model
            model_in = plan.prediction.model_input(seen, sigma)

            def branch(tokens: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
                return velocity(tokens, image_ids, cond, sigmas)

            v_cond, v_uncond = branch_velocities(branch, model_in, sigma_batch, plan.positive, plan.negative,
                                                 self.mesh.group(("cfg",)), self.mesh.coords.cfg, self.counter,
                                                 plan.batch_cfg)
            uncond = denoised_from(seen, sigma, v_uncond, plan.prediction) if v_uncond is not None else None
            denoised = apply_cfg(denoised_from(seen, sigma, v_cond, plan.prediction), uncond, plan.cfg)
            if inpaint is not None:
                denoised = inpaint.model_output(denoised)
            x, state = plan.step(x, denoised, plan.sigmas, i, state, None if step_noise is None else (lambda: step_noise(i)),
                                 uncond)
            if on_step is not None:
                on_step(step_event(self.adapter, plan, i, denoised, x, state, step_noise))
        return x

    # ---- helpers --------------------------------------------------------------------------------
    def _check_stop(self, should_stop: Optional[ShouldStop], step: int, device: torch.device) -> None:
        """All ranks agree (one tiny all-reduce) so that a cancel never leaves a rank waiting."""
        wanted = should_stop is not None and should_stop(step)
        if agree_any(wanted, device, None, self.counter, self.mesh.world_size):
            raise GenerationCancelled(f"cancelled before step {step}")

    @contextmanager
    def _attention(self, backend: AttentionBackend) -> Iterator[None]:
        """Route the adapter's seam through ``backend`` for one generation, then restore it."""
        previous = self.adapter.seam.backend
        self.adapter.seam.backend = backend
        try:
            yield
        finally:
            self.adapter.seam.backend = previous
