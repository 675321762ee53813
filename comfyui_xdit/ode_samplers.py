"""The deterministic one-call samplers: Euler, DPM-Solver++(2M), RES multistep and gradient estimation.

Each is ``(x, denoised, sigmas, i, state, noise=None) -> (x_next, state)`` (``sampler_types``), the same code
for every model, as ComfyUI's are; the arithmetic follows ComfyUI's ``sample_euler`` / ``sample_dpmpp_2m`` /
``res_multistep`` / ``sample_gradient_estimation`` operation by operation on float32 0-dim sigma tensors,
so the results match bit for bit.
"""

from __future__ import annotations

import torch

from .cfg_pp_samplers import GE_GAMMA
from .sampler_types import SamplerState, StepNoise, sigma_of_t, t_of_sigma


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
               state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    """Euler on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    sigma_hat = sigmas[i]
    d = (x - denoised) / sigma_hat
    dt = sigmas[i + 1] - sigma_hat
    return x + d * dt, None


def dpmpp_2m_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                  state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    """DPM-Solver++(2M); ``state`` holds the previous step's denoised prediction."""
    t, t_next = t_of_sigma(sigmas[i]), t_of_sigma(sigmas[i + 1])
    h = t_next - t
    if state is None or sigmas[i + 1] == 0:
        x_next = (sigma_of_t(t_next) / sigma_of_t(t)) * x - (-h).expm1() * denoised
    else:
        h_last = t - t_of_sigma(sigmas[i - 1])
        r = h_last / h
        denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * state[0]
        x_next = (sigma_of_t(t_next) / sigma_of_t(t)) * x - (-h).expm1() * denoised_d
    return x_next, (denoised,)


def res_multistep_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                       state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``res_multistep`` (KSampler's, i.e. eta 0: no noise reaches x), the second-order
    multistep RES method of arXiv 2308.02157; ``state`` holds the previous step's denoised prediction."""
    sigma, sigma_down = sigmas[i], sigmas[i + 1]  # eta 0: sigma_down is the next sigma
    if sigma_down == 0 or state is None:
        d = (x - denoised) / sigma
        return x + d * (sigma_down - sigma), (denoised,)
    # the previous step's sigma_down is this step's sigma
    t, t_old, t_next, t_prev = (t_of_sigma(s) for s in (sigma, sigmas[i], sigma_down, sigmas[i - 1]))
    h = t_next - t
    c2 = (t_prev - t_old) / h
    phi1 = torch.expm1(-h) / -h
    phi2 = (phi1 - 1.0) / -h
    b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
    b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
    return sigma_of_t(h) * x + h * (b1 * denoised + b2 * state[0]), (denoised,)


def gradient_estimation_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                             state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``gradient_estimation`` (ge_gamma 2; openreview.net/pdf?id=o2ND9v0CeK): Euler plus
    ``(ge_gamma - 1)`` times the change of the derivative since the previous step; ``state`` holds the
    previous derivative. The last step is the x0 prediction."""
    d = (x - denoised) / sigmas[i]
    dt = sigmas[i + 1] - sigmas[i]
    if sigmas[i + 1] == 0:
        return denoised, (d,)
    x = x + d * dt
    if i >= 1:
        d_bar = (GE_GAMMA - 1) * (d - state[0])
        x = x + d_bar * dt
    return x, (d,)
