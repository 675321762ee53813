"""UniPC (uni_pc, uni_pc_bh2) against ComfyUI's own ``comfy/extra_samplers/uni_pc.py``, patch by patch, and
in every parallel mode."""

import dataclasses

import pytest
import torch

from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.parallel.launch import generate_local_many, stop_helper_processes
from comfyui_xdit.parallel.pipefusion_reference import pipefusion_reference, relative_error
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.samplers import sampler_program, step_patch
from comfyui_xdit.sampling import finish, prepare_plan
from comfyui_xdit.sigmas import FluxShift, sampling_sigmas
from comfyui_xdit.uni_pc_sampler import uni_pc_sigmas

from comfy_reference import import_comfy

NAMES = ("uni_pc", "uni_pc_bh2")


def _toy_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A deterministic non-linear x0 prediction (stands in for a model)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x) * (1 - s) + 0.1 * torch.sin(3 * x)


def _ours(name, x, sigmas, seen=None):
    """Our loop over the tokens-free toy: begin, one step after each call, then finish's inverse scaling."""
    loop_sigmas = uni_pc_sigmas(sigmas)
    program = sampler_program(name, loop_sigmas)
    x, state = program.begin(x)
    for k in range(program.total_calls):
        if seen is not None:
            seen.append((float(program.call_sigmas[k]), x.clone()))
        denoised = _toy_denoiser(x, program.call_sigmas[k] * x.new_ones(x.shape[0]))
        x, state = program.step(x, denoised, loop_sigmas, k, state)
    return x / (1.0 - loop_sigmas[-1])


def _theirs(name, x, sigmas, seen):
    """ComfyUI's KSAMPLER for uni_pc: the sampler function, then CONST's inverse noise scaling at the last
    sigma of the schedule it passed (which the sampler has set to 0.001 in place)."""
    uni_pc = import_comfy("comfy.extra_samplers.uni_pc")
    ms = import_comfy("comfy.model_sampling")

    def model(x, sigma, **kwargs):
        seen.append((float(sigma[0]), x.clone()))
        return _toy_denoiser(x, sigma)
    fn = uni_pc.sample_unipc if name == "uni_pc" else uni_pc.sample_unipc_bh2
    samples = fn(model, x, sigmas, extra_args={}, disable=True)
    return ms.CONST().inverse_noise_scaling(sigmas[-1], samples)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scheduler", ["simple", "karras", "beta"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7])
def test_equals_comfyui_bit_for_bit(name, scheduler, steps):
    """The same model inputs at the same sigmas, call by call, and the same result, in every order the
    warm-up and lower-order-final rules give (1 to 7 steps)."""
    sigmas = sampling_sigmas(FluxShift(1.15), scheduler, steps, discard_penultimate=True)
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    x = sigmas[0] * noise  # CONST noise scaling of an empty latent
    their_calls, our_calls = [], []
    theirs_sigmas = sigmas.clone()
    theirs = _theirs(name, x.clone(), theirs_sigmas, their_calls)
    ours = _ours(name, x.clone(), sigmas, our_calls)
    assert float(theirs_sigmas[-1]) == pytest.approx(0.001)  # ComfyUI's schedule ends at 0.001 afterwards
    assert [s for s, _ in our_calls] == [s for s, _ in their_calls] and len(our_calls) == steps
    for (_, ours_in), (_, theirs_in) in zip(our_calls, their_calls):
        assert torch.equal(ours_in, theirs_in)
    assert torch.equal(ours, theirs)


def test_the_variants_differ():
    sigmas = sampling_sigmas(FluxShift(1.15), "simple", 6, discard_penultimate=True)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(_ours("uni_pc", x, sigmas), _ours("uni_pc_bh2", x, sigmas))


@pytest.mark.parametrize("name", NAMES)
def test_patchwise_equals_whole(name):
    """PipeFusion's order: the first call on the whole latent, then every call patch by patch."""
    sigmas = uni_pc_sigmas(sampling_sigmas(FluxShift(1.15), "simple", 6, discard_penultimate=True))
    program = sampler_program(name, sigmas)
    x0 = torch.randn(1, 24, 16, generator=torch.Generator().manual_seed(4))  # (B, tokens, C)
    whole, state = program.begin(x0.clone())
    for k in range(program.total_calls):
        denoised = _toy_denoiser(whole, program.call_sigmas[k] * torch.ones(1))
        whole, state = program.step(whole, denoised, sigmas, k, state)
    x, state = program.begin(x0.clone())
    for k in range(program.total_calls):
        for start, stop in [(0, 24)] if k == 0 else [(0, 8), (8, 16), (16, 24)]:
            denoised = _toy_denoiser(x[:, start:stop], program.call_sigmas[k] * torch.ones(1))
            state = step_patch(program.step, x, denoised, sigmas, k, state, start, stop)
    assert torch.equal(x, whole)


# --- every parallel mode, on the tiny Flux model --------------------------------------------------

MODEL = ModelRef("tiny:flux")
STEPS = 4


@pytest.fixture(scope="module")
def _no_helpers_left():
    yield
    stop_helper_processes()


def _request(sampler: str, **overrides) -> GenerationRequest:
    positive, negative = tiny_conditioning(MODEL, seed=6)
    options = dict(seed=13, steps=STEPS, cfg=2.0, sampler=sampler, scheduler="simple") | overrides
    return GenerationRequest(MODEL, torch.zeros(1, 16, 16, 16), positive, negative, **options)


def test_every_parallel_mode_equals_serial(_no_helpers_left) -> None:
    """uni_pc: Ulysses, ring, CFG parallel and PipeFusion with a whole warm-up equal serial; uni_pc_bh2 with
    PipeFusion after a one-step warm-up equals its reference."""
    serial = Engine(load_model(MODEL)).generate(_request("uni_pc"))
    layouts = [ParallelConfig(ulysses_degree=2), ParallelConfig(ring_degree=2), ParallelConfig(cfg_degree=2),
               ParallelConfig(pipefusion_degree=2, num_patches=2, warmup_steps=STEPS)]
    stale = dataclasses.replace(_request("uni_pc_bh2"), parallel=ParallelConfig(pipefusion_degree=2, num_patches=4,
                                                                                warmup_steps=1))
    results = generate_local_many([dataclasses.replace(_request("uni_pc"), parallel=p) for p in layouts] + [stale],
                                  timeout=400)
    for layout, result in zip(layouts, results[:-1]):
        torch.testing.assert_close(result.latent, serial, rtol=1e-4, atol=1e-4, msg=layout.describe())
    adapter = load_model(MODEL)
    plan = prepare_plan(adapter, _request("uni_pc_bh2"))
    reference = finish(adapter, plan, pipefusion_reference(adapter, plan, num_patches=4, warmup_steps=1))
    torch.testing.assert_close(results[-1].latent, reference, rtol=1e-4, atol=1e-4)
    bh2_serial = Engine(load_model(MODEL)).generate(_request("uni_pc_bh2"))
    assert relative_error(results[-1].latent, bh2_serial) > 0  # stale K/V after warm-up: not the serial result
