"""The sampling loop the engine owns, equal to ComfyUI's KSampler for the same seed.

``prepare_plan`` turns a request into noise, sigmas and the starting tokens exactly as ComfyUI does
(``prepare_noise``, the scheduler, ``process_latent_in``, the model's noise scaling); each model call
sees ``plan.prediction.model_input`` of the tokens and ``denoised_from`` turns its output into an x0
prediction (``prediction.py``: flow, EPS or v, as the adapter says); ``finish`` undoes the scaling back
into a ComfyUI LATENT. The serial loop here and the parallel loops call the same pieces.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from .cond_batch import branch_outputs
from .conditioning import Conditioning
from .inpaint import Inpaint, build_inpaint, mask_to_latent
from .models import packing
from .models.adapter import Adapter
from .noise import AncestralNoise, BatchRows, BrownianNoise, inpaint_noise, prepare_batch_noise
from .prediction import FLOW, PREDICTIONS, Prediction, max_denoise, prediction_of
from .request import GenerationRequest
from .resume import Checkpoint, capture, restore
from .samplers import (BROWNIAN_SAMPLERS, CFG_PP_SAMPLERS, DEVICE_TREE_SAMPLERS, DISCARD_PENULTIMATE_SIGMA_SAMPLERS, NOISE_SAMPLERS, SNR_OFFSET_SAMPLERS,
                       SamplerProgram, SamplerState, SamplerStep, check_sampler, sampler_program)
from .uni_pc_sampler import UNI_PC_VARIANTS, uni_pc_sigmas
from .sigmas import (DiscreteFlowShift, DiscreteSchedule, FluxShift, ModelSampling, offset_first_sigma_for_snr,
                     resolution_shift, sampling_sigmas, step_range)

logger = logging.getLogger(__name__)

PREVIEW_MAX_SIDE = 64  # preview latents are downscaled to at most this many latent pixels a side


@dataclass(frozen=True)
class StepEvent:
    """Progress of one finished step; ``preview`` is a downscaled x0 prediction in LATENT layout."""

    step: int
    total: int
    preview: Optional[torch.Tensor] = None
    checkpoint: Optional[Checkpoint] = None  # the loop's state after this step, when the request asks for it


class GenerationCancelled(RuntimeError):
    """Raised on every rank at the same step when a job is cancelled."""


OnStep = Callable[[StepEvent], None]
ShouldStop = Callable[[int], bool]


@dataclass(frozen=True)
class SamplingPlan:
    """Everything the loop needs, identical on every rank."""

    x: torch.Tensor  # (B, N, 64) noised starting tokens, float32
    sigmas: torch.Tensor  # (steps + 1,) float32
    image_ids: torch.Tensor  # (N, 3)
    height: int  # latent height / width (not pixels)
    width: int
    program: SamplerProgram  # the sampler's model calls and its step after each
    positive: Conditioning
    negative: Optional[Conditioning]
    cfg: float
    inpaint: Optional[Inpaint] = None  # the LATENT's noise mask, applied at every model call
    noise_seed: Optional[int] = None  # samplers that draw noise while sampling: the seed ComfyUI gives them
    latent_shape: tuple[int, ...] = ()  # (B, C, H, W): the shape that noise is drawn in
    brownian_span: Optional[torch.Tensor] = None  # SDE samplers: the schedule their Brownian tree spans
    brownian_on_device: bool = False  # the _gpu samplers: the tree on the model's device, not the CPU
    batch_rows: Optional[tuple[int, int]] = None  # a data group's plan: the rows [start, stop) of the batch it holds
    prediction: Prediction = FLOW  # the model's: its input scaling and x0 from its output (prediction.py)
    frames: Optional[int] = None  # a video latent's (B, C, T, H, W) frame count T; None: an image latent
    timestep_sigmas: Optional[torch.Tensor] = None  # (calls,) see model_sigmas; None: the call sigmas themselves
    checkpoints: bool = False  # emit a Checkpoint with every step event (resume.py)
    resume: Optional[Checkpoint] = None  # start after its calls, from its tokens, history and noise state
    checkpoint_kv: bool = True  # PipeFusion's checkpoints hold its ranks' K/V (resume.py)
    batch_cfg: bool = True  # both CFG branches in one forward where ComfyUI batches them (cond_batch.py)
    # packs a LATENT-shaped noise draw like the tokens (an adapter's ``noise_pack()``: CogVideoX 1.5's 2-frame tokens)
    noise_pack: Callable[[torch.Tensor], torch.Tensor] = packing.pack

    def unpack(self, adapter: Adapter, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, C*2*2) back into this plan's latent layout: (B, C, H, W) or (B, C, T, H, W)."""
        if self.frames is None:
            return adapter.unpack(tokens, self.height, self.width)
        return adapter.unpack(tokens, self.height, self.width, frames=self.frames)

    def step_noise(self, device: torch.device) -> "Optional[AncestralNoise | BrownianNoise | BatchRows]":
        """The noise the sampler draws during sampling, on ``device`` as ComfyUI draws it (for the whole
        batch, then this plan's rows); None for samplers that draw none."""
        if self.noise_seed is None:
            return None
        if self.brownian_span is not None:
            noise = BrownianNoise(self.noise_seed, self.latent_shape, self.noise_pack, device, self.brownian_span,
                                  self.program.noise_spans, tree_on_device=self.brownian_on_device)
        else:
            noise = AncestralNoise(self.noise_seed, self.latent_shape, self.noise_pack, device)
        return noise if self.batch_rows is None else BatchRows(noise, *self.batch_rows)

    def rows(self, start: int, stop: int) -> "SamplingPlan":
        """The plan for images ``[start, stop)`` of this whole-batch plan (a data group's chunk): its rows of
        the tokens, the noise mask and the conditioning; the noise drawn while sampling is still drawn for
        the whole batch (as ComfyUI does) and cut to these rows, so each image samples as in the whole batch."""
        if self.batch_rows is not None:
            raise ValueError("rows() takes rows of a whole-batch plan; this plan already holds rows "
                             f"{self.batch_rows}")
        batch = self.x.shape[0]
        if not 0 <= start < stop <= batch:
            raise ValueError(f"rows [{start}, {stop}) are not a non-empty part of a batch of {batch}")
        return replace(self, x=self.x[start:stop],
                       inpaint=self.inpaint.rows(start, stop) if self.inpaint is not None else None,
                       positive=self.positive.rows(batch, start, stop),
                       negative=self.negative.rows(batch, start, stop) if self.negative is not None else None,
                       batch_rows=(start, stop))

    def begin(self, x: torch.Tensor) -> tuple[torch.Tensor, SamplerState]:
        """The first model input and sampler state from ``x``, this plan's starting tokens on the model's
        device (the tokens themselves and no state, but for UniPC)."""
        return self.program.begin(x)

    @property
    def step(self) -> SamplerStep:
        """The step after model call ``k``: ``step(x, denoised, sigmas, k, state, noise, uncond=None)``
        (``uncond``, the unconditional x0 prediction, is read by CFG++ samplers only)."""
        return self.program.apply

    @property
    def call_sigmas(self) -> torch.Tensor:
        """(calls,) the sigma of each model call; the schedule's sigmas but the last for one-call samplers."""
        return self.program.call_sigmas

    @property
    def model_sigmas(self) -> torch.Tensor:
        """(calls,) the sigma the adapter is given at each model call, which it maps to the model's timestep by
        its own table: the call's sigma, or, under another discrete table than the adapter's (ModelSamplingDiscrete's
        zsnr), the adapter's table entry at the run's timestep of it, so the model sees ComfyUI's timestep."""
        return self.call_sigmas if self.timestep_sigmas is None else self.timestep_sigmas

    @property
    def total_calls(self) -> int:
        """Model calls per branch (sampler steps for one-call samplers; PipeFusion's pipeline steps)."""
        return self.program.total_calls


