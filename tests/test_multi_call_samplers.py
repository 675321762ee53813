"""Samplers with several model calls per step: bit-equal to ComfyUI's k-diffusion loops when run call by
call, patch-wise equal to whole (PipeFusion's order), and their call schedules and warm-up counting."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.multi_call_samplers import MULTI_CALL_SAMPLERS
from comfyui_xdit.noise import BrownianNoise
from comfyui_xdit.parallel.launch import generate_local_many, stop_helper_processes
from comfyui_xdit.parallel.pipefusion_reference import pipefusion_reference, relative_error
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sampling import finish, prepare_plan
from comfyui_xdit.samplers import CFG_PP_SAMPLERS, sampler_program, step_patch
from comfyui_xdit.sigmas import FluxShift, offset_first_sigma_for_snr, sampling_sigmas, scheduler_sigmas

from comfy_reference import import_comfy


def _toy_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A deterministic non-linear x0 prediction (stands in for a model)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x) * (1 - s) + 0.1 * torch.sin(3 * x)


def _run_calls(name, x, sigmas, noise=None, calls_seen=None):
    program = sampler_program(name, sigmas)
    state = None
    for k in range(program.total_calls):
        if calls_seen is not None:
            calls_seen.append(float(program.call_sigmas[k]))
        denoised = _toy_denoiser(x, program.call_sigmas[k] * x.new_ones(x.shape[0]))
        x, state = program.step(x, denoised, sigmas, k, state, None if noise is None else (lambda: noise(k)))
    return x


def _recording(denoiser, seen):
    def model(x, sigma, **kwargs):
        seen.append(float(sigma[0]))
        return denoiser(x, sigma)
    return model


class _DrawPerCall:
    """ComfyUI's default noise sampler stream (one draw of x's shape per ask), keyed by our call index."""

    def __init__(self, shape, seed):
        self.generator, self.shape, self.drawn = torch.Generator().manual_seed(seed), shape, {}

    def __call__(self, k):
        if k not in self.drawn:
            self.drawn[k] = torch.randn(self.shape, generator=self.generator)
        return self.drawn[k]


@pytest.mark.parametrize("name,comfy_fn", [("heun", "sample_heun"), ("heunpp2", "sample_heunpp2"),
                                           ("dpm_2", "sample_dpm_2"),
                                           ("dpm_2_ancestral", "sample_dpm_2_ancestral_RF"),
                                           ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral_RF")])
@pytest.mark.parametrize("scheduler", ["simple", "karras", "beta"])
def test_calls_equal_comfyui_samplers_bit_for_bit(name, comfy_fn, scheduler):
    kd = import_comfy("comfy.k_diffusion.sampling")
    discard = name in ("dpm_2", "dpm_2_ancestral")
    sigmas = sampling_sigmas(FluxShift(1.15), scheduler, 7, discard_penultimate=discard)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    their_calls, our_calls = [], []
    theirs = getattr(kd, comfy_fn)(_recording(_toy_denoiser, their_calls), x.clone(), sigmas,
                                   extra_args={"seed": 5}, disable=True)
    ours = _run_calls(name, x.clone(), sigmas, _DrawPerCall(x.shape, 5), our_calls)
    assert our_calls == their_calls  # the same model calls at the same sigmas, in order
    assert len(our_calls) > len(sigmas) - 1  # several calls per step
    assert torch.equal(ours, theirs)


def _flux_model_sampling():
    """ComfyUI's model sampling of a Flux model, on the fake model object its SDE samplers read it from."""
    ms = import_comfy("comfy.model_sampling")
    sampling = type("FluxSampling", (ms.ModelSamplingFlux, ms.CONST), {})()
    patcher = SimpleNamespace(get_model_object=lambda name: sampling)
    return sampling, SimpleNamespace(model_patcher=patcher, inner_model=SimpleNamespace(model_sampling=sampling))


