"""SA-Solver (Stochastic Adams Solver, arXiv 2309.05019) as ComfyUI's ``sa_solver`` / ``sa_solver_pece``
run it from KSampler.

ComfyUI's ``sample_sa_solver`` steps on the model's half log-SNR ``lambda`` (a ``Prediction``'s
``half_log_snr``: a flow model's ``log((1 - sigma) / sigma)``, the schedule offset just below sigma 1; an
EPS / v model's ``-log sigma``), with KSampler's defaults: predictor order 3, corrector order 4, s_noise 1, no
simple order-2 scheme, and ``tau = 1`` (stochastic) for sigmas between the model's ``percent_to_sigma(0.2)``
and ``percent_to_sigma(0.8)``, 0 (an ODE step) elsewhere. Its loop body for step ``i``: the model is called
at the predicted latent; a multistep corrector (its weights integrate the Lagrange basis on the last x0
predictions) recomputes the latent at sigma ``i`` from the previous corrected latent, the new x0 prediction
and the noise the previous predictor added; a multistep predictor then steps to sigma ``i + 1`` and adds
fresh noise from ComfyUI's default noise sampler. ``sa_solver_pece`` calls the model again at the
corrected latent (every step but the first) and its x0 prediction replaces the first one.

Here the step after model call ``k`` returns the next model input (the result after the last call). The
state is ``(x_corrected, added_noise, x0_oldest, ..., x0_newest)``, each shaped like ``x`` (B, N, C):
every operation is elementwise in ``x`` but a weighted sum over the history (``tensordot`` over its axis,
the same per element for any slice of tokens), so steps run on patches as on the whole latent. The
arithmetic follows ComfyUI's ``sample_sa_solver`` and ``compute_stochastic_adams_b_coeffs`` operation by
operation on float32 tensors, so the results match bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Protocol

import torch

from .prediction import FLOW, Prediction
from .sampler_types import HalfLogSnr

State = Optional[tuple[torch.Tensor, ...]]
Noise = Optional[Callable[[], torch.Tensor]]

SA_SOLVER_VARIANTS = {"sa_solver": False, "sa_solver_pece": True}  # name -> evaluates the corrected latent
PREDICTOR_ORDER = 3
CORRECTOR_ORDER = 4
KEPT = max(PREDICTOR_ORDER, CORRECTOR_ORDER) - 1  # x0 predictions the state keeps for the next step
TAU_PERCENTS = (0.2, 0.8)  # KSampler's stochastic interval, as sampling percents of the model
ETA = 1.0
S_NOISE = 1.0


class PercentToSigma(Protocol):
    def percent_to_sigma(self, percent: float) -> float: ...


def tau_interval(model_sampling: PercentToSigma) -> tuple[float, float]:
    """(start, end) sigmas of the stochastic interval: tau is ``ETA`` for ``start >= sigma >= end``."""
    return model_sampling.percent_to_sigma(TAU_PERCENTS[0]), model_sampling.percent_to_sigma(TAU_PERCENTS[1])


def _tau(sigma: torch.Tensor, interval: tuple[float, float]) -> float:
    """ComfyUI's ``get_tau_interval_func`` at ``sigma``: compared as Python floats."""
    if ETA <= 0:
        return 0.0
    start, end = interval
    return ETA if start >= sigma.item() >= end else 0.0


def _exponential_coeffs(s: torch.Tensor, t: torch.Tensor, order: int, tau: float) -> torch.Tensor:
    """(order,) the integrals from ``s`` to ``t`` of ``(1 + tau^2) exp((1 + tau^2) x) x^p`` for p < order, with
    ``exp((1 + tau^2) t)`` factored out: by parts, a lower-triangular matrix of signed ratios of factorials
    and powers of ``1 / (1 + tau^2)`` times the boundary terms ``t^p - s^p exp(-(1 + tau^2) h)``."""
    tau_mul = 1 + tau ** 2
    h = t - s
    p = torch.arange(order, dtype=s.dtype, device=s.device)
    boundary = (t ** p - s ** p * (-tau_mul * h).exp())  # (order,)
    depth = p.unsqueeze(1) - p.unsqueeze(0)  # (order, order): how many integrations by parts apart
    log_factorial = (p + 1).lgamma()
    log_ratio = log_factorial.unsqueeze(1) - log_factorial.unsqueeze(0)  # (order, order)
    if tau > 0:
        log_ratio = log_ratio - (depth * math.log(tau_mul))
    signs = torch.where(depth % 2 == 0, 1.0, -1.0)
    return (log_ratio.exp() * signs).tril() @ boundary  # (order, order) @ (order,) -> (order,)


