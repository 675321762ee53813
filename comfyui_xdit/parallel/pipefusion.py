"""PipeFusion, written once: the model's blocks split into pipeline stages, the latent into patches.

Every stage walks the same ``stage_work`` sequence. For each (step, patch) item, per CFG branch:
stage 0 embeds the patch, each stage runs its blocks with the stale-K/V attention backend and sends
the activations on; the last stage runs the head, applies CFG and the sampler step to the patch and
sends the updated patch back to stage 0, which needs it one step later. Warm-up items cover the
whole latent (synchronous, equal to serial) and fill the K/V buffers.

The text stream is carried *per patch*: stage 0 embeds the prompt for every patch and each patch's
text hidden state travels with its image hidden state through all stages. In a double block the text
attends to this patch's fresh image tokens and the other patches' stale ones, so its output differs
per patch; keeping it per patch makes each item an ordinary forward of the model on (text + patch)
with a different attention context, makes M = 1 exactly serial, and costs one (B, L, C) text tensor
per patch per stage boundary. ``pipefusion_reference`` computes the same numbers in one process.

Sampler state (DPM++ 2M's previous x0) lives on the last stage, full size, updated patch by patch:
the steps are elementwise, so a patch's update equals the same slice of a whole-latent update.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

from ..conditioning import Conditioning
from ..models.flux import BlockState, FluxAdapter
from ..parallel_config import ParallelConfig
from ..samplers import SamplerState
from ..sampling import (GenerationCancelled, OnStep, SamplingPlan, ShouldStop, StepEvent, apply_cfg, denoised_from,
                        preview_latent)
from .comm import CommCounter, all_gather_cat
from .mesh import Mesh
from .patch_kv_buffer import StaleKVAttention
from .pipefusion_comm import TAG_ACTIVATIONS, TAG_PATCH, TAG_PREVIEW, LaggedStopVote, PipeLinks
from .pipefusion_schedule import Work, patch_bounds, producer_of_input, split_stages, stage_work

logger = logging.getLogger(__name__)


def check_pipefusion(parallel: ParallelConfig, num_blocks: int) -> None:
    """What this implementation supports beyond ``ParallelConfig``'s own checks; ValueError names the fix."""
    if parallel.pipefusion_degree < 2:
        raise ValueError(f"PipeFusion needs pipefusion_degree >= 2, got {parallel.pipefusion_degree}; "
                         f"with one stage use the sequence-parallel loop")
    if parallel.ring_degree * parallel.ulysses_degree > 1:
        raise ValueError(f"PipeFusion combined with sequence parallel ({parallel.describe()}) is not implemented "
                         f"yet; use ring 1 x ulysses 1 with pipefusion {parallel.pipefusion_degree}, or pipefusion 1")
    if parallel.warmup_steps < 1:
        raise ValueError("PipeFusion needs warmup_steps >= 1 to fill its K/V buffers; set --warmup-steps 1")
    split_stages(num_blocks, parallel.pipefusion_degree)  # raises when there are more stages than blocks


class _Returns:
    """Stage 0's view of what the last stage sends back: patches in schedule order, a preview per step."""

    def __init__(self, links: PipeLinks, items: list[Work], bounds: tuple[tuple[int, int], ...],
                 num_tokens: int, preview_like: torch.Tensor, on_step: Optional[OnStep], total: int) -> None:
        self.links, self.bounds, self.num_tokens = links, bounds, num_tokens
        self.preview_like, self.on_step, self.total = preview_like, on_step, total
        # the last stage sends a patch for every item but those of the final step
        self._pending = [w for w in items if w.step < total - 1]
        self._received: set[Work] = set()

    def _region(self, work: Work) -> tuple[int, int]:
        return (0, self.num_tokens) if work.is_warmup else self.bounds[work.patch]

    def _take_one(self, x: torch.Tensor) -> None:
        work = self._pending.pop(0)
        start, stop = self._region(work)
        (x[:, start:stop],) = self.links.recv([x[:, start:stop]], self.links.last, TAG_PATCH)
        self._received.add(work)
        if work.is_warmup or work.patch == len(self.bounds) - 1:  # the step is complete
            self.step_done(work.step)

    def step_done(self, step: int) -> None:
        (preview,) = self.links.recv([self.preview_like], self.links.last, TAG_PREVIEW)
        if self.on_step is not None:
            self.on_step(StepEvent(step + 1, self.total, preview))

    def until(self, work: Work, x: torch.Tensor) -> None:
        """Receive into ``x`` until the patch ``work`` was produced is here."""
        while work not in self._received:
            self._take_one(x)

    def drain(self, x: torch.Tensor, before_step: int) -> None:
        """Receive everything the last stage sent for steps before ``before_step`` (on cancel)."""
        while self._pending and self._pending[0].step < before_step:
            self._take_one(x)


