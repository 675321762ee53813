"""CFG++ samplers: bit-equal to ComfyUI's, fed the unconditional prediction as its post-CFG hook sees it;
equal to stock ComfyUI on the tiny Flux (tests/test_same_seed_as_comfyui.py) and to serial in every
parallel mode."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.parallel.launch import generate_local_many, stop_helper_processes
from comfyui_xdit.parallel.pipefusion_reference import pipefusion_reference
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.samplers import CFG_PP_SAMPLERS, sampler_program, step_patch
from comfyui_xdit.sampling import apply_cfg, finish, prepare_plan
from comfyui_xdit.sigmas import FluxShift, scheduler_sigmas

from comfy_reference import import_comfy

CFG = 2.5


def _cond(x, sigma):
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x) * (1 - s) + 0.1 * torch.sin(3 * x)


def _uncond(x, sigma):
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return 0.8 * torch.tanh(x) * (1 - s) - 0.05 * torch.cos(2 * x)


def _comfy_model():
    """A guided toy model that calls ComfyUI's post-CFG hooks as its CFG guider does, with the model
    sampling object its CFG++ samplers read."""
    ms = import_comfy("comfy.model_sampling")
    sampling = type("FluxSampling", (ms.ModelSamplingFlux, ms.CONST), {})()

    def model(x, sigma, model_options=None, **kwargs):
        cond, uncond = _cond(x, sigma), _uncond(x, sigma)
        denoised = apply_cfg(cond, uncond, CFG)
        for hook in (model_options or {}).get("sampler_post_cfg_function", []):
            denoised = hook({"denoised": denoised, "uncond_denoised": uncond, "cond_denoised": cond})
        return denoised
    model.inner_model = SimpleNamespace(model_patcher=SimpleNamespace(get_model_object=lambda name: sampling),
                                        inner_model=SimpleNamespace(model_sampling=sampling))
    return model


class _Draws:
    def __init__(self, shape, seed):
        self.generator, self.shape, self.drawn = torch.Generator().manual_seed(seed), shape, {}

    def __call__(self, k):
        if k not in self.drawn:
            self.drawn[k] = torch.randn(self.shape, generator=self.generator)
        return self.drawn[k]


def _run_ours(name, x, sigmas, noise):
    program = sampler_program(name, sigmas)
    state = None
    for k in range(program.total_calls):
        sigma = program.call_sigmas[k] * x.new_ones(x.shape[0])
        uncond = _uncond(x, sigma)
        denoised = apply_cfg(_cond(x, sigma), uncond, CFG)
        x, state = program.apply(x, denoised, sigmas, k, state, lambda: noise(k), uncond)
    return x


@pytest.mark.parametrize("name,comfy_fn", [("euler_cfg_pp", "sample_euler_cfg_pp"),
                                           ("euler_ancestral_cfg_pp", "sample_euler_ancestral_cfg_pp"),
                                           ("dpmpp_2s_ancestral_cfg_pp", "sample_dpmpp_2s_ancestral_cfg_pp"),
                                           ("dpmpp_2m_cfg_pp", "sample_dpmpp_2m_cfg_pp"),
                                           ("res_multistep_cfg_pp", "sample_res_multistep_cfg_pp"),
                                           ("res_multistep_ancestral_cfg_pp", "sample_res_multistep_ancestral_cfg_pp"),
                                           ("gradient_estimation_cfg_pp", "sample_gradient_estimation_cfg_pp")])
@pytest.mark.parametrize("scheduler", ["simple", "karras", "beta"])
def test_cfg_pp_equals_comfyui_bit_for_bit(name, comfy_fn, scheduler):
    kd = import_comfy("comfy.k_diffusion.sampling")
    sigmas = scheduler_sigmas(FluxShift(1.15), scheduler, 7)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = getattr(kd, comfy_fn)(_comfy_model(), x.clone(), sigmas, extra_args={"seed": 5}, disable=True)
    ours = _run_ours(name, x.clone(), sigmas, _Draws(x.shape, 5))
    assert torch.equal(ours, theirs)


def test_every_cfg_pp_sampler_is_compared():
    assert CFG_PP_SAMPLERS == {"euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2m_cfg_pp",
                               "res_multistep_cfg_pp", "res_multistep_ancestral_cfg_pp", "gradient_estimation_cfg_pp"}


@pytest.mark.parametrize("name", sorted(CFG_PP_SAMPLERS))
def test_patchwise_equals_whole(name):
    sigmas = scheduler_sigmas(FluxShift(1.15), "simple", 6)
    program = sampler_program(name, sigmas)
    x0 = torch.randn(1, 24, 16, generator=torch.Generator().manual_seed(4))  # (B, tokens, C)

    def call_noise(k):
        return torch.randn(1, 24, 16, generator=torch.Generator().manual_seed(100 + k))

    def predictions(x, k):
        sigma = program.call_sigmas[k] * torch.ones(1)
        uncond = _uncond(x, sigma)
        return apply_cfg(_cond(x, sigma), uncond, CFG), uncond

    whole, state = x0.clone(), None
    for k in range(program.total_calls):
        denoised, uncond = predictions(whole, k)
        whole, state = program.apply(whole, denoised, sigmas, k, state, lambda: call_noise(k), uncond)
    x, state = x0.clone(), None
    for k in range(program.total_calls):
        for start, stop in [(0, 24)] if k < program.calls_before_step(1) else [(0, 8), (8, 16), (16, 24)]:
            denoised, uncond = predictions(x[:, start:stop], k)
            state = step_patch(program.apply, x, denoised, sigmas, k, state, start, stop, call_noise, uncond)
    assert torch.equal(x, whole)


MODEL = ModelRef("tiny:flux")
STEPS = 4


@pytest.fixture(scope="module")
def _no_helpers_left():
    yield
    stop_helper_processes()


def _request(sampler: str, cfg: float) -> GenerationRequest:
    positive, negative = tiny_conditioning(MODEL, seed=6)
    return GenerationRequest(MODEL, torch.zeros(1, 16, 16, 16), positive, negative, seed=13, steps=STEPS, cfg=cfg,
                             sampler=sampler, scheduler="normal")


@pytest.mark.parametrize("sampler,cfg", [("dpmpp_2m_cfg_pp", 1.0), ("dpmpp_2s_ancestral_cfg_pp", 2.0),
                                         ("euler_ancestral_cfg_pp", 2.0)])
def test_every_parallel_mode_equals_serial(sampler: str, cfg: float, _no_helpers_left) -> None:
    """cfg 1 too: CFG++ runs the unconditional branch anyway, so CFG parallel has two branches to split."""
    serial = Engine(load_model(MODEL)).generate(_request(sampler, cfg))
    layouts = [ParallelConfig(ulysses_degree=2), ParallelConfig(ring_degree=2),
               ParallelConfig(pipefusion_degree=2, num_patches=2, warmup_steps=STEPS),
               ParallelConfig(pipefusion_degree=2, num_patches=4, warmup_steps=1)]
    if cfg != 1.0:
        layouts.insert(0, ParallelConfig(cfg_degree=2))
    results = generate_local_many([dataclasses.replace(_request(sampler, cfg), parallel=p) for p in layouts],
                                  timeout=400)
    for layout, result in zip(layouts[:-1], results[:-1]):
        torch.testing.assert_close(result.latent, serial, rtol=1e-4, atol=1e-4, msg=layout.describe())
    adapter = load_model(MODEL)
    plan = prepare_plan(adapter, _request(sampler, cfg))
    reference = finish(adapter, plan, pipefusion_reference(adapter, plan, num_patches=4, warmup_steps=1))
    torch.testing.assert_close(results[-1].latent, reference, rtol=1e-4, atol=1e-4)
