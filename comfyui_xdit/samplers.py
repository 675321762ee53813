"""Sampler steps as pure, elementwise functions, equal to ComfyUI's k-diffusion samplers.

A step maps ``(x, denoised, sigmas, i, state) -> (x_next, state_next)``. Every operation is
elementwise in ``x``, and ``state`` is a tuple of tensors of ``x``'s shape (a multistep method's history),
so a step can be applied to the whole latent or to one patch of it (a slice of ``x``, ``denoised`` and
each state tensor) with identical numbers; PipeFusion relies on that. The arithmetic follows ComfyUI's ``sample_euler`` / ``sample_dpmpp_2m`` operation by
operation on float32 0-dim sigma tensors, so the results match bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .multi_call_samplers import MULTI_CALL_SAMPLERS, call_schedule, multi_call_step

SamplerState = Optional[tuple[torch.Tensor, ...]]  # history, oldest first, each shaped like x
StepNoise = Optional[Callable[[], torch.Tensor]]  # this step's noise for the tokens at hand (ancestral samplers)
SamplerStep = Callable[..., "tuple[torch.Tensor, SamplerState]"]  # (x, denoised, sigmas, i, state, noise=None)

SAMPLER_NAMES = ("euler", "euler_ancestral", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral",
                 "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "lcm",
                 "ipndm", "ipndm_v", "res_multistep", "ddim")
# samplers that draw fresh noise while sampling from ComfyUI's default noise sampler (one draw per ask)
NOISE_SAMPLERS = frozenset({"euler_ancestral", "lcm", "dpm_2_ancestral", "dpmpp_2s_ancestral"})
# samplers that draw their noise from ComfyUI's CPU Brownian tree
BROWNIAN_SAMPLERS = frozenset({"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"})
# samplers that step on half log-SNR and so start just below sigma 1 (offset_first_sigma_for_snr)
SNR_OFFSET_SAMPLERS = frozenset({"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"})
# KSampler computes one more sigma for these and drops the second to last (its DISCARD_PENULTIMATE_SIGMA_SAMPLERS)
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral"})


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
                  noise: StepNoise, solver: str) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's DPM-Solver++(2M) SDE for flow models (eta 1, half log-SNR log((1 - sigma) / sigma));
    ``state`` holds the previous denoised prediction. ``sigmas`` start just below 1 (see
    ``offset_first_sigma_for_snr``)."""
    eta, s_noise = 1.0, 1.0
    if sigmas[i + 1] == 0:
        return denoised, (denoised,)
    lambda_s, lambda_t = _half_log_snr(sigmas[i]), _half_log_snr(sigmas[i + 1])
    h = lambda_t - lambda_s
    h_eta = h * (eta + 1)
    alpha_t = sigmas[i + 1] * lambda_t.exp()
    x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
    if state is not None:
        h_last = lambda_s - _half_log_snr(sigmas[i - 1])  # the previous step's h, computed as it was
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


def dpmpp_3m_sde_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
                      state: SamplerState, noise: StepNoise = None) -> tuple[torch.Tensor, SamplerState]:
    """ComfyUI's DPM-Solver++(3M) SDE for flow models (eta 1); ``state`` holds the last two denoised
    predictions, oldest first (the history before step i holds min(i, 2); see ``ipndm_step``)."""
    eta, s_noise = 1.0, 1.0
    history = (state or ())[:min(i, 2)]
    new_history = (*history, denoised)[-2:]
    if sigmas[i + 1] == 0:
        return denoised, new_history
    lambda_s, lambda_t = _half_log_snr(sigmas[i]), _half_log_snr(sigmas[i + 1])
    h = lambda_t - lambda_s
    h_eta = h * (eta + 1)
    alpha_t = sigmas[i + 1] * lambda_t.exp()
    x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
    if history:
        h_1 = lambda_s - _half_log_snr(sigmas[i - 1])  # the previous steps' h, computed as they were
        phi_2 = h_eta.neg().expm1() / h_eta + 1
        if len(history) == 2:
            h_2 = _half_log_snr(sigmas[i - 1]) - _half_log_snr(sigmas[i - 2])
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


# ComfyUI's "ddim" is its euler sampler with random inpainting noise, which only differs under a noise
# mask (refused here), so it is euler.
_SAMPLERS: dict[str, SamplerStep] = {"euler": euler_step, "euler_ancestral": euler_ancestral_step,
                                     "dpmpp_2m": dpmpp_2m_step,
                                     "res_multistep": res_multistep_step, "ipndm": ipndm_step, "ipndm_v": ipndm_v_step,
                                     "lcm": lcm_step, "ddim": euler_step, "dpmpp_2m_sde": dpmpp_2m_sde_step,
                                     "dpmpp_2m_sde_heun": dpmpp_2m_sde_heun_step, "dpmpp_3m_sde": dpmpp_3m_sde_step}


def sampler_step(name: str) -> SamplerStep:
    """The step of a one-call sampler (model call ``i`` is step ``i``); see ``sampler_program`` for all."""
    try:
        return _SAMPLERS[name]
    except KeyError:
        if name in MULTI_CALL_SAMPLERS:
            raise ValueError(f"sampler {name!r} calls the model more than once per step; use sampler_program") from None
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

    @property
    def total_calls(self) -> int:
        return len(self.call_steps)

    def calls_before_step(self, step: int) -> int:
        """How many model calls the first ``step`` sampler steps make."""
        return sum(1 for s in self.call_steps if s < step)


def sampler_program(name: str, sigmas: torch.Tensor) -> SamplerProgram:
    if name in MULTI_CALL_SAMPLERS:
        schedule = call_schedule(name, sigmas)
        return SamplerProgram(multi_call_step(name, schedule), schedule.sigmas, schedule.noise_spans, schedule.steps)
    steps = max(len(sigmas) - 1, 0)
    return SamplerProgram(sampler_step(name), sigmas[:steps], torch.stack([sigmas[:steps], sigmas[1:]], dim=1),
                          tuple(range(steps)))


def step_patch(step: SamplerStep, x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int,
               state: SamplerState, start: int, stop: int,
               noise: Optional[Callable[[int], torch.Tensor]] = None) -> SamplerState:
    """Apply ``step`` to tokens ``[start, stop)`` of ``x`` (B, N, C) in place; ``denoised`` covers just
    those tokens. Returns the whole-latent state with that slice updated. A step that lengthens the
    history starts the new tensor here; the other patches of the same step fill the rest of it.
    ``noise(i)`` is step ``i``'s whole-latent noise (an ``AncestralNoise``); the patch takes its slice."""
    part_state = None if state is None else tuple(t[:, start:stop] for t in state)
    part_noise = None if noise is None else (lambda: noise(i)[:, start:stop])
    new_x, new_state = step(x[:, start:stop], denoised, sigmas, i, part_state, part_noise)
    if new_state is None:
        x[:, start:stop] = new_x
        return state
    whole = list(state or ())
    whole += [torch.empty_like(x) for _ in range(len(new_state) - len(whole))]
    for tensor, part in zip(whole, new_state):  # oldest first: a shifted history reads what it overwrites next
        tensor[:, start:stop] = part
    x[:, start:stop] = new_x  # after the state, which may hold this slice of x (a step's starting latent)
    return tuple(whole[:len(new_state)])
