"""Step events -> ComfyUI's progress bar and latent previews; ComfyUI's Cancel -> ``job.cancel()``."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch

from .video_preview import frame_strip

logger = logging.getLogger(__name__)

POLL_S = 0.1  # how often the node checks for step events and the Cancel button
CANCEL_GRACE_S = 120.0  # how long a cancelled job may take to stop at its next step


# ComfyUI's latent format (comfy/latent_formats.py) of each family's VAE: the previewer's colours and scaling.
COMFY_LATENT_FORMATS = {"flux": "Flux", "sd3": "SD3", "qwen-image": "Wan21", "pixart-alpha": "SD15",
                        "pixart-sigma": "SDXL"}
COMFY_LATENT_FORMATS["hunyuan-dit"] = "SDXL"  # HunyuanDiT / HunyuanDiT1 (comfy/supported_models.py)
COMFY_LATENT_FORMATS["wan21"] = "Wan21"  # WAN21_T2V
COMFY_LATENT_FORMATS["hunyuan-video"] = "HunyuanVideo"  # HunyuanVideo (T2V)
COMFY_LATENT_FORMATS["hunyuan-video-i2v"] = "HunyuanVideo"  # HunyuanVideoI2V
COMFY_LATENT_FORMATS["cogvideox"] = "Wan21"  # ComfyUI has no CogVideoX format: a 16-channel video one, colours approximate
COMFY_LATENT_FORMATS["wan22-5b"] = "Wan22"  # WAN22_T2V (Wan 2.2 TI2V 5B: 48 channels)


class ComfyProgress:
    """Feeds ComfyUI's ProgressBar; previews go through ComfyUI's previewer for the user's preview setting,
    with the latent format of the model's family."""

    def __init__(self, total: int, family: str = "flux", latent_dimensions: int = 2) -> None:
        import comfy.latent_formats
        import comfy.utils
        import latent_preview

        self.latent_format = getattr(comfy.latent_formats, COMFY_LATENT_FORMATS[family])()
        self.time_axis = latent_dimensions == 3  # Wan21's per-channel statistics are (1, C, 1, 1, 1)
        # None when the user's preview method is "none": then no preview is decoded at all.
        self.previewer = latent_preview.get_previewer(torch.device("cpu"), self.latent_format)
        self.bar = comfy.utils.ProgressBar(total)

    def __call__(self, event: Any) -> None:
        preview = None
        if self.previewer is not None and getattr(event, "preview", None) is not None:
            # the engine's preview is a LATENT (VAE space); ComfyUI previews the model-space x0
            latent = event.preview.float()
            # an image (B, C, H, W) of a video VAE's format gets its frame axis; a video preview has its frames
            x0 = self.latent_format.process_in(latent.unsqueeze(2) if self.time_axis and latent.ndim == 4 else latent)
            x0 = frame_strip(x0)  # a video: frames from first to last side by side
            preview = self.previewer.decode_latent_to_preview_image("JPEG", x0)
        self.bar.update_absolute(event.step, event.total, preview)


def comfy_interrupted() -> bool:
    import comfy.model_management

    return comfy.model_management.processing_interrupted()


def raise_comfy_interrupt() -> None:
    """Raise ComfyUI's own InterruptProcessingException so the UI shows 'interrupted', not an error."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def drive_job(job: Any, on_event: Callable[[Any], None], interrupted: Callable[[], bool] = comfy_interrupted,
              on_interrupt: Callable[[], None] = raise_comfy_interrupt,
              poll_s: float = POLL_S) -> Optional[torch.Tensor]:
    """Relay ``job``'s step events until it ends; cancel it when ComfyUI is interrupted.

    Returns the final latent. On interrupt the job is cancelled, its end awaited (all ranks stop at
    the same step) and ``on_interrupt`` raises ComfyUI's interruption.
    """
    while not job.wait(poll_s):
        for event in job.poll_events():
            on_event(event)
        if interrupted():
            logger.info("ComfyUI interrupt: cancelling xDiT job")
            job.cancel()
            _await_end(job)
            on_interrupt()
            raise RuntimeError("xDiT job cancelled")  # on_interrupt normally raises ComfyUI's exception
    for event in job.poll_events():
        on_event(event)
    return job.result(timeout=0)


def _await_end(job: Any) -> None:
    if not job.wait(CANCEL_GRACE_S):
        raise RuntimeError(f"the xDiT job did not stop within {CANCEL_GRACE_S:.0f}s of Cancel")
    job.poll_events()
