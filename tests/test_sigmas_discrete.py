"""The discrete DDPM model sampling of EPS models (ComfyUI's ModelSamplingDiscrete): its table, timestep(sigma),
sigma(timestep), percent_to_sigma and every scheduler's sigmas bit-equal to ComfyUI's, with and without zsnr;
the EPS prediction's scalings bit-equal to ComfyUI's EPS."""

from __future__ import annotations

import pytest
import torch

from comfyui_xdit.prediction import EPS, FLOW, V, max_denoise
from comfyui_xdit.sigmas import SCHEDULER_NAMES, DiscreteSchedule, beta_schedule, sampling_sigmas

from comfy_reference import import_comfy

PIXART = DiscreteSchedule(beta_schedule="sqrt_linear", linear_start=0.0001, linear_end=0.02)  # PixArt alpha/sigma
SD15 = DiscreteSchedule()  # ComfyUI's defaults: linear 0.00085 .. 0.012
SCHEDULES = {"pixart": PIXART, "sd15": SD15, "cosine": DiscreteSchedule(beta_schedule="cosine"),
             "sqrt": DiscreteSchedule(beta_schedule="sqrt", linear_start=0.0001, linear_end=0.02),
             # ModelSamplingDiscrete's zsnr: the schedule rescaled to zero terminal SNR (sigma_max ~4.5e3 for PixArt)
             "pixart-zsnr": DiscreteSchedule(beta_schedule="sqrt_linear", linear_start=0.0001, linear_end=0.02,
                                             zsnr=True),
             "sd15-zsnr": DiscreteSchedule(zsnr=True)}


def _comfy_sampling(schedule: DiscreteSchedule, kind: str = "eps"):
    ms = import_comfy("comfy.model_sampling")
    settings = {"beta_schedule": schedule.beta_schedule, "linear_start": schedule.linear_start,
                "linear_end": schedule.linear_end, "timesteps": schedule.timesteps}
    config = type("Config", (), {"sampling_settings": settings})()
    base = {"eps": ms.EPS, "v": ms.V_PREDICTION}[kind]
    return type("Sampling", (ms.ModelSamplingDiscrete, base), {})(config, zsnr=schedule.zsnr)


class _FakePatcher:
    def __init__(self, sampling):
        self.sampling = sampling

    def get_model_object(self, name):
        assert name == "model_sampling"
        return self.sampling


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_table_timestep_sigma_and_percent_equal_comfyui(name):
    ours, theirs = SCHEDULES[name], _comfy_sampling(SCHEDULES[name])
    assert torch.equal(ours.table(), theirs.sigmas) and torch.equal(ours.log_table(), theirs.log_sigmas)
    sigma = torch.tensor([0.03, 0.5, 1.0, 7.3, 14.6, 80.0, 200.0])
    assert torch.equal(ours.timestep(sigma), theirs.timestep(sigma))
    assert torch.equal(ours.timestep(ours.table()[-1]), theirs.timestep(theirs.sigma_max))
    timestep = torch.tensor([0.0, 0.5, 17.25, 500.0, 998.9, 999.0, 1200.0])
    assert torch.equal(ours.sigma(timestep), theirs.sigma(timestep))
    for percent in (-1.0, 0.0, 1e-4, 0.2, 0.5, 0.8, 1.0):
        assert ours.percent_to_sigma(percent) == theirs.percent_to_sigma(percent)


@pytest.mark.parametrize("name", ["pixart", "sd15", "pixart-zsnr"])
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps,denoise", [(1, 1.0), (4, 1.0), (20, 1.0), (7, 0.6), (4, 0.25)])
@pytest.mark.parametrize("discard", [False, True])
def test_every_scheduler_equals_comfyui_ksampler(name, scheduler, steps, denoise, discard):
    samplers = import_comfy("comfy.samplers")
    ours_sampling = SCHEDULES[name]
    if scheduler == "kl_optimal" and int(steps / denoise) + discard < 2:  # ComfyUI divides by zero: NaN sigmas
        with pytest.raises(ValueError, match="kl_optimal needs at least 2 steps"):
            sampling_sigmas(ours_sampling, scheduler, steps, denoise, discard_penultimate=discard)
        return
    theirs = samplers.KSampler(_FakePatcher(_comfy_sampling(ours_sampling)), steps=steps, device="cpu",
                               sampler="dpm_2" if discard else "euler", scheduler=scheduler, denoise=denoise).sigmas
    ours = sampling_sigmas(ours_sampling, scheduler, steps, denoise, discard_penultimate=discard)
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs), (ours, theirs)


def test_unknown_beta_schedule_names_the_choices():
    with pytest.raises(ValueError, match="linear, cosine, sqrt_linear, sqrt"):
        beta_schedule("squaredcos", 1000, 0.1, 0.2)


@pytest.mark.parametrize("kind,ours", [("eps", EPS), ("v", V)])
def test_eps_and_v_scalings_equal_comfyui(kind, ours):
    theirs = _comfy_sampling(PIXART, kind)
    g = torch.Generator().manual_seed(0)
    x, out, noise, latent = (torch.randn(2, 4, 6, 6, generator=g) for _ in range(4))
    for sigma in (torch.tensor(0.7), PIXART.table()[-1], torch.tensor(3.2)):
        batch = sigma * x.new_ones(2)  # ComfyUI sees the sigma of each image
        assert torch.equal(ours.model_input(x, sigma), theirs.calculate_input(batch, x))
        assert torch.equal(ours.denoised(x, sigma, out), theirs.calculate_denoised(batch, out, x))
        for full in (False, True):
            assert torch.equal(ours.noise_scaling(sigma, noise, latent, full),
                               theirs.noise_scaling(sigma, noise.clone(), latent, full))
        assert torch.equal(ours.inverse_noise_scaling(sigma, x), theirs.inverse_noise_scaling(sigma, x))


def test_max_denoise_is_ksamplers():
    sigma_max = float(PIXART.table()[-1])
    full = sampling_sigmas(PIXART, "normal", 5)
    assert max_denoise(sigma_max, full) and not max_denoise(sigma_max, sampling_sigmas(PIXART, "normal", 5, 0.6))
    assert not max_denoise(sigma_max, torch.FloatTensor([]))
    assert FLOW.is_flow and not EPS.is_flow and not V.is_flow
