"""Same seed, same latent: our serial engine against stock ComfyUI sampling of the same Flux file.

ComfyUI only loads full-width Flux (3072 wide, 24 heads, T5 width 4096), so the file is the smallest
such model (1 double + 1 single block, random weights, ~1.1 GB in bf16), written once per module.
ComfyUI runs in this process from COMFYUI_PATH, as `nodes.common_ksampler` does (UNETLoader + KSampler,
optionally with the ModelSamplingFlux node's patch).
"""

import pytest
import torch

from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model
from comfyui_xdit.models.flux_checkpoint import COMFY_MIN_FLUX, write_random_flux
from comfyui_xdit.request import GenerationRequest, ModelRef, SigmaShift

from comfy_reference import comfy_path, import_comfy, SKIP_REASON

pytestmark = pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)

TEXT_LEN = 12


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "flux-min.safetensors"
    write_random_flux(path, COMFY_MIN_FLUX, seed=11, dtype=torch.bfloat16)
    return str(path)


@pytest.fixture(scope="module")
def comfy_model(flux_file):
    comfy_sd = import_comfy("comfy.sd")
    return comfy_sd.load_diffusion_model(flux_file, model_options={"dtype": torch.float32})


@pytest.fixture(scope="module")
def our_engine(flux_file):
    return Engine(load_model(ModelRef(flux_file, "fp32")))


def _conditioning(seed: int) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, TEXT_LEN, 4096, generator=g), torch.randn(1, 768, generator=g), guidance=3.5)


def _comfy_cond(c: Conditioning):
    return [[c.context, {"pooled_output": c.pooled, "guidance": c.guidance}]]


def _comfy_sample(model, request: GenerationRequest):
    comfy_sample = import_comfy("comfy.sample")
    if request.shift.mode == "resolution":
        advanced = import_comfy("comfy_extras.nodes_model_advanced")
        h, w = request.latent.shape[2] * 8, request.latent.shape[3] * 8
        (model,) = advanced.ModelSamplingFlux().patch(model, request.shift.max_shift, request.shift.base_shift, w, h)
    latent = comfy_sample.fix_empty_latent_channels(model, request.latent)
    noise = comfy_sample.prepare_noise(latent, request.seed)
    negative = request.negative or request.positive
    return comfy_sample.sample(model, noise, request.steps, request.cfg, request.sampler, request.scheduler,
                               _comfy_cond(request.positive), _comfy_cond(negative), latent,
                               denoise=request.denoise, disable_pbar=True, seed=request.seed)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


