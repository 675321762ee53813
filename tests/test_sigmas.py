"""Sigmas against hand-computed values and against ComfyUI's own schedulers and model sampling."""

import math

import pytest
import torch

from comfyui_xdit.sigmas import (SCHEDULER_NAMES, DiscreteFlowShift, FluxShift, resolution_shift, sampling_sigmas,
                                 scheduler_sigmas)

from comfy_reference import import_comfy


def test_resolution_shift_endpoints():
    # ModelSamplingFlux interpolates base_shift at 256 patches (256x256 px) to max_shift at 4096 (1024x1024).
    assert resolution_shift(1.15, 0.5, 256, 256) == pytest.approx(0.5)
    assert resolution_shift(1.15, 0.5, 1024, 1024) == pytest.approx(1.15)
    assert resolution_shift(1.15, 0.5, 512, 512) == pytest.approx(0.5 + (1024 - 256) * 0.65 / 3840)


def test_flux_shift_formula_and_simple_schedule_by_hand():
    s = FluxShift(1.15)
    t = torch.tensor([0.25, 0.5])
    expected = [math.exp(1.15) / (math.exp(1.15) + (1 / x - 1)) for x in (0.25, 0.5)]
    assert s.sigma(t).tolist() == pytest.approx(expected, rel=1e-6)
    sig = scheduler_sigmas(s, "simple", 4)
    # simple takes table entries 10000, 7500, 5000, 2500 (1-based) then 0
    table = s.table()
    assert sig.tolist() == pytest.approx([1.0, float(table[7499]), float(table[4999]), float(table[2499]), 0.0])


def test_schnell_discrete_flow_is_linear():
    sig = scheduler_sigmas(DiscreteFlowShift(1.0, 1.0), "simple", 4)
    assert sig.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_denoise_keeps_the_tail_of_a_longer_schedule():
    s = FluxShift(1.15)
    full = scheduler_sigmas(s, "normal", 10)
    assert torch.equal(sampling_sigmas(s, "normal", 5, denoise=0.5), full[-6:])
    assert sampling_sigmas(s, "normal", 5, denoise=0.0).numel() == 0


def test_unknown_scheduler_names_choices():
    with pytest.raises(ValueError, match="simple, sgm_uniform, karras, .*, kl_optimal"):
        scheduler_sigmas(FluxShift(), "karas", 4)


def _comfy_model_sampling(kind: str, shift: float):
    ms = import_comfy("comfy.model_sampling")
    if kind == "flux":
        class Sampling(ms.ModelSamplingFlux, ms.CONST):
            pass
        obj = Sampling()
        obj.set_parameters(shift=shift)
    else:
        class Sampling(ms.ModelSamplingDiscreteFlow, ms.CONST):
            pass
        obj = Sampling()
        obj.set_parameters(shift=shift, multiplier=1.0)
    return obj


class _FakePatcher:
    def __init__(self, sampling):
        self.sampling = sampling

    def get_model_object(self, name):
        assert name == "model_sampling"
        return self.sampling


@pytest.mark.parametrize("kind,shift", [("flux", 1.15), ("flux", resolution_shift(1.15, 0.5, 768, 512)),
                                        ("flux", 0.5), ("discrete", 1.0)])
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps,denoise", [(1, 1.0), (4, 1.0), (20, 1.0), (7, 0.6), (4, 0.25)])
def test_sigmas_equal_comfyui_ksampler(kind, shift, scheduler, steps, denoise):
    samplers = import_comfy("comfy.samplers")
    ours_sampling = FluxShift(shift) if kind == "flux" else DiscreteFlowShift(shift, 1.0)
    if scheduler == "kl_optimal" and int(steps / denoise) < 2:  # ComfyUI divides by zero here: NaN sigmas
        with pytest.raises(ValueError, match="kl_optimal needs at least 2 steps"):
            sampling_sigmas(ours_sampling, scheduler, steps, denoise)
        return
    theirs = samplers.KSampler(_FakePatcher(_comfy_model_sampling(kind, shift)), steps=steps, device="cpu",
                               sampler="euler", scheduler=scheduler, denoise=denoise).sigmas
    ours = sampling_sigmas(ours_sampling, scheduler, steps, denoise)
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs), (ours, theirs)
