"""Sampler steps: bit-equal to ComfyUI's k-diffusion loops, patch-wise equal to whole, and correct on an ODE."""

from types import SimpleNamespace

import pytest
import torch

from comfyui_xdit.samplers import (SNR_OFFSET_SAMPLERS, _lms_coeff, ddpm_step, deis_step, dpmpp_2m_step,
                                   dpmpp_3m_sde_step, er_sde_step, euler_step, gradient_estimation_step, ipndm_step,
                                   ipndm_v_step, lms_step, res_multistep_ancestral_step, res_multistep_step,
                                   sampler_step, step_patch)
from comfyui_xdit.sigmas import FluxShift, offset_first_sigma_for_snr, scheduler_sigmas

from comfy_reference import import_comfy


def _toy_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A deterministic non-linear x0 prediction (stands in for a model)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x) * (1 - s) + 0.1 * torch.sin(3 * x)


def _run_ours(step, x, sigmas):
    state = None
    for i in range(len(sigmas) - 1):
        denoised = _toy_denoiser(x, sigmas[i] * x.new_ones(x.shape[0]))
        x, state = step(x, denoised, sigmas, i, state)
    return x


@pytest.mark.parametrize("name,comfy_fn", [("euler", "sample_euler"), ("dpmpp_2m", "sample_dpmpp_2m"),
                                           ("res_multistep", "sample_res_multistep"), ("ipndm", "sample_ipndm"),
                                           ("ipndm_v", "sample_ipndm_v")])
@pytest.mark.parametrize("scheduler", ["simple", "karras"])
def test_steps_equal_comfyui_samplers_bit_for_bit(name, comfy_fn, scheduler):
    kd = import_comfy("comfy.k_diffusion.sampling")
    sigmas = scheduler_sigmas(FluxShift(1.15), scheduler, 9)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = getattr(kd, comfy_fn)(lambda x, s, **kw: _toy_denoiser(x, s), x.clone(), sigmas, disable=True)
    ours = _run_ours(sampler_step(name), x.clone(), sigmas)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("step", [euler_step, dpmpp_2m_step, res_multistep_step, ipndm_step, ipndm_v_step])
def test_patchwise_application_equals_whole(step):
    sigmas = scheduler_sigmas(FluxShift(1.15), "normal", 6)
    x = torch.randn(1, 24, 64, generator=torch.Generator().manual_seed(1))  # (B, tokens, 64)
    whole = _run_ours(step, x.clone(), sigmas)
    patches = [x[:, i:i + 8].clone() for i in range(0, 24, 8)]  # 3 patches of 8 tokens
    states = [None] * 3
    for i in range(len(sigmas) - 1):
        for p in range(3):
            denoised = _toy_denoiser(patches[p], sigmas[i] * torch.ones(1))
            patches[p], states[p] = step(patches[p], denoised, sigmas, i, states[p])
    assert torch.equal(torch.cat(patches, dim=1), whole)


def test_euler_integrates_a_known_flow():
    # With the exact x0 of a point mass at c, the flow ODE is solved exactly by Euler for any sigmas:
    # x(sigma) = (1 - sigma) c + sigma * eps, so x at sigma = 0 is c.
    c = torch.full((1, 4), 0.3)
    sigmas = torch.tensor([1.0, 0.6, 0.2, 0.0])
    x = torch.randn(1, 4)
    state = None
    for i in range(3):
        x, state = euler_step(x, c, sigmas, i, state)
    torch.testing.assert_close(x, c)


def test_dpmpp_2m_second_order_uses_history():
    sigmas = torch.tensor([0.9, 0.5, 0.2, 0.0])
    x = torch.ones(1, 2)
    first, state = dpmpp_2m_step(x, torch.zeros(1, 2), sigmas, 0, None)
    # first order: x * sigma1/sigma0 - expm1(-h) * 0 = x * 0.5/0.9
    torch.testing.assert_close(first, x * 0.5 / 0.9)
    assert state is not None
    second, _ = dpmpp_2m_step(first, torch.zeros(1, 2), sigmas, 1, (torch.ones(1, 2),))
    second_no_history, _ = dpmpp_2m_step(first, torch.zeros(1, 2), sigmas, 1, None)
    assert not torch.equal(second, second_no_history)


@pytest.mark.parametrize("step", [dpmpp_2m_step, res_multistep_step, ipndm_step, ipndm_v_step, dpmpp_3m_sde_step,
                                  lms_step, deis_step, ddpm_step, res_multistep_ancestral_step,
                                  gradient_estimation_step, er_sde_step])
def test_step_patch_after_a_whole_first_step_equals_whole(step):
    """PipeFusion's order: step 0 on the whole latent (warm-up), then every step patch by patch through
    ``step_patch``, which keeps one whole-latent history (ipndm's, lms', deis', 3M SDE's and ER-SDE's grow
    while patches run)
    and hands each patch its slice of the step's noise."""
    sigmas = scheduler_sigmas(FluxShift(1.15), "simple", 7)[1:]  # below 1: what SDE samplers step on
    x0 = torch.randn(1, 24, 16, generator=torch.Generator().manual_seed(4))  # (B, tokens, C)

    def step_noise(i):
        return torch.randn(1, 24, 16, generator=torch.Generator().manual_seed(100 + i))

    whole, state = x0.clone(), None
    for i in range(len(sigmas) - 1):
        denoised = _toy_denoiser(whole, sigmas[i] * torch.ones(1))
        whole, state = step(whole, denoised, sigmas, i, state, lambda: step_noise(i))
    x, state = x0.clone(), None
    for i in range(len(sigmas) - 1):
        bounds = [(0, 24)] if i == 0 else [(0, 8), (8, 16), (16, 24)]
        for start, stop in bounds:
            denoised = _toy_denoiser(x[:, start:stop], sigmas[i] * torch.ones(1))
            state = step_patch(step, x, denoised, sigmas, i, state, start, stop, step_noise)
    assert torch.equal(x, whole)