CASES = {
    "euler-simple-default-shift": dict(sampler="euler", scheduler="simple"),
    "euler-beta-modelsamplingflux": dict(sampler="euler", scheduler="beta", shift=SigmaShift(mode="resolution")),
    "dpmpp2m-normal-cfg": dict(sampler="dpmpp_2m", scheduler="normal", cfg=2.5, negative=_conditioning(2)),
    "dpmpp2m-karras": dict(sampler="dpmpp_2m", scheduler="karras"),
    "euler-kl-optimal": dict(sampler="euler", scheduler="kl_optimal"),
    "euler-ddim-uniform": dict(sampler="euler", scheduler="ddim_uniform"),
    "ddim-sgm-uniform": dict(sampler="ddim", scheduler="sgm_uniform"),
    "euler-ancestral-beta-cfg": dict(sampler="euler_ancestral", scheduler="beta", cfg=2.5, negative=_conditioning(2)),
    "dpmpp-2m-sde-beta-cfg": dict(sampler="dpmpp_2m_sde", scheduler="beta", cfg=2.5, negative=_conditioning(2)),
    "dpmpp-2m-sde-heun-karras": dict(sampler="dpmpp_2m_sde_heun", scheduler="karras"),
    "dpmpp-3m-sde-simple-6-steps": dict(sampler="dpmpp_3m_sde", scheduler="simple", steps=6),
    "lcm-sgm-uniform": dict(sampler="lcm", scheduler="sgm_uniform"),
    "ipndm-v-karras-6-steps": dict(sampler="ipndm_v", scheduler="karras", steps=6),
    "ipndm-simple-6-steps": dict(sampler="ipndm", scheduler="simple", steps=6),
    "res-multistep-beta-cfg": dict(sampler="res_multistep", scheduler="beta", cfg=2.5, negative=_conditioning(2)),
    "heun-simple": dict(sampler="heun", scheduler="simple"),
    "heunpp2-karras-5-steps": dict(sampler="heunpp2", scheduler="karras", steps=5),
    "dpm-2-beta-cfg": dict(sampler="dpm_2", scheduler="beta", cfg=2.5, negative=_conditioning(2)),
    "dpm-2-ancestral-simple": dict(sampler="dpm_2_ancestral", scheduler="simple"),
    "dpmpp-2s-ancestral-normal-cfg": dict(sampler="dpmpp_2s_ancestral", scheduler="normal", cfg=2.5,
                                          negative=_conditioning(2)),
    "dpmpp-sde-karras": dict(sampler="dpmpp_sde", scheduler="karras"),
    "dpmpp-sde-gpu-simple": dict(sampler="dpmpp_sde_gpu", scheduler="simple"),  # tree on the model's device
    "dpmpp-3m-sde-gpu-beta-cfg": dict(sampler="dpmpp_3m_sde_gpu", scheduler="beta", steps=5, cfg=2.5,
                                      negative=_conditioning(2)),
    "lms-karras-6-steps": dict(sampler="lms", scheduler="karras", steps=6),
    "deis-beta-cfg-6-steps": dict(sampler="deis", scheduler="beta", steps=6, cfg=2.5, negative=_conditioning(2)),
    "ddpm-simple": dict(sampler="ddpm", scheduler="simple"),
    "res-multistep-ancestral-normal-cfg": dict(sampler="res_multistep_ancestral", scheduler="normal", cfg=2.5,
                                               negative=_conditioning(2)),
    "gradient-estimation-sgm-uniform-5-steps": dict(sampler="gradient_estimation", scheduler="sgm_uniform", steps=5),
    "er-sde-beta-modelsamplingflux-6-steps": dict(sampler="er_sde", scheduler="beta", steps=6,
                                                  shift=SigmaShift(mode="resolution")),
    "euler-cfg-pp-simple-cfg-1": dict(sampler="euler_cfg_pp", scheduler="simple", negative=_conditioning(2)),
    "dpmpp-2m-cfg-pp-karras-cfg": dict(sampler="dpmpp_2m_cfg_pp", scheduler="karras", cfg=1.5,
                                       negative=_conditioning(2)),
    "dpmpp-2s-ancestral-cfg-pp-beta-cfg": dict(sampler="dpmpp_2s_ancestral_cfg_pp", scheduler="beta", cfg=1.5,
                                               negative=_conditioning(2)),
    "euler-ancestral-cfg-pp-normal": dict(sampler="euler_ancestral_cfg_pp", scheduler="normal", cfg=1.5,
                                          negative=_conditioning(2)),
    "res-multistep-cfg-pp-sgm-uniform": dict(sampler="res_multistep_cfg_pp", scheduler="sgm_uniform",
                                             negative=_conditioning(2)),
    "res-multistep-ancestral-cfg-pp-karras": dict(sampler="res_multistep_ancestral_cfg_pp", scheduler="karras",
                                                  cfg=1.5, negative=_conditioning(2)),
    "gradient-estimation-cfg-pp-beta": dict(sampler="gradient_estimation_cfg_pp", scheduler="beta", cfg=1.5,
                                            negative=_conditioning(2)),
    "seeds-2-beta-cfg": dict(sampler="seeds_2", scheduler="beta", cfg=2.5, negative=_conditioning(2)),
    "seeds-3-karras": dict(sampler="seeds_3", scheduler="karras"),
    "sa-solver-karras-6-steps": dict(sampler="sa_solver", scheduler="karras", steps=6),
    "sa-solver-pece-simple-cfg": dict(sampler="sa_solver_pece", scheduler="simple", cfg=2.5, negative=_conditioning(2)),
    "dpm-fast-karras-5-steps": dict(sampler="dpm_fast", scheduler="karras", steps=5),
    "uni-pc-karras-6-steps": dict(sampler="uni_pc", scheduler="karras", steps=6),
    "uni-pc-bh2-simple-cfg-img2img": dict(sampler="uni_pc_bh2", scheduler="simple", cfg=2.5, negative=_conditioning(2),
                                          denoise=0.7, latent=torch.randn(1, 16, 16, 16,
                                                                          generator=torch.Generator().manual_seed(8))),
    "img2img-denoise": dict(sampler="euler", scheduler="simple", denoise=0.6,
                            latent=torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(5))),
}


