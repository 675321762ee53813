"""The multi-call SDE samplers on half log-SNR: ``dpmpp_sde`` (DPM-Solver++ stochastic, r 1/2, its noise
from the Brownian tree) and ``seeds_2`` / ``seeds_3`` (SEEDS, arXiv 2305.14267, ComfyUI's default noise
sampler).

ComfyUI writes each once for every model, asking the model sampling only for its half log-SNR and back
(``sigma_to_half_log_snr`` / ``half_log_snr_to_sigma``: flow ``log((1 - sigma) / sigma)``, EPS / v
``-log sigma``); here each takes a ``Prediction`` and asks it the same. A flow model's ``sigmas`` start
just below 1 (``offset_first_sigma_for_snr``). The arithmetic follows ComfyUI's ``sample_dpmpp_sde`` /
``sample_seeds_2`` / ``sample_seeds_3`` (eta 1, s_noise 1) operation by operation on float32 0-dim sigma
tensors, so the results match bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch

from .ancestral_samplers import ancestral_step
from .prediction import Prediction
from .sampler_types import CallPlan, CallsOf, Phase, SamplerState, StepNoise


# --- dpmpp_sde (Brownian tree) ---------------------------------------------------------------------

@dataclass(frozen=True)
class _SdeGeometry:
    lambda_s: torch.Tensor
    lambda_s_1: torch.Tensor
    lambda_t: torch.Tensor
    sigma_s_1: torch.Tensor
    alpha_s: torch.Tensor
    alpha_s_1: torch.Tensor
    alpha_t: torch.Tensor

    @classmethod
    def at(cls, sigmas: torch.Tensor, i: int, prediction: Prediction) -> "_SdeGeometry":
        r = 1 / 2
        lambda_s, lambda_t = prediction.half_log_snr(sigmas[i]), prediction.half_log_snr(sigmas[i + 1])
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        sigma_s_1 = prediction.sigma_of_half_log_snr(lambda_s_1)
        return cls(lambda_s, lambda_s_1, lambda_t, sigma_s_1, sigmas[i] * lambda_s.exp(),
                   sigma_s_1 * lambda_s_1.exp(), sigmas[i + 1] * lambda_t.exp())


def _dpmpp_sde_calls(sigmas: torch.Tensor, i: int, *, prediction: Prediction) -> CallPlan:
    step = (sigmas[i], sigmas[i + 1])
    if sigmas[i + 1] == 0:
        return CallPlan((sigmas[i],), (step,))
    sigma_s_1 = _SdeGeometry.at(sigmas, i, prediction).sigma_s_1
    return CallPlan((sigmas[i], sigma_s_1), ((sigmas[i], sigma_s_1), step))


def _dpmpp_sde_phase(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, phase: int,
                     state: SamplerState, noise: StepNoise, uncond: Optional[torch.Tensor] = None, *,
                     prediction: Prediction) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's DPM-Solver++ (stochastic), r 1/2, eta 1, on half log-SNR: a noised first-order step to
    the midpoint, a second call there, then the whole step from both predictions, noised again."""
    eta, s_noise, r = 1.0, 1.0, 1 / 2
    if sigmas[i + 1] == 0:
        return denoised, None
    g = _SdeGeometry.at(sigmas, i, prediction)
    if phase == 0:
        sd, su = ancestral_step(g.lambda_s.neg().exp(), g.lambda_s_1.neg().exp(), eta)
        h_ = sd.log().neg() - g.lambda_s
        x_2 = (g.alpha_s_1 / g.alpha_s) * (-h_).exp() * x - g.alpha_s_1 * (-h_).expm1() * denoised
        x_2 = x_2 + g.alpha_s_1 * noise() * s_noise * su
        return x_2, (x, denoised)
    fac = 1 / (2 * r)
    sd, su = ancestral_step(g.lambda_s.neg().exp(), g.lambda_t.neg().exp(), eta)
    h_ = sd.log().neg() - g.lambda_s
    denoised_d = (1 - fac) * state[1] + fac * denoised
    x = (g.alpha_t / g.alpha_s) * (-h_).exp() * state[0] - g.alpha_t * (-h_).expm1() * denoised_d
    return x + g.alpha_t * noise() * s_noise * su, None


# --- seeds_2 / seeds_3 (default noise sampler) ------------------------------------------------------

SEEDS_STAGES = {"seeds_2": (1 / 2,), "seeds_3": (1. / 3, 2. / 3)}  # ComfyUI's r / (r_1, r_2): the stages' positions


def _ei_h_phi_1(h: torch.Tensor) -> torch.Tensor:
    return torch.expm1(h)


def _ei_h_phi_2(h: torch.Tensor) -> torch.Tensor:
    return (torch.expm1(h) - h) / h


