"""ComfyUI's CFG++ samplers (arXiv 2406.08070): steps that read the unconditional x0 prediction besides
the guided one.

ComfyUI hands these samplers ``uncond_denoised`` through a post-CFG hook and turns off its cfg 1
shortcut, so the unconditional branch runs even at cfg 1. Here the loops pass ``uncond`` (the raw
unconditional prediction, before any noise-mask blend, as ComfyUI's hook sees it) to these steps; the
plan keeps the negative branch for them at any cfg. The arithmetic follows ComfyUI's
``sample_euler_ancestral_cfg_pp`` / ``sample_dpmpp_2m_cfg_pp`` / ``res_multistep(cfg_pp=True)`` /
``sample_gradient_estimation(cfg_pp=True)`` operation by operation; like every step here, each one is
elementwise in ``x`` and keeps its history in ``state`` (see ``samplers.py``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .ancestral_samplers import ancestral_step

State = Optional[tuple[torch.Tensor, ...]]
Noise = Optional[Callable[[], torch.Tensor]]


def _t(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _flow_half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.logit().neg()


def _eps_half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def _euler_ancestral_cfg_pp(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, state: State,
                            noise: Noise, uncond: torch.Tensor, eta: float,
                            half_log_snr: Callable[[torch.Tensor], torch.Tensor] = _flow_half_log_snr
                            ) -> tuple[torch.Tensor, State]:
    """Steps toward the guided x0 along the unconditional noise direction, on the model's alphas (a flow
    model's 1 - sigma by default; ``_eps_half_log_snr`` gives an EPS model's 1)."""
    s_noise = eta  # ComfyUI's euler_cfg_pp is this with eta 0 and s_noise 0
    if sigmas[i + 1] == 0:
        return denoised, None
    alpha_s = sigmas[i] * half_log_snr(sigmas[i]).exp()
    alpha_t = sigmas[i + 1] * half_log_snr(sigmas[i + 1]).exp()
    d = (x - alpha_s * uncond) / sigmas[i]
    sigma_down, sigma_up = ancestral_step(sigmas[i] / alpha_s, sigmas[i + 1] / alpha_t, eta)
    sigma_down = alpha_t * sigma_down
    x = alpha_t * denoised + sigma_down * d
    if eta > 0 and s_noise > 0:
        x = x + alpha_t * noise() * s_noise * sigma_up
    return x, None


def euler_cfg_pp_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, state: State,
                      noise: Noise = None, uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, State]:
    return _euler_ancestral_cfg_pp(x, denoised, sigmas, i, state, noise, uncond, eta=0.0)


def euler_ancestral_cfg_pp_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, state: State,
                                noise: Noise = None, uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, State]:
    return _euler_ancestral_cfg_pp(x, denoised, sigmas, i, state, noise, uncond, eta=1.0)


def euler_cfg_pp_eps_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, state: State,
                          noise: Noise = None, uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, State]:
    return _euler_ancestral_cfg_pp(x, denoised, sigmas, i, state, noise, uncond, 0.0, _eps_half_log_snr)


def euler_ancestral_cfg_pp_eps_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                                    state: State, noise: Noise = None,
                                    uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, State]:
    return _euler_ancestral_cfg_pp(x, denoised, sigmas, i, state, noise, uncond, 1.0, _eps_half_log_snr)


def dpmpp_2m_cfg_pp_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, state: State,
                         noise: Noise = None, uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, State]:
    """DPM-Solver++(2M) with CFG++: ``state`` holds the previous step's unconditional prediction."""
    t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
    h = t_next - t
    if state is None or sigmas[i + 1] == 0:
        denoised_mix = -torch.exp(-h) * uncond
    else:
        h_last = t - _t(sigmas[i - 1])
        r = h_last / h
        denoised_mix = -torch.exp(-h) * uncond - torch.expm1(-h) * (1 / (2 * r)) * (denoised - state[0])
    return denoised + denoised_mix + torch.exp(-h) * x, (uncond,)


def _res_multistep_cfg_pp(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, state: State,
                          noise: Noise, uncond: torch.Tensor, eta: float) -> tuple[torch.Tensor, State]:
    """``res_multistep`` with CFG++: ``state`` holds the previous step's unconditional prediction."""
    s_noise = 1.0
    sigma = sigmas[i]
    sigma_down, sigma_up = ancestral_step(sigma, sigmas[i + 1], eta)
    if sigma_down == 0 or state is None:
        d = (x - uncond) / sigma
        x = denoised + d * sigma_down
    else:
        old_sigma_down, _ = ancestral_step(sigmas[i - 1], sigma, eta)  # the previous step's, as it was
        t, t_old, t_next, t_prev = (_t(s) for s in (sigma, old_sigma_down, sigma_down, sigmas[i - 1]))
        h = t_next - t
        c2 = (t_prev - t_old) / h
        phi1 = torch.expm1(-h) / -h
        phi2 = (phi1 - 1.0) / -h
        b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
        b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
        x = x + (denoised - uncond)
        x = _sigma(h) * x + h * (b1 * uncond + b2 * state[0])
    if sigmas[i + 1] > 0 and eta > 0:  # with eta 0 ComfyUI adds its draw times sigma_up 0: nothing
        x = x + noise() * s_noise * sigma_up
    return x, (uncond,)


def res_multistep_cfg_pp_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, state: State,
                              noise: Noise = None, uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, State]:
    return _res_multistep_cfg_pp(x, denoised, sigmas, i, state, noise, uncond, eta=0.0)


def res_multistep_ancestral_cfg_pp_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                                        state: State, noise: Noise = None,
                                        uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, State]:
    return _res_multistep_cfg_pp(x, denoised, sigmas, i, state, noise, uncond, eta=1.0)


GE_GAMMA = 2.0  # gradient_estimation's ge_gamma (KSampler's default)


def gradient_estimation_cfg_pp_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                                    state: State, noise: Noise = None,
                                    uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, State]:
    """``gradient_estimation`` with CFG++: ``state`` holds the previous unconditional derivative."""
    d = (x - uncond) / sigmas[i]
    dt = sigmas[i + 1] - sigmas[i]
    if sigmas[i + 1] == 0:
        return denoised, (d,)
    x = denoised + d * sigmas[i + 1]
    if i >= 1:
        d_bar = (GE_GAMMA - 1) * (d - state[0])
        x = x + d_bar * dt
    return x, (d,)


CFG_PP_STEPS = {"euler_cfg_pp": euler_cfg_pp_step, "euler_ancestral_cfg_pp": euler_ancestral_cfg_pp_step,
                "dpmpp_2m_cfg_pp": dpmpp_2m_cfg_pp_step, "res_multistep_cfg_pp": res_multistep_cfg_pp_step,
                "res_multistep_ancestral_cfg_pp": res_multistep_ancestral_cfg_pp_step,
                "gradient_estimation_cfg_pp": gradient_estimation_cfg_pp_step}
# the CFG++ steps whose ComfyUI code asks for the model sampling type, in their EPS / v form
CFG_PP_EPS_FORMS = {"euler_cfg_pp": euler_cfg_pp_eps_step, "euler_ancestral_cfg_pp": euler_ancestral_cfg_pp_eps_step}
CFG_PP_NOISE = frozenset({"euler_ancestral_cfg_pp", "res_multistep_ancestral_cfg_pp"})  # default noise sampler