def model_sampling_for(adapter: Adapter, request: GenerationRequest) -> ModelSampling:
    if request.shift.mode == "default":
        return adapter.default_sampling()
    if request.shift.mode == "discrete":
        return _discrete_sampling(adapter, request.shift.zsnr)
    prediction = prediction_of(adapter)
    if not prediction.is_flow:
        raise ValueError(f"sigma shift {request.shift.mode!r} is a flow-model sampling, but this model predicts "
                         f"{prediction.name}; use the model's default sampling (no ModelSamplingFlux / SD3 node)")
    if request.shift.mode == "flux":
        return FluxShift(shift=request.shift.shift)
    if request.shift.mode == "discrete_flow":
        return DiscreteFlowShift(shift=request.shift.shift, multiplier=request.shift.multiplier)
    h, w = request.latent.shape[-2], request.latent.shape[-1]  # (B, C, [T,] H, W)
    width = request.shift.width if request.shift.width is not None else w * 8
    height = request.shift.height if request.shift.height is not None else h * 8
    return FluxShift(shift=resolution_shift(request.shift.max_shift, request.shift.base_shift, width, height))


def _discrete_sampling(adapter: Adapter, zsnr: bool) -> DiscreteSchedule:
    """ModelSamplingDiscrete's schedule: the model's own DDPM schedule, rescaled to zero terminal SNR with ``zsnr``."""
    own = adapter.default_sampling()
    if not isinstance(own, DiscreteSchedule):
        raise ValueError(f"a ModelSamplingDiscrete patch (eps / v_prediction, zsnr) changes a discrete-schedule model "
                         f"(PixArt, HunyuanDiT), but this model samples on {type(own).__name__}, a flow schedule; "
                         f"connect the MODEL from before that node")
    return replace(own, zsnr=zsnr)


