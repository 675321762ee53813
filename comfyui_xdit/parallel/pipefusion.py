"""PipeFusion, written once: the model's blocks split into pipeline stages, the latent into patches.

Every stage walks the same ``stage_work`` sequence. For each (step, patch) item, per CFG forward (both
branches stacked into one forward of batch 2B where ComfyUI batches them, ``cond_batch.py``, else one per
branch):
stage 0 embeds the patch, each stage runs its blocks with the stale-K/V attention backend and sends
the activations on; the last stage runs the head, applies CFG and the sampler step to the patch and
sends the updated patch back to stage 0, which needs it one step later. Warm-up items cover the
whole latent (synchronous, equal to serial) and fill the K/V buffers.

The text stream is carried *per patch* by default: stage 0 embeds the prompt for every patch and each
patch's text hidden state travels with its image hidden state through all stages. In a double block the
text attends to this patch's fresh image tokens and the other patches' stale ones, so its output differs
per patch; keeping it per patch makes each item an ordinary forward of the model on (text + patch)
with a different attention context, makes M = 1 exactly serial, and costs one (B, L, C) text tensor
per patch per stage boundary. Adapters that allow it (Flux) run the prompt once a step instead: only a
step's first patch carries it, the others attend over its cached text K/V (``pipefusion_text.py``).
``pipefusion_reference`` computes the same numbers in one process.

Sampler state (DPM++ 2M's previous x0) lives on the last stage, full size, updated patch by patch:
the steps are elementwise, so a patch's update equals the same slice of a whole-latent update.

Sequence parallel inside a stage (ring x ulysses > 1): each item's tokens are split into equal
contiguous shards over the stage's ring x ulysses group; activations travel shard by shard to the
same (ring, ulysses) position of the next stage; ``StaleKVAttention`` gathers what attention needs.
The last stage all-gathers the patch's x0 prediction over the group and steps the whole patch on
every rank of the group, then sends stage 0 only the tokens its peer reads next (``returned_range``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch

from ..cond_batch import branch_forwards
from ..conditioning import Conditioning
from ..inpaint import Inpaint
from ..noise import AncestralNoise
from ..models.adapter import Adapter
from ..parallel_config import ParallelConfig
from ..resume import Checkpoint, CheckpointPart, capture, restore
from ..samplers import SamplerState, step_patch
from ..sampling import (GenerationCancelled, OnStep, SamplingPlan, ShouldStop, StepEvent, apply_cfg, denoised_from,
                        preview_latent)
from .comm import CommCounter, all_gather_cat
from .mesh import SEQUENCE_AXES, Mesh
from .patch_kv_buffer import StaleKVAttention
from .pipefusion_comm import LaggedStopVote, PipeLinks
from .pipefusion_schedule import (Work, parallel_stages, patch_bounds, producer_of_input, resumed_work,
                                  split_stages, stage_work)
from .pipefusion_text import carries_text, item_conds, uses_text_once
from .sequence_parallel import SequenceShard

logger = logging.getLogger(__name__)

OnPart = Callable[[CheckpointPart], None]


def check_pipefusion(parallel: ParallelConfig, num_blocks: int) -> None:
    """What the loop needs beyond ``ParallelConfig``'s own checks (which ``validate_for`` runs before any
    rank starts); ValueError names the fix."""
    if parallel.pipefusion_degree < 2:
        raise ValueError(f"PipeFusion needs pipefusion_degree >= 2, got {parallel.pipefusion_degree}; "
                         f"with one stage use the sequence-parallel loop")
    split_stages(num_blocks, parallel.pipefusion_degree)  # raises when there are more stages than blocks


def shard_range(shard: SequenceShard, start: int, stop: int) -> tuple[int, int]:
    """This rank's contiguous share of image tokens ``[start, stop)``, in absolute token indices."""
    lo, hi = shard.bounds(stop - start)
    return start + lo, start + hi


def returned_range(work: Work, warmup_steps: int, bounds: tuple[tuple[int, int], ...], num_tokens: int,
                   shard: SequenceShard) -> tuple[int, int]:
    """The tokens of ``work``'s update that the last stage sends back to its stage-0 peer: the shard that
    peer reads next. After the last warm-up step that is the whole latent, because the patch shards of
    the next step do not lie inside one shard of the whole latent."""
    if work.is_warmup:
        if work.step + 1 >= warmup_steps:
            return 0, num_tokens
        return shard_range(shard, 0, num_tokens)
    return shard_range(shard, *bounds[work.patch])


