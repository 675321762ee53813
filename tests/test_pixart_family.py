"""PixArt-alpha / PixArt-sigma: the first EPS family, through the family seam and the prediction seam.

- PixArt's single-file layout: detection (alpha by its micro-condition embedders), spec from the header,
  renaming onto diffusers;
- our piecewise forward (self-attention through the seam, cross-attention local, positions per token)
  equals diffusers' own ``PixArtTransformer2DModel.forward``;
- ComfyUI's discrete schedule for PixArt: every scheduler's sigmas bit-equal to ComfyUI's;
- same seed, same latent as stock ComfyUI (UNETLoader + KSampler, in process) on the stock-loadable tiny
  files (ComfyUI fixes width 1152 and 16 heads; depth 4) with true CFG, PixArt-alpha's micro-conditions
  from the conditioning and from the latent, img2img, and samplers with an EPS form (the samplers ported
  last and ModelSamplingDiscrete's patches: ``tests/test_pixart_model_sampling.py``);
- flow-model shifts refused before sampling; every sampler and a v + zsnr patch planned.
"""

from __future__ import annotations

import dataclasses
import logging
import types

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import save_file

from comfyui_xdit.attention import sdpa
from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.engine import Engine
from comfyui_xdit.input_checks import NODE_INPUTS, check_inputs
from comfyui_xdit.model_loader import load_model
from comfyui_xdit.models.families import TINY_SPECS, detect_family, read_spec, write_random_model
from comfyui_xdit.models.pixart import PIXART_SAMPLING, PixArtAdapter
from comfyui_xdit.models.pixart_checkpoint import (TINY_PIXART_ALPHA, TINY_PIXART_SIGMA, PixArtSpec,
                                                   infer_pixart_spec, random_pixart_state)
from comfyui_xdit.prediction import EPS
from comfyui_xdit.request import GenerationRequest, ModelRef, SigmaShift
from comfyui_xdit.sampling import model_sampling_for, prepare_plan
from comfyui_xdit.sigmas import SCHEDULER_NAMES, FluxShift, sampling_sigmas

from comfy_reference import SKIP_REASON, comfy_path, import_comfy

logger = logging.getLogger(__name__)

TEXT_LEN = 10
LATENT = (32, 40)  # 256x320 px: (h + w) / 2 above ComfyUI's smallest PixArt size; 320 tokens
# small, not stock-loadable (ComfyUI fixes width 1152): for the forward against diffusers
SMALL_ALPHA = PixArtSpec(num_layers=2, micro_condition=True, hidden_size=96, caption_channels=32, model_max_length=4,
                         input_size=64)
SMALL_SIGMA = dataclasses.replace(SMALL_ALPHA, micro_condition=False, input_size=None)


@pytest.mark.parametrize("spec", [SMALL_ALPHA, SMALL_SIGMA], ids=["alpha", "sigma"])
def test_piecewise_forward_equals_diffusers(spec) -> None:
    """At (h + w) / 2 = 64 latent pixels ComfyUI's per-resolution position base size (32) and interpolation
    (1) are diffusers' for a 64-pixel ``sample_size``, so the two forwards are the same function."""
    adapter = PixArtAdapter.from_state_dict(random_pixart_state(spec, 0), spec=spec)
    g = torch.Generator().manual_seed(1)
    height, width = 48, 80  # not square: rows and columns differ
    latent = torch.randn(2, 4, height, width, generator=g)
    cond = Conditioning(context=torch.randn(1, 5, spec.caption_channels, generator=g), pooled=None)
    sigma = torch.tensor([3.0, 3.0])
    ours = adapter.unpack(adapter.velocity(adapter.pack(latent), adapter.image_ids(height, width), cond, sigma),
                          height, width)
    for block in adapter.transformer.transformer_blocks:  # diffusers' own attention
        block.attn1.set_processor(AttnProcessor2_0())
        block.attn2.set_processor(AttnProcessor2_0())
    added = None
    if spec.micro_condition:  # ComfyUI's fallback: the latent's size (height, width px) and aspect ratio
        added = {"resolution": torch.tensor([[height * 8.0, width * 8.0]]).repeat(2, 1),
                 "aspect_ratio": torch.tensor([[height / width]]).repeat(2, 1)}
    with torch.no_grad():
        theirs = adapter.transformer(hidden_states=latent, encoder_hidden_states=cond.context.repeat(2, 1, 1),
                                     timestep=adapter.timestep(sigma), added_cond_kwargs=added).sample
    torch.testing.assert_close(ours, theirs[:, :4], rtol=1e-5, atol=1e-5)  # eps: the first 4 of 8 channels