@pytest.mark.parametrize("scheduler", ["simple", "karras"])
def test_dpmpp_sde_equals_comfyui_with_its_brownian_tree(scheduler):
    kd = import_comfy("comfy.k_diffusion.sampling")
    _, inner = _flux_model_sampling()
    sigmas = scheduler_sigmas(FluxShift(1.15), scheduler, 6)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))

    def model(x, sigma, **kwargs):
        return _toy_denoiser(x, sigma)
    model.inner_model = inner
    theirs = kd.sample_dpmpp_sde(model, x.clone(), sigmas, extra_args={"seed": 9}, disable=True)

    loop_sigmas = offset_first_sigma_for_snr(sigmas, FluxShift(1.15))
    program = sampler_program("dpmpp_sde", loop_sigmas)
    noise = BrownianNoise(9, x.shape, lambda t: t, torch.device("cpu"), sigmas, program.noise_spans)
    ours = _run_calls("dpmpp_sde", x.clone(), loop_sigmas, noise)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", [n for n in MULTI_CALL_SAMPLERS if n not in CFG_PP_SAMPLERS])  # CFG++: own test
def test_patchwise_calls_after_a_whole_first_step_equal_whole(name):
    """PipeFusion's order: the first step's calls on the whole latent (warm-up), then every call patch by
    patch through ``step_patch``, which keeps one whole-latent state and each call's noise."""
    sigmas = scheduler_sigmas(FluxShift(1.15), "simple", 6)[1:]  # below 1, as SDE samplers step
    program = sampler_program(name, sigmas)
    x0 = torch.randn(1, 24, 16, generator=torch.Generator().manual_seed(4))  # (B, tokens, C)

    def call_noise(k):
        return torch.randn(1, 24, 16, generator=torch.Generator().manual_seed(100 + k))

    whole, state = x0.clone(), None
    for k in range(program.total_calls):
        denoised = _toy_denoiser(whole, program.call_sigmas[k] * torch.ones(1))
        whole, state = program.step(whole, denoised, sigmas, k, state, lambda: call_noise(k))
    x, state = x0.clone(), None
    warmup = program.calls_before_step(1)
    for k in range(program.total_calls):
        bounds = [(0, 24)] if k < warmup else [(0, 8), (8, 16), (16, 24)]
        for start, stop in bounds:
            denoised = _toy_denoiser(x[:, start:stop], program.call_sigmas[k] * torch.ones(1))
            state = step_patch(program.step, x, denoised, sigmas, k, state, start, stop, call_noise)
    assert torch.equal(x, whole)


def test_call_schedules_and_warmup_in_calls():
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    heun = sampler_program("heun", sigmas)
    assert heun.call_steps == (0, 0, 1, 1, 2, 2, 3)  # the last step is Euler: one call
    torch.testing.assert_close(heun.call_sigmas, torch.tensor([1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25]))
    assert heun.calls_before_step(2) == 4 and heun.calls_before_step(4) == heun.total_calls
    heunpp2 = sampler_program("heunpp2", sigmas)
    assert heunpp2.call_steps == (0, 0, 0, 1, 1, 1, 2, 2, 3)  # three calls, then Heun, then Euler
    euler = sampler_program("euler", sigmas)
    assert euler.call_steps == (0, 1, 2, 3) and euler.calls_before_step(2) == 2
    sde = sampler_program("dpmpp_sde", sigmas[1:])
    assert sde.noise_spans[0, 0] == sigmas[1] and sde.noise_spans[0, 1] == sde.call_sigmas[1]  # to the midpoint
    assert torch.equal(sde.noise_spans[1], sigmas[1:3])  # then the whole step


@pytest.mark.parametrize("name", ["seeds_2", "seeds_3"])
@pytest.mark.parametrize("scheduler", ["simple", "karras", "beta"])
def test_seeds_equal_comfyui_with_its_noise_sampler(name, scheduler):
    """SEEDS: two or three calls a step, a fresh draw of ComfyUI's default noise sampler after each but
    the last step's, on the schedule offset below sigma 1 as ComfyUI offsets it."""
    kd = import_comfy("comfy.k_diffusion.sampling")
    _, inner = _flux_model_sampling()
    sigmas = scheduler_sigmas(FluxShift(1.15), scheduler, 6)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    their_calls = []
    model = _recording(_toy_denoiser, their_calls)
    model.inner_model = inner
    theirs = getattr(kd, f"sample_{name}")(model, x.clone(), sigmas, extra_args={"seed": 9}, disable=True)
    our_calls = []
    ours = _run_calls(name, x.clone(), offset_first_sigma_for_snr(sigmas, FluxShift(1.15)),
                      _DrawPerCall(x.shape, 9), our_calls)
    assert our_calls == their_calls and len(our_calls) == (len(sigmas) - 2) * (2 if name == "seeds_2" else 3) + 1
    assert torch.equal(ours, theirs)


