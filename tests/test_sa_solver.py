"""SA-Solver (sa_solver, sa_solver_pece) against ComfyUI's own ``sample_sa_solver`` / ``sample_sa_solver_pece``
with its default noise sampler, patch by patch, and in every parallel mode."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.parallel.launch import generate_local_many, stop_helper_processes
from comfyui_xdit.parallel.pipefusion_reference import pipefusion_reference, relative_error
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sa_solver_sampler import tau_interval
from comfyui_xdit.samplers import sampler_program, step_patch
from comfyui_xdit.sampling import finish, prepare_plan
from comfyui_xdit.sigmas import DiscreteFlowShift, FluxShift, offset_first_sigma_for_snr, scheduler_sigmas

from comfy_reference import import_comfy

NAMES = ("sa_solver", "sa_solver_pece")


def _toy_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A deterministic non-linear x0 prediction (stands in for a model)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x) * (1 - s) + 0.1 * torch.sin(3 * x)


def _recording(denoiser, seen):
    def model(x, sigma, **kwargs):
        seen.append((float(sigma[0]), x.clone()))
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


def _flux_model_sampling():
    """ComfyUI's model sampling of a Flux model (shift 1.15), on the fake model object its samplers read."""
    ms = import_comfy("comfy.model_sampling")
    sampling = type("FluxSampling", (ms.ModelSamplingFlux, ms.CONST), {})()
    patcher = SimpleNamespace(get_model_object=lambda name: sampling)
    return SimpleNamespace(model_patcher=patcher, inner_model=SimpleNamespace(model_sampling=sampling))


def _ours(name, x, sigmas, noise, seen):
    """Our loop over KSampler's ``sigmas``: offset below sigma 1, one step after each model call."""
    loop_sigmas = offset_first_sigma_for_snr(sigmas, FluxShift(1.15))
    program = sampler_program(name, loop_sigmas, FluxShift(1.15))
    state = None
    for k in range(program.total_calls):
        seen.append((float(program.call_sigmas[k]), x.clone()))
        denoised = _toy_denoiser(x, program.call_sigmas[k] * x.new_ones(x.shape[0]))
        x, state = program.step(x, denoised, loop_sigmas, k, state, lambda: noise(k))
    return x


def _schedule(scheduler: str, steps: int) -> torch.Tensor:
    if scheduler == "simple-first-half":  # SplitSigmas' first part: the schedule does not end at 0
        return scheduler_sigmas(FluxShift(1.15), "simple", 2 * steps)[:steps + 1]
    return scheduler_sigmas(FluxShift(1.15), scheduler, steps)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scheduler", ["simple", "karras", "beta", "simple-first-half"])
@pytest.mark.parametrize("steps", [1, 2, 3, 6])
def test_equals_comfyui_bit_for_bit(name, scheduler, steps):
    """The same model inputs at the same sigmas, call by call, and the same result, with KSampler's defaults
    (orders 3 and 4, tau 1 between the model's 20% and 80% sigmas, its default noise sampler seeded 9)."""
    kd = import_comfy("comfy.k_diffusion.sampling")
    sigmas = _schedule(scheduler, steps)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    their_calls, our_calls = [], []
    model = _recording(_toy_denoiser, their_calls)
    model.inner_model = _flux_model_sampling()
    theirs = getattr(kd, f"sample_{name}")(model, x.clone(), sigmas, extra_args={"seed": 9}, disable=True)
    noise = _DrawPerCall(x.shape, 9)
    ours = _ours(name, x.clone(), sigmas, noise, our_calls)
    assert [s for s, _ in our_calls] == [s for s, _ in their_calls]
    assert len(our_calls) == (steps if name == "sa_solver" else 2 * steps - 1)  # PECE: twice a step but the first
    for (_, ours_in), (_, theirs_in) in zip(our_calls, their_calls):
        assert torch.equal(ours_in, theirs_in)
    assert torch.equal(ours, theirs)
    if steps == 6 and scheduler in ("simple", "beta"):  # both ODE and SDE steps were taken (karras: ODE only)
        assert 0 < len(noise.drawn) < steps - 1


def test_the_variants_differ():
    sigmas = scheduler_sigmas(FluxShift(1.15), "simple", 6)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    results = [_ours(name, x, sigmas, _DrawPerCall(x.shape, 1), []) for name in NAMES]
    assert not torch.equal(*results)