def test_only_image_self_attention_goes_through_the_seam() -> None:
    """Cross-attention runs locally (no parallel or stale-K/V backend sees it); positions are per token, so a
    shard or patch of the ids embeds as that slice of the whole image."""
    adapter = PixArtAdapter.from_state_dict(random_pixart_state(SMALL_SIGMA, 0), spec=SMALL_SIGMA)
    calls = []

    def recording(query, key, value, *, text_len, layer):
        calls.append((layer, text_len, query.shape[1], key.shape[1]))
        return sdpa(query, key, value)

    adapter.seam.backend = recording
    tokens = torch.randn(1, 24 * 40, 16)
    ids = adapter.image_ids(48, 80)
    adapter.velocity(tokens, ids, Conditioning(torch.randn(1, 5, 32), None), torch.tensor([2.0]))
    assert calls == [(layer, 0, 960, 960) for layer in range(SMALL_SIGMA.num_layers)]
    assert torch.equal(adapter.positions(ids[100:340]), adapter.positions(ids)[100:340])


def test_spec_read_from_the_header_and_detected(tmp_path) -> None:
    for spec in (SMALL_ALPHA, SMALL_SIGMA):
        path = tmp_path / f"{spec.family}.safetensors"
        write_random_model(path, spec)
        assert read_spec(path) == spec
        assert detect_family(random_pixart_state(spec, 0)).id == spec.family
    checkpoint = tmp_path / "pixart-checkpoint.safetensors"  # a checkpoint's layout, with a text encoder
    state = {f"model.diffusion_model.{k}": v for k, v in random_pixart_state(SMALL_SIGMA, 0).items()}
    state["text_encoders.t5xxl.transformer.shared.weight"] = torch.zeros(2, 4)
    save_file(state, str(checkpoint))
    assert read_spec(checkpoint) == SMALL_SIGMA
    for name, spec in (("pixart-alpha", TINY_PIXART_ALPHA), ("pixart-sigma", TINY_PIXART_SIGMA)):
        assert TINY_SPECS[name] == spec and spec.family == name  # stock-loadable: ComfyUI's fixed shapes
        assert (spec.hidden_size, spec.num_attention_heads, spec.num_blocks, spec.context_dim) == (1152, 16, 4, 4096)
        assert spec.pooled_dim == 0 and spec.latent_channels == 4


def test_wrong_shapes_name_the_tensor() -> None:
    state = random_pixart_state(SMALL_SIGMA, 0)
    state["blocks.1.cross_attn.kv_linear.weight"] = torch.zeros(3, 96)
    with pytest.raises(ValueError, match=r"looks like pixart-sigma.*blocks.1.cross_attn.kv_linear.weight: "
                                         r"expected \(192, 96\)"):
        infer_pixart_spec(state)


def test_too_small_an_image_is_refused() -> None:
    adapter = PixArtAdapter.from_state_dict(random_pixart_state(SMALL_SIGMA, 0), spec=SMALL_SIGMA)
    with pytest.raises(ValueError, match="at least 264 px"):
        adapter.check_latent(torch.zeros(1, 4, 16, 16))
    adapter.check_latent(torch.zeros(1, 4, *LATENT))


def test_input_checks_take_t5_tokens_without_a_pooled_vector() -> None:
    for spec in (TINY_PIXART_ALPHA, TINY_PIXART_SIGMA):
        t5 = Conditioning(torch.zeros(1, 7, 4096), None)  # a T5-only encoder's pooled_output is None
        check_inputs(spec, torch.zeros(1, 4, *LATENT), t5, t5, NODE_INPUTS)
        with pytest.raises(ValueError, match=r"width 2048 \(looks like CLIP-L \+ CLIP-G \(SDXL\)\).*CLIPLoader "
                                             r"\(type pixart, t5xxl\)"):
            check_inputs(spec, torch.zeros(1, 4, *LATENT), Conditioning(torch.zeros(1, 7, 2048), None), None,
                         NODE_INPUTS)
        with pytest.raises(ValueError, match=r"256x256 px is too small.*at least 264 px"):
            check_inputs(spec, torch.zeros(1, 4, 32, 32), t5, None, NODE_INPUTS)


# ---- ComfyUI's schedule for PixArt ---------------------------------------------------------------------