def test_discard_penultimate_sigma_as_ksampler():
    samplers = import_comfy("comfy.samplers")
    _, inner = _flux_model_sampling()
    patcher = SimpleNamespace(get_model_object=inner.model_patcher.get_model_object)
    for name in ("dpm_2", "euler"):
        for denoise in (1.0, 0.6):
            ks = samplers.KSampler(patcher, steps=5, device="cpu", sampler=name, scheduler="karras", denoise=denoise)
            ours = sampling_sigmas(FluxShift(1.15), "karras", 5, denoise, discard_penultimate=name == "dpm_2")
            assert torch.equal(ours, ks.sigmas)


# --- every parallel mode, on the tiny Flux model --------------------------------------------------

MODEL = ModelRef("tiny:flux")
STEPS = 4


@pytest.fixture(scope="module")
def _no_helpers_left():
    yield
    stop_helper_processes()


def _request(sampler: str, **overrides) -> GenerationRequest:
    positive, negative = tiny_conditioning(MODEL, seed=6)
    options = dict(seed=13, steps=STEPS, cfg=2.0, sampler=sampler, scheduler="karras") | overrides
    return GenerationRequest(MODEL, torch.zeros(1, 16, 16, 16), positive, negative, **options)


@pytest.mark.parametrize("sampler", MULTI_CALL_SAMPLERS)
def test_every_parallel_mode_equals_serial(sampler: str, _no_helpers_left) -> None:
    """Ulysses, ring, CFG parallel and PipeFusion whose warm-up covers every step (all of a step's calls)
    equal serial; PipeFusion after a one-step warm-up equals its reference, each call a pipeline step."""
    serial = Engine(load_model(MODEL)).generate(_request(sampler))
    layouts = [ParallelConfig(ulysses_degree=2), ParallelConfig(ring_degree=2), ParallelConfig(cfg_degree=2),
               ParallelConfig(pipefusion_degree=2, num_patches=2, warmup_steps=STEPS),
               ParallelConfig(pipefusion_degree=2, num_patches=4, warmup_steps=1)]
    results = generate_local_many([dataclasses.replace(_request(sampler), parallel=p) for p in layouts], timeout=400)
    for layout, result in zip(layouts[:-1], results[:-1]):
        torch.testing.assert_close(result.latent, serial, rtol=1e-4, atol=1e-4, msg=layout.describe())
    adapter = load_model(MODEL)
    plan = prepare_plan(adapter, _request(sampler))
    assert plan.total_calls > STEPS  # several calls per step
    reference = finish(adapter, plan, pipefusion_reference(adapter, plan, num_patches=4, warmup_steps=1))
    torch.testing.assert_close(results[-1].latent, reference, rtol=1e-4, atol=1e-4)
    assert relative_error(results[-1].latent, serial) > 0  # stale K/V after warm-up: not the serial result


def test_gpu_variants_build_their_tree_on_the_model_device():
    """``_gpu``: the base sampler's calls and steps, the Brownian tree where the model runs (the CPU here,
    so the same noise as the base sampler's CPU tree)."""
    adapter = load_model(MODEL)
    for name, base in (("dpmpp_sde_gpu", "dpmpp_sde"), ("dpmpp_2m_sde_gpu", "dpmpp_2m_sde")):
        ours, theirs = prepare_plan(adapter, _request(name)), prepare_plan(adapter, _request(base))
        assert ours.brownian_on_device and not theirs.brownian_on_device
        assert torch.equal(ours.call_sigmas, theirs.call_sigmas)
        noise = ours.step_noise(torch.device("cpu"))
        assert noise.tree_device == torch.device("cpu")
        assert torch.equal(noise(1), theirs.step_noise(torch.device("cpu"))(1))