def test_tau_interval_is_comfyuis_percent_to_sigma():
    """The stochastic interval in sigmas, as ComfyUI's ModelSamplingFlux / ModelSamplingDiscreteFlow give it."""
    ms = import_comfy("comfy.model_sampling")
    for shift in (1.15, 0.5, 3.0):
        theirs = ms.ModelSamplingFlux()
        theirs.set_parameters(shift=shift)
        assert tau_interval(FluxShift(shift)) == (theirs.percent_to_sigma(0.2), theirs.percent_to_sigma(0.8))
    for shift in (1.0, 3.0):
        theirs = ms.ModelSamplingDiscreteFlow()
        theirs.set_parameters(shift=shift, multiplier=1.0)
        ours = tau_interval(DiscreteFlowShift(shift=shift, multiplier=1.0))
        assert ours == (theirs.percent_to_sigma(0.2), theirs.percent_to_sigma(0.8))


def test_needs_the_model_sampling():
    with pytest.raises(ValueError, match="model's sampling"):
        sampler_program("sa_solver", torch.tensor([0.9, 0.5, 0.0]))


@pytest.mark.parametrize("name", NAMES)
def test_patchwise_equals_whole(name):
    """PipeFusion's order: the first call on the whole latent, then every call patch by patch through
    ``step_patch``, which keeps one whole-latent state and each call's noise."""
    sigmas = offset_first_sigma_for_snr(scheduler_sigmas(FluxShift(1.15), "simple", 6), FluxShift(1.15))
    program = sampler_program(name, sigmas, FluxShift(1.15))
    x0 = torch.randn(1, 24, 16, generator=torch.Generator().manual_seed(4))  # (B, tokens, C)

    def call_noise(k):
        return torch.randn(1, 24, 16, generator=torch.Generator().manual_seed(100 + k))

    whole, state = x0.clone(), None
    for k in range(program.total_calls):
        denoised = _toy_denoiser(whole, program.call_sigmas[k] * torch.ones(1))
        whole, state = program.step(whole, denoised, sigmas, k, state, lambda: call_noise(k))
    x, state = x0.clone(), None
    for k in range(program.total_calls):
        for start, stop in [(0, 24)] if k == 0 else [(0, 8), (8, 16), (16, 24)]:
            denoised = _toy_denoiser(x[:, start:stop], program.call_sigmas[k] * torch.ones(1))
            state = step_patch(program.step, x, denoised, sigmas, k, state, start, stop, call_noise)
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
    """sa_solver: Ulysses, ring, CFG parallel and PipeFusion with a whole warm-up equal serial;
    sa_solver_pece with PipeFusion after a one-step warm-up (its evaluations of corrected latents are
    pipeline steps too) equals its reference."""
    serial = Engine(load_model(MODEL)).generate(_request("sa_solver"))
    layouts = [ParallelConfig(ulysses_degree=2), ParallelConfig(ring_degree=2), ParallelConfig(cfg_degree=2),
               ParallelConfig(pipefusion_degree=2, num_patches=2, warmup_steps=STEPS)]
    stale = dataclasses.replace(_request("sa_solver_pece"), parallel=ParallelConfig(pipefusion_degree=2, num_patches=4,
                                                                                    warmup_steps=1))
    results = generate_local_many([dataclasses.replace(_request("sa_solver"), parallel=p) for p in layouts] + [stale],
                                  timeout=400)
    for layout, result in zip(layouts, results[:-1]):
        torch.testing.assert_close(result.latent, serial, rtol=1e-4, atol=1e-4, msg=layout.describe())
    adapter = load_model(MODEL)
    plan = prepare_plan(adapter, _request("sa_solver_pece"))
    assert plan.total_calls == 2 * STEPS - 1 and plan.noise_seed == 13
    reference = finish(adapter, plan, pipefusion_reference(adapter, plan, num_patches=4, warmup_steps=1))
    torch.testing.assert_close(results[-1].latent, reference, rtol=1e-4, atol=1e-4)
    pece_serial = Engine(load_model(MODEL)).generate(_request("sa_solver_pece"))
    assert relative_error(results[-1].latent, pece_serial) > 0  # stale K/V after warm-up: not the serial result
