"""dpm_fast against ComfyUI's own ``ksampler("dpm_fast")`` sampler function, patch by patch, and in every
parallel mode."""

import dataclasses

import pytest
import torch

from comfyui_xdit.dpm_fast_sampler import dpm_fast_grid
from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.parallel.launch import generate_local_many, stop_helper_processes
from comfyui_xdit.parallel.pipefusion_reference import pipefusion_reference, relative_error
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.samplers import sampler_program, step_patch
from comfyui_xdit.sampling import finish, prepare_plan
from comfyui_xdit.sigmas import FluxShift, sampling_sigmas

from comfy_reference import import_comfy


def _toy_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A deterministic non-linear x0 prediction (stands in for a model)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x) * (1 - s) + 0.1 * torch.sin(3 * x)


def _ours(x, sigmas, seen=None):
    """Our loop over the toy: one step after each call, then finish's inverse scaling."""
    program = sampler_program("dpm_fast", sigmas)
    x, state = program.begin(x)
    for k in range(program.total_calls):
        if seen is not None:
            seen.append((float(program.call_sigmas[k]), x.clone()))
        denoised = _toy_denoiser(x, program.call_sigmas[k] * x.new_ones(x.shape[0]))
        x, state = program.step(x, denoised, sigmas, k, state)
    return x / (1.0 - sigmas[-1])


def _theirs(x, sigmas, seen):
    """ComfyUI's KSAMPLER for dpm_fast: its sampler function, then CONST's inverse noise scaling."""
    samplers = import_comfy("comfy.samplers")
    ms = import_comfy("comfy.model_sampling")

    def model(x, sigma, **kwargs):
        seen.append((float(sigma[0]), x.clone()))
        return _toy_denoiser(x, sigma)
    function = samplers.ksampler("dpm_fast").sampler_function
    samples = function(model, x, sigmas, extra_args={"seed": 9}, callback=None, disable=True)
    return ms.CONST().inverse_noise_scaling(sigmas[-1], samples)


@pytest.mark.parametrize("scheduler", ["simple", "karras", "beta"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 7])
def test_equals_comfyui_bit_for_bit(scheduler, steps):
    """The same model inputs at the same sigmas, call by call, and the same result, for every ``n % 3`` and
    the shortest grids (one step of order 1 or 2; order 2 then 1)."""
    sigmas = sampling_sigmas(FluxShift(1.15), scheduler, steps)
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    x = sigmas[0] * noise  # CONST noise scaling of an empty latent
    their_calls, our_calls = [], []
    theirs = _theirs(x.clone(), sigmas.clone(), their_calls)
    ours = _ours(x.clone(), sigmas, our_calls)
    assert [s for s, _ in our_calls] == [s for s, _ in their_calls] and len(our_calls) == steps
    for (_, ours_in), (_, theirs_in) in zip(our_calls, their_calls):
        assert torch.equal(ours_in, theirs_in)
    assert torch.equal(ours, theirs)


def test_the_grid_is_its_own():
    """The calls lie on the solver's log-sigma grid, not the schedule's; orders as ComfyUI picks them."""
    sigmas = sampling_sigmas(FluxShift(1.15), "simple", 6)
    grid = dpm_fast_grid(sigmas)
    assert grid.orders == (3, 2, 1) and len(grid.call_sigmas) == 6
    assert float(grid.call_sigmas[0]) == pytest.approx(float(sigmas[0]))
    assert not set(grid.call_sigmas[1:].tolist()) & set(sigmas.tolist())
    assert dpm_fast_grid(sampling_sigmas(FluxShift(1.15), "simple", 7)).orders == (3, 3, 1)
    assert dpm_fast_grid(sigmas[:1]).orders == () and sampler_program("dpm_fast", sigmas[:1]).total_calls == 0
    with pytest.raises(ValueError, match="must not be 0"):
        dpm_fast_grid(torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("steps", [5, 6, 7])
@pytest.mark.parametrize("whole_calls", ["one", "first_grid_step"])
def test_patchwise_equals_whole(steps, whole_calls):
    """PipeFusion's order: the first call (a one-step warm-up: each call is one of the n steps), or the
    first grid step's calls, on the whole latent, then every call patch by patch."""
    sigmas = sampling_sigmas(FluxShift(1.15), "simple", steps)
    program = sampler_program("dpm_fast", sigmas)
    x0 = torch.randn(1, 24, 16, generator=torch.Generator().manual_seed(4))  # (B, tokens, C)
    whole, state = program.begin(x0.clone())
    for k in range(program.total_calls):
        denoised = _toy_denoiser(whole, program.call_sigmas[k] * torch.ones(1))
        whole, state = program.step(whole, denoised, sigmas, k, state)
    x, state = program.begin(x0.clone())
    warm = 1 if whole_calls == "one" else dpm_fast_grid(sigmas).steps.count(0)
    for k in range(program.total_calls):
        for start, stop in [(0, 24)] if k < warm else [(0, 8), (8, 16), (16, 24)]:
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


def _request(**overrides) -> GenerationRequest:
    positive, negative = tiny_conditioning(MODEL, seed=6)
    options = dict(seed=13, steps=STEPS, cfg=2.0, sampler="dpm_fast", scheduler="simple") | overrides
    return GenerationRequest(MODEL, torch.zeros(1, 16, 16, 16), positive, negative, **options)


def test_every_parallel_mode_equals_serial(_no_helpers_left) -> None:
    """Ulysses, ring, CFG parallel and PipeFusion with a whole warm-up equal serial; PipeFusion after a
    one-step warm-up equals its reference."""
    serial = Engine(load_model(MODEL)).generate(_request())
    layouts = [ParallelConfig(ulysses_degree=2), ParallelConfig(ring_degree=2), ParallelConfig(cfg_degree=2),
               ParallelConfig(pipefusion_degree=2, num_patches=2, warmup_steps=STEPS)]
    stale = dataclasses.replace(_request(), parallel=ParallelConfig(pipefusion_degree=2, num_patches=4, warmup_steps=1))
    results = generate_local_many([dataclasses.replace(_request(), parallel=p) for p in layouts] + [stale],
                                  timeout=400)
    for layout, result in zip(layouts, results[:-1]):
        torch.testing.assert_close(result.latent, serial, rtol=1e-4, atol=1e-4, msg=layout.describe())
    adapter = load_model(MODEL)
    plan = prepare_plan(adapter, _request())
    reference = finish(adapter, plan, pipefusion_reference(adapter, plan, num_patches=4, warmup_steps=1))
    torch.testing.assert_close(results[-1].latent, reference, rtol=1e-4, atol=1e-4)
    assert relative_error(results[-1].latent, serial) > 0  # stale K/V after warm-up: not the serial result
