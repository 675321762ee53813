"""The one-call ancestral samplers: each step goes down to a ``sigma_down`` below the next sigma, then adds
this step's noise back (ComfyUI's default noise sampler: one draw of the whole latent per step).

ComfyUI's ``euler_ancestral`` and ``lcm`` ask the model sampling whether it is ``CONST`` (a flow model):
flow models take the rectified-flow step (``*_RF``: re-noise with ``alpha`` scaling) and the flow noise
scaling, the others k-diffusion's variance-exploding split (``get_ancestral_step``) and their own noise
scaling; ``ancestral_steps(prediction)`` picks the form by ``Prediction.is_flow``. ``ddpm`` and
``res_multistep_ancestral`` are one code for every model. The arithmetic follows ComfyUI's loops
operation by operation on float32 0-dim sigma tensors, so the results match bit for bit.
"""

from __future__ import annotations

from functools import partial

import torch

from .prediction import Prediction
from .sampler_types import SamplerState, SamplerStep, StepNoise, sigma_of_t, t_of_sigma


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """k-diffusion's ``get_ancestral_step``: the sigma to step down to and the noise to add back."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def euler_ancestral_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                         state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``euler_ancestral`` for flow models (its ``sample_euler_ancestral_RF``, eta 1): step down
    to ``sigma_down``, then re-noise to the next sigma with this step's noise."""
    eta = 1.0
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    if sigma_next == 0:
        return denoised, None
    downstep_ratio = 1 + (sigma_next / sigma - 1) * eta
    sigma_down = sigma_next * downstep_ratio
    alpha_ip1 = 1 - sigma_next
    alpha_down = 1 - sigma_down
    renoise_coeff = (sigma_next ** 2 - sigma_down ** 2 * alpha_ip1 ** 2 / alpha_down ** 2) ** 0.5
    sigma_down_i_ratio = sigma_down / sigma
    x = sigma_down_i_ratio * x + (1 - sigma_down_i_ratio) * denoised
    return (alpha_ip1 / alpha_down) * x + noise() * 1.0 * renoise_coeff, None


def lcm_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
             state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``lcm``: jump to the x0 prediction, then re-noise it to the next sigma (CONST scaling)."""
    sigma_next = sigmas[i + 1]
    if sigma_next > 0:
        return sigma_next * noise() + (1.0 - sigma_next) * denoised, None
    return denoised, None


def ddpm_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
              state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``ddpm`` (its generic step sampler with the DDPM ancestral step), as it runs on any model:
    the sigmas read as variance-exploding ones, ``x`` scaled to ``x / sqrt(1 + sigma^2)``, the DDPM
    posterior mean plus this step's noise, scaled back to the next sigma."""
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    eps = (x - denoised) / sigma
    x_scaled = x / torch.sqrt(1.0 + sigma ** 2.0)
    alpha_cumprod = 1 / ((sigma * sigma) + 1)
    alpha_cumprod_next = 1 / ((sigma_next * sigma_next) + 1)
    alpha = alpha_cumprod / alpha_cumprod_next
    mu = (1.0 / alpha).sqrt() * (x_scaled - (1 - alpha) * eps / (1 - alpha_cumprod).sqrt())
    if sigma_next > 0:
        mu = mu + ((1 - alpha) * (1. - alpha_cumprod_next) / (1. - alpha_cumprod)).sqrt() * noise()
    if sigma_next != 0:
        mu = mu * torch.sqrt(1.0 + sigma_next ** 2.0)
    return mu, None


def res_multistep_ancestral_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                                 state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``res_multistep_ancestral`` (eta 1): ``res_multistep`` down to the ancestral step's
    ``sigma_down``, then this step's noise times ``sigma_up`` (k-diffusion's variance-exploding ancestral
    split, which ComfyUI uses for flow models too); ``state`` holds the previous denoised prediction."""
    eta, s_noise = 1.0, 1.0
    sigma = sigmas[i]
    sigma_down, sigma_up = ancestral_step(sigma, sigmas[i + 1], eta)
    if sigma_down == 0 or state is None:
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
    else:
        old_sigma_down, _ = ancestral_step(sigmas[i - 1], sigma, eta)  # the previous step's, as it was
        t, t_old, t_next, t_prev = (t_of_sigma(s) for s in (sigma, old_sigma_down, sigma_down, sigmas[i - 1]))
        h = t_next - t
        c2 = (t_prev - t_old) / h
        phi1 = torch.expm1(-h) / -h
        phi2 = (phi1 - 1.0) / -h
        b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
        b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
        x = sigma_of_t(h) * x + h * (b1 * denoised + b2 * state[0])
    if sigmas[i + 1] > 0:
        x = x + noise() * s_noise * sigma_up
    return x, (denoised,)


def euler_ancestral_eps_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                             state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``euler_ancestral`` for EPS / v models (eta 1): Euler down to k-diffusion's ``sigma_down``,
    then this step's noise times ``sigma_up``."""
    eta, s_noise = 1.0, 1.0
    sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
    if sigma_down == 0:
        return denoised, None
    d = (x - denoised) / sigmas[i]
    dt = sigma_down - sigmas[i]
    return x + d * dt + noise() * s_noise * sigma_up, None


def lcm_discrete_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, state: SamplerState,
                      noise: StepNoise = None, *, prediction: Prediction) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``lcm`` for EPS / v models: the x0 prediction re-noised with the model's noise scaling."""
    sigma_next = sigmas[i + 1]
    if sigma_next > 0:
        return prediction.noise_scaling(sigma_next, noise(), denoised), None
    return denoised, None


def ancestral_steps(prediction: Prediction) -> dict[str, SamplerStep]:
    """These samplers' steps for a ``prediction`` model (the flow or the other form where ComfyUI branches)."""
    steps = {"ddpm": ddpm_step, "res_multistep_ancestral": res_multistep_ancestral_step}
    if prediction.is_flow:
        return {**steps, "euler_ancestral": euler_ancestral_step, "lcm": lcm_step}
    return {**steps, "euler_ancestral": euler_ancestral_eps_step,
            "lcm": partial(lcm_discrete_step, prediction=prediction)}

