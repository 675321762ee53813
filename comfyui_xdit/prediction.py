"""What a model predicts, and so how the loop talks to it: ComfyUI's ``CONST`` / ``EPS`` / ``V_PREDICTION``.

The one place the sampling loop, the sequence-parallel loop, PipeFusion and its reference turn a
sampler's ``x`` into the model's input and the model's output into an x0 prediction, and where a
request's noise is scaled in and out. Each adapter says its ``prediction``; ``prediction_of`` reads it.
Every formula keeps ComfyUI's float32 operations and their order (``comfy/model_sampling.py``), so the
numbers match bit for bit.

- ``FLOW`` (Flux, SD3: rectified flow): input = x, x0 = x - v*sigma, x = sigma*noise + (1-sigma)*latent,
  and the final latent is divided by 1 - sigma_last;
- ``EPS`` (PixArt, SD1.5: noise on a variance-exploding sigma): input = x / sqrt(sigma^2 + 1),
  x0 = x - eps*sigma, x = latent + noise*sigma (noise*sqrt(1 + sigma^2) from the model's largest sigma),
  no inverse scaling;
- ``V`` (v-prediction, as EPS but x0 = x/(sigma^2+1) - v*sigma/sqrt(sigma^2+1)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

SIGMA_DATA = 1.0  # ComfyUI's ModelSamplingDiscrete.sigma_data


class Prediction(Protocol):
    name: str  # "flow", "eps" or "v"
    is_flow: bool  # samplers' *_RF branches: ComfyUI's ``isinstance(model_sampling, CONST)``

    def model_input(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...

    def denoised(self, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> torch.Tensor: ...

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor: ...

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor: ...

    def half_log_snr(self, sigma: torch.Tensor) -> torch.Tensor: ...

    def sigma_of_half_log_snr(self, half_log_snr: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class FlowPrediction:
    """ComfyUI's ``CONST``: the model predicts the velocity noise - x0."""

    name: str = "flow"
    is_flow: bool = True

    def model_input(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x

    def denoised(self, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return x - out * sigma

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        return sigma * noise + (1.0 - sigma) * latent

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return latent / (1.0 - sigma)

    def half_log_snr(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.logit().neg()  # log((1 - sigma) / sigma)

    def sigma_of_half_log_snr(self, half_log_snr: torch.Tensor) -> torch.Tensor:
        return half_log_snr.neg().sigmoid()


@dataclass(frozen=True)
class EpsPrediction:
    """ComfyUI's ``EPS``: the model predicts the noise, on input scaled to unit variance."""

    name: str = "eps"
    is_flow: bool = False

    def model_input(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x / (sigma ** 2 + SIGMA_DATA ** 2) ** 0.5

    def denoised(self, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return x - out * sigma

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        noise = noise * torch.sqrt(1.0 + sigma ** 2.0) if max_denoise else noise * sigma
        return noise + latent  # ComfyUI's in-place ``noise += latent_image``

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return latent

    def half_log_snr(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.log().neg()

    def sigma_of_half_log_snr(self, half_log_snr: torch.Tensor) -> torch.Tensor:
        return half_log_snr.neg().exp()


@dataclass(frozen=True)
class VPrediction(EpsPrediction):
    """ComfyUI's ``V_PREDICTION``: EPS's input and noise scaling, a v target."""

    name: str = "v"

    def denoised(self, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return (x * SIGMA_DATA ** 2 / (sigma ** 2 + SIGMA_DATA ** 2)
                - out * sigma * SIGMA_DATA / (sigma ** 2 + SIGMA_DATA ** 2) ** 0.5)


FLOW = FlowPrediction()
EPS = EpsPrediction()
V = VPrediction()
PREDICTIONS = {p.name: p for p in (FLOW, EPS, V)}


def prediction_of(adapter: Any) -> Prediction:
    """The adapter's ``prediction``; an adapter that does not say one is a flow model (Flux, SD3)."""
    return getattr(adapter, "prediction", FLOW)


def max_denoise(sigma_max: float, sigmas: torch.Tensor) -> bool:
    """KSAMPLER's ``max_denoise``: whether sampling starts at (or above) the model's largest sigma, where
    EPS noise is scaled by sqrt(1 + sigma^2) instead of sigma."""
    if len(sigmas) == 0:
        return False
    sigma = float(sigmas[0])
    return math.isclose(sigma_max, sigma, rel_tol=1e-05) or sigma > sigma_max
