"""The one-call SDE samplers on half log-SNR: DPM-Solver++(2M) SDE (midpoint and heun), DPM-Solver++(3M) SDE
and ER-SDE.

ComfyUI writes each once for every model, asking the model sampling only for its half log-SNR
``lambda = log(alpha / sigma)`` (``sigma_to_half_log_snr``: a flow model's ``log((1 - sigma) / sigma)``, an
EPS / v model's ``-log sigma``); here the step takes that function, a ``Prediction``'s ``half_log_snr``
(flow's by default). A flow model's ``sigmas`` start just below 1 (``offset_first_sigma_for_snr``). The
noise is this step's Brownian-tree increment (``noise.BrownianNoise``) or, for ER-SDE, ComfyUI's default
noise sampler's draw. The arithmetic follows ComfyUI's loops operation by operation on float32 0-dim
sigma tensors, so the results match bit for bit.
"""

from __future__ import annotations

from functools import partial

import torch

from .prediction import FLOW, Prediction
from .sampler_types import HalfLogSnr, SamplerState, SamplerStep, StepNoise


def _dpmpp_2m_sde(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, state: SamplerState,
                  noise: StepNoise, solver: str,
                  half_log_snr: HalfLogSnr = FLOW.half_log_snr) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's DPM-Solver++(2M) SDE (eta 1) on ``half_log_snr`` (flow models' log((1 - sigma) / sigma) by
    default, EPS models' -log sigma); ``state`` holds the previous denoised prediction. A flow model's
    ``sigmas`` start just below 1 (see ``offset_first_sigma_for_snr``)."""
    eta, s_noise = 1.0, 1.0
    if sigmas[i + 1] == 0:
        return denoised, (denoised,)
    lambda_s, lambda_t = half_log_snr(sigmas[i]), half_log_snr(sigmas[i + 1])
    h = lambda_t - lambda_s
    h_eta = h * (eta + 1)
    alpha_t = sigmas[i + 1] * lambda_t.exp()
    x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
    if state is not None:
        h_last = lambda_s - half_log_snr(sigmas[i - 1])  # the previous step's h, computed as it was
        r = h_last / h
        if solver == "heun":
            x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - state[0])
        else:
            x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - state[0])
    x = x + noise() * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
    return x, (denoised,)


def dpmpp_2m_sde_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                      state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    return _dpmpp_2m_sde(x, denoised, sigmas, i, state, noise, "midpoint")


def dpmpp_2m_sde_heun_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                           state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    return _dpmpp_2m_sde(x, denoised, sigmas, i, state, noise, "heun")


def dpmpp_3m_sde_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                      state: SamplerState, noise: StepNoise = None,
                      half_log_snr: HalfLogSnr = FLOW.half_log_snr) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's DPM-Solver++(3M) SDE (eta 1) on ``half_log_snr`` (flow's by default); ``state`` holds the
    last two denoised predictions, oldest first (the history before step i holds min(i, 2); see ``ipndm_step``)."""
    eta, s_noise = 1.0, 1.0
    history = (state or ())[:min(i, 2)]
    new_history = (*history, denoised)[-2:]
    if sigmas[i + 1] == 0:
        return denoised, new_history
    lambda_s, lambda_t = half_log_snr(sigmas[i]), half_log_snr(sigmas[i + 1])
    h = lambda_t - lambda_s
    h_eta = h * (eta + 1)
    alpha_t = sigmas[i + 1] * lambda_t.exp()
    x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
    if history:
        h_1 = lambda_s - half_log_snr(sigmas[i - 1])  # the previous steps' h, computed as they were
        phi_2 = h_eta.neg().expm1() / h_eta + 1
        if len(history) == 2:
            h_2 = half_log_snr(sigmas[i - 1]) - half_log_snr(sigmas[i - 2])
            denoised_1, denoised_2 = history[-1], history[-2]
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
        else:
            r = h_1 / h
            d = (denoised - history[-1]) / r
            x = x + (alpha_t * phi_2) * d
    x = x + noise() * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
    return x, new_history


ER_SDE_STAGES = 3  # er_sde's max_stage (KSampler's default)
ER_SDE_POINTS = 200.0  # points of its Riemann sums per step


