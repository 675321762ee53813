"""Noise levels (sigmas) for DiTs, computed exactly as ComfyUI computes them.

Model-sampling tables, as ComfyUI's:
- ``FluxShift`` (ComfyUI's ``ModelSamplingFlux``): flux-dev files, constant shift 1.15 by default, or
  the resolution-dependent shift of the ModelSamplingFlux node;
- ``DiscreteFlowShift`` (``ModelSamplingDiscreteFlow``): flux-schnell files, shift 1.0, multiplier 1.0;
  SD3, shift 3.0, multiplier 1000;
- ``DiscreteSchedule`` (``ModelSamplingDiscrete``): the DDPM beta schedules of EPS / v models (PixArt).
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

# KSampler's scheduler list, in ComfyUI's order.
SCHEDULER_NAMES = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                   "linear_quadratic", "kl_optimal")


def _flow_percent_to_sigma(percent: float, sigma_at: Callable[[float], float]) -> float:
    """A flow model's sigma at ``percent`` of the way through sampling (1 at the start, 0 at the end)."""
    if percent <= 0.0:
        return 1.0
    if percent >= 1.0:
        return 0.0
    return sigma_at(1.0 - percent)


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

    def percent_to_sigma(self, percent: float) -> float:
        return _flow_percent_to_sigma(percent, lambda t: self.sigma(t))


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

    def percent_to_sigma(self, percent: float) -> float:
        return _flow_percent_to_sigma(percent, lambda t: t if self.shift == 1.0
                                      else self.shift * t / (1 + (self.shift - 1) * t))


BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")


def beta_schedule(schedule: str, timesteps: int, linear_start: float, linear_end: float,
                  cosine_s: float = 8e-3) -> torch.Tensor:
    """ComfyUI's ``make_beta_schedule``: (timesteps,) float64 betas."""
    if schedule == "linear":
        return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    if schedule == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * numpy.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        return torch.clamp(1 - alphas[1:] / alphas[:-1], min=0, max=0.999)
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    if schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64) ** 0.5
    raise ValueError(f"unknown beta schedule {schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")


ZSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08  # ComfyUI's stand-in for the zero terminal alpha-bar (sigma ~4.5e3)


def zero_terminal_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """ComfyUI's ``rescale_zero_terminal_snr_sigmas`` (Lin et al. 2023, arXiv 2305.08891): sqrt(alpha-bar)
    shifted so the last timestep's is 0 and scaled so the first keeps its value, the last alpha-bar then set
    to a tiny positive number (an infinite sigma would break the schedulers); float64 in and out."""
    alphas_bar_sqrt = (1 / ((sigmas * sigmas) + 1)).sqrt()  # (timesteps,)
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt ** 2
    alphas_bar[-1] = ZSNR_LAST_ALPHA_BAR
    return ((1 - alphas_bar) / alphas_bar) ** 0.5


@dataclass(frozen=True)
class DiscreteSchedule:
    """ComfyUI ``ModelSamplingDiscrete``: sigma_t = sqrt((1 - alphabar_t) / alphabar_t) of a DDPM beta
    schedule, ``timesteps`` entries (sigma_min first); timestep(sigma) is the nearest entry in log sigma,
    sigma(t) interpolates log sigma linearly between entries. ``zsnr``: the schedule rescaled to zero
    terminal SNR (ModelSamplingDiscrete's ``zsnr`` switch)."""

    beta_schedule: str = "linear"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    zsnr: bool = False
    snr_shift: float = 1.0  # CogVideoX's snr_shift_scale s: alpha-bar / (s + (1 - s) alpha-bar), i.e. sigma * sqrt(s)

    def _sigmas64(self) -> torch.Tensor:
        betas = beta_schedule(self.beta_schedule, self.timesteps, self.linear_start, self.linear_end)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # (timesteps,) float64
        if self.snr_shift != 1.0:  # before the zero-SNR rescale, as CogVideoX's schedulers
            sigmas = sigmas * self.snr_shift ** 0.5
        return zero_terminal_snr(sigmas) if self.zsnr else sigmas

    def table(self) -> torch.Tensor:
        return self._sigmas64().float()

    def log_table(self) -> torch.Tensor:
        return self._sigmas64().log().float()  # the log in float64, as ComfyUI's set_sigmas

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        dists = sigma.log() - self.log_table()[:, None]  # (timesteps, *sigma)
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        log_sigmas = self.log_table()
        t = torch.clamp(timestep.float(), min=0, max=(len(log_sigmas) - 1))
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]).exp()

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()


ModelSampling = Union[FluxShift, DiscreteFlowShift, DiscreteSchedule]


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


def _sigma_range(sampling: ModelSampling) -> tuple[float, float]:
    """(sigma_min, sigma_max) of the table as Python floats, as ComfyUI hands them to k-diffusion schedules."""
    table = sampling.table()
    return float(table[0]), float(table[-1])


def _with_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def sgm_uniform_scheduler(sampling: ModelSampling, steps: int) -> torch.Tensor:
    """Uniform in timestep from sigma_max, ``steps`` points out of ``steps + 1`` (SGM's spacing), then 0."""
    table = sampling.table()
    timesteps = torch.linspace(sampling.timestep(table[-1]), sampling.timestep(table[0]), steps + 1)[:-1]
    return torch.FloatTensor([float(sampling.sigma(ts)) for ts in timesteps] + [0.0])


