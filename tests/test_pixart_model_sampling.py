"""PixArt on the samplers ported last and on ModelSamplingDiscrete's patches, against stock ComfyUI in process.

- the samplers whose ComfyUI code branches on the model sampling (``CONST`` or not, its half log-SNR) and
  that were refused on EPS / v models before: dpm_2_ancestral, dpmpp_2s_ancestral, dpmpp_sde(_gpu),
  seeds_2/3, sa_solver(_pece) (every one with true CFG in the slow suite);
- ModelSamplingDiscrete (``comfy_extras/nodes_model_advanced.py``) with sampling eps / v_prediction and
  zsnr on or off: what XDiTParallelModel reads off the patched MODEL, and the latent of UNETLoader +
  ModelSamplingDiscrete + KSampler (PixArt as a v model, its timesteps on the zero-terminal-SNR table);
  its lcm / x0 / img_to_img and a patch on a flow model refused naming what works.
The step-level, bit-for-bit checks of the same samplers are ``tests/test_samplers_eps.py``.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model
from comfyui_xdit.models.families import write_random_model
from comfyui_xdit.models.pixart_checkpoint import TINY_PIXART_SIGMA
from comfyui_xdit.request import GenerationRequest, ModelRef, SigmaShift

from comfy_reference import SKIP_REASON, comfy_path, import_comfy
from nodes_package import nodes_module
from test_pixart_family import LATENT, _conditioning, _patched, _relative, _stock


@pytest.fixture(scope="module")
def sigma_pair(tmp_path_factory) -> tuple:
    """(stock ComfyUI's MODEL, our adapter) of the stock-loadable tiny PixArt-sigma, loaded once."""
    if comfy_path() is None:
        pytest.skip(SKIP_REASON)
    path = str(tmp_path_factory.mktemp("models") / "pixart-sigma-tiny.safetensors")
    write_random_model(path, TINY_PIXART_SIGMA, seed=5)
    model = import_comfy("comfy.sd").load_diffusion_model(path, model_options={"dtype": torch.float32})
    return model, load_model(ModelRef(path, "fp32"))


# samplers whose ComfyUI code branches on CONST, ported last: end to end against stock (2 steps, cfg 1 by
# default; every one with true CFG in the slow suite)
PORTED_SAMPLERS = ("dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu", "seeds_2", "seeds_3",
                   "sa_solver", "sa_solver_pece")


@pytest.mark.slow
@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("sampler", PORTED_SAMPLERS)
def test_ported_samplers_on_pixart_equal_stock(sampler, sigma_pair) -> None:
    model, adapter = sigma_pair
    request = GenerationRequest(model=ModelRef("unused"), latent=torch.zeros(1, 4, *LATENT), positive=_conditioning(1),
                                negative=_conditioning(2), seed=11, steps=3, cfg=2.0, sampler=sampler,
                                scheduler="karras")
    error = _relative(Engine(adapter).generate(request), _stock(model, request))
    assert error < 1e-4, error


# ModelSamplingDiscrete's patches: (sampling, zsnr) -> a sampler, in the default suite
DISCRETE_PATCH_CASES = {
    "eps-zsnr": (SigmaShift(mode="discrete", prediction="eps", zsnr=True), "euler"),
    "v": (SigmaShift(mode="discrete", prediction="v"), "dpmpp_2s_ancestral"),
    "v-zsnr": (SigmaShift(mode="discrete", prediction="v", zsnr=True), "dpmpp_sde"),
}


def _discrete_patch_request(case: str, **kwargs) -> GenerationRequest:
    shift, sampler = DISCRETE_PATCH_CASES[case]
    options = dict(model=ModelRef("unused"), latent=torch.zeros(1, 4, *LATENT), positive=_conditioning(1), seed=21,
                   steps=2, sampler=sampler, scheduler="normal", shift=shift)
    return GenerationRequest(**{**options, **kwargs})


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("case", sorted(DISCRETE_PATCH_CASES))
def test_model_sampling_discrete_patches_equal_stock(case, sigma_pair) -> None:
    """What the node reads off the patched MODEL is the request's model sampling, and the latent equals the
    stock graph's (UNETLoader + ModelSamplingDiscrete + KSampler)."""
    model, adapter = sigma_pair
    request = _discrete_patch_request(case)
    sampling = {"eps": "eps", "v": "v_prediction"}[request.shift.prediction]
    assert nodes_module("model_patches").sigma_shift(_patched(model, sampling, request.shift.zsnr)) == request.shift
    error = _relative(Engine(adapter).generate(request), _stock(model, request))
    assert error < 1e-4, error


@pytest.mark.slow
@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("case,sampler", [("eps-zsnr", "seeds_3"), ("v", "sa_solver_pece"),
                                          ("v-zsnr", "dpm_2_ancestral"), ("v-zsnr", "dpmpp_2m")])
def test_model_sampling_discrete_patches_with_cfg_equal_stock(case, sampler, sigma_pair) -> None:
    model, adapter = sigma_pair
    request = _discrete_patch_request(case, sampler=sampler, steps=3, cfg=3.0, negative=_conditioning(2),
                                      scheduler="karras")
    error = _relative(Engine(adapter).generate(request), _stock(model, request))
    assert error < 1e-4, error


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_model_sampling_discrete_default_and_refusals(sigma_pair) -> None:
    """The node's eps without zsnr is PixArt's own sampling; lcm / x0 / img_to_img are refused naming what
    works; ModelSamplingDiscrete on a flow model is refused."""
    model, _ = sigma_pair
    patches = nodes_module("model_patches")
    assert patches.sigma_shift(model) == SigmaShift()
    assert patches.sigma_shift(_patched(model, "eps", False)) == SigmaShift()
    for sampling in ("lcm", "x0", "img_to_img"):
        with pytest.raises(ValueError, match=rf"ModelSamplingDiscrete's '{sampling}' sampling, which the xDiT ranks "
                                             r"do not reproduce; xDiT runs ModelSamplingDiscrete with sampling eps or "
                                             r"v_prediction, zsnr on or off"):
            patches.sigma_shift(_patched(model, sampling, False))
    model_base = import_comfy("comfy.model_base")
    flux_like = types.SimpleNamespace(model=types.SimpleNamespace(model_type=model_base.ModelType.FLUX),
                                      get_model_object=lambda name: model.get_model_object(name))
    with pytest.raises(ValueError, match="samples on a flow schedule, but carries a ModelSamplingDiscrete patch"):
        patches.sigma_shift(flux_like)


@pytest.mark.slow
def test_model_sampling_discrete_patch_in_parallel_equals_serial() -> None:
    """A v_prediction + zsnr patch (the adapter's timesteps read off the zsnr table) under Ulysses, CFG parallel
    and PipeFusion (warm-up = steps) on the narrow PixArt: the serial latent to float tolerance."""
    from comfyui_xdit.model_loader import tiny_conditioning
    from comfyui_xdit.parallel.launch import generate_local_many, stop_helper_processes
    from comfyui_xdit.parallel_config import ParallelConfig

    ref = ModelRef("tiny:pixart-sigma-narrow")
    positive, negative = tiny_conditioning(ref, seed=3)
    base = GenerationRequest(model=ref, latent=torch.zeros(1, 4, *LATENT), positive=positive, negative=negative,
                             seed=7, steps=3, cfg=2.5, sampler="dpmpp_sde", scheduler="karras",
                             shift=SigmaShift(mode="discrete", prediction="v", zsnr=True))
    layouts = [ParallelConfig(ulysses_degree=2), ParallelConfig(cfg_degree=2),
               ParallelConfig(pipefusion_degree=2, warmup_steps=3)]
    try:
        results = generate_local_many([dataclasses.replace(base, parallel=p) for p in layouts], timeout=500)
    finally:
        stop_helper_processes()
    serial = Engine(load_model(ref)).generate(base)
    for layout, result in zip(layouts, results):
        assert _relative(result.latent, serial) < 1e-4, layout.describe()
