"""UniPC (arXiv 2302.04867) as ComfyUI's ``uni_pc`` / ``uni_pc_bh2`` run it on a flow model.

ComfyUI's ``comfy/extra_samplers/uni_pc.py`` treats each sigma as a variance-preserving time:
alpha = 1 / sqrt(1 + sigma^2), and samples ``x_vp = x / sqrt(1 + sigma_0^2)``; each model call sees
``x_vp * sqrt(1 + sigma^2)`` and its x0 is turned into noise and back into a data prediction ``m``.
A step is a multistep predictor (from the corrected latent and the last ``m``s) and, after the model has
seen the predicted latent, a corrector that reuses that same model output. So there is one model call
per step, and the call of step ``j`` happens between step ``j``'s predictor and its corrector.

Here the step after call ``k`` does the corrector for sigma ``k``, then the predictor for sigma ``k + 1``,
and returns the next model input. The state is ``(x_corrected, x_predicted, m_oldest, ..., m_newest)``,
each shaped like ``x`` (B, N, C); every operation is elementwise in ``x`` except a weighted sum over the
history (``tensordot`` over the history axis, the same per element for any slice of tokens), so the step
runs on patches as on the whole latent. ComfyUI steps to sigma 0.001 instead of 0 and leaves that value in
its schedule (its inverse noise scaling then divides by 1 - 0.001); ``uni_pc_sigmas`` does the same. The
arithmetic follows ComfyUI's ``multistep_uni_pc_bh_update`` operation by operation on float32 tensors.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch

State = Optional[tuple[torch.Tensor, ...]]

UNI_PC_VARIANTS = {"uni_pc": "bh1", "uni_pc_bh2": "bh2"}
MAX_ORDER = 3  # ComfyUI's order: min(3, steps - 1)
FINAL_SIGMA = 0.001  # ComfyUI steps to this sigma where the schedule ends at 0


def uni_pc_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """The schedule UniPC steps on: a final 0 becomes 0.001, as ComfyUI writes into its sigmas."""
    if len(sigmas) == 0 or sigmas[-1] != 0:
        return sigmas
    out = sigmas.clone()
    out[-1] = FINAL_SIGMA
    return out


def _log_alpha(sigma: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.log(1 / ((sigma * sigma) + 1))


def _alpha(sigma: torch.Tensor) -> torch.Tensor:
    return torch.exp(_log_alpha(sigma))


def _std(sigma: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(1. - torch.exp(2. * _log_alpha(sigma)))


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    log_alpha = _log_alpha(sigma)
    return log_alpha - 0.5 * torch.log(1. - torch.exp(2. * log_alpha))


def _input_scale(sigma: torch.Tensor) -> torch.Tensor:
    """What the VP latent is multiplied by before the model sees it (ComfyUI's ``predict_eps_sigma``)."""
    return (sigma ** 2 + 1.0) ** 0.5


def _max_order(sigmas: torch.Tensor) -> int:
    return min(MAX_ORDER, len(sigmas) - 2)


def _step_order(sigmas: torch.Tensor, j: int) -> int:
    """The order of the update to sigma ``j``: rising from 1 while the history fills, then lowered again
    near the end (ComfyUI's ``lower_order_final``)."""
    order, steps = _max_order(sigmas), len(sigmas) - 1
    return j if j < order else min(order, steps + 1 - j)


def _update(x: torch.Tensor, history: tuple[torch.Tensor, ...], sigmas: torch.Tensor, j: int, order: int,
            variant: str, model_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The update from the corrected latent at sigma ``j - 1`` to sigma ``j``: the predictor, or with
    ``model_t`` (the data prediction at the predicted latent) the corrector. ``history`` ends with the data
    prediction at sigma ``j - 1``; the one ``i`` back belongs to sigma ``j - 1 - i``."""
    t, t_prev_0 = sigmas[j], sigmas[j - 1]
    lambda_prev_0, lambda_t = _lambda(t_prev_0), _lambda(t)
    model_prev_0 = history[-1]
    sigma_prev_0, sigma_t = _std(t_prev_0), _std(t)
    alpha_t = torch.exp(_log_alpha(t))
    h = lambda_t - lambda_prev_0

    rks, d1s = [], []
    for i in range(1, order):
        rk = (_lambda(sigmas[j - 1 - i]) - lambda_prev_0) / h
        rks.append(rk)
        d1s.append((history[-(i + 1)] - model_prev_0) / rk)
    rks = torch.tensor([float(rk) for rk in rks] + [1.0])

    hh = -h  # data prediction
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    r_matrix = torch.stack(rows)  # (order, order)
    b = torch.tensor([float(v) for v in b])

    diffs = torch.stack(d1s, dim=1) if d1s else None  # (B, order - 1, N, C)
    x_t_ = (sigma_t / sigma_prev_0) * x - (alpha_t * h_phi_1) * model_prev_0
    if model_t is None:  # the predictor
        if diffs is not None:
            rhos_p = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(r_matrix[:-1, :-1], b[:-1])
            pred_res = torch.tensordot(diffs, rhos_p, dims=([1], [0]))  # (B, K, N, C) . (K,) -> (B, N, C)
        else:
            pred_res = 0
        return x_t_ - (alpha_t * b_h) * pred_res
    rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(r_matrix, b)
    corr_res = torch.tensordot(diffs, rhos_c[:-1], dims=([1], [0])) if diffs is not None else 0  # -> (B, N, C)
    d1_t = model_t - model_prev_0
    return x_t_ - (alpha_t * b_h) * (corr_res + rhos_c[-1] * d1_t)


def uni_pc_start(x: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, State]:
    """The first model input and state from the noised latent: ComfyUI divides it into the VP latent and
    the model sees that scaled back (not bit-equal to the noised latent)."""
    x_vp = x / torch.sqrt(1.0 + sigmas[0] ** 2.0)
    return x_vp * _input_scale(sigmas[0]), (x_vp, x_vp.clone())


def uni_pc_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int, state: State,
                noise: Optional[Callable[[], torch.Tensor]] = None, *, variant: str) -> tuple[torch.Tensor, State]:
    """After model call ``i`` (at sigma ``i``, on ``x``, the predicted latent scaled for the model): the
    corrector for sigma ``i`` and the predictor for sigma ``i + 1``; after the last call, the result."""
    kept = max(_max_order(sigmas), 1)  # data predictions kept in the history
    # the history before call i holds min(i, kept); under PipeFusion a call's first patch may already have
    # lengthened the whole state (step_patch), which the later patches of the same call must not read
    x_corrected, x_predicted = state[:2]
    history = state[2:2 + min(i, kept)]
    sigma = sigmas[i]
    eps = (x - denoised) / sigma
    model_t = (x_predicted - _std(sigma) * eps) / _alpha(sigma)  # the data prediction
    if i > 0:
        x_corrected = _update(x_corrected, history, sigmas, i, _step_order(sigmas, i), variant, model_t)
    history = (*history, model_t)[-kept:]
    steps = len(sigmas) - 1
    if i == steps - 1:  # the last step's update is a first-order predictor (none with one step)
        x_final = _update(x_corrected, history, sigmas, steps, 1, variant) if steps > 1 else x_corrected
        return x_final / _alpha(sigmas[-1]), None
    x_next = _update(x_corrected, history, sigmas, i + 1, _step_order(sigmas, i + 1), variant)
    return x_next * _input_scale(sigmas[i + 1]), (x_corrected, x_next, *history)


def uni_pc_functions(name: str, sigmas: torch.Tensor) -> tuple[Callable[..., "tuple[torch.Tensor, State]"],
                                                               Callable[[torch.Tensor], "tuple[torch.Tensor, State]"]]:
    """The step and the start of ``uni_pc`` / ``uni_pc_bh2`` over ``sigmas`` (already ``uni_pc_sigmas``)."""
    return partial(uni_pc_step, variant=UNI_PC_VARIANTS[name]), partial(uni_pc_start, sigmas=sigmas)