def _timestep_sigmas(own: ModelSampling, run: ModelSampling, call_sigmas: torch.Tensor) -> Optional[torch.Tensor]:
    """(calls,) sigmas of the adapter's own discrete table at the run table's timesteps (nearest entries) of
    ``call_sigmas``; None where the run samples on the adapter's own table (or a flow one, whose timestep is sigma)."""
    if run == own or not isinstance(run, DiscreteSchedule) or not isinstance(own, DiscreteSchedule):
        return None
    return own.table()[run.timestep(call_sigmas)]  # (calls,) float32


def prediction_for(adapter: Adapter, request: GenerationRequest) -> Prediction:
    """What the model's output means in this run: the adapter's own prediction, or the one a ModelSamplingDiscrete
    patch chose (``v_prediction`` on an EPS model: its output is read as v)."""
    if request.shift.mode == "discrete":
        return PREDICTIONS[request.shift.prediction]
    return prediction_of(adapter)


def fix_empty_latent_channels(latent: torch.Tensor, channels: int) -> torch.Tensor:
    """ComfyUI widens an all-zero LATENT of the wrong channel count (EmptyLatentImage's 4) to the model's."""
    if latent.ndim in (4, 5) and latent.shape[1] != channels and torch.count_nonzero(latent) == 0:  # 5: a video's
        return torch.zeros(latent.shape[0], channels, *latent.shape[2:], dtype=latent.dtype)
    return latent