# The default suite runs these Flux cases (one per kind of sampler: plain, ModelSamplingFlux, multistep with
# CFG, ancestral, Brownian SDE, two calls per step, CFG++, UniPC img2img); every case runs on the stock-loadable
# tiny SD3 in test_sd3_family.py, whose forward costs a hundredth of this full-width Flux; all of them here
# with XDIT_SLOW_TESTS=1.
FLUX_DEFAULT_CASES = ("euler-simple-default-shift", "euler-beta-modelsamplingflux", "dpmpp2m-normal-cfg",
                      "euler-ancestral-beta-cfg", "dpmpp-2m-sde-beta-cfg", "heun-simple", "euler-cfg-pp-simple-cfg-1",
                      "uni-pc-bh2-simple-cfg-img2img", "img2img-denoise")


@pytest.mark.parametrize("case", [pytest.param(case, marks=() if case in FLUX_DEFAULT_CASES else pytest.mark.slow)
                                  for case in sorted(CASES)])
def test_serial_engine_equals_stock_comfyui(case, comfy_model, our_engine, flux_file):
    options = dict(CASES[case])
    latent = options.pop("latent", torch.zeros(1, 16, 16, 16))  # 128x128 px
    options.setdefault("steps", 4)
    request = GenerationRequest(model=ModelRef(flux_file, "fp32"), latent=latent, positive=_conditioning(1),
                                seed=1234, **options)
    theirs = _comfy_sample(comfy_model, request)
    ours = our_engine.generate(request)
    assert ours.shape == theirs.shape
    error = _relative_error(ours, theirs)
    print(f"{case}: relative error {error:.2e} (latent std {float(theirs.std()):.3f})")
    assert error < 1e-4, f"{case}: relative error {error:.2e}"


# Our engine computes in the dtype asked for; ComfyUI on a CPU host computes bf16/fp16 weights in fp32
# (on a GPU both compute in bf16). Measured 2026-11-24 (this file's model, 4 euler steps): bf16 3.5e-3,
# fp16 4.6e-4 relative; asserted with headroom. A bf16-rounded timestep (the old x1000 after the cast)
# gave 2.1e-1 (bf16) and 1.2e-2 (fp16) here, failing both bounds.
HALF_BOUNDS = {"bf16": (torch.bfloat16, 1e-2), "fp16": (torch.float16, 2e-3)}


@pytest.mark.parametrize("dtype", sorted(HALF_BOUNDS))
def test_half_precision_engine_close_to_stock_comfyui(dtype, flux_file):
    torch_dtype, bound = HALF_BOUNDS[dtype]
    comfy_sd = import_comfy("comfy.sd")
    comfy_model = comfy_sd.load_diffusion_model(flux_file, model_options={"dtype": torch_dtype})
    request = GenerationRequest(model=ModelRef(flux_file, dtype), latent=torch.zeros(1, 16, 16, 16),
                                positive=_conditioning(1), seed=1234, steps=4)
    theirs = _comfy_sample(comfy_model, request)
    ours = Engine(load_model(request.model)).generate(request)
    error = _relative_error(ours, theirs)
    print(f"{dtype}: relative error {error:.2e}")
    assert 1e-6 < error < bound, f"{dtype}: relative error {error:.2e}"


def _comfy_sample_custom(model, request: GenerationRequest):
    """SamplerCustom: add_noise on, the sampler by name, the schedule as given."""
    comfy_sample, comfy_samplers = import_comfy("comfy.sample"), import_comfy("comfy.samplers")
    latent = comfy_sample.fix_empty_latent_channels(model, request.latent)
    noise = comfy_sample.prepare_noise(latent, request.seed)
    negative = request.negative or request.positive
    return comfy_sample.sample_custom(model, noise, request.cfg, comfy_samplers.sampler_object(request.sampler),
                                      request.sigmas, _comfy_cond(request.positive), _comfy_cond(negative), latent,
                                      disable_pbar=True, seed=request.seed)


@pytest.mark.parametrize("case", ["karras-from-basic-scheduler", "split-first-half", "hand-made-img2img"])
def test_custom_sigmas_equal_stock_sampler_custom(case, comfy_model, our_engine, flux_file):
    comfy_samplers = import_comfy("comfy.samplers")
    latent = torch.zeros(1, 16, 16, 16)
    if case == "karras-from-basic-scheduler":  # what BasicScheduler gives for this model
        sigmas = comfy_samplers.calculate_sigmas(comfy_model.get_model_object("model_sampling"), "karras", 5).cpu()
    elif case == "split-first-half":  # SplitSigmas' first part: the last sigma is not 0
        sigmas = comfy_samplers.calculate_sigmas(comfy_model.get_model_object("model_sampling"), "simple", 6)[:4].cpu()
    else:  # a hand-made schedule on a non-empty latent
        sigmas = torch.tensor([0.8, 0.55, 0.3, 0.1, 0.0])
        latent = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(8))
    request = GenerationRequest(model=ModelRef(flux_file, "fp32"), latent=latent, positive=_conditioning(3),
                                negative=_conditioning(4), seed=77, cfg=2.0, sampler="dpmpp_2m",
                                steps=20, scheduler="beta", denoise=0.3, sigmas=sigmas)  # the last three are ignored
    theirs = _comfy_sample_custom(comfy_model, request)
    ours = our_engine.generate(request)
    error = _relative_error(ours, theirs)
    print(f"custom sigmas {case}: relative error {error:.2e}")
    assert error < 1e-4, f"{case}: relative error {error:.2e}"