def karras_scheduler(sampling: ModelSampling, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho, then 0."""
    sigma_min, sigma_max = _sigma_range(sampling)
    ramp = torch.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _with_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_scheduler(sampling: ModelSampling, steps: int) -> torch.Tensor:
    """Log-uniform from sigma_max down to sigma_min, then 0."""
    sigma_min, sigma_max = _sigma_range(sampling)
    return _with_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp())


def ddim_uniform_scheduler(sampling: ModelSampling, steps: int) -> torch.Tensor:
    """Every ``len(table) // steps``-th table entry from the second one up, highest first, ending in 0."""
    table = sampling.table()
    if math.isclose(float(table[1]), 0, abs_tol=0.00001):
        steps, sigs = steps + 1, []
    else:
        sigs = [0.0]
    stride = max(len(table) // steps, 1)
    sigs += [float(table[x]) for x in range(1, len(table), stride)]
    return torch.FloatTensor(sigs[::-1])


def linear_quadratic_scheduler(sampling: ModelSampling, steps: int, threshold_noise: float = 0.025) -> torch.Tensor:
    """Mochi's schedule: noise falls linearly to ``threshold_noise`` over the first half of the steps, then
    quadratically to 0; scaled by sigma_max."""
    sigma_max = sampling.table()[-1]
    if steps == 1:
        return torch.FloatTensor([1.0, 0.0]) * sigma_max
    linear = steps // 2
    quadratic = steps - linear
    step_diff = linear - threshold_noise * steps
    quad_coef = step_diff / (linear * quadratic ** 2)
    lin_coef = threshold_noise / linear - 2 * step_diff / (quadratic ** 2)
    const = quad_coef * (linear ** 2)
    noise = ([i * threshold_noise / linear for i in range(linear)]
             + [quad_coef * (i ** 2) + lin_coef * i + const for i in range(linear, steps)] + [1.0])
    return torch.FloatTensor([1.0 - x for x in noise]) * sigma_max


def kl_optimal_scheduler(sampling: ModelSampling, steps: int) -> torch.Tensor:
    """Uniform in arctan(sigma) from sigma_max to sigma_min (the KL-optimal schedule), then 0."""
    if steps < 2:  # the spacing divides by steps - 1 (ComfyUI returns NaN sigmas and a black image)
        raise ValueError("scheduler kl_optimal needs at least 2 steps; raise steps or choose another scheduler")
    sigma_min, sigma_max = _sigma_range(sampling)
    frac = torch.arange(steps, dtype=torch.float).div_(steps - 1)
    sigmas = frac.new_zeros(steps + 1)
    sigmas[:-1] = (frac * math.atan(sigma_min) + (1 - frac) * math.atan(sigma_max)).tan_()
    return sigmas


_SCHEDULERS: dict[str, Callable[[ModelSampling, int], torch.Tensor]] = {
    "simple": simple_scheduler,
    "sgm_uniform": sgm_uniform_scheduler,
    "karras": karras_scheduler,
    "exponential": exponential_scheduler,
    "ddim_uniform": ddim_uniform_scheduler,
    "beta": beta_scheduler,
    "normal": normal_scheduler,
    "linear_quadratic": linear_quadratic_scheduler,
    "kl_optimal": kl_optimal_scheduler,
}
assert tuple(_SCHEDULERS) == SCHEDULER_NAMES


def offset_first_sigma_for_snr(sigmas: torch.Tensor, sampling: ModelSampling,
                               percent_offset: float = 1e-4) -> torch.Tensor:
    """ComfyUI's SDE samplers start just below sigma 1, where a flow model's log-SNR is infinite."""
    if len(sigmas) > 1 and sigmas[0] >= 1:
        sigmas = sigmas.clone()
        sigmas[0] = sampling.percent_to_sigma(percent_offset)
    return sigmas


def scheduler_sigmas(sampling: ModelSampling, scheduler: str, steps: int) -> torch.Tensor:
    try:
        handler = _SCHEDULERS[scheduler]
    except KeyError:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULER_NAMES)}") from None
    return handler(sampling, steps)


def sampling_sigmas(sampling: ModelSampling, scheduler: str, steps: int, denoise: float = 1.0,
                    discard_penultimate: bool = False) -> torch.Tensor:
    """KSampler's sigmas: ``steps + 1`` values; ``denoise < 1`` keeps the tail of a longer schedule.
    ``discard_penultimate`` (dpm_2, uni_pc, ...): each schedule is computed for one more step and its
    second to last sigma dropped, as KSampler does for those samplers."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")

    def schedule(n: int) -> torch.Tensor:
        if not discard_penultimate:
            return scheduler_sigmas(sampling, scheduler, n)
        sigmas = scheduler_sigmas(sampling, scheduler, n + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])

    if denoise > 0.9999:
        return schedule(steps)
    if denoise <= 0.0:
        return torch.FloatTensor([])
    return schedule(int(steps / denoise))[-(steps + 1):]


def step_range(sigmas: torch.Tensor, start_step: int = 0, end_step: int | None = None,
               full_denoise: bool = True) -> torch.Tensor:
    """KSamplerAdvanced's part of a schedule: sigmas of steps ``[start_step, end_step)``, as KSampler's ``sample``
    cuts them. An ``end_step`` before the schedule's end keeps that step's sigma (leftover noise) unless
    ``full_denoise`` (its return_with_leftover_noise disabled) sets it to 0; an empty range (start at or past the
    end) gives no sigmas, and then the latent comes back as given."""
    if end_step is not None and end_step < len(sigmas) - 1:
        sigmas = sigmas[:end_step + 1].clone()  # (end_step + 1,)
        if full_denoise:
            sigmas[-1] = 0.0
    if start_step >= len(sigmas) - 1:
        return sigmas[:0]
    return sigmas[start_step:]