def prepare_plan(adapter: Adapter, request: GenerationRequest) -> SamplingPlan:
    latent = fix_empty_latent_channels(request.latent.float(), adapter.latent_format.channels)
    adapter.check_latent(latent)
    frames = latent.shape[2] if latent.ndim == 5 else None  # a video family's (B, C, T, H, W)
    if frames is not None and request.noise_mask is not None and not getattr(adapter, "video_noise_mask", False):
        raise ValueError("a noise mask (SetLatentNoiseMask) on a video latent is not supported by the xDiT sampler "
                         "yet; use the stock KSampler for video inpainting")
    prediction = prediction_for(adapter, request)
    check_sampler(request.sampler, prediction)  # a sampler without this prediction's form: refused before anything
    # KSamplerAdvanced's add_noise disabled: zero noise (a latent with leftover noise goes on as it is)
    noise = (prepare_batch_noise(latent, request.seed, request.batch_index) if request.add_noise
             else torch.zeros_like(latent))
    model_sampling = model_sampling_for(adapter, request)
    if request.sigmas is not None:  # SamplerCustom: the schedule as given
        sigmas = request.sigmas.detach().to("cpu", torch.float32)
    else:
        sigmas = sampling_sigmas(model_sampling, request.scheduler, request.steps, request.denoise,
                                 discard_penultimate=request.sampler in DISCARD_PENULTIMATE_SIGMA_SAMPLERS)
    # KSamplerAdvanced's start / end steps; the loops (serial, sequence, CFG, PipeFusion, whose warm-up counts
    # from this part's first step: its K/V buffers start empty) see only this part of the schedule
    sigmas = step_range(sigmas, request.start_step, request.end_step, full_denoise=not request.leftover_noise)
    if torch.count_nonzero(latent) > 0:  # ComfyUI does not shift the empty latent
        latent = adapter.latent_format.process_in(latent)
    inpaint = None
    if request.noise_mask is not None:  # ddim re-noises the kept latent with its own draw, as ComfyUI's
        kept_noise = inpaint_noise(latent.shape, request.seed) if request.sampler == "ddim" else noise
        inpaint = build_inpaint(request.noise_mask, latent, kept_noise, adapter.pack, prediction,
                                renoise=getattr(adapter, "inpaint_renoises", True))
    if len(sigmas) > 0:  # KSAMPLER's noise scaling, from the model's largest sigma or below it
        latent = prediction.noise_scaling(sigmas[0], noise, latent,
                                          max_denoise(float(model_sampling.table()[-1]), sigmas))
    h, w = latent.shape[-2:]
    brownian = request.sampler in BROWNIAN_SAMPLERS
    # flow models' SDE samplers start just below sigma 1 (offset after noise scaling, as ComfyUI's samplers do)
    offset = request.sampler in SNR_OFFSET_SAMPLERS and prediction.is_flow
    loop_sigmas = offset_first_sigma_for_snr(sigmas, model_sampling) if offset else sigmas
    if request.sampler in UNI_PC_VARIANTS:  # a final 0 becomes 0.001, which finish() then divides by as ComfyUI
        loop_sigmas = uni_pc_sigmas(loop_sigmas)
    image_ids = adapter.image_ids(h, w) if frames is None else adapter.image_ids(h, w, frames=frames)
    if request.noise_mask is not None and hasattr(adapter, "with_denoise_mask"):  # Wan 2.2 5B: timestep per token
        image_ids = adapter.with_denoise_mask(image_ids, mask_to_latent(request.noise_mask, tuple(latent.shape)))
    program = sampler_program(request.sampler, loop_sigmas, model_sampling, prediction)
    timestep_sigmas = _timestep_sigmas(adapter.default_sampling(), model_sampling, program.call_sigmas)
    return SamplingPlan(x=adapter.pack(latent), sigmas=loop_sigmas, image_ids=image_ids, height=h, width=w,
                        frames=frames, program=program,
                        timestep_sigmas=timestep_sigmas,
                        positive=request.positive,
                        negative=_negative_branch(request), cfg=request.cfg, inpaint=inpaint,
                        noise_seed=request.seed if request.sampler in NOISE_SAMPLERS | BROWNIAN_SAMPLERS else None,
                        latent_shape=tuple(latent.shape), brownian_span=sigmas if brownian else None,
                        brownian_on_device=request.sampler in DEVICE_TREE_SAMPLERS, prediction=prediction,
                        checkpoints=request.checkpoints, resume=request.resume,
                        checkpoint_kv=request.checkpoint_kv,
                        noise_pack=adapter.noise_pack() if hasattr(adapter, "noise_pack") else packing.pack)


def _negative_branch(request: GenerationRequest) -> Optional[Conditioning]:
    """The unconditional branch's conditioning: skipped at cfg 1 as ComfyUI does, except for CFG++
    samplers, for which ComfyUI turns that shortcut off (the positive stands in for a missing negative)."""
    if request.sampler in CFG_PP_SAMPLERS:
        return request.negative if request.negative is not None else request.positive
    return request.negative if request.uses_cfg else None


def denoised_from(x: torch.Tensor, sigma: torch.Tensor, velocity: torch.Tensor,
                  prediction: Prediction = FLOW) -> torch.Tensor:
    """ComfyUI's ``calculate_denoised`` for the model's ``prediction``: the x0 prediction from the model's
    output at tokens ``x`` (what the sampler holds, before ``model_input``); flow: x0 = x - v * sigma."""
    return prediction.denoised(x, sigma, velocity)


def apply_cfg(cond: torch.Tensor, uncond: Optional[torch.Tensor], cfg: float) -> torch.Tensor:
    """ComfyUI's ``cfg_function``: uncond + (cond - uncond) * cfg; the cond alone when there is no uncond."""
    if uncond is None:
        return cond
    return uncond + (cond - uncond) * cfg


def finish(adapter: Adapter, plan: SamplingPlan, x: torch.Tensor) -> torch.Tensor:
    """Tokens (on any device) back into a ComfyUI LATENT on the CPU (inverse noise scaling, then
    ``process_latent_out``)."""
    x = plan.prediction.inverse_noise_scaling(plan.sigmas[-1], x.cpu())
    return adapter.latent_format.process_out(plan.unpack(adapter, x.float()))