def _comfy_pixart_sampling(config_name: str):
    model_base = import_comfy("comfy.model_base")
    supported = import_comfy("comfy.supported_models")
    config = getattr(supported, config_name)({"image_model": "pixart"})
    return model_base.model_sampling(config, model_base.ModelType.EPS)


class _FakePatcher:
    def __init__(self, sampling):
        self.sampling = sampling

    def get_model_object(self, name):
        assert name == "model_sampling"
        return self.sampling


@pytest.mark.parametrize("config_name", ["PixArtAlpha", "PixArtSigma"])
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps,denoise", [(1, 1.0), (5, 1.0), (20, 1.0), (7, 0.6)])
def test_discrete_sigmas_equal_comfyui_for_every_scheduler(config_name, scheduler, steps, denoise) -> None:
    samplers = import_comfy("comfy.samplers")
    ours_sampling = PIXART_SAMPLING
    if scheduler == "kl_optimal" and int(steps / denoise) < 2:  # ComfyUI divides by zero here: NaN sigmas
        with pytest.raises(ValueError, match="kl_optimal needs at least 2 steps"):
            sampling_sigmas(ours_sampling, scheduler, steps, denoise)
        return
    theirs = samplers.KSampler(_FakePatcher(_comfy_pixart_sampling(config_name)), steps=steps, device="cpu",
                               sampler="euler", scheduler=scheduler, denoise=denoise).sigmas
    ours = sampling_sigmas(ours_sampling, scheduler, steps, denoise)
    assert torch.equal(ours, theirs), (ours, theirs)


# ---- same seed, same latent as stock ComfyUI ------------------------------------------------------

def _conditioning(seed: int, resolution: tuple[float, float] | None = None) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, TEXT_LEN, 4096, generator=g), None, resolution=resolution)


@pytest.fixture(scope="module")
def pixart_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for spec in (TINY_PIXART_ALPHA, TINY_PIXART_SIGMA):
        paths[spec.family] = str(folder / f"{spec.family}-tiny.safetensors")
        write_random_model(paths[spec.family], spec, seed=5)
    return paths


@pytest.fixture(scope="module")
def loaded(pixart_files) -> dict[str, tuple]:
    """(stock ComfyUI's MODEL, our adapter) per family, loaded once."""
    if comfy_path() is None:
        pytest.skip(SKIP_REASON)
    comfy_sd = import_comfy("comfy.sd")
    out = {}
    for family, path in pixart_files.items():
        model = comfy_sd.load_diffusion_model(path, model_options={"dtype": torch.float32})
        assert type(model.model).__name__ == "PixArt"
        assert type(model.model.model_config).__name__ == {"pixart-alpha": "PixArtAlpha",
                                                           "pixart-sigma": "PixArtSigma"}[family]
        out[family] = (model, load_model(ModelRef(path, "fp32")))
    return out


def _patched(model, sampling: str, zsnr: bool):
    """Stock ComfyUI's ModelSamplingDiscrete node on ``model``."""
    (patched,) = import_comfy("comfy_extras.nodes_model_advanced").ModelSamplingDiscrete().patch(model, sampling, zsnr)
    return patched


def _stock(model, request: GenerationRequest) -> torch.Tensor:
    comfy_sample = import_comfy("comfy.sample")
    if request.shift.mode == "discrete":  # the same patch on the stock side
        model = _patched(model, {"eps": "eps", "v": "v_prediction"}[request.shift.prediction], request.shift.zsnr)
    latent = comfy_sample.fix_empty_latent_channels(model, request.latent)
    noise = comfy_sample.prepare_noise(latent, request.seed)

    def cond(c: Conditioning):
        extras = {}
        if c.resolution is not None:  # what CLIPTextEncodePixArtAlpha adds
            extras = {"height": c.resolution[0], "width": c.resolution[1]}
        return [[c.context, extras]]

    negative = request.negative or request.positive
    return comfy_sample.sample(model, noise, request.steps, request.cfg, request.sampler, request.scheduler,
                               cond(request.positive), cond(negative), latent, denoise=request.denoise,
                               disable_pbar=True, seed=request.seed)


