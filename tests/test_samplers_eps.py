"""Samplers on EPS models: the steps whose ComfyUI code branches on the model sampling type, in their EPS
form, bit-equal to ComfyUI's (its non-CONST branch, on a ModelSamplingDiscrete); the ones without an EPS
form refused with the list of those that work; the flow forms untouched."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from comfyui_xdit.prediction import EPS, FLOW
from comfyui_xdit.samplers import (FLOW_ONLY_SAMPLERS, SAMPLER_NAMES, check_sampler, sampler_program,
                                   samplers_for)
from comfyui_xdit.sampling import apply_cfg
from comfyui_xdit.sigmas import DiscreteSchedule, sampling_sigmas

from comfy_reference import import_comfy

PIXART = DiscreteSchedule(beta_schedule="sqrt_linear", linear_start=0.0001, linear_end=0.02)
CFG = 2.5


def _cond(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A deterministic non-linear x0 prediction at an EPS model's sigmas (stands in for a model)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x / (1 + s ** 2) ** 0.5) + 0.1 * torch.sin(3 * x / (1 + s))


def _uncond(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return 0.8 * torch.tanh(x / (1 + s ** 2) ** 0.5) - 0.05 * torch.cos(2 * x / (1 + s))


def _comfy_eps_model(guided: bool):
    """The toy model as ComfyUI's samplers call it (x0 out; with ``guided``, CFG and the post-CFG hooks its
    CFG++ samplers read), on a fake model object carrying PixArt's EPS ModelSamplingDiscrete."""
    ms = import_comfy("comfy.model_sampling")
    settings = {"beta_schedule": "sqrt_linear", "linear_start": 0.0001, "linear_end": 0.02, "timesteps": 1000}
    sampling = type("Sampling", (ms.ModelSamplingDiscrete, ms.EPS), {})(
        type("Config", (), {"sampling_settings": settings})())

    def model(x, sigma, model_options=None, **kwargs):
        if not guided:
            return _cond(x, sigma)
        cond, uncond = _cond(x, sigma), _uncond(x, sigma)
        denoised = apply_cfg(cond, uncond, CFG)
        for hook in (model_options or {}).get("sampler_post_cfg_function", []):
            denoised = hook({"denoised": denoised, "uncond_denoised": uncond, "cond_denoised": cond})
        return denoised
    model.inner_model = SimpleNamespace(model_patcher=SimpleNamespace(get_model_object=lambda name: sampling),
                                        inner_model=SimpleNamespace(model_sampling=sampling))
    return model


class _Draws:
    """One stream of draws of x's shape, in the order they are asked for (ComfyUI's default noise sampler)."""

    def __init__(self, shape, seed):
        self.generator, self.shape, self.drawn = torch.Generator().manual_seed(seed), shape, {}

    def __call__(self, k):
        if k not in self.drawn:
            self.drawn[k] = torch.randn(self.shape, generator=self.generator)
        return self.drawn[k]

    def sampler(self):
        count = iter(range(10 ** 6))
        return lambda sigma, sigma_next: self(next(count))


def _run_ours(name, x, sigmas, noise, guided):
    program = sampler_program(name, sigmas, PIXART, EPS)
    state = None
    for k in range(program.total_calls):
        sigma = program.call_sigmas[k] * x.new_ones(x.shape[0])
        uncond = _uncond(x, sigma) if guided else None
        denoised = apply_cfg(_cond(x, sigma), uncond, CFG) if guided else _cond(x, sigma)
        x, state = program.apply(x, denoised, sigmas, k, state, lambda: noise(k), uncond)
    return x


EPS_FORMS = {"euler_ancestral": "sample_euler_ancestral", "lcm": "sample_lcm",
             "dpmpp_2m_sde": "sample_dpmpp_2m_sde", "dpmpp_2m_sde_heun": "sample_dpmpp_2m_sde_heun",
             "dpmpp_3m_sde": "sample_dpmpp_3m_sde", "er_sde": "sample_er_sde",
             "euler_cfg_pp": "sample_euler_cfg_pp", "euler_ancestral_cfg_pp": "sample_euler_ancestral_cfg_pp",
             # the same code for every model in ComfyUI; checked here on EPS sigmas too
             "euler": "sample_euler", "heun": "sample_heun", "dpmpp_2m": "sample_dpmpp_2m", "ipndm": "sample_ipndm",
             "ddpm": "sample_ddpm", "res_multistep_ancestral": "sample_res_multistep_ancestral",
             "dpmpp_2s_ancestral_cfg_pp": "sample_dpmpp_2s_ancestral_cfg_pp"}


@pytest.mark.parametrize("name", sorted(EPS_FORMS))
@pytest.mark.parametrize("scheduler", ["normal", "karras"])
def test_eps_steps_equal_comfyui_bit_for_bit(name, scheduler):
    kd = import_comfy("comfy.k_diffusion.sampling")
    guided = "cfg_pp" in name
    sigmas = sampling_sigmas(PIXART, scheduler, 7)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    their_draws, our_draws = _Draws(x.shape, 5), _Draws(x.shape, 5)
    function = getattr(kd, EPS_FORMS[name])
    takes_noise = "noise_sampler" in inspect.signature(function).parameters
    kwargs = {"noise_sampler": their_draws.sampler()} if takes_noise else {}
    theirs = function(_comfy_eps_model(guided), x.clone(), sigmas.clone(), extra_args={"seed": 5}, disable=True,
                      **kwargs)
    ours = _run_ours(name, x.clone(), sigmas, our_draws, guided)
    assert torch.equal(ours, theirs)


def test_eps_forms_differ_from_the_flow_forms():
    sigmas = sampling_sigmas(PIXART, "normal", 4)
    for name in ("euler_ancestral", "lcm", "dpmpp_2m_sde", "er_sde"):
        assert sampler_program(name, sigmas, PIXART, EPS).step is not sampler_program(name, sigmas).step, name


@pytest.mark.parametrize("name", sorted(FLOW_ONLY_SAMPLERS))
def test_flow_only_samplers_are_refused_naming_those_that_work(name):
    with pytest.raises(ValueError, match=rf"sampler '{name}' is not available for this EPS-prediction model.*"
                                         r"choose one of euler, euler_cfg_pp, euler_ancestral"):
        check_sampler(name, EPS)
    with pytest.raises(ValueError, match="not available for this EPS"):
        sampler_program(name, sampling_sigmas(PIXART, "normal", 4), PIXART, EPS)
    check_sampler(name, FLOW)  # flow models run them all


def test_samplers_for():
    assert samplers_for(FLOW) == SAMPLER_NAMES
    eps = samplers_for(EPS)
    assert set(eps) == set(SAMPLER_NAMES) - FLOW_ONLY_SAMPLERS
    assert {"euler", "euler_ancestral", "heun", "dpmpp_2m", "ddim", "lms", "ipndm", "uni_pc"} <= set(eps)