def _er_sde_noise_scaler(er_lambda: torch.Tensor) -> torch.Tensor:
    """ER-SDE's default noise scaler ``x (exp(x^0.3) + 10)``."""
    return er_lambda * ((er_lambda ** 0.3).exp() + 10.0)


def er_sde_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                state: SamplerState, noise: StepNoise = None,
                half_log_snr: HalfLogSnr = FLOW.half_log_snr) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``er_sde`` (VP ER-SDE-Solver-3, arXiv 2309.06169) on ``er_lambda`` = exp of minus the half
    log-SNR (a flow model's sigma / (1 - sigma) by default; an EPS model's sigma); ``state`` holds the last two
    denoised predictions, oldest first (the history before step i holds min(i, 2); see ``ipndm_step``).
    A flow model's ``sigmas`` start just below 1 (see ``offset_first_sigma_for_snr``)."""
    s_noise = 1.0
    history = (state or ())[:min(i, 2)]
    new_history = (*history, denoised)[-2:]
    if sigmas[i + 1] == 0:
        return denoised, new_history
    er_lambdas = half_log_snr(sigmas).neg().exp()  # the whole grid at once, as ComfyUI
    stage = min(ER_SDE_STAGES, i + 1)
    er_lambda_s, er_lambda_t = er_lambdas[i], er_lambdas[i + 1]
    alpha_s = sigmas[i] / er_lambda_s
    alpha_t = sigmas[i + 1] / er_lambda_t
    r_alpha = alpha_t / alpha_s
    r = _er_sde_noise_scaler(er_lambda_t) / _er_sde_noise_scaler(er_lambda_s)
    x = r_alpha * r * x + alpha_t * (1 - r) * denoised  # stage 1: Euler
    if stage >= 2:
        dt = er_lambda_t - er_lambda_s
        lambda_step_size = -dt / ER_SDE_POINTS
        points = torch.arange(0, ER_SDE_POINTS, dtype=torch.float32, device=sigmas.device)
        lambda_pos = er_lambda_t + points * lambda_step_size
        scaled_pos = _er_sde_noise_scaler(lambda_pos)
        s = torch.sum(1 / scaled_pos) * lambda_step_size
        denoised_d = (denoised - history[-1]) / (er_lambda_s - er_lambdas[i - 1])
        x = x + alpha_t * (dt + s * _er_sde_noise_scaler(er_lambda_t)) * denoised_d
        if stage >= 3:
            s_u = torch.sum((lambda_pos - er_lambda_s) / scaled_pos) * lambda_step_size
            # the previous step's difference quotient, computed as it was then
            old_denoised_d = (history[-1] - history[-2]) / (er_lambdas[i - 1] - er_lambdas[i - 2])
            denoised_u = (denoised_d - old_denoised_d) / ((er_lambda_s - er_lambdas[i - 2]) / 2)
            x = x + alpha_t * ((dt ** 2) / 2 + s_u * _er_sde_noise_scaler(er_lambda_t)) * denoised_u
    x = x + alpha_t * noise() * s_noise * (er_lambda_t ** 2 - er_lambda_s ** 2 * r ** 2).sqrt().nan_to_num(nan=0.0)
    return x, new_history


def sde_steps(prediction: Prediction) -> dict[str, SamplerStep]:
    """These samplers' steps for a ``prediction`` model: on its half log-SNR (flow's: the plain functions)."""
    if prediction.is_flow:
        return {"dpmpp_2m_sde": dpmpp_2m_sde_step, "dpmpp_2m_sde_heun": dpmpp_2m_sde_heun_step,
                "dpmpp_3m_sde": dpmpp_3m_sde_step, "er_sde": er_sde_step}
    half_log_snr = prediction.half_log_snr
    return {"dpmpp_2m_sde": partial(_dpmpp_2m_sde, solver="midpoint", half_log_snr=half_log_snr),
            "dpmpp_2m_sde_heun": partial(_dpmpp_2m_sde, solver="heun", half_log_snr=half_log_snr),
            "dpmpp_3m_sde": partial(dpmpp_3m_sde_step, half_log_snr=half_log_snr),
            "er_sde": partial(er_sde_step, half_log_snr=half_log_snr)}