@dataclass(frozen=True)
class _SeedsGeometry:
    h: torch.Tensor  # the step in half log-SNR
    stage_sigmas: tuple[torch.Tensor, ...]  # sigma at each intermediate stage
    stage_alphas: tuple[torch.Tensor, ...]
    alpha_t: torch.Tensor

    @classmethod
    def at(cls, sigmas: torch.Tensor, i: int, stages: tuple[float, ...],
           prediction: Prediction) -> "_SeedsGeometry":
        lambda_s, lambda_t = prediction.half_log_snr(sigmas[i]), prediction.half_log_snr(sigmas[i + 1])
        lambdas = [torch.lerp(lambda_s, lambda_t, r) for r in stages]
        stage_sigmas = tuple(prediction.sigma_of_half_log_snr(lam) for lam in lambdas)
        stage_alphas = tuple(sigma * lam.exp() for sigma, lam in zip(stage_sigmas, lambdas))
        return cls(lambda_t - lambda_s, stage_sigmas, stage_alphas, sigmas[i + 1] * lambda_t.exp())


def _seeds_calls(sigmas: torch.Tensor, i: int, *, stages: tuple[float, ...],
                 prediction: Prediction) -> CallPlan:
    step = (sigmas[i], sigmas[i + 1])
    if sigmas[i + 1] == 0:
        return CallPlan((sigmas[i],), (step,))
    g = _SeedsGeometry.at(sigmas, i, stages, prediction)
    return CallPlan((sigmas[i], *g.stage_sigmas), (step,) * (1 + len(stages)))


def _seeds_phase(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, phase: int, state: SamplerState,
                 noise: StepNoise, uncond: Optional[torch.Tensor] = None, *,
                 stages: tuple[float, ...], prediction: Prediction) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``sample_seeds_2`` / ``sample_seeds_3`` (SEEDS, arXiv 2305.14267; eta 1, s_noise 1): data
    prediction exponential-integrator stages on half log-SNR, each noised with the previous stage's
    noise carried forward plus a fresh draw. ``state``: the step's starting latent, its first x0
    prediction and the carried noise."""
    eta, s_noise = 1.0, 1.0
    if sigmas[i + 1] == 0:
        return denoised, None
    g = _SeedsGeometry.at(sigmas, i, stages, prediction)
    h, h_eta = g.h, g.h * (eta + 1)
    if phase == 0:
        r_1, sigma_s_1, alpha_s_1 = stages[0], g.stage_sigmas[0], g.stage_alphas[0]
        x_2 = sigma_s_1 / sigmas[i] * (-r_1 * h * eta).exp() * x - alpha_s_1 * _ei_h_phi_1(-r_1 * h_eta) * denoised
        sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise()
        return x_2 + sde_noise * sigma_s_1 * s_noise, (x, denoised, sde_noise)
    x_start, denoised_1, sde_noise = state
    if phase == 1 and len(stages) == 2:  # seeds_3's second stage
        r_1, r_2 = stages
        sigma_s_2, alpha_s_2 = g.stage_sigmas[1], g.stage_alphas[1]
        a3_2 = r_2 / r_1 * _ei_h_phi_2(-r_2 * h_eta)
        a3_1 = _ei_h_phi_1(-r_2 * h_eta) - a3_2
        x_3 = sigma_s_2 / sigmas[i] * (-r_2 * h * eta).exp() * x_start - alpha_s_2 * (a3_1 * denoised_1 + a3_2 * denoised)
        segment_factor = (r_1 - r_2) * h * eta
        sde_noise = sde_noise * segment_factor.exp()
        sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise()
        return x_3 + sde_noise * sigma_s_2 * s_noise, (x_start, denoised_1, sde_noise)
    if len(stages) == 1:  # seeds_2's final stage: the step from both predictions
        r = stages[0]
        denoised_d = torch.lerp(denoised_1, denoised, 1 / (2 * r))
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x_start - g.alpha_t * _ei_h_phi_1(-h_eta) * denoised_d
    else:  # seeds_3's final stage: from the first and third predictions
        r = stages[1]
        b3 = _ei_h_phi_2(-h_eta) / r
        b1 = _ei_h_phi_1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x_start - g.alpha_t * (b1 * denoised_1 + b3 * denoised)
    segment_factor = (r - 1) * h * eta
    sde_noise = sde_noise * segment_factor.exp()
    sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise()
    return x + sde_noise * sigmas[i + 1] * s_noise, None


def sde_multi_call(prediction: Prediction) -> dict[str, tuple[CallsOf, Phase]]:
    """These samplers' (calls, phase) on ``prediction``'s half log-SNR."""
    out: dict[str, tuple[CallsOf, Phase]] = {
        "dpmpp_sde": (partial(_dpmpp_sde_calls, prediction=prediction),
                      partial(_dpmpp_sde_phase, prediction=prediction))}
    for name, stages in SEEDS_STAGES.items():
        out[name] = (partial(_seeds_calls, stages=stages, prediction=prediction),
                     partial(_seeds_phase, stages=stages, prediction=prediction))
    return out