def preview_latent(adapter: Adapter, plan: SamplingPlan, denoised: torch.Tensor) -> torch.Tensor:
    """First image of the x0 prediction as a LATENT, average-pooled to at most PREVIEW_MAX_SIDE a side,
    on the CPU (pooled where ``denoised`` lives, so only the small preview leaves the device); a video keeps
    every frame: (1, C, T, h, w)."""
    latent = adapter.latent_format.process_out(plan.unpack(adapter, denoised[:1].float()))
    factor = max(1, -(-max(plan.height, plan.width) // PREVIEW_MAX_SIDE))
    if factor == 1:
        return latent.cpu()
    if latent.ndim == 5:  # pool each frame's rows and columns, not across frames
        return torch.nn.functional.avg_pool3d(latent, (1, factor, factor)).cpu()
    return torch.nn.functional.avg_pool2d(latent, factor).cpu()


def check_stop(should_stop: Optional[ShouldStop], step: int) -> None:
    if should_stop is not None and should_stop(step):
        raise GenerationCancelled(f"cancelled before step {step}")


VelocityFn = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


def resume_point(plan: SamplingPlan, x: torch.Tensor, state: SamplerState,
                 step_noise: Optional[object]) -> tuple[torch.Tensor, SamplerState, int]:
    """(tokens, sampler history, first call) a whole-latent loop starts from: ``begin``'s, or where the plan's
    ``resume`` checkpoint stood (its noise generator state restored into ``step_noise``)."""
    if plan.resume is None:
        return x, state, 0
    plan.resume.check_fits(x, plan.total_calls)
    x, state = restore(plan.resume, x.device, step_noise)
    return x, state, plan.resume.calls


def step_event(adapter: Adapter, plan: SamplingPlan, i: int, denoised: torch.Tensor, x: torch.Tensor,
               state: SamplerState, step_noise: Optional[object]) -> StepEvent:
    """The event after model call ``i``: its preview, and a checkpoint when the plan asks for them."""
    checkpoint = capture(i + 1, x, state, step_noise) if plan.checkpoints else None
    return StepEvent(i + 1, plan.total_calls, preview_latent(adapter, plan, denoised), checkpoint)


def run_loop(adapter: Adapter, plan: SamplingPlan, velocity: VelocityFn, on_step: Optional[OnStep] = None,
             should_stop: Optional[ShouldStop] = None) -> torch.Tensor:
    """The whole-latent loop: ``velocity(model_input, sigma_batch, cond)`` for the CFG branches (one call over
    both where the plan batches them, ``cond_batch.py``), CFG, one sampler step.

    Serial sampling passes the adapter's forward; sequence/CFG parallel pass a velocity that shards
    and gathers. The tokens live on the model's device (sigmas stay 0-dim CPU scalars, which every
    device accepts). Returns the final tokens (B, N, 64) on that device.
    """
    x, state = plan.begin(plan.x.to(adapter.device))
    inpaint = plan.inpaint.to(adapter.device) if plan.inpaint is not None else None
    step_noise = plan.step_noise(x.device)
    x, state, first = resume_point(plan, x, state, step_noise)
    batch = x.shape[0]
    for i in range(first, plan.total_calls):
        check_stop(should_stop, i)
        sigma = plan.call_sigmas[i]
        sigma_batch = plan.model_sigmas[i] * x.new_ones(batch)  # what the adapter is told (model_sigmas)
        seen = inpaint.model_input(x, sigma) if inpaint is not None else x  # what the sampler shows the model
        model_in = plan.prediction.model_input(seen, sigma)  # EPS: scaled to unit variance
        v_cond, v_uncond = branch_outputs(velocity, model_in, sigma_batch, plan.positive, plan.negative,
                                          plan.batch_cfg)  # one forward of both branches, as ComfyUI's batch
        cond = denoised_from(seen, sigma, v_cond, plan.prediction)
        uncond = denoised_from(seen, sigma, v_uncond, plan.prediction) if v_uncond is not None else None
        denoised = apply_cfg(cond, uncond, plan.cfg)
        if inpaint is not None:
            denoised = inpaint.model_output(denoised)
        x, state = plan.step(x, denoised, plan.sigmas, i, state, None if step_noise is None else (lambda: step_noise(i)),
                             uncond)
        if on_step is not None:
            on_step(step_event(adapter, plan, i, denoised, x, state, step_noise))
    return x
