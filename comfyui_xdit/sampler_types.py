"""The shapes every sampler step module shares: a step's state and noise, and a multi-call sampler's plan.

A one-call step maps ``(x, denoised, sigmas, i, state, noise=None) -> (x_next, state_next)``; ``state`` is a
tuple of tensors shaped like ``x`` (a multistep method's history) and every operation is elementwise in
``x``, so a step runs on a whole latent or on a PipeFusion patch with the same numbers. A multi-call
sampler (heun, dpmpp_sde, ...) is a ``CallPlan`` per step and a phase function after each model call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

SamplerState = Optional[tuple[torch.Tensor, ...]]  # history, oldest first, each shaped like x
StepNoise = Optional[Callable[[], torch.Tensor]]  # this step's noise for the tokens at hand (ancestral samplers)
SamplerStep = Callable[..., "tuple[torch.Tensor, SamplerState]"]  # (x, denoised, sigmas, i, state, noise=None)
HalfLogSnr = Callable[[torch.Tensor], torch.Tensor]  # sigma -> log(alpha / sigma): a Prediction's half_log_snr
Scalar = Union[torch.Tensor, float]


@dataclass(frozen=True)
class CallPlan:
    """The model calls of one sampler step: the sigma of each call and the Brownian interval of the noise
    drawn after it (the whole step's interval where none is drawn)."""

    sigmas: tuple[Scalar, ...]
    noise_spans: tuple[tuple[Scalar, Scalar], ...]


CallsOf = Callable[[torch.Tensor, int], CallPlan]  # (sigmas, i) -> step i's calls
Phase = Callable[..., "tuple[torch.Tensor, SamplerState]"]  # (x, denoised, sigmas, i, phase, state, noise, uncond=None)


def to_d(x: torch.Tensor, sigma: Scalar, denoised: torch.Tensor) -> torch.Tensor:
    """k-diffusion's ``to_d``: the Karras ODE derivative from an x0 prediction."""
    return (x - denoised) / sigma


def t_of_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """k-diffusion's ``t = -log sigma`` (DPM-Solver's time on a variance-exploding sigma)."""
    return sigma.log().neg()


def sigma_of_t(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()
