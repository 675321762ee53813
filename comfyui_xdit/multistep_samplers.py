"""The linear multistep samplers ComfyUI runs on every model alike: ``ipndm``, ``ipndm_v``, ``lms``, ``deis``.

Each keeps its last derivatives in ``state`` (oldest first; see ``ipndm_step`` for how a step reads only
the history before it, which PipeFusion's patches rely on) and follows ComfyUI's loop operation by
operation, so the results match bit for bit (``lms``'s weights to ~1e-7, see ``_lms_coeff``).
"""

from __future__ import annotations

import numpy
import torch

from .sampler_types import SamplerState, StepNoise


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
