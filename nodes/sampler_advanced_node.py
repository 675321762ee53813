"""xDiT Sampler (Advanced): KSamplerAdvanced's inputs and meaning (start / end steps, add noise, leftover
noise), sampled by the pool -> LATENT. Two of them split one schedule between two models, as Wan 2.2's
high-noise and low-noise experts are run."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from comfyui_xdit.environment import require_environment
from comfyui_xdit.samplers import SAMPLER_NAMES
from comfyui_xdit.sigmas import SCHEDULER_NAMES

from .comfy_types import CATEGORY, XDiTModelType
from .handles import ModelHandle
from .sampler_node import SHIFT_CHOICES, SHIFT_DEFAULT, build_request, make_sigma_shift, run_request

logger = logging.getLogger(__name__)

ENABLE, DISABLE = "enable", "disable"  # KSamplerAdvanced's switches


class XDiTSamplerAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XDiTSamplerAdvanced",
            display_name="xDiT Sampler (Advanced)",
            category=CATEGORY,
            description="KSamplerAdvanced on the xDiT pool: the same inputs (start_at_step, end_at_step, add_noise, "
                        "return_with_leftover_noise) and, for the same seed, the same latent. Wan 2.2: the high-noise "
                        "expert from step 0 to k with leftover noise, then the low-noise one from k without noise.",
            inputs=[
                XDiTModelType.Input("model"),
                io.Combo.Input("add_noise", options=[ENABLE, DISABLE],
                               tooltip="disable: start from the latent as it is (another sampler's leftover noise)."),
                io.Int.Input("noise_seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=list(SAMPLER_NAMES)),
                io.Combo.Input("scheduler", options=list(SCHEDULER_NAMES)),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative", tooltip="Used only when cfg != 1 (like KSamplerAdvanced)."),
                io.Latent.Input("latent_image"),
                io.Int.Input("start_at_step", default=0, min=0, max=10000),
                io.Int.Input("end_at_step", default=10000, min=0, max=10000),
                io.Combo.Input("return_with_leftover_noise", options=[DISABLE, ENABLE],
                               tooltip="enable: stop at end_at_step's sigma, for a second sampler to go on from."),
                io.Combo.Input("sigma_shift", options=SHIFT_CHOICES, default=SHIFT_DEFAULT,
                               tooltip="model default = UNETLoader + KSamplerAdvanced; resolution = with "
                                       "ModelSamplingFlux (max_shift, base_shift, width, height below)."),
                io.Float.Input("max_shift", default=1.15, min=0.0, max=100.0, step=0.01),
                io.Float.Input("base_shift", default=0.5, min=0.0, max=100.0, step=0.01),
                io.Int.Input("width", default=1024, min=16, max=16384, step=8),
                io.Int.Input("height", default=1024, min=16, max=16384, step=8),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model: ModelHandle, add_noise: str, noise_seed: int, steps: int, cfg: float, sampler_name: str,
                scheduler: str, positive, negative, latent_image: dict, start_at_step: int, end_at_step: int,
                return_with_leftover_noise: str, sigma_shift: str = SHIFT_DEFAULT, max_shift: float = 1.15,
                base_shift: float = 0.5, width: int = 1024, height: int = 1024) -> io.NodeOutput:
        require_environment()
        shift = make_sigma_shift(sigma_shift, max_shift, base_shift, width, height)
        request = build_request(model, positive, negative, latent_image, noise_seed, steps, cfg, sampler_name,
                                scheduler, 1.0, shift, start_step=start_at_step, end_step=end_at_step,
                                add_noise=add_noise == ENABLE, leftover_noise=return_with_leftover_noise == ENABLE)
        return io.NodeOutput(run_request(model, request, latent_image))
