"""Noise levels (sigmas) for flow-matching DiTs, computed exactly as ComfyUI computes them.

Two model-sampling tables exist for Flux in ComfyUI:
- ``FluxShift`` (ComfyUI's ``ModelSamplingFlux``): flux-dev files, constant shift 1.15 by default, or
  the resolution-dependent shift of the ModelSamplingFlux node;
- ``DiscreteFlowShift`` (``ModelSamplingDiscreteFlow``): flux-schnell files, shift 1.0, multiplier 1.0.
Schedulers turn a table into ``steps + 1`` sigmas ending in 0. Every formula keeps ComfyUI's float32
tensor arithmetic and order of operations so the numbers match bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import numpy
import scipy.stats
import torch

SCHEDULER_NAMES = ("simple", "normal", "beta")


@dataclass(frozen=True)
class FluxShift:
    """ComfyUI ``ModelSamplingFlux``: sigma(t) = e^mu / (e^mu + (1/t - 1)), 10000 table entries."""

    shift: float = 1.15
    table_size: int = 10000

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return math.exp(self.shift) / (math.exp(self.shift) + (1 / t - 1) ** 1.0)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def table(self) -> torch.Tensor:
        return self.sigma(torch.arange(1, self.table_size + 1, 1) / self.table_size)


@dataclass(frozen=True)
class DiscreteFlowShift:
    """ComfyUI ``ModelSamplingDiscreteFlow``: sigma(t) = shift*t / (1 + (shift-1)*t), t = ts/multiplier."""

    shift: float = 1.0
    multiplier: float = 1.0
    table_size: int = 1000

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        t = timestep / self.multiplier
        if self.shift == 1.0:
            return t
        return self.shift * t / (1 + (self.shift - 1) * t)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.multiplier

    def table(self) -> torch.Tensor:
        return self.sigma((torch.arange(1, self.table_size + 1, 1) / self.table_size) * self.multiplier)


ModelSampling = Union[FluxShift, DiscreteFlowShift]


def resolution_shift(max_shift: float, base_shift: float, width: int, height: int) -> float:
    """The shift of ComfyUI's ModelSamplingFlux node: linear in the number of 2x2 latent patches."""
    x1, x2 = 256, 4096
    mm = (max_shift - base_shift) / (x2 - x1)
    b = base_shift - mm * x1
    return (width * height / (8 * 8 * 2 * 2)) * mm + b


def simple_scheduler(sampling: ModelSampling, steps: int) -> torch.Tensor:
    table = sampling.table()
    stride = len(table) / steps
    sigs = [float(table[-(1 + int(x * stride))]) for x in range(steps)]
    return torch.FloatTensor(sigs + [0.0])


def normal_scheduler(sampling: ModelSampling, steps: int) -> torch.Tensor:
    table = sampling.table()
    start = sampling.timestep(table[-1])
    end = sampling.timestep(table[0])
    append_zero = True
    if math.isclose(float(sampling.sigma(end)), 0, abs_tol=0.00001):
        steps += 1
        append_zero = False
    timesteps = torch.linspace(start, end, steps)
    sigs = [float(sampling.sigma(ts)) for ts in timesteps]
    if append_zero:
        sigs.append(0.0)
    return torch.FloatTensor(sigs)


def beta_scheduler(sampling: ModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    table = sampling.table()
    total_timesteps = len(table) - 1
    ts = 1 - numpy.linspace(0, 1, steps, endpoint=False)
    ts = numpy.rint(scipy.stats.beta.ppf(ts, alpha, beta) * total_timesteps)
    sigs: list[float] = []
    last_t = -1
    for t in ts:
        if t != last_t:
            sigs.append(float(table[int(t)]))
        last_t = t
    sigs.append(0.0)
    return torch.FloatTensor(sigs)


_SCHEDULERS: dict[str, Callable[[ModelSampling, int], torch.Tensor]] = {
    "simple": simple_scheduler,
    "normal": normal_scheduler,
    "beta": beta_scheduler,
}


def scheduler_sigmas(sampling: ModelSampling, scheduler: str, steps: int) -> torch.Tensor:
    try:
        handler = _SCHEDULERS[scheduler]
    except KeyError:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULER_NAMES)}") from None
    return handler(sampling, steps)


def sampling_sigmas(sampling: ModelSampling, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """KSampler's sigmas: ``steps + 1`` values; ``denoise < 1`` keeps the tail of a longer schedule."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if denoise > 0.9999:
        return scheduler_sigmas(sampling, scheduler, steps)
    if denoise <= 0.0:
        return torch.FloatTensor([])
    longer = scheduler_sigmas(sampling, scheduler, int(steps / denoise))
    return longer[-(steps + 1):]