def _half_mask(size: int = 128) -> torch.Tensor:
    """A pixel mask (1, H, W): the right half is repainted, with a soft edge so bilinear scaling matters."""
    mask = torch.zeros(1, size, size)
    mask[:, :, size // 2:] = 1.0
    mask[:, :, size // 2 - 4:size // 2] = 0.5
    return mask


INPAINT_CASES = {
    "euler-mask": dict(sampler="euler"),
    "dpmpp2m-mask-cfg-batch3": dict(sampler="dpmpp_2m", cfg=2.5, negative=_conditioning(2), batch=3),
    "ddim-mask-own-noise": dict(sampler="ddim"),
    "euler-ancestral-mask-batch2": dict(sampler="euler_ancestral", batch=2),
    "dpmpp-2m-sde-mask-batch2": dict(sampler="dpmpp_2m_sde", batch=2),
    "batch-index-no-mask": dict(sampler="euler", batch=2, batch_index=(2, 0), mask=False),
    "img2img-mask-denoise": dict(sampler="euler", denoise=0.7, image=True),
    "uni-pc-mask-batch2": dict(sampler="uni_pc", batch=2),
}


@pytest.mark.parametrize("case", sorted(INPAINT_CASES))
def test_noise_mask_and_batch_index_equal_stock_comfyui(case, comfy_model, our_engine, flux_file):
    options = dict(INPAINT_CASES[case])
    batch, image, use_mask = options.pop("batch", 1), options.pop("image", False), options.pop("mask", True)
    batch_index = options.pop("batch_index", None)
    latent = (torch.randn(batch, 16, 16, 16, generator=torch.Generator().manual_seed(6)) if image
              else torch.zeros(batch, 16, 16, 16))
    request = GenerationRequest(model=ModelRef(flux_file, "fp32"), latent=latent, positive=_conditioning(1),
                                seed=99, steps=4, scheduler="simple", noise_mask=_half_mask() if use_mask else None,
                                batch_index=batch_index, **options)
    comfy_sample = import_comfy("comfy.sample")
    fixed = comfy_sample.fix_empty_latent_channels(comfy_model, request.latent)
    noise = comfy_sample.prepare_noise(fixed, request.seed, list(batch_index) if batch_index else None)
    negative = request.negative or request.positive
    theirs = comfy_sample.sample(comfy_model, noise, request.steps, request.cfg, request.sampler, request.scheduler,
                                 _comfy_cond(request.positive), _comfy_cond(negative), fixed, denoise=request.denoise,
                                 noise_mask=request.noise_mask, disable_pbar=True, seed=request.seed)
    ours = our_engine.generate(request)
    error = _relative_error(ours, theirs)
    print(f"{case}: relative error {error:.2e}")
    assert error < 1e-4, f"{case}: relative error {error:.2e}"


@pytest.mark.parametrize("fp8", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_file_gives_stock_comfyuis_latent(fp8, tmp_path):
    """A Flux file stored in fp8 (like flux1-dev-fp8), loaded as UNETLoader's weight_dtype default does on
    this CPU host (fp8 weights computed in fp32), and by our engine in fp32 (the nodes' default on CPU)."""
    path = tmp_path / f"flux-min-{fp8}.safetensors"
    write_random_flux(path, COMFY_MIN_FLUX, seed=12, dtype=getattr(torch, fp8))
    comfy_model = import_comfy("comfy.sd").load_diffusion_model(str(path))
    request = GenerationRequest(model=ModelRef(str(path), "fp32"), latent=torch.zeros(1, 16, 16, 16),
                                positive=_conditioning(1), seed=1234, steps=3)
    theirs = _comfy_sample(comfy_model, request)
    ours = Engine(load_model(request.model)).generate(request)
    error = _relative_error(ours, theirs)
    print(f"{fp8}: relative error {error:.2e}")
    assert error < 1e-4, f"{fp8}: relative error {error:.2e}"
