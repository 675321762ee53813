"""xDiT Sampler: KSampler's inputs and meaning, sampled by the pool -> LATENT."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from comfy_api.latest import io

from comfyui_xdit.environment import require_environment

from comfyui_xdit.input_checks import NODE_INPUTS, check_inputs
from comfyui_xdit.models.families import family_of
from comfyui_xdit.request import GenerationRequest, SigmaShift
from comfyui_xdit.samplers import SAMPLER_NAMES, check_sampler
from comfyui_xdit.sampling import prediction_for
from comfyui_xdit.sigmas import SCHEDULER_NAMES

from .comfy_types import CATEGORY, XDiTModelType
from .convert import (image_tokens, latent_batch_index, latent_noise_mask, to_conditioning, to_latent_output,
                      to_latent_tensor)
from .handles import ModelHandle
from .pool_access import registry
from .progress import ComfyProgress, drive_job

logger = logging.getLogger(__name__)

SHIFT_DEFAULT = "model default"  # = UNETLoader + KSampler: the model's constant shift
SHIFT_RESOLUTION = "resolution (ModelSamplingFlux)"  # = UNETLoader + ModelSamplingFlux + KSampler
SHIFT_CHOICES = [SHIFT_DEFAULT, SHIFT_RESOLUTION]


def make_sigma_shift(choice: str, max_shift: float, base_shift: float, width: int, height: int) -> SigmaShift:
    if choice == SHIFT_DEFAULT:
        return SigmaShift()
    return SigmaShift(mode="resolution", max_shift=float(max_shift), base_shift=float(base_shift),
                      width=int(width), height=int(height))


def build_request(model: ModelHandle, positive, negative, latent_image: dict, seed: int, steps: int, cfg: float,
                  sampler_name: str, scheduler: str, denoise: float, shift: SigmaShift,
                  sigmas: Optional[torch.Tensor] = None, start_step: int = 0, end_step: Optional[int] = None,
                  add_noise: bool = True, leftover_noise: bool = False) -> GenerationRequest:
    """ComfyUI's values -> the request the pool runs; raises ValueError naming the fix. ``start_step`` ..
    ``leftover_noise``: KSamplerAdvanced's split (xDiT Sampler (Advanced))."""
    latent = to_latent_tensor(latent_image, video=bool(getattr(model.spec, "video", False)))
    if sigmas is not None:
        sigmas = sigmas.detach().to("cpu", torch.float32).contiguous()
    guidance = getattr(model.spec, "default_guidance", None)  # the family's, where the conditioning has none
    request = GenerationRequest(model=model.model, latent=latent,
                                positive=to_conditioning(positive, "positive", guidance),
                                negative=to_conditioning(negative, "negative", guidance), seed=int(seed),
                                steps=int(steps),
                                cfg=float(cfg), sampler=sampler_name, scheduler=scheduler, denoise=float(denoise),
                                shift=model.shift or shift, parallel=model.parallel, sigmas=sigmas,
                                noise_mask=latent_noise_mask(latent_image), batch_index=latent_batch_index(latent_image),
                                start_step=int(start_step), end_step=None if end_step is None else int(end_step),
                                add_noise=bool(add_noise), leftover_noise=bool(leftover_noise))
    check_inputs(model.spec, latent, request.positive, request.negative if request.uses_cfg else None, NODE_INPUTS)
    # a sampler without a form for the model's prediction (ModelSamplingDiscrete's v_prediction patch included)
    check_sampler(sampler_name, prediction_for(family_of(model.spec).adapter(), request))
    model.parallel.validate_for(model.parallel.world_size, model.spec.num_attention_heads, image_tokens(latent),
                                request.cfg, num_blocks=model.spec.num_blocks,
                                batch_size=latent.shape[0])
    return request


class XDiTSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XDiTSampler",
            display_name="xDiT Sampler",
            category=CATEGORY,
            description="KSampler on the xDiT pool: the same inputs and, for the same seed, the same latent; "
                        "faster on more GPUs.",
            inputs=[
                XDiTModelType.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative", tooltip="Used only when cfg != 1 (like KSampler)."),
                io.Latent.Input("latent_image"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=list(SAMPLER_NAMES)),
                io.Combo.Input("scheduler", options=list(SCHEDULER_NAMES)),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Combo.Input("sigma_shift", options=SHIFT_CHOICES, default=SHIFT_DEFAULT,
                               tooltip="model default = UNETLoader + KSampler; resolution = with ModelSamplingFlux "
                                       "(max_shift, base_shift, width, height below)."),
                io.Float.Input("max_shift", default=1.15, min=0.0, max=100.0, step=0.01),
                io.Float.Input("base_shift", default=0.5, min=0.0, max=100.0, step=0.01),
                io.Int.Input("width", default=1024, min=16, max=16384, step=8),
                io.Int.Input("height", default=1024, min=16, max=16384, step=8),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="A custom schedule (BasicScheduler, SplitSigmas, ...): replaces steps, "
                                        "scheduler, denoise and the sigma shift, as SamplerCustom does."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model: ModelHandle, positive, negative, latent_image: dict, seed: int, steps: int, cfg: float,
                sampler_name: str, scheduler: str, denoise: float, sigma_shift: str, max_shift: float,
                base_shift: float, width: int, height: int, sigmas: Optional[torch.Tensor] = None) -> io.NodeOutput:
        require_environment()
        shift = make_sigma_shift(sigma_shift, max_shift, base_shift, width, height)
        request = build_request(model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                                denoise, shift, sigmas)
        return io.NodeOutput(run_request(model, request, latent_image))


def run_request(model: ModelHandle, request: GenerationRequest, latent_image: dict) -> dict:
    """Sample ``request`` on the model's pool with ComfyUI's progress bar and previews -> the LATENT dict."""
    job = registry().get(model.pool).submit(request)
    family = family_of(model.spec)
    progress = ComfyProgress(total=request.sampling_steps, family=family.id, latent_dimensions=family.latent_dimensions)
    samples = drive_job(job, progress)
    return to_latent_output(latent_image, samples, family.latent_dimensions)