class _Returns:
    """Stage 0's view of what the last stage sends back: patches in schedule order, a preview per step."""

    def __init__(self, links: PipeLinks, items: list[Work], returned: dict[Work, tuple[int, int]],
                 patches: int, preview_like: Optional[torch.Tensor], on_step: Optional[OnStep], total: int) -> None:
        self.links, self.returned, self.patches = links, returned, patches
        self.preview_like, self.on_step, self.total = preview_like, on_step, total  # no preview_like: none sent
        # the last stage sends a patch for every item but those of the final step
        self._pending = [w for w in items if w.step < total - 1]
        self._received: set[Work] = set()

    def _take_one(self, x: torch.Tensor) -> None:
        work = self._pending.pop(0)
        start, stop = self.returned[work]
        (x[:, start:stop],) = self.links.recv_back([x[:, start:stop]])
        self._received.add(work)
        if work.is_warmup or work.patch == self.patches - 1:  # the step is complete
            self.step_done(work.step)

    def step_done(self, step: int) -> None:
        if self.preview_like is None:
            return
        (preview,) = self.links.recv_back([self.preview_like])
        if self.on_step is not None:
            self.on_step(StepEvent(step + 1, self.total, preview.cpu()))  # received on the device

    def until(self, work: Work, x: torch.Tensor) -> None:
        """Receive into ``x`` until the patch ``work`` was produced is here."""
        while work not in self._received:
            self._take_one(x)

    def drain(self, x: torch.Tensor, before: Work) -> None:
        """Receive everything the last stage sent for the items before ``before`` (on cancel: every rank
        stopped at that item, so the last stage sent exactly those)."""
        while self._pending and self._pending[0] != before:
            self._take_one(x)


