"""ComfyUI's latent conventions: the LATENT a graph carries vs. what the model sees."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LatentFormat:
    """Scale and shift between ComfyUI's LATENT (VAE space) and model space.

    Mirrors ComfyUI's ``latent_formats``: ``process_in = (x - shift) * scale``,
    ``process_out = x / scale + shift``.
    """

    channels: int
    scale_factor: float
    shift_factor: float

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent - self.shift_factor) * self.scale_factor

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent / self.scale_factor) + self.shift_factor


FLUX_LATENT_FORMAT = LatentFormat(channels=16, scale_factor=0.3611, shift_factor=0.1159)
SD3_LATENT_FORMAT = LatentFormat(channels=16, scale_factor=1.5305, shift_factor=0.0609)
