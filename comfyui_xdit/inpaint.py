"""KSampler's noise mask (SetLatentNoiseMask, InpaintModelConditioning), applied at every model call.

Where the mask is 1 the model denoises; where it is 0 the input latent is kept. As ComfyUI's
``KSamplerX0Inpaint`` does, each call sees ``x * m + noised_latent(sigma) * (1 - m)`` and its x0
prediction (after CFG) becomes ``denoised * m + latent * (1 - m)``; the sampler steps the unblended
``x``. Everything is elementwise in the packed tokens, so a shard or a patch blends its own slice.
A video latent's mask (B, C, T, H, W) is resized in time too (trilinear, as ComfyUI's ``reshape_mask``); a model
whose ``scale_latent_inpaint`` keeps the latent as it is (Wan 2.2 TI2V 5B) is shown it clean (``renoise`` False).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .prediction import FLOW, Prediction


@dataclass(frozen=True)
class Inpaint:
    """The mask, the latent to keep and the noise to re-noise it with, packed like the tokens (B, N, 64)."""

    mask: torch.Tensor
    latent: torch.Tensor  # after process_latent_in
    noise: torch.Tensor
    prediction: Prediction = FLOW  # the model's noise scaling re-noises the kept latent
    renoise: bool = True  # False: the model sees the kept latent clean (ComfyUI's WAN22.scale_latent_inpaint)

    def to(self, device: torch.device) -> "Inpaint":
        return replace(self, mask=self.mask.to(device), latent=self.latent.to(device), noise=self.noise.to(device))

    def rows(self, start: int, stop: int) -> "Inpaint":
        """Images ``[start, stop)`` of the batch (a data group's chunk)."""
        return replace(self, mask=self.mask[start:stop], latent=self.latent[start:stop],
                       noise=self.noise[start:stop])

    def model_input(self, x: torch.Tensor, sigma: torch.Tensor, start: int = 0) -> torch.Tensor:
        """What the sampler shows the model for tokens ``[start, start + x.shape[1])``: the model's noise
        scaling of the kept latent where the mask is 0 (flow: sigma * noise + (1 - sigma) * latent)."""
        mask, latent, noise = (t[:, start:start + x.shape[1]] for t in (self.mask, self.latent, self.noise))
        kept = self.prediction.noise_scaling(sigma, noise, latent) if self.renoise else latent
        return x * mask + kept * (1.0 - mask)

    def model_output(self, denoised: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The x0 prediction with the kept latent where the mask is 0."""
        mask, latent = (t[:, start:start + denoised.shape[1]] for t in (self.mask, self.latent))
        return denoised * mask + latent * (1.0 - mask)


def mask_to_latent(noise_mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A mask of any size as ComfyUI's ``reshape_mask`` makes it: bilinear to the latent's (H, W) (trilinear to a
    video's (T, H, W)), repeated over channels and over the batch (cycling, then cut) -> ``shape`` (B, C, [T,] H, W)."""
    batch, channels = shape[:2]
    if len(shape) == 5:  # a video: (B, c, t, h, w) as given, anything smaller as one video (1, 1, t, h, w)
        mask = noise_mask.float()
        if mask.ndim < 5:
            mask = mask.reshape(1, 1, -1, mask.shape[-2], mask.shape[-1])
        mask = torch.nn.functional.interpolate(mask, size=tuple(shape[2:]), mode="trilinear")  # (M, c, T, H, W)
    else:
        # (..., h, w) -> (M, 1, h, w) -> (M, 1, H, W)
        mask = noise_mask.float().reshape(-1, 1, noise_mask.shape[-2], noise_mask.shape[-1])
        mask = torch.nn.functional.interpolate(mask, size=tuple(shape[2:]), mode="bilinear")
    if mask.shape[1] < channels:
        mask = mask.repeat(1, channels, *(1,) * (mask.ndim - 2))[:, :channels]  # (M, C, [T,] H, W)
    if mask.shape[0] < batch:
        mask = mask.repeat(math.ceil(batch / mask.shape[0]), *(1,) * (mask.ndim - 1))
    return mask[:batch]


def build_inpaint(noise_mask: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor,
                  pack: Callable[[torch.Tensor], torch.Tensor], prediction: Prediction = FLOW,
                  renoise: bool = True) -> Inpaint:
    """``latent`` (after process_latent_in) and ``noise`` in (B, C, [T,] H, W); ``pack`` makes tokens of them."""
    mask = mask_to_latent(noise_mask, tuple(latent.shape))
    return Inpaint(mask=pack(mask), latent=pack(latent), noise=pack(noise), prediction=prediction, renoise=renoise)
