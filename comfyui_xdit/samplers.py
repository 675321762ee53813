"""Sampler steps as pure, elementwise functions, equal to ComfyUI's k-diffusion samplers.

A step maps ``(x, denoised, sigmas, i, state) -> (x_next, state_next)``. Every operation is
elementwise in ``x``, and ``state`` is a tuple of tensors of ``x``'s shape (a multistep method's history),
so a step can be applied to the whole latent or to one patch of it (a slice of ``x``, ``denoised`` and
each state tensor) with identical numbers; PipeFusion relies on that. The arithmetic follows ComfyUI's ``sample_euler`` / ``sample_dpmpp_2m`` operation by
operation on float32 0-dim sigma tensors, so the results match bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import numpy
import torch

from .cfg_pp_samplers import CFG_PP_EPS_FORMS, CFG_PP_NOISE, CFG_PP_STEPS, GE_GAMMA
from .dpm_fast_sampler import dpm_fast_functions
from .multi_call_samplers import MULTI_CALL_SAMPLERS, ancestral_step, call_schedule, multi_call_step
from .prediction import EPS, FLOW, Prediction
from .sa_solver_sampler import SA_SOLVER_VARIANTS, PercentToSigma, sa_solver_functions
from .uni_pc_sampler import UNI_PC_VARIANTS, uni_pc_functions

SamplerState = Optional[tuple[torch.Tensor, ...]]  # history, oldest first, each shaped like x
StepNoise = Optional[Callable[[], torch.Tensor]]  # this step's noise for the tokens at hand (ancestral samplers)
SamplerStep = Callable[..., "tuple[torch.Tensor, SamplerState]"]  # (x, denoised, sigmas, i, state, noise=None)

SAMPLER_NAMES = ("euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral", "lms",
                 "dpm_fast", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
                 "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
                 "res_multistep_ancestral_cfg_pp",
                 "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver",
                 "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2")
# samplers that draw fresh noise while sampling from ComfyUI's default noise sampler (one draw per ask)
NOISE_SAMPLERS = frozenset({"euler_ancestral", "lcm", "dpm_2_ancestral", "dpmpp_2s_ancestral", "ddpm",
                            "res_multistep_ancestral", "er_sde", "dpmpp_2s_ancestral_cfg_pp", "seeds_2", "seeds_3",
                            *SA_SOLVER_VARIANTS, *CFG_PP_NOISE})
# CFG++ samplers: their steps also read the unconditional x0 prediction, computed even at cfg 1
CFG_PP_SAMPLERS = frozenset({*CFG_PP_STEPS, "dpmpp_2s_ancestral_cfg_pp"})
# the _gpu samplers: their base sampler with the Brownian tree on the model's device instead of the CPU
DEVICE_TREE_SAMPLERS = {"dpmpp_sde_gpu": "dpmpp_sde", "dpmpp_2m_sde_gpu": "dpmpp_2m_sde",
                        "dpmpp_2m_sde_heun_gpu": "dpmpp_2m_sde_heun", "dpmpp_3m_sde_gpu": "dpmpp_3m_sde"}
# samplers that draw their noise from ComfyUI's Brownian tree
BROWNIAN_SAMPLERS = frozenset({"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", *DEVICE_TREE_SAMPLERS})
# samplers that step on half log-SNR and so start just below sigma 1 (offset_first_sigma_for_snr)
SNR_OFFSET_SAMPLERS = frozenset({"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "er_sde", "seeds_2",
                                 "seeds_3", *SA_SOLVER_VARIANTS,
                                 *DEVICE_TREE_SAMPLERS})
# KSampler computes one more sigma for these and drops the second to last (its DISCARD_PENULTIMATE_SIGMA_SAMPLERS)
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", *UNI_PC_VARIANTS})


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
               state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    """Euler on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    sigma_hat = sigmas[i]
    d = (x - denoised) / sigma_hat
    dt = sigmas[i + 1] - sigma_hat
    return x + d * dt, None


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


