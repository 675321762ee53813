"""The deterministic multi-call samplers: ``heun``, ``heunpp2`` and ``dpm_2`` (Karras et al. 2022 flavours),
one code for every model, as ComfyUI's.

Each is a ``CallPlan`` per step and a phase function after each model call (``sampler_types``; the
sequence is run by ``multi_call_samplers``). The arithmetic follows ComfyUI's ``sample_heun`` /
``sample_heunpp2`` / ``sample_dpm_2`` (no churn) operation by operation on float32 0-dim sigma tensors.
"""

from __future__ import annotations

from typing import Optional

import torch

from .sampler_types import CallPlan, SamplerState, StepNoise, to_d


# --- heun ------------------------------------------------------------------------------------------

def _heun_calls(sigmas: torch.Tensor, i: int) -> CallPlan:
    step = (sigmas[i], sigmas[i + 1])
    if sigmas[i + 1] == 0:
        return CallPlan((sigmas[i],), (step,))
    return CallPlan((sigmas[i], sigmas[i + 1]), (step, step))


def _heun_phase(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, phase: int, state: SamplerState,
                noise: StepNoise, uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, SamplerState]:
    """Karras et al. (2022) Algorithm 2 without churn: an Euler predictor, then the trapezoidal corrector."""
    sigma_hat = sigmas[i] * 1  # ComfyUI's sigma_hat = sigmas[i] * (gamma + 1) with gamma 0
    dt = sigmas[i + 1] - sigma_hat
    if phase == 0:
        d = to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            return x + d * dt, None
        return x + d * dt, (x, d)
    x_start, d = state[0], state[1]
    d_2 = to_d(x, sigmas[i + 1], denoised)
    d_prime = (d + d_2) / 2
    return x_start + d_prime * dt, None


# --- heunpp2 ---------------------------------------------------------------------------------------

def _heunpp2_calls(sigmas: torch.Tensor, i: int) -> CallPlan:
    s_end, step = sigmas[-1], (sigmas[i], sigmas[i + 1])
    if sigmas[i + 1] == s_end:
        return CallPlan((sigmas[i],), (step,))
    if sigmas[i + 2] == s_end:
        return CallPlan((sigmas[i], sigmas[i + 1]), (step, step))
    return CallPlan((sigmas[i], sigmas[i + 1], sigmas[i + 2]), (step, step, step))


def _heunpp2_phase(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, phase: int,
                   state: SamplerState, noise: StepNoise, uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``heunpp2``: Euler on the last step, Heun with sigma weights on the one before, else a
    third call at ``sigmas[i + 2]`` and a three-point weighted derivative."""
    s_end = sigmas[-1]
    sigma_hat = sigmas[i] * (0.0 + 1)  # gamma is 0.0 without churn
    dt = sigmas[i + 1] - sigma_hat
    if phase == 0:
        d = to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == s_end:
            return x + d * dt, None
        return x + d * dt, (x, d)
    x_start, d = state[0], state[1]
    d_2 = to_d(x, sigmas[i + 1], denoised) if phase == 1 else state[2]
    if phase == 1 and sigmas[i + 2] == s_end:
        w = 2 * sigmas[0]
        w2 = sigmas[i + 1] / w
        w1 = 1 - w2
        d_prime = d * w1 + d_2 * w2
        return x_start + d_prime * dt, None
    if phase == 1:
        dt_2 = sigmas[i + 2] - sigmas[i + 1]
        return x + d_2 * dt_2, (x_start, d, d_2)
    d_3 = to_d(x, sigmas[i + 2], denoised)
    w = 3 * sigmas[0]
    w2 = sigmas[i + 1] / w
    w3 = sigmas[i + 2] / w
    w1 = 1 - w2 - w3
    d_prime = w1 * d + w2 * d_2 + w3 * d_3
    return x_start + d_prime * dt, None


# --- dpm_2 -----------------------------------------------------------------------------------------

def log_midpoint(sigma: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    return sigma.log().lerp(sigma_to.log(), 0.5).exp()


def _dpm_2_calls(sigmas: torch.Tensor, i: int) -> CallPlan:
    step = (sigmas[i], sigmas[i + 1])
    if sigmas[i + 1] == 0:
        return CallPlan((sigmas[i],), (step,))
    return CallPlan((sigmas[i], log_midpoint(sigmas[i] * 1, sigmas[i + 1])), (step, step))


def _dpm_2_phase(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, phase: int, state: SamplerState,
                 noise: StepNoise, uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, SamplerState]:
    """DPM-Solver-2 (Karras et al. 2022 flavour): an Euler half step to the log-midpoint sigma, then the
    whole step with the midpoint's derivative."""
    sigma_hat = sigmas[i] * 1
    if phase == 0:
        d = to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            return x + d * (sigmas[i + 1] - sigma_hat), None
        dt_1 = log_midpoint(sigma_hat, sigmas[i + 1]) - sigma_hat
        return x + d * dt_1, (x,)
    sigma_mid = log_midpoint(sigma_hat, sigmas[i + 1])
    d_2 = to_d(x, sigma_mid, denoised)
    return state[0] + d_2 * (sigmas[i + 1] - sigma_hat), None


ODE_MULTI_CALL = {"heun": (_heun_calls, _heun_phase), "heunpp2": (_heunpp2_calls, _heunpp2_phase),
                  "dpm_2": (_dpm_2_calls, _dpm_2_phase)}
