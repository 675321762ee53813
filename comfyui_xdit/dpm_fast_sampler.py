"""DPM-Solver-Fast (arXiv 2206.00927) as ComfyUI's ``dpm_fast`` runs it, one model call at a time.

ComfyUI's ``ksampler("dpm_fast")`` hands k-diffusion's ``DPMSolver.dpm_solver_fast`` (eta 0) the range from
``sigma_max = sigmas[0]`` to ``sigma_min = sigmas[-1]`` (``sigmas[-2]`` where the schedule ends at 0) and
``n = len(sigmas) - 1`` model evaluations. The solver ignores the schedule's other sigmas: it steps on its
own grid, ``m = n // 3 + 1`` equal steps in ``t = -log(sigma)``, of orders 3, ..., 3 then ``n % 3`` (or
2, 1 where ``n % 3 == 0``), so it makes exactly ``n`` model calls. An order-``o`` step calls the model at
``t`` and at ``o - 1`` intermediate times, each on a latent built from the step's start and its first eps;
the step's result is the next step's first model input. The latent is treated as variance-exploding
(``eps = (x - x0) / sigma``), so the model sees ``x`` unscaled, at ``sigma = exp(-t)``.

Here call ``k`` is one item: after it, the step returns the next model input (the result after the last
call); ``state`` is ``(x_start, eps)``, the step's starting latent and its first eps, each shaped like ``x``
(B, N, C). Every operation is elementwise in ``x``, so the step runs on patches as on the whole latent. The
arithmetic follows ``dpm_solver_1_step`` / ``_2_step`` / ``_3_step`` operation by operation on float32
0-dim tensors. With eta 0 ComfyUI adds ``0. * noise`` after each step (it still draws that noise from its
default noise sampler); the draw cannot change the result, so none is drawn here. The user's steps are the
``n`` model calls (ComfyUI's progress bar counts them too), so ``call_steps`` numbers the calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch

State = Optional[tuple[torch.Tensor, ...]]

R1_ORDER_2 = 1 / 2  # dpm_solver_2_step's r1
R1_ORDER_3, R2_ORDER_3 = 1 / 3, 2 / 3  # dpm_solver_3_step's r1, r2


def _t(sigma: torch.Tensor) -> torch.Tensor:
    return -sigma.log()


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


@dataclass(frozen=True)
class DpmFastGrid:
    """The solver's own time grid over a schedule: step ``i`` goes from ``ts[i]`` to ``ts[i + 1]`` with
    order ``orders[i]``; model call ``k`` is phase ``phases[k]`` of step ``steps[k]``, at ``call_sigmas[k]``."""

    ts: torch.Tensor  # (m + 1,) float32
    orders: tuple[int, ...]  # (m,)
    steps: tuple[int, ...]  # (calls,)
    phases: tuple[int, ...]  # (calls,)
    call_sigmas: torch.Tensor  # (calls,) float32: exactly the sigmas ComfyUI's solver passes to the model
    noise_spans: torch.Tensor  # (calls, 2) float32: each call's step, sigma(ts[i]) to sigma(ts[i + 1])


def _intermediate_times(t: torch.Tensor, t_next: torch.Tensor, order: int) -> tuple[torch.Tensor, ...]:
    """The times of an order-``order`` step's calls after the first (its ``s1``, ``s2``), as ComfyUI's
    ``dpm_solver_{order}_step`` computes them."""
    h = t_next - t
    if order == 2:
        return (t + R1_ORDER_2 * h,)
    if order == 3:
        return t + R1_ORDER_3 * h, t + R2_ORDER_3 * h
    return ()


def dpm_fast_grid(sigmas: torch.Tensor) -> DpmFastGrid:
    """ComfyUI's ``dpm_fast_function`` and ``dpm_solver_fast`` grid for the schedule ``sigmas``; no calls for
    a schedule of at most one sigma (ComfyUI returns the noised latent as it is)."""
    if len(sigmas) <= 1:
        return DpmFastGrid(torch.zeros(0), (), (), (), torch.zeros(0), torch.zeros(0, 2))
    sigma_min, sigma_max = sigmas[-1], sigmas[0]
    if sigma_min == 0:
        sigma_min = sigmas[-2]
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("dpm_fast: sigma_min and sigma_max must not be 0 (ComfyUI refuses this schedule too)")
    nfe = len(sigmas) - 1
    m = math.floor(nfe / 3) + 1
    ts = torch.linspace(_t(sigma_max.detach().clone()), _t(sigma_min.detach().clone()), m + 1)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    steps, phases, call_sigmas, spans = [], [], [], []
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        for phase, time in enumerate((t, *_intermediate_times(t, t_next, order))):
            steps.append(i)
            phases.append(phase)
            call_sigmas.append(_sigma(time))
            spans.append(torch.stack([_sigma(t), _sigma(t_next)]))
    return DpmFastGrid(ts, tuple(orders), tuple(steps), tuple(phases), torch.stack(call_sigmas), torch.stack(spans))


def dpm_fast_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, k: int, state: State,
                  noise: Optional[Callable[[], torch.Tensor]] = None, *,
                  grid: DpmFastGrid) -> tuple[torch.Tensor, State]:
    """After model call ``k`` (on ``x``, the model's input, with x0 prediction ``denoised``): the next
    intermediate latent of the step, or the step's result. ``sigmas`` is unused: the grid was built from it."""
    i, phase = grid.steps[k], grid.phases[k]
    order = grid.orders[i]
    t, t_next = grid.ts[i], grid.ts[i + 1]
    h = t_next - t
    times = _intermediate_times(t, t_next, order)
    eps_now = (x - denoised) / _sigma((t, *times)[phase])  # DPMSolver.eps
    if phase == 0:
        x_start, eps = x, eps_now
        if order == 1:
            return x - _sigma(t_next) * h.expm1() * eps, None
        r1 = R1_ORDER_2 if order == 2 else R1_ORDER_3
        return x - _sigma(times[0]) * (r1 * h).expm1() * eps, (x_start, eps)
    x_start, eps = state
    if order == 2:  # phase 1: eps_r1
        r1 = R1_ORDER_2
        return (x_start - _sigma(t_next) * h.expm1() * eps
                - _sigma(t_next) / (2 * r1) * h.expm1() * (eps_now - eps)), None
    r1, r2 = R1_ORDER_3, R2_ORDER_3
    if phase == 1:  # eps_r1: the input of the third call
        s2 = times[1]
        return (x_start - _sigma(s2) * (r2 * h).expm1() * eps
                - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_now - eps)), (x_start, eps)
    return (x_start - _sigma(t_next) * h.expm1() * eps
            - _sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_now - eps)), None  # eps_r2: the step's result


def dpm_fast_functions(sigmas: torch.Tensor) -> tuple[Callable[..., "tuple[torch.Tensor, State]"], DpmFastGrid]:
    """The step after each model call of ``dpm_fast`` over the schedule ``sigmas``, and its grid."""
    grid = dpm_fast_grid(sigmas)
    return partial(dpm_fast_step, grid=grid), grid
