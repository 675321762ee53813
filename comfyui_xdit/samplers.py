"""The samplers by name, as ComfyUI's KSampler lists them, and how each runs over a schedule.

A step maps ``(x, denoised, sigmas, i, state) -> (x_next, state_next)`` (``sampler_types``). Every operation is
elementwise in ``x``, and ``state`` is a tuple of tensors of ``x``'s shape (a multistep method's history),
so a step can be applied to the whole latent or to one patch of it (a slice of ``x``, ``denoised`` and
each state tensor) with identical numbers; PipeFusion relies on that. The steps live by kind
(``ode_samplers``, ``multistep_samplers``, ``ancestral_samplers``, ``sde_samplers``, ``cfg_pp_samplers``, the
multi-call ones in ``multi_call_samplers``, and ``dpm_fast``, UniPC and SA-Solver in their own modules); each
follows ComfyUI's k-diffusion loop operation by operation on float32 0-dim sigma tensors, so the results
match bit for bit. Where ComfyUI's code asks the model sampling (``isinstance(model_sampling, CONST)``, its
half log-SNR, its noise scaling), the step is built for the model's ``Prediction``; nothing here asks
which family a model is.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping, Optional

import torch

from .ancestral_samplers import (ancestral_step, ancestral_steps, ddpm_step, euler_ancestral_eps_step,
                                 euler_ancestral_step, lcm_step, res_multistep_ancestral_step)
from .cfg_pp_samplers import CFG_PP_EPS_FORMS, CFG_PP_NOISE, CFG_PP_STEPS
from .dpm_fast_sampler import dpm_fast_functions
from .multi_call_samplers import MULTI_CALL_SAMPLERS, call_schedule, multi_call_step
from .multistep_samplers import _lms_coeff, deis_step, ipndm_step, ipndm_v_step, lms_step
from .ode_samplers import dpmpp_2m_step, euler_step, gradient_estimation_step, res_multistep_step
from .prediction import FLOW, Prediction
from .sa_solver_sampler import SA_SOLVER_VARIANTS, PercentToSigma, sa_solver_functions
from .sampler_types import SamplerState, SamplerStep, StepNoise
from .sde_samplers import dpmpp_2m_sde_heun_step, dpmpp_2m_sde_step, dpmpp_3m_sde_step, er_sde_step, sde_steps
from .uni_pc_sampler import UNI_PC_VARIANTS, uni_pc_functions

__all__ = [  # what other modules and the tests import from here
    "SAMPLER_NAMES", "NOISE_SAMPLERS", "CFG_PP_SAMPLERS", "DEVICE_TREE_SAMPLERS", "BROWNIAN_SAMPLERS",
    "SNR_OFFSET_SAMPLERS", "DISCARD_PENULTIMATE_SIGMA_SAMPLERS", "FLOW_ONLY_SAMPLERS", "SamplerState", "StepNoise",
    "SamplerStep", "SamplerProgram", "samplers_for", "check_sampler", "sampler_step", "sampler_program", "step_patch",
    "ancestral_step", "ddpm_step", "deis_step", "dpmpp_2m_sde_heun_step", "dpmpp_2m_sde_step", "dpmpp_2m_step",
    "dpmpp_3m_sde_step", "er_sde_step", "euler_ancestral_eps_step", "euler_ancestral_step", "euler_step",
    "gradient_estimation_step", "ipndm_step", "ipndm_v_step", "lcm_step", "lms_step", "_lms_coeff",
    "res_multistep_ancestral_step", "res_multistep_step",
]

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


# ComfyUI's "ddim" is its euler sampler whose inpainting re-noises the kept latent with its own draw
# (prepare_plan builds that), so its step is euler's.
_ODE_STEPS: dict[str, SamplerStep] = {
    "euler": euler_step, "ddim": euler_step, "dpmpp_2m": dpmpp_2m_step, "res_multistep": res_multistep_step,
    "gradient_estimation": gradient_estimation_step, "ipndm": ipndm_step, "ipndm_v": ipndm_v_step, "lms": lms_step,
    "deis": deis_step}


def _one_call_steps(prediction: Prediction) -> dict[str, SamplerStep]:
    """Every one-call sampler's step for a ``prediction`` model (the flow or the other form where ComfyUI's
    code branches on the model sampling), the _gpu variants included."""
    steps = {**_ODE_STEPS, **ancestral_steps(prediction), **sde_steps(prediction), **CFG_PP_STEPS}
    if not prediction.is_flow:
        steps.update(CFG_PP_EPS_FORMS)
    steps.update({name: steps[base] for name, base in DEVICE_TREE_SAMPLERS.items() if base in steps})
    return steps


# Samplers that do not run on a model of some prediction, by prediction name; none today: every sampler of
# ComfyUI's list (but dpm_adaptive, which xDiT does not offer) has its flow and its EPS / v form here.
UNAVAILABLE: Mapping[str, frozenset[str]] = MappingProxyType({})
FLOW_ONLY_SAMPLERS: frozenset[str] = frozenset()  # kept for importers: no sampler is flow-only any more


def samplers_for(prediction: Prediction) -> tuple[str, ...]:
    """The sampler names (in ComfyUI's order) that run, equal to ComfyUI, on a model of ``prediction``."""
    refused = UNAVAILABLE.get(prediction.name, frozenset())
    return tuple(name for name in SAMPLER_NAMES if name not in refused)


def check_sampler(name: str, prediction: Prediction) -> None:
    """``ValueError`` naming the samplers that work when ``name`` does not run on a ``prediction`` model."""
    if name in SAMPLER_NAMES and name not in samplers_for(prediction):
        raise ValueError(f"sampler {name!r} is not available for this {prediction.name.upper()}-prediction model; "
                         f"choose one of {', '.join(samplers_for(prediction))}")


def sampler_step(name: str, prediction: Prediction = FLOW) -> SamplerStep:
    """The step of a one-call sampler (model call ``i`` is step ``i``) for a ``prediction`` model; see
    ``sampler_program`` for all."""
    check_sampler(name, prediction)
    try:
        return _one_call_steps(prediction)[name]
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
        schedule = call_schedule(name, sigmas, prediction)
        return SamplerProgram(multi_call_step(name, schedule, prediction), schedule.sigmas, schedule.noise_spans,
                              schedule.steps, needs_uncond)
    if name == "dpm_fast":  # its own grid in log sigma: n model calls, each counted as one of the n steps
        step, grid = dpm_fast_functions(sigmas)
        return SamplerProgram(step, grid.call_sigmas, grid.noise_spans, tuple(range(len(grid.call_sigmas))),
                              needs_uncond)
    if name in SA_SOLVER_VARIANTS:  # one model call a step; PECE's second at the corrected latent
        if model_sampling is None:
            raise ValueError(f"sampler {name!r} needs the model's sampling (its stochastic interval is in "
                             f"percents of it)")
        step, calls = sa_solver_functions(name, sigmas, model_sampling, prediction)
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
