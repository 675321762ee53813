"""ComfyUI's latent conventions: the LATENT a graph carries vs. what the model sees."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

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


@dataclass(frozen=True)
class PerChannelLatentFormat:
    """A per-channel mean and std between LATENT and model space: ComfyUI's ``Wan21`` latent format
    (Qwen-Image's), ``process_in = (x - mean) * scale / std``, ``process_out = x * std / scale + mean``,
    in that order of operations. Works on (B, C, H, W) and (B, C, T, H, W) latents alike."""

    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale_factor: float = 1.0

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"a per-channel latent format needs {self.channels} means and stds, got "
                             f"{len(self.mean)} and {len(self.std)}")

    def _stats(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (C,) -> (1, C, 1, ...) broadcasting over the latent's batch and spatial axes
        shape = (1, self.channels) + (1,) * (latent.ndim - 2)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(shape).to(latent.device, latent.dtype)
        std = torch.tensor(self.std, dtype=torch.float32).view(shape).to(latent.device, latent.dtype)
        return mean, std

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latent)
        return (latent - mean) * self.scale_factor / std

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latent)
        return latent * std / self.scale_factor + mean


AnyLatentFormat = Union[LatentFormat, PerChannelLatentFormat]  # what an adapter's ``latent_format`` may be

# ComfyUI's Wan21 format (comfy/latent_formats.py), which its QwenImage model uses.
QWEN_IMAGE_LATENT_FORMAT = PerChannelLatentFormat(
    channels=16,
    mean=(-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
          0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921),
    std=(2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
         3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160),
)

# ComfyUI's SD15 and SDXL formats (4 channels, scale only), which PixArt-alpha and PixArt-sigma use.
SD15_LATENT_FORMAT = LatentFormat(channels=4, scale_factor=0.18215, shift_factor=0.0)
SDXL_LATENT_FORMAT = LatentFormat(channels=4, scale_factor=0.13025, shift_factor=0.0)

# Wan 2.1's own latent (the Wan VAE: the same per-channel statistics), with a time axis (B, 16, T, H, W).
WAN21_LATENT_FORMAT = QWEN_IMAGE_LATENT_FORMAT

# Wan 2.2 TI2V 5B's own latent (the Wan 2.2 VAE: 48 channels, 16x spatial downscale), ComfyUI's ``Wan22`` format.
WAN22_LATENT_FORMAT = PerChannelLatentFormat(
    channels=48,
    mean=(-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
          -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
          -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
          -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
          -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
          0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667),
    std=(0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
         0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
         0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
         0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
         0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
         0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744),
)
