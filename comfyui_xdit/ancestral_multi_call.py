"""The multi-call ancestral samplers: ``dpm_2_ancestral``, ``dpmpp_2s_ancestral`` and
``dpmpp_2s_ancestral_cfg_pp``. Each step makes a second model call at a midpoint on the way down to a
``sigma_down``, then adds this step's noise back (ComfyUI's default noise sampler, one draw per step).

ComfyUI's ``dpm_2_ancestral`` / ``dpmpp_2s_ancestral`` ask the model sampling whether it is ``CONST``: a
flow model takes the rectified-flow form (``*_RF``: ``sigma_down`` from the downstep ratio, the latent
re-noised with ``alpha`` scaling; the 2S midpoint on the flow log-SNR), any other the k-diffusion form
(``get_ancestral_step``'s variance-exploding split; the 2S midpoint in ``-log sigma``);
``ancestral_multi_call(prediction)`` picks by ``Prediction.is_flow``. The CFG++ variant is one code for
every model. The arithmetic follows ComfyUI's loops operation by operation on float32 0-dim sigma tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .ancestral_samplers import ancestral_step
from .heun_samplers import log_midpoint
from .prediction import Prediction
from .sampler_types import CallPlan, CallsOf, Phase, SamplerState, Scalar, StepNoise, sigma_of_t, t_of_sigma, to_d


# --- dpm_2_ancestral (flow) ------------------------------------------------------------------------

@dataclass(frozen=True)
class _FlowAncestral:
    """The RF ancestral step's geometry (eta 1): step down to ``sigma_down``, re-noise to ``sigmas[i + 1]``."""

    sigma_down: torch.Tensor
    alpha_ip1: torch.Tensor
    alpha_down: torch.Tensor
    renoise_coeff: torch.Tensor

    @classmethod
    def at(cls, sigmas: torch.Tensor, i: int) -> "_FlowAncestral":
        eta = 1.0
        downstep_ratio = 1 + (sigmas[i + 1] / sigmas[i] - 1) * eta
        sigma_down = sigmas[i + 1] * downstep_ratio
        alpha_ip1 = 1 - sigmas[i + 1]
        alpha_down = 1 - sigma_down
        renoise_coeff = (sigmas[i + 1] ** 2 - sigma_down ** 2 * alpha_ip1 ** 2 / alpha_down ** 2) ** 0.5
        return cls(sigma_down, alpha_ip1, alpha_down, renoise_coeff)


def _dpm_2_ancestral_calls(sigmas: torch.Tensor, i: int) -> CallPlan:
    step, geometry = (sigmas[i], sigmas[i + 1]), _FlowAncestral.at(sigmas, i)
    if geometry.sigma_down == 0:
        return CallPlan((sigmas[i],), (step,))
    return CallPlan((sigmas[i], log_midpoint(sigmas[i], geometry.sigma_down)), (step, step))