def _dpmpp_2m_sde(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, state: SamplerState,
                  noise: StepNoise, solver: str,
                  half_log_snr: HalfLogSnr = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's DPM-Solver++(2M) SDE (eta 1) on ``half_log_snr`` (flow models' log((1 - sigma) / sigma) by
    default, EPS models' -log sigma); ``state`` holds the previous denoised prediction. A flow model's
    ``sigmas`` start just below 1 (see ``offset_first_sigma_for_snr``)."""
    half_log_snr = half_log_snr or _half_log_snr
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


def _half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.logit().neg()  # log((1 - sigma) / sigma) for flow models


HalfLogSnr = Optional[Callable[[torch.Tensor], torch.Tensor]]  # sigma -> log(alpha / sigma); None: flow's


def dpmpp_3m_sde_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                      state: SamplerState, noise: StepNoise = None,
                      half_log_snr: HalfLogSnr = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's DPM-Solver++(3M) SDE (eta 1) on ``half_log_snr`` (flow's by default); ``state`` holds the
    last two denoised predictions, oldest first (the history before step i holds min(i, 2); see ``ipndm_step``)."""
    half_log_snr = half_log_snr or _half_log_snr
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


def lcm_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
             state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``lcm``: jump to the x0 prediction, then re-noise it to the next sigma (CONST scaling)."""
    sigma_next = sigmas[i + 1]
    if sigma_next > 0:
        return sigma_next * noise() + (1.0 - sigma_next) * denoised, None
    return denoised, None


def _t_of_sigma(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def _sigma_of_t(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def dpmpp_2m_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                  state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    """DPM-Solver++(2M); ``state`` holds the previous step's denoised prediction."""
    t, t_next = _t_of_sigma(sigmas[i]), _t_of_sigma(sigmas[i + 1])
    h = t_next - t
    if state is None or sigmas[i + 1] == 0:
        x_next = (_sigma_of_t(t_next) / _sigma_of_t(t)) * x - (-h).expm1() * denoised
    else:
        h_last = t - _t_of_sigma(sigmas[i - 1])
        r = h_last / h
        denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * state[0]
        x_next = (_sigma_of_t(t_next) / _sigma_of_t(t)) * x - (-h).expm1() * denoised_d
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
    t, t_old, t_next, t_prev = (_t_of_sigma(s) for s in (sigma, sigmas[i], sigma_down, sigmas[i - 1]))
    h = t_next - t
    c2 = (t_prev - t_old) / h
    phi1 = torch.expm1(-h) / -h
    phi2 = (phi1 - 1.0) / -h
    b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
    b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
    return _sigma_of_t(h) * x + h * (b1 * denoised + b2 * state[0]), (denoised,)


IPNDM_ORDER = 4


def ipndm_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
               state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``ipndm``: Adams-Bashforth of order up to 4 on the derivative; ``state`` holds the last
    (up to 3) derivatives, oldest first."""
    t_cur, t_next = sigmas[i], sigmas[i + 1]
    d_cur = (x - denoised) / t_cur
    # the history before step i holds min(i, 3) derivatives; under PipeFusion a step's first patch may
    # already have started the next one (step_patch), which this step's later patches must not read
    history = (state or ())[:min(i, IPNDM_ORDER - 1)]
    order = min(IPNDM_ORDER, i + 1)
    if t_next == 0:  # the final, denoising step
        x_next = denoised
    elif order == 1:
        x_next = x + (t_next - t_cur) * d_cur
    elif order == 2:
        x_next = x + (t_next - t_cur) * (3 * d_cur - history[-1]) / 2
    elif order == 3:
        x_next = x + (t_next - t_cur) * (23 * d_cur - 16 * history[-1] + 5 * history[-2]) / 12
    else:
        x_next = x + (t_next - t_cur) * (55 * d_cur - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
    return x_next, (*history, d_cur)[-(IPNDM_ORDER - 1):]


def ipndm_v_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                 state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``ipndm_v``: ``ipndm`` with coefficients for variable step sizes (order up to 4)."""
    t_cur, t_next = sigmas[i], sigmas[i + 1]
    d_cur = (x - denoised) / t_cur
    history = (state or ())[:min(i, IPNDM_ORDER - 1)]  # see ipndm_step
    order = min(IPNDM_ORDER, i + 1)
    if t_next == 0:
        return denoised, (*history, d_cur)[-(IPNDM_ORDER - 1):]
    if order == 1:
        x_next = x + (t_next - t_cur) * d_cur
        return x_next, (*history, d_cur)[-(IPNDM_ORDER - 1):]
    h_n = t_next - t_cur
    h_n_1 = t_cur - sigmas[i - 1]
    if order == 2:
        coeff1 = (2 + (h_n / h_n_1)) / 2
        coeff2 = -(h_n / h_n_1) / 2
        x_next = x + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * history[-1])
    elif order == 3:
        h_n_2 = sigmas[i - 1] - sigmas[i - 2]
        temp = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
        coeff1 = (2 + (h_n / h_n_1)) / 2 + temp
        coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp
        coeff3 = temp * h_n_1 / h_n_2
        x_next = x + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * history[-1] + coeff3 * history[-2])
    else:
        h_n_2 = sigmas[i - 1] - sigmas[i - 2]
        h_n_3 = sigmas[i - 2] - sigmas[i - 3]
        temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
        temp2 = ((1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2))) \
            * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
        ratio = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
        coeff1 = (2 + (h_n / h_n_1)) / 2 + temp1 + temp2
        coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + (h_n_1 / h_n_2) + ratio) * temp2
        coeff3 = temp1 * h_n_1 / h_n_2 + ((h_n_1 / h_n_2) + ratio * (1 + h_n_2 / h_n_3)) * temp2
        coeff4 = -temp2 * ratio * h_n_1 / h_n_2
        x_next = x + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * history[-1] + coeff3 * history[-2]
                                         + coeff4 * history[-3])
    return x_next, (*history, d_cur)[-(IPNDM_ORDER - 1):]