SAME_SEED_CASES = {
    "euler-normal-cfg": dict(sampler="euler", scheduler="normal", cfg=3.0, negative=_conditioning(2)),
    "dpmpp-2m-karras-cfg": dict(sampler="dpmpp_2m", scheduler="karras", cfg=4.5, negative=_conditioning(2)),
}


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape
    error = float((ours - theirs).detach().norm() / theirs.detach().norm())
    logger.info("relative error against stock ComfyUI: %.2e", error)
    return error


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("family", ["pixart-alpha", "pixart-sigma"])
@pytest.mark.parametrize("case", sorted(SAME_SEED_CASES))
def test_serial_engine_equals_stock_comfyui(family, case, loaded) -> None:
    model, adapter = loaded[family]
    request = GenerationRequest(model=ModelRef("unused"), latent=torch.zeros(1, 4, *LATENT),
                                positive=_conditioning(1), seed=77, steps=4, **SAME_SEED_CASES[case])
    error = _relative(Engine(adapter).generate(request), _stock(model, request))
    assert error < 1e-4, error


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_alpha_micro_conditions_from_the_conditioning_equal_stock(loaded) -> None:
    """The positive carries CLIPTextEncodePixArtAlpha's width and height, the negative none (the latent's)."""
    model, adapter = loaded["pixart-alpha"]
    request = GenerationRequest(model=ModelRef("unused"), latent=torch.zeros(1, 4, *LATENT),
                                positive=_conditioning(1, resolution=(768.0, 1024.0)), negative=_conditioning(2),
                                seed=3, steps=3, cfg=2.0, sampler="euler", scheduler="simple")
    ours = Engine(adapter).generate(request)
    error = _relative(ours, _stock(model, request))
    assert error < 1e-4, error
    plain = dataclasses.replace(request, positive=_conditioning(1))
    assert _relative(Engine(adapter).generate(plain), ours) > 1e-3  # the micro-conditions reach the model


# samplers that must work on PixArt (and those with an EPS form), end to end against stock
EPS_SAMPLER_CASES = ("euler_ancestral", "heun", "ddim", "lms", "ipndm", "dpmpp_2m_sde", "lcm")


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("sampler", EPS_SAMPLER_CASES)
def test_samplers_on_pixart_equal_stock(sampler, loaded) -> None:
    model, adapter = loaded["pixart-sigma"]
    request = GenerationRequest(model=ModelRef("unused"), latent=torch.zeros(1, 4, *LATENT), positive=_conditioning(1),
                                negative=_conditioning(2), seed=11, steps=3, cfg=2.0, sampler=sampler,
                                scheduler="sgm_uniform")
    error = _relative(Engine(adapter).generate(request), _stock(model, request))
    assert error < 1e-4, error


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_img2img_equals_stock(loaded) -> None:
    """denoise < 1: sampling starts below the largest sigma, so EPS noise scaling is noise * sigma."""
    model, adapter = loaded["pixart-sigma"]
    latent = torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(4))
    request = GenerationRequest(model=ModelRef("unused"), latent=latent, positive=_conditioning(1), seed=9, steps=3,
                                sampler="euler", scheduler="normal", denoise=0.6)
    error = _relative(Engine(adapter).generate(request), _stock(model, request))
    assert error < 1e-4, error


# ---- what PixArt refuses ----------------------------------------------------------------------------

def test_flow_shifts_are_refused_and_every_sampler_planned_before_sampling() -> None:
    adapter = PixArtAdapter.from_state_dict(random_pixart_state(SMALL_SIGMA, 0), spec=SMALL_SIGMA)
    assert adapter.prediction is EPS
    cond = Conditioning(torch.zeros(1, 4, SMALL_SIGMA.caption_channels), None)
    request = GenerationRequest(model=ModelRef("unused"), latent=torch.zeros(1, 4, *LATENT), positive=cond,
                                sampler="dpmpp_sde", steps=3)
    assert prepare_plan(adapter, request).prediction is EPS  # once refused: no EPS form
    patched = dataclasses.replace(request, shift=SigmaShift(mode="discrete", prediction="v", zsnr=True))
    plan = prepare_plan(adapter, patched)
    assert plan.prediction.name == "v" and plan.sigmas[0] > 4000  # the zero-terminal-SNR schedule's top
    shifted = dataclasses.replace(request, sampler="euler", shift=SigmaShift(mode="flux", shift=1.15))
    with pytest.raises(ValueError, match="flow-model sampling, but this model predicts eps"):
        prepare_plan(adapter, shifted)
    flow_model = types.SimpleNamespace(default_sampling=FluxShift)
    with pytest.raises(ValueError, match="a ModelSamplingDiscrete patch .* but this model samples on FluxShift"):
        model_sampling_for(flow_model, patched)
    with pytest.raises(ValueError, match="a discrete model sampling predicts one of eps, v, got 'x0'"):
        SigmaShift(mode="discrete", prediction="x0")

