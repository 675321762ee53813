"""Samplers that call the model more than once per step (heun, heunpp2, dpm_2, dpm_2_ancestral,
dpmpp_2s_ancestral, dpmpp_sde, seeds_2, seeds_3), written as a sequence of single model calls.

ComfyUI's k-diffusion loops evaluate the model at an intermediate point inside a step. Here every model
call is its own item: the loop keeps ``x`` as the next *model input* and, after each call, a phase
function turns ``(x, denoised)`` into the next model input, keeping what the step needs later (the
step's starting latent, earlier derivatives) in ``state``, a tuple of tensors shaped like ``x``. So the
loops (serial, sequence and CFG parallel, PipeFusion where each call is one pipeline step) stay
one-call-per-item and every operation stays elementwise in ``x``.

The arithmetic follows ComfyUI's ``sample_heun`` / ``sample_heunpp2`` / ``sample_dpm_2`` /
``sample_dpm_2_ancestral_RF`` / ``sample_dpmpp_2s_ancestral_RF`` / ``sample_dpmpp_sde`` (flow models,
eta 1, no churn) operation by operation on float32 0-dim sigma tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Union

import torch

Scalar = Union[torch.Tensor, float]
State = Optional[tuple[torch.Tensor, ...]]
Noise = Optional[Callable[[], torch.Tensor]]


@dataclass(frozen=True)
class CallPlan:
    """The model calls of one sampler step: the sigma of each call and the Brownian interval of the noise
    drawn after it (the whole step's interval where none is drawn)."""

    sigmas: tuple[Scalar, ...]
    noise_spans: tuple[tuple[Scalar, Scalar], ...]


Phase = Callable[..., "tuple[torch.Tensor, State]"]  # (x, denoised, sigmas, i, phase, state, noise, uncond=None)


def _to_d(x: torch.Tensor, sigma: Scalar, denoised: torch.Tensor) -> torch.Tensor:
    return (x - denoised) / sigma


# --- heun ------------------------------------------------------------------------------------------

def _heun_calls(sigmas: torch.Tensor, i: int) -> CallPlan:
    step = (sigmas[i], sigmas[i + 1])
    if sigmas[i + 1] == 0:
        return CallPlan((sigmas[i],), (step,))
    return CallPlan((sigmas[i], sigmas[i + 1]), (step, step))


def _heun_phase(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, phase: int, state: State,
                noise: Noise, uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, State]:
    """Karras et al. (2022) Algorithm 2 without churn: an Euler predictor, then the trapezoidal corrector."""
    sigma_hat = sigmas[i] * 1  # ComfyUI's sigma_hat = sigmas[i] * (gamma + 1) with gamma 0
    dt = sigmas[i + 1] - sigma_hat
    if phase == 0:
        d = _to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            return x + d * dt, None
        return x + d * dt, (x, d)
    x_start, d = state[0], state[1]
    d_2 = _to_d(x, sigmas[i + 1], denoised)
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


def _heunpp2_phase(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, phase: int, state: State,
                   noise: Noise, uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, State]:
    """ComfyUI's ``heunpp2``: Euler on the last step, Heun with sigma weights on the one before, else a
    third call at ``sigmas[i + 2]`` and a three-point weighted derivative."""
    s_end = sigmas[-1]
    sigma_hat = sigmas[i] * (0.0 + 1)  # gamma is 0.0 without churn
    dt = sigmas[i + 1] - sigma_hat
    if phase == 0:
        d = _to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == s_end:
            return x + d * dt, None
        return x + d * dt, (x, d)
    x_start, d = state[0], state[1]
    d_2 = _to_d(x, sigmas[i + 1], denoised) if phase == 1 else state[2]
    if phase == 1 and sigmas[i + 2] == s_end:
        w = 2 * sigmas[0]
        w2 = sigmas[i + 1] / w
        w1 = 1 - w2
        d_prime = d * w1 + d_2 * w2
        return x_start + d_prime * dt, None
    if phase == 1:
        dt_2 = sigmas[i + 2] - sigmas[i + 1]
        return x + d_2 * dt_2, (x_start, d, d_2)
    d_3 = _to_d(x, sigmas[i + 2], denoised)
    w = 3 * sigmas[0]
    w2 = sigmas[i + 1] / w
    w3 = sigmas[i + 2] / w
    w1 = 1 - w2 - w3
    d_prime = w1 * d + w2 * d_2 + w3 * d_3
    return x_start + d_prime * dt, None


# --- dpm_2 -----------------------------------------------------------------------------------------

def _log_midpoint(sigma: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    return sigma.log().lerp(sigma_to.log(), 0.5).exp()


def _dpm_2_calls(sigmas: torch.Tensor, i: int) -> CallPlan:
    step = (sigmas[i], sigmas[i + 1])
    if sigmas[i + 1] == 0:
        return CallPlan((sigmas[i],), (step,))
    return CallPlan((sigmas[i], _log_midpoint(sigmas[i] * 1, sigmas[i + 1])), (step, step))


def _dpm_2_phase(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, phase: int, state: State,
                 noise: Noise, uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, State]:
    """DPM-Solver-2 (Karras et al. 2022 flavour): an Euler half step to the log-midpoint sigma, then the
    whole step with the midpoint's derivative."""
    sigma_hat = sigmas[i] * 1
    if phase == 0:
        d = _to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            return x + d * (sigmas[i + 1] - sigma_hat), None
        dt_1 = _log_midpoint(sigma_hat, sigmas[i + 1]) - sigma_hat
        return x + d * dt_1, (x,)
    sigma_mid = _log_midpoint(sigma_hat, sigmas[i + 1])
    d_2 = _to_d(x, sigma_mid, denoised)
    return state[0] + d_2 * (sigmas[i + 1] - sigma_hat), None


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
    return CallPlan((sigmas[i], _log_midpoint(sigmas[i], geometry.sigma_down)), (step, step))


def _dpm_2_ancestral_phase(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, phase: int,
                           state: State, noise: Noise, uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, State]:
    """ComfyUI's ``dpm_2_ancestral`` for flow models: DPM-Solver-2 down to ``sigma_down``, then the RF
    re-noise with this step's noise (none on the final Euler step)."""
    g = _FlowAncestral.at(sigmas, i)
    if phase == 0:
        d = _to_d(x, sigmas[i], denoised)
        if g.sigma_down == 0:
            return x + d * (g.sigma_down - sigmas[i]), None
        dt_1 = _log_midpoint(sigmas[i], g.sigma_down) - sigmas[i]
        return x + d * dt_1, (x,)
    sigma_mid = _log_midpoint(sigmas[i], g.sigma_down)
    d_2 = _to_d(x, sigma_mid, denoised)
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
                              state: State, noise: Noise, uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, State]:
    """ComfyUI's ``dpmpp_2s_ancestral`` for flow models: DPM-Solver++(2S) to ``sigma_down`` through the
    log-SNR midpoint, then the RF re-noise."""
    g = _FlowAncestral.at(sigmas, i)
    if phase == 0:
        if sigmas[i + 1] == 0:
            d = _to_d(x, sigmas[i], denoised)
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
                                     phase: int, state: State, noise: Noise,
                                     uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, State]:
    """ComfyUI's ``dpmpp_2s_ancestral_cfg_pp`` (its k-diffusion ancestral split, also for flow models). Its
    second update reads the unconditional prediction of the *second* call (ComfyUI's hook has overwritten
    the first's by then), with the first call's guided one."""
    s_noise = 1.0
    sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], 1.0)
    if phase == 0 and sigma_down == 0:
        d = _to_d(x, sigmas[i], uncond)
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