LMS_ORDER = 4


def _lms_coeff(sigmas: torch.Tensor, i: int, order: int, j: int) -> float:
    """The weight of the derivative at ``sigmas[i - j]`` in step ``i`` of linear multistep: the integral
    from ``sigmas[i]`` to ``sigmas[i + 1]`` of its Lagrange basis polynomial on ``sigmas[i - order + 1 .. i]``.
    Integrated exactly in float64, in the variable ``sigma - sigmas[i]`` (well conditioned for short steps).
    ComfyUI integrates the same polynomial numerically (scipy's quad, the basis evaluated in float32), so its
    weights differ from these by about 1e-7 relative and its results by as little."""
    t_i = float(sigmas[i])
    basis = numpy.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            t_k = float(sigmas[i - k])
            basis = basis * numpy.polynomial.Polynomial([t_i - t_k, 1.0]) / (float(sigmas[i - j]) - t_k)
    return float(basis.integ()(float(sigmas[i + 1]) - t_i))


def lms_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
             state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``lms``: linear multistep (Adams-Bashforth on the sigma grid) of order up to 4; ``state``
    holds the last (up to 3) derivatives, oldest first (see ``ipndm_step``). The last step is the x0
    prediction."""
    d = (x - denoised) / sigmas[i]
    history = (state or ())[:min(i, LMS_ORDER - 1)]
    ds = (*history, d)
    if sigmas[i + 1] == 0:
        return denoised, ds[-(LMS_ORDER - 1):]
    order = min(i + 1, LMS_ORDER)
    coeffs = [_lms_coeff(sigmas, i, order, j) for j in range(order)]
    # a Python-float weight times each derivative, newest first, summed in that order (as ComfyUI)
    return x + sum(coeff * d_j for coeff, d_j in zip(coeffs, reversed(ds))), ds[-(LMS_ORDER - 1):]


DEIS_ORDER = 3
DEIS_POINTS = 10000  # the Riemann sum's points per step ('tab' DEIS)


def _deis_vp_betas() -> tuple[torch.Tensor, torch.Tensor]:
    """DEIS's VP schedule fitted to EDM's sigma range (0.002 to 80, epsilon_s 1e-3): ``beta_min`` and
    ``beta_d``. Computed with the dtypes ComfyUI's deis.py ends up with: numpy's float32 log of
    ``0.002 ** 2 + 1``, and a float64 log of ``80 ** 2 + 1`` (an integer there), which makes both betas
    float64."""
    eps_s = 1e-3
    log_min = torch.tensor(numpy.log((torch.tensor(0.002) ** 2 + 1).numpy()))
    log_max = torch.tensor(numpy.log(numpy.float64(80 ** 2 + 1)))
    beta_d = 2 * (log_min / eps_s - log_max) / (eps_s - 1)
    beta_min = log_max - 0.5 * beta_d
    return beta_min, beta_d


def _deis_coeffs(sigmas: torch.Tensor, i: int, order: int) -> list[torch.Tensor]:
    """'tab' DEIS weights of step ``i`` (current derivative first, then older ones): sigmas become VP times
    ``t``; each weight is a ``DEIS_POINTS``-point Riemann sum over ``[t_i, t_(i+1)]`` of the exponential
    integrator's factor times a Lagrange basis polynomial on the last ``order`` times, in float32 as
    ComfyUI's ``get_deis_coeff_list`` computes it (so the weights agree bit for bit)."""
    beta_min, beta_d = _deis_vp_betas()
    beta_0, beta_1 = beta_min, beta_d + beta_min
    # VP times of the whole grid at once (elementwise, as ComfyUI maps it)
    t = ((beta_min ** 2 + 2 * beta_d * (sigmas ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    taus = torch.linspace(t[i], t[i + 1], DEIS_POINTS)
    dtau = (t[i + 1] - t[i]) / DEIS_POINTS
    alpha = torch.exp(-0.5 * taus ** 2 * (beta_1 - beta_0) - taus * beta_0)
    # d log(alpha) / d tau, evaluated as autograd evaluates it through log(exp(.)) (ComfyUI differentiates
    # with autograd): the chain rule's factors in that order, so every float32 rounding is the same
    chain = (1 / alpha) * alpha
    d_log_alpha = chain * (beta_1 - beta_0) * -0.5 * (2 * taus) - chain * beta_0
    integrand = -0.5 * d_log_alpha / torch.sqrt(alpha * (1 - alpha))
    prev_t = t[[i - k for k in range(order)]]
    coeffs = []
    for j in range(order):
        basis = 1
        for k in range(order):
            if k != j:
                basis = basis * ((taus - prev_t[k]) / (prev_t[j] - prev_t[k]))
        coeffs.append(torch.sum(integrand * basis) * dtau)
    return coeffs


def deis_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
              state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``deis`` ('tab' mode, order up to 3): a multistep exponential integrator on the
    derivative; ``state`` holds the last (up to 2) derivatives, oldest first (see ``ipndm_step``). The
    last step (to sigma 0) is Euler."""
    t_cur, t_next = sigmas[i], sigmas[i + 1]
    d_cur = (x - denoised) / t_cur
    history = (state or ())[:min(i, DEIS_ORDER - 1)]
    new_history = (*history, d_cur)[-(DEIS_ORDER - 1):]
    order = 1 if t_next <= 0 else min(DEIS_ORDER, i + 1)
    if order == 1:
        return x + (t_next - t_cur) * d_cur, new_history
    coeffs = _deis_coeffs(sigmas, i, order)
    x_next = x + coeffs[0] * d_cur
    for coeff, d_prev in zip(coeffs[1:], reversed(history)):
        x_next = x_next + coeff * d_prev
    return x_next, new_history


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
        t, t_old, t_next, t_prev = (_t_of_sigma(s) for s in (sigma, old_sigma_down, sigma_down, sigmas[i - 1]))
        h = t_next - t
        c2 = (t_prev - t_old) / h
        phi1 = torch.expm1(-h) / -h
        phi2 = (phi1 - 1.0) / -h
        b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
        b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
        x = _sigma_of_t(h) * x + h * (b1 * denoised + b2 * state[0])
    if sigmas[i + 1] > 0:
        x = x + noise() * s_noise * sigma_up
    return x, (denoised,)




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


ER_SDE_STAGES = 3  # er_sde's max_stage (KSampler's default)
ER_SDE_POINTS = 200.0  # points of its Riemann sums per step


def _er_sde_noise_scaler(er_lambda: torch.Tensor) -> torch.Tensor:
    """ER-SDE's default noise scaler ``x (exp(x^0.3) + 10)``."""
    return er_lambda * ((er_lambda ** 0.3).exp() + 10.0)


def er_sde_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                state: SamplerState, noise: StepNoise = None,
                half_log_snr: HalfLogSnr = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``er_sde`` (VP ER-SDE-Solver-3, arXiv 2309.06169) on ``er_lambda`` = exp of minus the half
    log-SNR (a flow model's sigma / (1 - sigma) by default; an EPS model's sigma); ``state`` holds the last two
    denoised predictions, oldest first (the history before step i holds min(i, 2); see ``ipndm_step``).
    A flow model's ``sigmas`` start just below 1 (see ``offset_first_sigma_for_snr``)."""
    half_log_snr = half_log_snr or _half_log_snr
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


# ComfyUI's "ddim" is its euler sampler whose inpainting re-noises the kept latent with its own draw
# (prepare_plan builds that), so its step is euler's.
_SAMPLERS: dict[str, SamplerStep] = {"euler": euler_step, "euler_ancestral": euler_ancestral_step,
                                     "dpmpp_2m": dpmpp_2m_step,
                                     "res_multistep": res_multistep_step, "ipndm": ipndm_step, "ipndm_v": ipndm_v_step,
                                     "lcm": lcm_step, "ddim": euler_step, "dpmpp_2m_sde": dpmpp_2m_sde_step,
                                     "dpmpp_2m_sde_heun": dpmpp_2m_sde_heun_step, "dpmpp_3m_sde": dpmpp_3m_sde_step,
                                     "lms": lms_step, "deis": deis_step, "ddpm": ddpm_step,
                                     "res_multistep_ancestral": res_multistep_ancestral_step,
                                     "gradient_estimation": gradient_estimation_step, "er_sde": er_sde_step}
_SAMPLERS.update(CFG_PP_STEPS)
_SAMPLERS.update({name: _SAMPLERS[base] for name, base in DEVICE_TREE_SAMPLERS.items() if base in _SAMPLERS})


# --- EPS / v models ------------------------------------------------------------------------------
# ComfyUI's samplers are one code for every model but where they ask ``isinstance(model_sampling, CONST)``:
# the *_RF variants, the half log-SNR, lcm's re-noise. Those with an EPS form here run on EPS / v models
# (bit-equal to ComfyUI's non-CONST branch); the rest are refused for them (``check_sampler``).

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


def lcm_eps_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                 state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's ``lcm`` for EPS / v models: the x0 prediction re-noised with EPS noise scaling."""
    sigma_next = sigmas[i + 1]
    if sigma_next > 0:
        return EPS.noise_scaling(sigma_next, noise(), denoised), None
    return denoised, None


# samplers whose ComfyUI code asks for the model sampling type, in their EPS / v form
_EPS_FORMS: dict[str, SamplerStep] = {
    "euler_ancestral": euler_ancestral_eps_step, "lcm": lcm_eps_step,
    "dpmpp_2m_sde": partial(_dpmpp_2m_sde, solver="midpoint", half_log_snr=EPS.half_log_snr),
    "dpmpp_2m_sde_heun": partial(_dpmpp_2m_sde, solver="heun", half_log_snr=EPS.half_log_snr),
    "dpmpp_3m_sde": partial(dpmpp_3m_sde_step, half_log_snr=EPS.half_log_snr),
    "er_sde": partial(er_sde_step, half_log_snr=EPS.half_log_snr),
}
_EPS_FORMS.update(CFG_PP_EPS_FORMS)
_EPS_FORMS.update({name: _EPS_FORMS[base] for name, base in DEVICE_TREE_SAMPLERS.items() if base in _EPS_FORMS})
# samplers that take a flow-only path in our code and have no EPS form here yet
FLOW_ONLY_SAMPLERS = frozenset({"dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu", "seeds_2",
                                "seeds_3", *SA_SOLVER_VARIANTS})


def samplers_for(prediction: Prediction) -> tuple[str, ...]:
    """The sampler names (in ComfyUI's order) that run, equal to ComfyUI, on a model of ``prediction``."""
    if prediction.is_flow:
        return SAMPLER_NAMES
    return tuple(name for name in SAMPLER_NAMES if name not in FLOW_ONLY_SAMPLERS)


def check_sampler(name: str, prediction: Prediction) -> None:
    """``ValueError`` naming the samplers that work when ``name`` does not run on a ``prediction`` model."""
    if name in SAMPLER_NAMES and name not in samplers_for(prediction):
        raise ValueError(f"sampler {name!r} is not available for this {prediction.name.upper()}-prediction model "
                         f"(xDiT has only its flow-model form); choose one of {', '.join(samplers_for(prediction))}")


def sampler_step(name: str, prediction: Prediction = FLOW) -> SamplerStep:
    """The step of a one-call sampler (model call ``i`` is step ``i``) for a ``prediction`` model; see
    ``sampler_program`` for all."""
    check_sampler(name, prediction)
    if not prediction.is_flow and name in _EPS_FORMS:
        return _EPS_FORMS[name]
    try:
        return _SAMPLERS[name]
    except KeyError:
        if (DEVICE_TREE_SAMPLERS.get(name, name) in MULTI_CALL_SAMPLERS or name in UNI_PC_VARIANTS
                or name == "dpm_fast" or name in SA_SOLVER_VARIANTS):
            raise ValueError(f"sampler {name!r} is more than a step after each model call; use sampler_program") from None
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}") from None


@dataclass(frozen=True)
class SamplerProgram:
    """How a sampler runs over a schedule: the sigma of every model call, in order, and the step applied
    after call ``k``: ``step(x, denoised, sigmas, k, state, noise)`` returns the next model input (the
    result after the last call). For one-call samplers call ``k`` is step ``k``."""

    step: SamplerStep
    call_sigmas: torch.Tensor  # (calls,) float32: the sigma the model sees at each call
    noise_spans: torch.Tensor  # (calls, 2) float32: the Brownian-tree interval of noise drawn after a call
    call_steps: tuple[int, ...]  # the sampler step each call belongs to
    needs_uncond: bool = False  # CFG++: the step also takes the unconditional prediction
    start: Optional[Callable[[torch.Tensor], "tuple[torch.Tensor, SamplerState]"]] = None  # UniPC: see begin

    def begin(self, x: torch.Tensor) -> tuple[torch.Tensor, SamplerState]:
        """The first model input and sampler state from the noised starting tokens (unchanged, and no
        state, except for UniPC, which moves the latent into its own space first)."""
        return (x, None) if self.start is None else self.start(x)

    def apply(self, x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, k: int, state: SamplerState,
              noise: StepNoise = None, uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, SamplerState]:
        """The step after call ``k``; ``uncond`` (the unconditional x0 prediction) reaches CFG++ steps only."""
        if not self.needs_uncond:
            return self.step(x, denoised, sigmas, k, state, noise)
        if uncond is None:
            raise ValueError("a CFG++ sampler needs the unconditional prediction at every model call")
        return self.step(x, denoised, sigmas, k, state, noise, uncond)

    @property
    def total_calls(self) -> int:
        return len(self.call_steps)

    def calls_before_step(self, step: int) -> int:
        """How many model calls the first ``step`` sampler steps make."""
        return sum(1 for s in self.call_steps if s < step)


def sampler_program(name: str, sigmas: torch.Tensor,
                    model_sampling: Optional[PercentToSigma] = None,
                    prediction: Prediction = FLOW) -> SamplerProgram:
    """``name``'s program over ``sigmas`` (the loop's: offset, UniPC's final 0.001) for a ``prediction``
    model (``ValueError`` for a sampler it cannot run); ``model_sampling`` (the model's sigma table, with
    ``percent_to_sigma``) is read by the SA-Solvers only, for their stochastic interval."""
    check_sampler(name, prediction)
    needs_uncond = name in CFG_PP_SAMPLERS
    name = DEVICE_TREE_SAMPLERS.get(name, name)  # the same steps; only where the noise comes from differs
    if name in MULTI_CALL_SAMPLERS:
        schedule = call_schedule(name, sigmas)
        return SamplerProgram(multi_call_step(name, schedule), schedule.sigmas, schedule.noise_spans, schedule.steps,
                              needs_uncond)
    if name == "dpm_fast":  # its own grid in log sigma: n model calls, each counted as one of the n steps
        step, grid = dpm_fast_functions(sigmas)
        return SamplerProgram(step, grid.call_sigmas, grid.noise_spans, tuple(range(len(grid.call_sigmas))),
                              needs_uncond)
    if name in SA_SOLVER_VARIANTS:  # one model call a step; PECE's second at the corrected latent
        if model_sampling is None:
            raise ValueError(f"sampler {name!r} needs the model's sampling (its stochastic interval is in "
                             f"percents of it)")
        step, calls = sa_solver_functions(name, sigmas, model_sampling)
        return SamplerProgram(step, calls.sigmas, calls.noise_spans, calls.steps, needs_uncond)
    steps = max(len(sigmas) - 1, 0)
    if name in UNI_PC_VARIANTS:
        step, start = uni_pc_functions(name, sigmas)
        return SamplerProgram(step, sigmas[:steps], torch.stack([sigmas[:steps], sigmas[1:]], dim=1),
                              tuple(range(steps)), needs_uncond, start)
    return SamplerProgram(sampler_step(name, prediction), sigmas[:steps],
                          torch.stack([sigmas[:steps], sigmas[1:]], dim=1), tuple(range(steps)), needs_uncond)


def step_patch(step: SamplerStep, x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
               state: SamplerState, start: int, stop: int,
               noise: Optional[Callable[[int], torch.Tensor]] = None,
               uncond: Optional[torch.Tensor] = None) -> SamplerState:
    """Apply ``step`` to tokens ``[start, stop)`` of ``x`` (B, N, C) in place; ``denoised`` covers just
    those tokens. Returns the whole-latent state with that slice updated. A step that lengthens the
    history starts the new tensor here; the other patches of the same step fill the rest of it.
    ``noise(i)`` is step ``i``'s whole-latent noise (an ``AncestralNoise``); the patch takes its slice."""
    part_state = None if state is None else tuple(t[:, start:stop] for t in state)
    part_noise = None if noise is None else (lambda: noise(i)[:, start:stop])
    extra = () if uncond is None else (uncond,)  # CFG++: the patch's unconditional prediction, like denoised
    new_x, new_state = step(x[:, start:stop], denoised, sigmas, i, part_state, part_noise, *extra)
    if new_state is None:
        x[:, start:stop] = new_x
        return state
    whole = list(state or ())
    whole += [torch.empty_like(x) for _ in range(len(new_state) - len(whole))]
    for tensor, part in zip(whole, new_state):  # oldest first: a shifted history reads what it overwrites next
        tensor[:, start:stop] = part
    x[:, start:stop] = new_x  # after the state, which may hold this slice of x (a step's starting latent)
    return tuple(whole[:len(new_state)])
