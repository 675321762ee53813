"""Samplers that call the model more than once per step (heun, heunpp2, dpm_2, dpm_2_ancestral,
dpmpp_2s_ancestral(_cfg_pp), dpmpp_sde, seeds_2, seeds_3), run as a sequence of single model calls.

ComfyUI's k-diffusion loops evaluate the model at an intermediate point inside a step. Here every model
call is its own item: the loop keeps ``x`` as the next *model input* and, after each call, a phase
function turns ``(x, denoised)`` into the next model input, keeping what the step needs later (the
step's starting latent, earlier derivatives) in ``state``, a tuple of tensors shaped like ``x``. So the
loops (serial, sequence and CFG parallel, PipeFusion where each call is one pipeline step) stay
one-call-per-item and every operation stays elementwise in ``x``.

The samplers live by kind (``heun_samplers``, ``ancestral_multi_call``, ``sde_multi_call``); where
ComfyUI's code asks the model sampling (``CONST`` or not, its half log-SNR), they take the model's
``Prediction``. This module lays a run's calls out and dispatches each to its phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch

from .ancestral_multi_call import ancestral_multi_call
from .heun_samplers import ODE_MULTI_CALL
from .prediction import FLOW, Prediction
from .sampler_types import CallsOf, Phase, SamplerState, StepNoise
from .sde_multi_call import SEEDS_STAGES, sde_multi_call

__all__ = ["MULTI_CALL_SAMPLERS", "SEEDS_STAGES", "CallSchedule", "call_schedule", "multi_call_step"]


def _multi_call(prediction: Prediction) -> dict[str, tuple[CallsOf, Phase]]:
    """Every multi-call sampler's (calls, phase) for a ``prediction`` model."""
    return {**ODE_MULTI_CALL, **ancestral_multi_call(prediction), **sde_multi_call(prediction)}


MULTI_CALL_SAMPLERS = tuple(_multi_call(FLOW))


@dataclass(frozen=True)
class CallSchedule:
    """Every model call of a run, in order: its step, its phase within the step, its sigma and the
    Brownian interval of the noise drawn after it."""

    steps: tuple[int, ...]
    phases: tuple[int, ...]
    sigmas: torch.Tensor  # (calls,) float32
    noise_spans: torch.Tensor  # (calls, 2) float32


def call_schedule(name: str, sigmas: torch.Tensor, prediction: Prediction = FLOW) -> CallSchedule:
    plan_step = _multi_call(prediction)[name][0]
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


def _call_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, k: int, state: SamplerState,
               noise: StepNoise = None, uncond: Optional[torch.Tensor] = None, *, phase_fn: Phase,
               schedule: CallSchedule) -> tuple[torch.Tensor, SamplerState]:
    return phase_fn(x, denoised, sigmas, schedule.steps[k], schedule.phases[k], state, noise, uncond)


def multi_call_step(name: str, schedule: CallSchedule,
                    prediction: Prediction = FLOW) -> Callable[..., "tuple[torch.Tensor, SamplerState]"]:
    """The sampler's step for model call ``k``: ``(x, denoised, sigmas, k, state, noise)``, as a one-call
    sampler's step is for step ``k``; ``schedule`` is ``call_schedule`` of the same name and prediction."""
    return partial(_call_step, phase_fn=_multi_call(prediction)[name][1], schedule=schedule)