def test_euler_ancestral_equals_comfyui_with_its_noise_sampler():
    """Our step fed ComfyUI's noise stream (same seed, drawn in the latent's shape) equals ComfyUI's
    sample_euler_ancestral_RF bit for bit."""
    kd = import_comfy("comfy.k_diffusion.sampling")
    sigmas = scheduler_sigmas(FluxShift(1.15), "simple", 6)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = kd.sample_euler_ancestral_RF(lambda x, s, **kw: _toy_denoiser(x, s), x.clone(), sigmas,
                                          extra_args={"seed": 5}, disable=True)
    assert torch.equal(_run_with_noise("euler_ancestral", x.clone(), sigmas, seed=5), theirs)


def _run_with_noise(name, x, sigmas, seed):
    generator = torch.Generator().manual_seed(seed)
    state = None
    for i in range(len(sigmas) - 1):
        denoised = _toy_denoiser(x, sigmas[i] * x.new_ones(x.shape[0]))
        x, state = sampler_step(name)(x, denoised, sigmas, i, state, lambda: torch.randn(x.shape, generator=generator))
    return x



def _comfy_flux_model():
    """The toy denoiser as ComfyUI's samplers call the model, on a fake model object carrying a Flux model
    sampling (CONST) where its SNR samplers read it (``model.inner_model.model_patcher``)."""
    ms = import_comfy("comfy.model_sampling")
    sampling = type("FluxSampling", (ms.ModelSamplingFlux, ms.CONST), {})()  # shift 1.15, as FluxShift(1.15)

    def model(x, sigma, **kwargs):
        return _toy_denoiser(x, sigma)
    model.inner_model = SimpleNamespace(model_patcher=SimpleNamespace(get_model_object=lambda name: sampling),
                                        inner_model=SimpleNamespace(model_sampling=sampling))
    return model


# ComfyUI's function for each sampler; all but lms are equal bit for bit (noise fed from ComfyUI's stream)
NEW_SAMPLERS = {"lms": "sample_lms", "deis": "sample_deis", "ddpm": "sample_ddpm",
                "res_multistep_ancestral": "sample_res_multistep_ancestral",
                "gradient_estimation": "sample_gradient_estimation", "er_sde": "sample_er_sde"}


@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")  # ComfyUI's deis.py: np.log of a tensor
@pytest.mark.parametrize("name", sorted(NEW_SAMPLERS))
@pytest.mark.parametrize("scheduler,steps", [("simple", 6), ("karras", 9), ("beta", 7)])
def test_new_steps_equal_comfyui_samplers(name, scheduler, steps):
    kd = import_comfy("comfy.k_diffusion.sampling")
    sigmas = scheduler_sigmas(FluxShift(1.15), scheduler, steps)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = getattr(kd, NEW_SAMPLERS[name])(_comfy_flux_model(), x.clone(), sigmas, extra_args={"seed": 5},
                                             disable=True)
    # er_sde offsets the first sigma itself; our loop gets the offset schedule (as prepare_plan makes it)
    ours_sigmas = offset_first_sigma_for_snr(sigmas, FluxShift(1.15)) if name in SNR_OFFSET_SAMPLERS else sigmas
    ours = _run_with_noise(name, x.clone(), ours_sigmas, seed=5)
    if name == "lms":
        # ComfyUI integrates the Lagrange basis with scipy's quad on np.float32 sigmas, which numpy 2 keeps
        # in float32 against Python floats, so its weights are off by up to ~1e-7 relative (1.6e-6 at 30
        # steps); ours are exact in float64. Measured here: 7.3e-8 (simple), 2.9e-8 (karras), 4.6e-7 (beta).
        # test_lms_equals_comfyui_with_our_weights shows the rest is equal bit for bit.
        assert float((ours - theirs).norm() / theirs.norm()) < 1e-6
    else:
        assert torch.equal(ours, theirs)


def test_lms_equals_comfyui_with_our_weights(monkeypatch):
    """With ComfyUI's quadrature replaced by our exact weights, its sample_lms equals ours bit for bit."""
    kd = import_comfy("comfy.k_diffusion.sampling")
    monkeypatch.setattr(kd, "linear_multistep_coeff",
                        lambda order, t, i, j: _lms_coeff(torch.from_numpy(t), i, order, j))
    sigmas = scheduler_sigmas(FluxShift(1.15), "beta", 9)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = kd.sample_lms(_comfy_flux_model(), x.clone(), sigmas, disable=True)
    assert torch.equal(_run_ours(lms_step, x.clone(), sigmas), theirs)


def test_lms_weights_integrate_the_lagrange_basis():
    # the basis polynomials sum to 1, so a step's weights sum to its length; one point: plain Euler
    sigmas = scheduler_sigmas(FluxShift(1.15), "karras", 8)
    for i in range(len(sigmas) - 2):
        order = min(i + 1, 4)
        weights = [_lms_coeff(sigmas, i, order, j) for j in range(order)]
        assert sum(weights) == pytest.approx(float(sigmas[i + 1]) - float(sigmas[i]), rel=1e-12)
    assert _lms_coeff(sigmas, 0, 1, 0) == float(sigmas[1]) - float(sigmas[0])

def test_unknown_sampler_names_choices():
    with pytest.raises(ValueError, match="euler, euler_cfg_pp, euler_ancestral"):
        sampler_step("dpm_adaptive")