def _b_coeffs(sigma_next: torch.Tensor, lambdas: torch.Tensor, lambda_s: torch.Tensor, lambda_t: torch.Tensor,
              tau: float) -> torch.Tensor:
    """(K,) the weights of the last K x0 predictions (at ``lambdas``, oldest first) in an update from
    ``lambda_s`` to ``lambda_t``: the exponential integrals of the Lagrange basis on ``lambdas``, found by
    solving the transposed Vandermonde system, times ``alpha_t = sigma_next exp(lambda_t)``."""
    order = lambdas.shape[0]
    integrals = _exponential_coeffs(lambda_s, lambda_t, order, tau)
    vandermonde_t = torch.vander(lambdas, order, increasing=True).T  # (K, K): row p holds lambdas ** p
    lagrange_integrals = torch.linalg.solve(vandermonde_t, integrals)
    alpha_t = sigma_next * lambda_t.exp()
    return alpha_t * lagrange_integrals


def _weighted(preds: tuple[torch.Tensor, ...], b: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(preds, dim=1)  # K x (B, N, C) -> (B, K, N, C)
    return torch.tensordot(stacked, b, dims=([1], [0]))  # (B, K, N, C) . (K,) -> (B, N, C)


def _orders(sigmas: torch.Tensor, i: int, pece: bool) -> tuple[int, int]:
    """(predictor, corrector) orders of step ``i``: as many x0 predictions as ComfyUI's list holds (at most
    ``KEPT + 1``), no corrector on the first step (nor, without PECE, on a step to sigma 0), both lowered
    near the end of a schedule that ends at 0."""
    available = min(i + 1, KEPT + 1)
    predictor = min(PREDICTOR_ORDER, available)
    corrector = 0 if i == 0 or (sigmas[i + 1] == 0 and not pece) else min(CORRECTOR_ORDER, available)
    if sigmas[-1].item() == 0:
        predictor = min(predictor, len(sigmas) - 2 - i)
        corrector = min(corrector, len(sigmas) - 1 - i)
    return predictor, corrector


def _correct(x: torch.Tensor, added_noise: torch.Tensor, preds: tuple[torch.Tensor, ...], sigmas: torch.Tensor,
             lambdas: torch.Tensor, i: int, order: int, interval: tuple[float, float]) -> torch.Tensor:
    """The corrected latent at sigma ``i`` from the corrected latent ``x`` at sigma ``i - 1``, the noise the
    predictor added on the way and the last ``order`` x0 predictions (ending with sigma ``i``'s)."""
    tau = _tau(sigmas[i], interval)  # the previous predictor's
    b = _b_coeffs(sigmas[i], lambdas[i - order + 1:i + 1], lambdas[i - 1], lambdas[i], tau)
    corr_res = _weighted(preds[-order:], b)
    h = lambdas[i] - lambdas[i - 1]
    x = sigmas[i] / sigmas[i - 1] * (-(tau ** 2) * h).exp() * x + corr_res
    if tau > 0 and S_NOISE > 0:
        x = x + added_noise
    return x


def _predict(x: torch.Tensor, preds: tuple[torch.Tensor, ...], sigmas: torch.Tensor, lambdas: torch.Tensor, i: int,
             order: int, interval: tuple[float, float], noise: Noise) -> tuple[torch.Tensor, State]:
    """From the corrected latent ``x`` at sigma ``i``: the predicted latent at sigma ``i + 1`` (the next model
    input) and the state; after the last step the result (the x0 prediction where the schedule ends at 0,
    else the corrected latent, as ComfyUI returns it)."""
    if sigmas[i + 1] == 0:
        return preds[-1], None
    if i == len(sigmas) - 2:
        return x, None
    tau = _tau(sigmas[i + 1], interval)
    b = _b_coeffs(sigmas[i + 1], lambdas[i - order + 1:i + 1], lambdas[i], lambdas[i + 1], tau)
    pred_res = _weighted(preds[-order:], b)
    h = lambdas[i + 1] - lambdas[i]
    x_pred = sigmas[i + 1] / sigmas[i] * (-(tau ** 2) * h).exp() * x + pred_res
    if tau > 0 and S_NOISE > 0:
        added_noise = noise() * sigmas[i + 1] * (-2 * tau ** 2 * h).expm1().neg().sqrt() * S_NOISE
        x_pred = x_pred + added_noise
    else:  # none drawn; the next corrector does not add it
        added_noise = torch.zeros_like(x)
    return x_pred, (x, added_noise, *preds[-KEPT:])


@dataclass(frozen=True)
class SaSolverCalls:
    """The model calls of a run: call ``k`` is phase ``phases[k]`` of step ``steps[k]`` at ``sigmas[k]``
    (phase 1: PECE's evaluation of the corrected latent)."""

    steps: tuple[int, ...]
    phases: tuple[int, ...]
    sigmas: torch.Tensor  # (calls,) float32
    noise_spans: torch.Tensor  # (calls, 2) float32: each call's step, sigma i to sigma i + 1


def sa_solver_calls(sigmas: torch.Tensor, pece: bool) -> SaSolverCalls:
    steps, phases, call_sigmas, spans = [], [], [], []
    for i in range(len(sigmas) - 1):
        evaluations = 2 if pece and _orders(sigmas, i, pece)[1] > 0 else 1
        for phase in range(evaluations):
            steps.append(i)
            phases.append(phase)
            call_sigmas.append(sigmas[i])
            spans.append(sigmas[i:i + 2])
    return SaSolverCalls(tuple(steps), tuple(phases), torch.stack(call_sigmas) if call_sigmas else torch.zeros(0),
                         torch.stack(spans) if spans else torch.zeros(0, 2))


def sa_solver_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, k: int, state: State,
                   noise: Noise = None, *, pece: bool, interval: tuple[float, float],
                   calls: SaSolverCalls, half_log_snr: HalfLogSnr = FLOW.half_log_snr) -> tuple[torch.Tensor, State]:
    """After model call ``k`` (on ``x``, with x0 prediction ``denoised``): the corrector of its step, then
    (unless PECE evaluates the corrected latent first) the predictor to the next sigma."""
    i, phase = calls.steps[k], calls.phases[k]
    # the history before step i holds min(i, KEPT); under PipeFusion a call's first patch may already have
    # lengthened the whole state (step_patch), which the later patches of the same call must not read
    history = () if state is None else state[2:2 + min(i, KEPT)]
    preds = (*history, denoised)
    predictor, corrector = _orders(sigmas, i, pece)
    lambdas = half_log_snr(sigmas)  # (steps + 1,) the whole schedule at once, as ComfyUI (inf at sigma 0)
    if phase == 0 and corrector > 0:
        x = _correct(state[0], state[1], preds, sigmas, lambdas, i, corrector, interval)
        if pece:  # the model sees the corrected latent next; its x0 prediction replaces this one
            return x, state[:2 + len(history)]
    return _predict(x, preds, sigmas, lambdas, i, predictor, interval, noise)


def sa_solver_functions(name: str, sigmas: torch.Tensor, model_sampling: PercentToSigma,
                        prediction: Prediction = FLOW) -> tuple[Callable[..., "tuple[torch.Tensor, State]"], SaSolverCalls]:
    """The step after each model call of ``sa_solver`` / ``sa_solver_pece`` over ``sigmas`` (a flow model's
    already offset below sigma 1) for a ``prediction`` model with ``model_sampling``, and the calls."""
    pece = SA_SOLVER_VARIANTS[name]
    calls = sa_solver_calls(sigmas, pece)
    return partial(sa_solver_step, pece=pece, interval=tau_interval(model_sampling), calls=calls,
                   half_log_snr=prediction.half_log_snr), calls
