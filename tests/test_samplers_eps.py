"""Samplers on EPS / v models: the steps whose ComfyUI code branches on the model sampling type, in their
EPS / v form, bit-equal to ComfyUI's (its non-CONST branch, on a ModelSamplingDiscrete with and without zsnr),
model call by model call; every sampler has that form (a refused one would be named with those that work);
the flow forms untouched."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from comfyui_xdit import samplers
from comfyui_xdit.noise import BrownianNoise
from comfyui_xdit.prediction import EPS, FLOW, V
from comfyui_xdit.samplers import SAMPLER_NAMES, check_sampler, sampler_program, samplers_for
from comfyui_xdit.sampling import apply_cfg
from comfyui_xdit.sigmas import DiscreteSchedule, FluxShift, offset_first_sigma_for_snr, sampling_sigmas

from comfy_reference import import_comfy

PIXART = DiscreteSchedule(beta_schedule="sqrt_linear", linear_start=0.0001, linear_end=0.02)
PIXART_ZSNR = DiscreteSchedule(beta_schedule="sqrt_linear", linear_start=0.0001, linear_end=0.02, zsnr=True)
CFG = 2.5


def _cond(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A deterministic non-linear x0 prediction at an EPS model's sigmas (stands in for a model)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x / (1 + s ** 2) ** 0.5) + 0.1 * torch.sin(3 * x / (1 + s))


def _uncond(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return 0.8 * torch.tanh(x / (1 + s ** 2) ** 0.5) - 0.05 * torch.cos(2 * x / (1 + s))


def _comfy_eps_model(guided: bool, zsnr: bool = False, kind: str = "EPS", seen: list | None = None):
    """The toy model as ComfyUI's samplers call it (x0 out; with ``guided``, CFG and the post-CFG hooks its
    CFG++ samplers read), on a fake model object carrying PixArt's ModelSamplingDiscrete (``kind`` EPS or
    V_PREDICTION, with ``zsnr`` as ModelSamplingDiscrete's node sets it); ``seen`` records each call's sigma."""
    ms = import_comfy("comfy.model_sampling")
    settings = {"beta_schedule": "sqrt_linear", "linear_start": 0.0001, "linear_end": 0.02, "timesteps": 1000}
    sampling = type("Sampling", (ms.ModelSamplingDiscrete, getattr(ms, kind)), {})(
        type("Config", (), {"sampling_settings": settings})(), zsnr=zsnr)

    def model(x, sigma, model_options=None, **kwargs):
        if seen is not None:
            seen.append(float(sigma[0]))
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


def _run_ours(name, x, sigmas, noise, guided, schedule=PIXART, prediction=EPS, seen=None):
    program = sampler_program(name, sigmas, schedule, prediction)
    state = None
    for k in range(program.total_calls):
        if seen is not None:
            seen.append(float(program.call_sigmas[k]))
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


# the samplers whose non-flow form was ported last (they were refused on EPS / v models before)
PORTED = {"dpm_2_ancestral": "sample_dpm_2_ancestral", "dpmpp_2s_ancestral": "sample_dpmpp_2s_ancestral",
          "seeds_2": "sample_seeds_2", "seeds_3": "sample_seeds_3", "sa_solver": "sample_sa_solver",
          "sa_solver_pece": "sample_sa_solver_pece"}


@pytest.mark.parametrize("name", sorted(PORTED))
@pytest.mark.parametrize("scheduler", ["normal", "karras"])
@pytest.mark.parametrize("zsnr", [False, True], ids=["plain", "zsnr"])
@pytest.mark.parametrize("prediction", [EPS, V], ids=["eps", "v"])
def test_ported_samplers_equal_comfyui_call_by_call(name, scheduler, zsnr, prediction):
    """The same model calls at the same sigmas and the same result as ComfyUI's non-CONST branch, on PixArt's
    schedule and its zero-terminal-SNR rescaling (sigma_max ~4.5e3), for an EPS and a v model sampling."""
    kd = import_comfy("comfy.k_diffusion.sampling")
    schedule = PIXART_ZSNR if zsnr else PIXART
    sigmas = sampling_sigmas(schedule, scheduler, 6, discard_penultimate=name == "dpm_2_ancestral")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    their_draws, our_draws, their_calls, our_calls = _Draws(x.shape, 5), _Draws(x.shape, 5), [], []
    kind = "EPS" if prediction is EPS else "V_PREDICTION"
    theirs = getattr(kd, PORTED[name])(_comfy_eps_model(False, zsnr, kind, their_calls), x.clone(), sigmas.clone(),
                                       extra_args={"seed": 5}, disable=True, noise_sampler=their_draws.sampler())
    ours = _run_ours(name, x.clone(), sigmas, our_draws, False, schedule, prediction, our_calls)
    assert our_calls == their_calls
    assert len(our_draws.drawn) > 0  # the noise reached the steps
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_sde_gpu"])
@pytest.mark.parametrize("scheduler", ["normal", "karras"])
@pytest.mark.parametrize("zsnr", [False, True], ids=["plain", "zsnr"])
def test_dpmpp_sde_equals_comfyui_with_its_brownian_tree(name, scheduler, zsnr):
    """dpmpp_sde's EPS form: its midpoint in -log sigma, its noise the Brownian tree over the schedule
    (no offset of the first sigma: that is for flow models only)."""
    kd = import_comfy("comfy.k_diffusion.sampling")
    schedule = PIXART_ZSNR if zsnr else PIXART
    sigmas = sampling_sigmas(schedule, scheduler, 5)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    their_calls, our_calls = [], []
    theirs = getattr(kd, f"sample_{name}")(_comfy_eps_model(False, zsnr, seen=their_calls), x.clone(), sigmas.clone(),
                                           extra_args={"seed": 9}, disable=True)
    program = sampler_program(name, sigmas, schedule, EPS)
    noise = BrownianNoise(9, x.shape, lambda t: t, torch.device("cpu"), sigmas, program.noise_spans)
    ours = _run_ours(name, x.clone(), sigmas, noise, False, schedule, EPS, our_calls)
    assert our_calls == their_calls
    assert torch.equal(ours, theirs)


def test_eps_forms_differ_from_the_flow_forms():
    sigmas = sampling_sigmas(PIXART, "normal", 4)
    for name in ("euler_ancestral", "lcm", "dpmpp_2m_sde", "er_sde"):
        assert sampler_program(name, sigmas, PIXART, EPS).step is not sampler_program(name, sigmas).step, name
    # where ComfyUI branches on CONST, the model calls themselves move (a flow schedule, offset below sigma 1)
    flow_sigmas = offset_first_sigma_for_snr(sampling_sigmas(FluxShift(), "simple", 4), FluxShift())
    for name in ("dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "seeds_2", "seeds_3"):
        eps = sampler_program(name, flow_sigmas, FluxShift(), EPS).call_sigmas
        flow = sampler_program(name, flow_sigmas, FluxShift(), FLOW).call_sigmas
        assert not torch.equal(eps, flow), name


@pytest.mark.parametrize("prediction", [FLOW, EPS, V], ids=lambda p: p.name)
def test_every_sampler_runs_on_every_prediction(prediction):
    assert samplers_for(prediction) == SAMPLER_NAMES
    sigmas = sampling_sigmas(PIXART, "karras", 3)
    for name in SAMPLER_NAMES:
        check_sampler(name, prediction)
        assert sampler_program(name, sigmas, PIXART, prediction).total_calls >= 3, name


def test_a_sampler_without_a_form_is_refused_naming_those_that_work(monkeypatch):
    """The refusal stays for a sampler that some day lacks a form (none today)."""
    monkeypatch.setattr(samplers, "UNAVAILABLE", {"v": frozenset({"seeds_3"})})
    with pytest.raises(ValueError, match=r"sampler 'seeds_3' is not available for this V-prediction model; "
                                         r"choose one of euler, euler_cfg_pp, euler_ancestral"):
        check_sampler("seeds_3", V)
    with pytest.raises(ValueError, match="not available for this V"):
        sampler_program("seeds_3", sampling_sigmas(PIXART, "normal", 4), PIXART, V)
    assert "seeds_3" not in samplers_for(V) and "seeds_3" in samplers_for(EPS)
    check_sampler("seeds_3", EPS)