def _dpm_2_ancestral_phase(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, phase: int,
                           state: SamplerState, noise: StepNoise,
                           uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``dpm_2_ancestral`` for flow models: DPM-Solver-2 down to ``sigma_down``, then the RF
    re-noise with this step's noise (none on the final Euler step)."""
    g = _FlowAncestral.at(sigmas, i)
    if phase == 0:
        d = to_d(x, sigmas[i], denoised)
        if g.sigma_down == 0:
            return x + d * (g.sigma_down - sigmas[i]), None
        dt_1 = log_midpoint(sigmas[i], g.sigma_down) - sigmas[i]
        return x + d * dt_1, (x,)
    sigma_mid = log_midpoint(sigmas[i], g.sigma_down)
    d_2 = to_d(x, sigma_mid, denoised)
    x = state[0] + d_2 * (g.sigma_down - sigmas[i])
    return (g.alpha_ip1 / g.alpha_down) * x + noise() * 1.0 * g.renoise_coeff, None


# --- dpmpp_2s_ancestral (flow) ---------------------------------------------------------------------

def _dpmpp_2s_midpoint(sigmas: torch.Tensor, i: int, sigma_down: torch.Tensor) -> Scalar:
    if sigmas[i] == 1.0:
        return 0.9999  # ComfyUI's guard where the flow log-SNR is infinite
    t_i, t_down = ((1 - sigmas[i]) / sigmas[i]).log(), ((1 - sigma_down) / sigma_down).log()
    r = 1 / 2
    h = t_down - t_i
    s = t_i + r * h
    return (s.exp() + 1) ** -1


def _dpmpp_2s_ancestral_calls(sigmas: torch.Tensor, i: int) -> CallPlan:
    step = (sigmas[i], sigmas[i + 1])
    if sigmas[i + 1] == 0:
        return CallPlan((sigmas[i],), (step,))
    sigma_s = _dpmpp_2s_midpoint(sigmas, i, _FlowAncestral.at(sigmas, i).sigma_down)
    return CallPlan((sigmas[i], sigma_s), (step, step))


def _dpmpp_2s_ancestral_phase(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, phase: int,
                              state: SamplerState, noise: StepNoise,
                              uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``dpmpp_2s_ancestral`` for flow models: DPM-Solver++(2S) to ``sigma_down`` through the
    log-SNR midpoint, then the RF re-noise."""
    g = _FlowAncestral.at(sigmas, i)
    if phase == 0:
        if sigmas[i + 1] == 0:
            d = to_d(x, sigmas[i], denoised)
            return x + d * (g.sigma_down - sigmas[i]), None
        sigma_s_i_ratio = _dpmpp_2s_midpoint(sigmas, i, g.sigma_down) / sigmas[i]
        return sigma_s_i_ratio * x + (1 - sigma_s_i_ratio) * denoised, (x,)
    sigma_down_i_ratio = g.sigma_down / sigmas[i]
    x = sigma_down_i_ratio * state[0] + (1 - sigma_down_i_ratio) * denoised
    return (g.alpha_ip1 / g.alpha_down) * x + noise() * 1.0 * g.renoise_coeff, None


# --- dpmpp_2s_ancestral_cfg_pp -------------------------------------------------------------------

def _dpmpp_2s_cfg_pp_midpoint(sigmas: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, t_next, s) in -log sigma: the step to the (k-diffusion, not flow) ``sigma_down`` and its midpoint."""
    sigma_down, _ = ancestral_step(sigmas[i], sigmas[i + 1], 1.0)
    t, t_next = sigmas[i].log().neg(), sigma_down.log().neg()
    h = t_next - t
    return t, t_next, t + (1 / 2) * h


def _dpmpp_2s_ancestral_cfg_pp_calls(sigmas: torch.Tensor, i: int) -> CallPlan:
    step = (sigmas[i], sigmas[i + 1])
    if ancestral_step(sigmas[i], sigmas[i + 1], 1.0)[0] == 0:
        return CallPlan((sigmas[i],), (step,))
    s = _dpmpp_2s_cfg_pp_midpoint(sigmas, i)[2]
    return CallPlan((sigmas[i], s.neg().exp()), (step, step))


def _dpmpp_2s_ancestral_cfg_pp_phase(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                                     phase: int, state: SamplerState, noise: StepNoise,
                                     uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``dpmpp_2s_ancestral_cfg_pp`` (its k-diffusion ancestral split, also for flow models). Its
    second update reads the unconditional prediction of the *second* call (ComfyUI's hook has overwritten
    the first's by then), with the first call's guided one."""
    s_noise = 1.0
    sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], 1.0)
    if phase == 0 and sigma_down == 0:
        d = to_d(x, sigmas[i], uncond)
        x = denoised + d * sigma_down
        if sigmas[i + 1] > 0:
            x = x + noise() * s_noise * sigma_up
        return x, None
    t, t_next, s = _dpmpp_2s_cfg_pp_midpoint(sigmas, i)
    h = t_next - t
    if phase == 0:
        x_2 = (s.neg().exp() / t.neg().exp()) * (x + (denoised - uncond)) - (-h * (1 / 2)).expm1() * denoised
        return x_2, (x, denoised)
    x = (t_next.neg().exp() / t.neg().exp()) * (state[0] + (state[1] - uncond)) - (-h).expm1() * denoised
    if sigmas[i + 1] > 0:
        x = x + noise() * s_noise * sigma_up
    return x, None


# --- the k-diffusion forms (EPS / v models) ---------------------------------------------------------

def _ve_ancestral(sigmas: torch.Tensor, i: int) -> tuple[torch.Tensor, Scalar]:
    """(sigma_down, sigma_up) of step ``i`` with eta 1: k-diffusion's variance-exploding split."""
    return ancestral_step(sigmas[i], sigmas[i + 1], 1.0)


def _dpm_2_ancestral_ve_calls(sigmas: torch.Tensor, i: int) -> CallPlan:
    step, (sigma_down, _) = (sigmas[i], sigmas[i + 1]), _ve_ancestral(sigmas, i)
    if sigma_down == 0:
        return CallPlan((sigmas[i],), (step,))
    return CallPlan((sigmas[i], log_midpoint(sigmas[i], sigma_down)), (step, step))


def _dpm_2_ancestral_ve_phase(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, phase: int,
                              state: SamplerState, noise: StepNoise,
                              uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``dpm_2_ancestral`` for EPS / v models: DPM-Solver-2 down to ``sigma_down`` through its
    log-midpoint, then this step's noise times ``sigma_up`` (none on the final Euler step)."""
    s_noise = 1.0
    sigma_down, sigma_up = _ve_ancestral(sigmas, i)
    if phase == 0:
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            return x + d * (sigma_down - sigmas[i]), None
        dt_1 = log_midpoint(sigmas[i], sigma_down) - sigmas[i]
        return x + d * dt_1, (x,)
    sigma_mid = log_midpoint(sigmas[i], sigma_down)
    d_2 = to_d(x, sigma_mid, denoised)
    x = state[0] + d_2 * (sigma_down - sigmas[i])
    return x + noise() * s_noise * sigma_up, None


def _dpmpp_2s_ve_times(sigmas: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, t_next, s) in ``-log sigma``: from sigma ``i`` to its ``sigma_down`` and the midpoint (r 1/2)."""
    t, t_next = t_of_sigma(sigmas[i]), t_of_sigma(_ve_ancestral(sigmas, i)[0])
    r = 1 / 2
    h = t_next - t
    return t, t_next, t + r * h


def _dpmpp_2s_ancestral_ve_calls(sigmas: torch.Tensor, i: int) -> CallPlan:
    step = (sigmas[i], sigmas[i + 1])
    if _ve_ancestral(sigmas, i)[0] == 0:
        return CallPlan((sigmas[i],), (step,))
    return CallPlan((sigmas[i], sigma_of_t(_dpmpp_2s_ve_times(sigmas, i)[2])), (step, step))


def _dpmpp_2s_ancestral_ve_phase(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, phase: int,
                                 state: SamplerState, noise: StepNoise,
                                 uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``dpmpp_2s_ancestral`` for EPS / v models: DPM-Solver++(2S) in ``-log sigma`` down to
    ``sigma_down`` (Euler where that is 0), then this step's noise times ``sigma_up`` unless at the end."""
    s_noise = 1.0
    sigma_down, sigma_up = _ve_ancestral(sigmas, i)
    if phase == 0 and sigma_down == 0:
        d = to_d(x, sigmas[i], denoised)
        x = x + d * (sigma_down - sigmas[i])
    else:
        t, t_next, s = _dpmpp_2s_ve_times(sigmas, i)
        h = t_next - t
        if phase == 0:
            r = 1 / 2
            return (sigma_of_t(s) / sigma_of_t(t)) * x - (-h * r).expm1() * denoised, (x,)
        x = (sigma_of_t(t_next) / sigma_of_t(t)) * state[0] - (-h).expm1() * denoised
    if sigmas[i + 1] > 0:
        x = x + noise() * s_noise * sigma_up
    return x, None


def ancestral_multi_call(prediction: Prediction) -> dict[str, tuple[CallsOf, Phase]]:
    """These samplers' (calls, phase) for a ``prediction`` model: the RF form for flow, else k-diffusion's."""
    cfg_pp = {"dpmpp_2s_ancestral_cfg_pp": (_dpmpp_2s_ancestral_cfg_pp_calls, _dpmpp_2s_ancestral_cfg_pp_phase)}
    if prediction.is_flow:
        return {"dpm_2_ancestral": (_dpm_2_ancestral_calls, _dpm_2_ancestral_phase),
                "dpmpp_2s_ancestral": (_dpmpp_2s_ancestral_calls, _dpmpp_2s_ancestral_phase), **cfg_pp}
    return {"dpm_2_ancestral": (_dpm_2_ancestral_ve_calls, _dpm_2_ancestral_ve_phase),
            "dpmpp_2s_ancestral": (_dpmpp_2s_ancestral_ve_calls, _dpmpp_2s_ancestral_ve_phase), **cfg_pp}