class PipeFusionLoop:
    """One rank's part of PipeFusion sampling; ``run`` returns the final tokens on every rank."""

    def __init__(self, adapter: Adapter, parallel: ParallelConfig, mesh: Mesh,
                 counter: Optional[CommCounter] = None) -> None:
        check_pipefusion(parallel, len(adapter.blocks))
        self.adapter, self.parallel, self.mesh, self.counter = adapter, parallel, mesh, counter
        self.links = PipeLinks(mesh, counter)
        self.blocks = parallel_stages(parallel, adapter.spec)[self.links.stage]  # balanced by cost or as split
        self.cfg_group = mesh.group(("cfg",))
        self.sequence_group = mesh.group(SEQUENCE_AXES)
        self.shard = SequenceShard(mesh.index(SEQUENCE_AXES), mesh.size(SEQUENCE_AXES))
        self.sends_preview = self.shard.index == 0  # one preview per pipeline, to the rank that reports
        # the tokens, history and noise of a checkpoint: one copy, from the first last-stage rank
        self.reports_core = self.links.is_last and self.shard.index == 0 and mesh.coords.cfg == 0

    def _branches(self, plan: SamplingPlan) -> list[Conditioning]:
        """The CFG branches this rank's pipeline runs: both without CFG parallel, else its own."""
        if self.cfg_group is None:
            return [plan.positive] + ([plan.negative] if plan.negative is not None else [])
        if plan.negative is None:
            raise ValueError("cfg_degree 2 needs a negative conditioning and cfg != 1.0; drop CFG parallel otherwise")
        return [plan.positive if self.mesh.coords.cfg == 0 else plan.negative]

    def _guided(self, denoised: list[torch.Tensor], cfg: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(the guided x0 prediction, the unconditional one or None) of one item."""
        if self.cfg_group is None:
            uncond = denoised[1] if len(denoised) > 1 else None
            return apply_cfg(denoised[0], uncond, cfg), uncond
        # (B, n, C) per cfg rank -> (2, B, n, C), positive first: one latent per step over M patches
        both = all_gather_cat(denoised[0].unsqueeze(0), 0, self.cfg_group, self.counter, "cfg")
        return apply_cfg(both[0], both[1], cfg), both[1]

    def _forward(self, part: torch.Tensor, image_ids: torch.Tensor, cond: Conditioning,
                 sigma: torch.Tensor) -> Any:
        """This stage's blocks on one branch of one item's shard ``part`` (B, n_local, 64); stage 0 embeds
        it, later stages receive what the adapter carries across a stage boundary (``carried``) and embed only
        the timestep and positions."""
        adapter, links = self.adapter, self.links
        if links.is_first:
            state = adapter.embed(part, image_ids, cond, sigma)
        else:
            context = adapter.embed_context(image_ids, cond, sigma)
            like = adapter.carried_like(self.blocks[0], part.shape[0], part.shape[1], cond)
            state = adapter.resume(context, links.recv_activations(like))
        state = adapter.run_blocks(state, *self.blocks)
        if not links.is_last:
            links.send_activations(adapter.carried(state))
        return state

    @torch.no_grad()
    def run(self, plan: SamplingPlan, on_step: Optional[OnStep] = None,
            should_stop: Optional[ShouldStop] = None, on_part: Optional[OnPart] = None) -> torch.Tensor:
        """``on_part`` (on every rank) gets this rank's ``CheckpointPart`` after each step when the plan asks
        for checkpoints; a plan that ``resume``s starts from one put together from them (``resume.py``)."""
        adapter, links, total = self.adapter, self.links, plan.total_calls
        num_tokens, patches = plan.x.shape[1], self.parallel.patches
        warmup = plan.program.calls_before_step(self.parallel.warmup_steps)  # warm-up steps counted in model calls
        bounds = patch_bounds(num_tokens, patches)
        items = list(stage_work(total, warmup, patches))
        first, rewarm = 0, False
        if plan.resume is not None:
            plan.resume.check_fits(plan.x, total)
            first = plan.resume.calls
            rewarm = first >= warmup and len(plan.resume.kv or {}) < self.mesh.world_size
            items = resumed_work(items, first, rewarm)
            if rewarm:
                logger.info("rank %d: resuming after call %d without the stale K/V: that step re-warms over the "
                            "whole latent", self.mesh.rank, first)
        whole_steps = frozenset(w.step for w in items if w.is_warmup)
        returned = {w: returned_range(w, warmup, bounds, num_tokens, self.shard) for w in items}
        # both branches as one forward of batch 2B where ComfyUI batches them, else one forward each
        forwards = branch_forwards(self._branches(plan), plan.x.shape[0], plan.batch_cfg)
        ulysses, ring = self.mesh.group(("ulysses",)), self.mesh.group(("ring",))
        # one K/V buffer set per forward (a stacked one holds each branch's own rows: the same stale K/V)
        text_once = uses_text_once(adapter)
        backends = [StaleKVAttention(num_tokens, ulysses, ring, self.counter, text_once) for _ in forwards.conds]
        with_text, textless = item_conds(forwards.conds, text_once)  # the prompt once a step where allowed
        # stage 0: inputs as they come back; last stage: the truth (and the sampler state)
        x, sampler_state = plan.begin(plan.x.to(adapter.device).clone())
        inpaint = plan.inpaint.to(adapter.device) if plan.inpaint is not None else None
        step_noise = plan.step_noise(adapter.device) if links.is_last else None  # the last stage steps
        if plan.resume is not None:
            x, sampler_state = self._restore(plan.resume, backends, step_noise, load_kv=first >= warmup and not rewarm)
        denoised_full = torch.zeros_like(x)
        preview_like = preview_latent(adapter, plan, plan.x).to(adapter.device) if self.sends_preview else None
        returns = _Returns(links, items, returned, patches, preview_like, on_step, total) if links.is_first else None
        vote = LaggedStopVote(should_stop, adapter.device, self.counter, links.stages)
        saved = adapter.seam.backend
        logger.debug("rank %d: pipefusion stage %d/%d, blocks %s, %d patches, warm-up %d, shard %d/%d",
                     self.mesh.rank, links.stage, links.stages, self.blocks, patches, warmup, self.shard.index,
                     self.shard.count)
        work = items[0]
        try:
            for index, work in enumerate(items):
                step = work.step
                if self.counter is not None and (work.is_warmup or work.patch == 0):
                    self.counter.begin_step(step)
                if returns is not None and step > first:
                    returns.until(producer_of_input(work, warmup, whole_steps), x)
                vote.before_item(index, step, work.is_warmup)  # after the input arrived: see LaggedStopVote
                start, stop = (0, num_tokens) if work.is_warmup else bounds[work.patch]
                lo, hi = shard_range(self.shard, start, stop)
                sigma = plan.call_sigmas[step]
                part = x[:, lo:hi]  # (B, n_local, C_latent): this rank's shard of the item
                seen = inpaint.model_input(part, sigma, lo) if inpaint is not None else part  # what the sampler shows
                model_in = plan.prediction.model_input(seen, sigma)  # what the model sees
                sigma_batch = plan.model_sigmas[step] * part.new_ones(part.shape[0])  # what the adapter is told
                denoised = []
                for backend, cond in zip(backends, with_text if carries_text(work) else textless):
                    adapter.seam.backend = backend.at(start, stop)
                    # (B, n_local, C) -> (2B, n_local, C) when the branches are stacked
                    state = self._forward(forwards.rows(model_in), plan.image_ids[lo:hi], cond,
                                          forwards.rows(sigma_batch))
                    if links.is_last:
                        local = denoised_from(forwards.rows(seen), sigma, adapter.head(state), plan.prediction)
                        # (rows, n_local, C) from each ring x ulysses rank -> (rows, n, C), the whole item
                        denoised.append(all_gather_cat(local, 1, self.sequence_group, self.counter, "sequence"))
                if links.is_last:
                    sampler_state = self._step(plan, work, forwards.branches(denoised), x, denoised_full,
                                               sampler_state, start, stop, returned[work], inpaint, step_noise)
                if on_part is not None and plan.checkpoints and step + 1 < total and \
                        (work.is_warmup or work.patch == patches - 1):
                    self._post_part(on_part, plan, step + 1, warmup, backends, x, sampler_state, step_noise)
        except GenerationCancelled:
            if returns is not None:
                returns.drain(x, work)
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

    def _restore(self, checkpoint: Checkpoint, backends: list[StaleKVAttention], step_noise: Optional[Any],
                 load_kv: bool) -> tuple[torch.Tensor, SamplerState]:
        """Tokens (every rank: stage 0 reads them, the last stage steps them), the sampler's history and noise
        (the last stage) and this rank's K/V buffers as they stood at the checkpoint; copies, which the run
        updates in place."""
        x, state = restore(checkpoint, self.adapter.device, step_noise)
        x = x.clone()
        state = None if state is None else tuple(t.clone() for t in state)
        if load_kv:
            assert checkpoint.kv is not None
            saved = checkpoint.kv[self.mesh.rank]
            if len(saved) != len(backends):
                raise ValueError(f"the checkpoint holds K/V of {len(saved)} forwards a step, this run makes "
                                 f"{len(backends)}; resume with the same CFG batching as the interrupted run")
            for backend, layers in zip(backends, saved):
                backend.load(layers, self.adapter.device)
        return x, state

    def _post_part(self, on_part: OnPart, plan: SamplingPlan, calls: int, warmup: int,
                   backends: list[StaleKVAttention], x: torch.Tensor, sampler_state: SamplerState,
                   step_noise: Optional[Any]) -> None:
        """This rank's share of the state after ``calls`` model calls, right after its last item of that step:
        its K/V (when the next step reads stale K/V and the plan keeps it), and the core from one rank."""
        with_kv = plan.checkpoint_kv and calls >= warmup
        core = capture(calls, x, sampler_state, step_noise) if self.reports_core else None
        if core is None and not plan.checkpoint_kv:
            return
        kv = tuple(backend.snapshot() for backend in backends) if with_kv else None
        needed = self.mesh.world_size if plan.checkpoint_kv else 1
        on_part(CheckpointPart(calls=calls, rank=self.mesh.rank, needed=needed, kv=kv, core=core))

    def _step(self, plan: SamplingPlan, work: Work, denoised: list[torch.Tensor], x: torch.Tensor,
              denoised_full: torch.Tensor, sampler_state: SamplerState, start: int, stop: int,
              back: tuple[int, int], inpaint: Optional[Inpaint],
              step_noise: Optional[AncestralNoise]) -> SamplerState:
        """Last stage: CFG (+ the noise mask) + sampler step on one patch of ``x`` in place; hand tokens
        ``back`` of it (and at a step's end the preview) to stage 0."""
        links, total = self.links, plan.total_calls
        guided, uncond = self._guided(denoised, plan.cfg)
        if inpaint is not None:
            guided = inpaint.model_output(guided, start)
        sampler_state = step_patch(plan.step, x, guided, plan.sigmas, work.step, sampler_state, start, stop,
                                   step_noise, uncond)
        denoised_full[:, start:stop] = guided
        step_done = work.is_warmup or work.patch == self.parallel.patches - 1
        if work.step < total - 1:
            links.send_back([x[:, back[0]:back[1]].clone()])  # x changes while in flight
        if step_done and self.sends_preview:
            links.send_back([preview_latent(self.adapter, plan, denoised_full)])
        return sampler_state