# --- dpmpp_sde (flow, Brownian tree) ---------------------------------------------------------------

def _half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.logit().neg()


def _sigma_of_half_log_snr(half_log_snr: torch.Tensor) -> torch.Tensor:
    return half_log_snr.neg().sigmoid()


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """k-diffusion's ``get_ancestral_step``: the sigma to step down to and the noise to add back."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


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
    def at(cls, sigmas: torch.Tensor, i: int) -> "_SdeGeometry":
        r = 1 / 2
        lambda_s, lambda_t = _half_log_snr(sigmas[i]), _half_log_snr(sigmas[i + 1])
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        sigma_s_1 = _sigma_of_half_log_snr(lambda_s_1)
        return cls(lambda_s, lambda_s_1, lambda_t, sigma_s_1, sigmas[i] * lambda_s.exp(),
                   sigma_s_1 * lambda_s_1.exp(), sigmas[i + 1] * lambda_t.exp())


def _dpmpp_sde_calls(sigmas: torch.Tensor, i: int) -> CallPlan:
    step = (sigmas[i], sigmas[i + 1])
    if sigmas[i + 1] == 0:
        return CallPlan((sigmas[i],), (step,))
    sigma_s_1 = _SdeGeometry.at(sigmas, i).sigma_s_1
    return CallPlan((sigmas[i], sigma_s_1), ((sigmas[i], sigma_s_1), step))


def _dpmpp_sde_phase(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, phase: int,
                     state: State, noise: Noise, uncond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, State]:
    """ComfyUI's DPM-Solver++ (stochastic), r 1/2, eta 1, on half log-SNR: a noised first-order step to
    the midpoint, a second call there, then the whole step from both predictions, noised again."""
    eta, s_noise, r = 1.0, 1.0, 1 / 2
    if sigmas[i + 1] == 0:
        return denoised, None
    g = _SdeGeometry.at(sigmas, i)
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


# --- seeds_2 / seeds_3 (flow, default noise sampler) ------------------------------------------------

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
    def at(cls, sigmas: torch.Tensor, i: int, stages: tuple[float, ...]) -> "_SeedsGeometry":
        lambda_s, lambda_t = _half_log_snr(sigmas[i]), _half_log_snr(sigmas[i + 1])
        lambdas = [torch.lerp(lambda_s, lambda_t, r) for r in stages]
        stage_sigmas = tuple(_sigma_of_half_log_snr(lam) for lam in lambdas)
        return cls(lambda_t - lambda_s, stage_sigmas,
                   tuple(sigma * lam.exp() for sigma, lam in zip(stage_sigmas, lambdas)), sigmas[i + 1] * lambda_t.exp())


def _seeds_calls(sigmas: torch.Tensor, i: int, stages: tuple[float, ...]) -> CallPlan:
    step = (sigmas[i], sigmas[i + 1])
    if sigmas[i + 1] == 0:
        return CallPlan((sigmas[i],), (step,))
    g = _SeedsGeometry.at(sigmas, i, stages)
    return CallPlan((sigmas[i], *g.stage_sigmas), (step,) * (1 + len(stages)))


def _seeds_phase(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, phase: int, state: State,
                 noise: Noise, uncond: Optional[torch.Tensor] = None, *,
                 stages: tuple[float, ...]) -> tuple[torch.Tensor, State]:
    """ComfyUI's ``sample_seeds_2`` / ``sample_seeds_3`` (SEEDS, arXiv 2305.14267; eta 1, s_noise 1): data
    prediction exponential-integrator stages on half log-SNR, each noised with the previous stage's
    noise carried forward plus a fresh draw. ``state``: the step's starting latent, its first x0
    prediction and the carried noise."""
    eta, s_noise = 1.0, 1.0
    if sigmas[i + 1] == 0:
        return denoised, None
    g = _SeedsGeometry.at(sigmas, i, stages)
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


# --- programs --------------------------------------------------------------------------------------

_MULTI_CALL: dict[str, tuple[Callable[[torch.Tensor, int], CallPlan], Phase]] = {
    "heun": (_heun_calls, _heun_phase),
    "heunpp2": (_heunpp2_calls, _heunpp2_phase),
    "dpm_2": (_dpm_2_calls, _dpm_2_phase),
    "dpm_2_ancestral": (_dpm_2_ancestral_calls, _dpm_2_ancestral_phase),
    "dpmpp_2s_ancestral": (_dpmpp_2s_ancestral_calls, _dpmpp_2s_ancestral_phase),
    "dpmpp_sde": (_dpmpp_sde_calls, _dpmpp_sde_phase),
    "dpmpp_2s_ancestral_cfg_pp": (_dpmpp_2s_ancestral_cfg_pp_calls, _dpmpp_2s_ancestral_cfg_pp_phase),
    **{name: (partial(_seeds_calls, stages=stages), partial(_seeds_phase, stages=stages))
       for name, stages in SEEDS_STAGES.items()},
}
MULTI_CALL_SAMPLERS = tuple(_MULTI_CALL)


@dataclass(frozen=True)
class CallSchedule:
    """Every model call of a run, in order: its step, its phase within the step, its sigma and the
    Brownian interval of the noise drawn after it."""

    steps: tuple[int, ...]
    phases: tuple[int, ...]
    sigmas: torch.Tensor  # (calls,) float32
    noise_spans: torch.Tensor  # (calls, 2) float32


def call_schedule(name: str, sigmas: torch.Tensor) -> CallSchedule:
    plan_step = _MULTI_CALL[name][0]
    steps, phases, call_sigmas, spans = [], [], [], []
    for i in range(len(sigmas) - 1):
        plan = plan_step(sigmas, i)
        for phase, (sigma, span) in enumerate(zip(plan.sigmas, plan.noise_spans)):
            steps.append(i)
            phases.append(phase)
            call_sigmas.append(torch.as_tensor(sigma, dtype=torch.float32))
            spans.append(torch.stack([torch.as_tensor(s, dtype=torch.float32) for s in span]))
    return CallSchedule(tuple(steps), tuple(phases),
                        torch.stack(call_sigmas) if call_sigmas else torch.zeros(0),
                        torch.stack(spans) if spans else torch.zeros(0, 2))


def _call_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, k: int, state: State,
               noise: Noise = None, uncond: Optional[torch.Tensor] = None, *, phase_fn: Phase,
               schedule: CallSchedule) -> tuple[torch.Tensor, State]:
    return phase_fn(x, denoised, sigmas, schedule.steps[k], schedule.phases[k], state, noise, uncond)


def multi_call_step(name: str, schedule: CallSchedule) -> Callable[..., "tuple[torch.Tensor, State]"]:
    """The sampler's step for model call ``k``: ``(x, denoised, sigmas, k, state, noise)``, as a one-call
    sampler's step is for step ``k``."""
    return partial(_call_step, phase_fn=_MULTI_CALL[name][1], schedule=schedule)