class PipeFusionLoop:
    """One rank's part of PipeFusion sampling; ``run`` returns the final tokens on every rank."""

    def __init__(self, adapter: FluxAdapter, parallel: ParallelConfig, mesh: Mesh,
                 counter: Optional[CommCounter] = None) -> None:
        check_pipefusion(parallel, len(adapter.blocks))
        self.adapter, self.parallel, self.mesh, self.counter = adapter, parallel, mesh, counter
        self.links = PipeLinks(mesh, counter)
        self.blocks = split_stages(len(adapter.blocks), parallel.pipefusion_degree)[self.links.stage]
        self.cfg_group = mesh.group(("cfg",))

    def _branches(self, plan: SamplingPlan) -> list[Conditioning]:
        """The CFG branches this rank's pipeline runs: both without CFG parallel, else its own."""
        if self.cfg_group is None:
            return [plan.positive] + ([plan.negative] if plan.negative is not None else [])
        if plan.negative is None:
            raise ValueError("cfg_degree 2 needs a negative conditioning and cfg != 1.0; drop CFG parallel otherwise")
        return [plan.positive if self.mesh.coords.cfg == 0 else plan.negative]

    def _guided(self, denoised: list[torch.Tensor], cfg: float) -> torch.Tensor:
        if self.cfg_group is None:
            return apply_cfg(denoised[0], denoised[1] if len(denoised) > 1 else None, cfg)
        # (B, n, C) per cfg rank -> (2, B, n, C), positive first: one latent per step over M patches
        both = all_gather_cat(denoised[0].unsqueeze(0), 0, self.cfg_group, self.counter, "cfg")
        return apply_cfg(both[0], both[1], cfg)

    def _forward(self, state: BlockState) -> BlockState:
        """This stage's blocks on one branch of one item, with activations in from / out to neighbours."""
        links = self.links
        if not links.is_first:
            hidden, text = links.recv([state.hidden, state.encoder_hidden], links.prev, TAG_ACTIVATIONS)
            state = dataclasses.replace(state, hidden=hidden, encoder_hidden=text)
        state = self.adapter.run_blocks(state, *self.blocks)
        if not links.is_last:
            links.send([state.hidden, state.encoder_hidden], links.next, TAG_ACTIVATIONS)
        return state

    @torch.no_grad()
    def run(self, plan: SamplingPlan, on_step: Optional[OnStep] = None,
            should_stop: Optional[ShouldStop] = None) -> torch.Tensor:
        adapter, links, total = self.adapter, self.links, plan.total_steps
        num_tokens, patches, warmup = plan.x.shape[1], self.parallel.patches, self.parallel.warmup_steps
        bounds = patch_bounds(num_tokens, patches)
        items = list(stage_work(total, warmup, patches))
        branches = self._branches(plan)
        backends = [StaleKVAttention(num_tokens) for _ in branches]  # one K/V buffer set per branch
        x = plan.x.to(adapter.device).clone()  # stage 0: inputs as they come back; last stage: the truth
        denoised_full = torch.zeros_like(x)
        sampler_state: SamplerState = None
        preview_like = preview_latent(adapter, plan, plan.x).to(adapter.device)
        returns = _Returns(links, items, bounds, num_tokens, preview_like, on_step, total) if links.is_first else None
        vote = LaggedStopVote(should_stop, adapter.device, self.counter)
        saved = adapter.seam.backend
        logger.debug("rank %d: pipefusion stage %d/%d, blocks %s, %d patches, warm-up %d", self.mesh.rank,
                     links.stage, links.stages, self.blocks, patches, warmup)
        step = 0
        try:
            for work in items:
                step = work.step
                if work.is_warmup or work.patch == 0:
                    if self.counter is not None:
                        self.counter.begin_step(step)
                    vote.before_step(step)
                if returns is not None and step > 0:
                    returns.until(producer_of_input(work, warmup), x)
                start, stop = (0, num_tokens) if work.is_warmup else bounds[work.patch]
                sigma = plan.sigmas[step]
                part = x[:, start:stop]  # (B, n, C_latent)
                sigma_batch = sigma * part.new_ones(part.shape[0])
                denoised = []
                for backend, cond in zip(backends, branches):
                    adapter.seam.backend = backend.at(start, stop)
                    # later stages embed too, only for temb and rotary; hidden and text come from upstream
                    state = adapter.embed(part if links.is_first else torch.zeros_like(part),
                                          plan.image_ids[start:stop], cond, sigma_batch)
                    state = self._forward(state)
                    if links.is_last:
                        denoised.append(denoised_from(part, sigma, adapter.head(state)))
                if links.is_last:
                    sampler_state = self._step(plan, work, denoised, x, denoised_full, sampler_state, start, stop)
        except GenerationCancelled:
            if returns is not None:
                returns.drain(x, step)
            links.flush()
            raise
        finally:
            adapter.seam.backend = saved
        vote.close()
        if returns is not None:
            returns.step_done(total - 1)
        links.flush()
        if self.counter is not None:
            self.counter.begin_step(-1)
        return links.broadcast_from_last(x)

    def _step(self, plan: SamplingPlan, work: Work, denoised: list[torch.Tensor], x: torch.Tensor,
              denoised_full: torch.Tensor, sampler_state: SamplerState, start: int, stop: int) -> SamplerState:
        """Last stage: CFG + sampler step on one patch of ``x`` in place; hand the patch (and at a step's
        end the preview) back to stage 0."""
        links, total = self.links, plan.total_steps
        guided = self._guided(denoised, plan.cfg)
        part_state = None if sampler_state is None else sampler_state[:, start:stop]
        new_part, new_state = plan.step(x[:, start:stop], guided, plan.sigmas, work.step, part_state)
        x[:, start:stop] = new_part
        denoised_full[:, start:stop] = guided
        if new_state is not None:
            if sampler_state is None:
                assert work.is_warmup, "a sampler's state must be created by a whole-latent step"
                sampler_state = torch.empty_like(new_state)
            sampler_state[:, start:stop] = new_state
        step_done = work.is_warmup or work.patch == self.parallel.patches - 1
        if work.step < total - 1:
            links.send([new_part], links.first, TAG_PATCH)
        if step_done:
            links.send([preview_latent(self.adapter, plan, denoised_full)], links.first, TAG_PREVIEW)
        return sampler_state
