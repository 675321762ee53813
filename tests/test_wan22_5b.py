"""Wan 2.2 TI2V 5B (issue 12): 48 channels in and out, ComfyUI's WAN22_T2V with the Wan22 latent format.

- the Wan22 latent format equals ComfyUI's; the spec from the header, its own family told from Wan 2.1's by shapes,
  stock ComfyUI loads the tiny file as WAN22_T2V and the Parallelize Model node takes it;
- text-to-video: same seed, same latent as stock ComfyUI (in process) with true CFG;
- image-to-video (Wan22ImageToVideoLatent's latent: the start image in the first latent frame, a noise mask that
  keeps it): the per-frame timestep ComfyUI's ``WAN22.process_timestep`` derives from the mask, carried per token
  (a 7th ``image_ids`` column, cut with the shards); our piecewise forward equals diffusers' per-token-timestep
  forward; same seed, same latent as stock; the parallel layouts equal serial (or PipeFusion's reference).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.engine import Engine
from comfyui_xdit.latent_format import WAN22_LATENT_FORMAT
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.models import packing
from comfyui_xdit.models.checkpoint_file import TensorShape
from comfyui_xdit.models.families import detect_family, family_of, read_spec, write_random_model
from comfyui_xdit.models.wan import WanAdapter
from comfyui_xdit.models.wan_checkpoint import (TINY_WAN21, TINY_WAN22_5B, WAN22_TI2V_5B, infer_wan_spec,
                                                random_wan_state, wan_shapes)
from comfyui_xdit.parallel.launch import generate_local_many
from comfyui_xdit.parallel.pipefusion_reference import pipefusion_reference
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sampling import finish, prepare_plan

from comfy_reference import SKIP_REASON, comfy_path, import_comfy
from process_check import no_process_left

TEXT_LEN = 7
TWO_BLOCKS = dataclasses.replace(TINY_WAN22_5B, num_layers=2)
VIDEO = (1, 48, 3, 4, 8)  # 3 latent frames (9 video frames) of 64x128 px (the Wan 2.2 VAE downscales 16x)


def i2v_latent(seed: int, shape: tuple[int, ...] = VIDEO) -> tuple[torch.Tensor, torch.Tensor]:
    """A LATENT and its noise_mask as Wan22ImageToVideoLatent makes them for a start image: the encoded image in the
    first latent frame (kept, mask 0), the other frames the format's process_out of zeros (mask 1)."""
    mean = torch.tensor(WAN22_LATENT_FORMAT.mean).view(1, 48, 1, 1, 1)
    latent = mean.expand(shape).clone()
    latent[:, :, :1] = torch.randn(shape[0], 48, 1, *shape[3:], generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(shape[0], 1, *shape[2:])
    mask[:, :, :1] = 0.0
    return latent, mask


def _conditioning(seed: int) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, TEXT_LEN, 4096, generator=g), None, guidance=None)


# ---- the file and the format ---------------------------------------------------------------------

@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_latent_format_equals_comfyui_wan22() -> None:
    theirs = import_comfy("comfy.latent_formats").Wan22()
    assert WAN22_LATENT_FORMAT.channels == theirs.latent_channels == 48
    assert torch.equal(torch.tensor(WAN22_LATENT_FORMAT.mean), theirs.latents_mean.flatten())
    assert torch.equal(torch.tensor(WAN22_LATENT_FORMAT.std), theirs.latents_std.flatten())
    latent = torch.randn(2, 48, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(WAN22_LATENT_FORMAT.process_in(latent), theirs.process_in(latent), rtol=0, atol=1e-6)
    torch.testing.assert_close(WAN22_LATENT_FORMAT.process_out(latent), theirs.process_out(latent), rtol=0, atol=1e-6)


def test_spec_from_the_header_and_its_own_family(tmp_path) -> None:
    path = tmp_path / "wan22-5b.safetensors"
    write_random_model(path, TWO_BLOCKS)
    assert read_spec(path) == TWO_BLOCKS and TWO_BLOCKS.family == "wan22-5b" and TWO_BLOCKS.ti2v
    assert detect_family(random_wan_state(TINY_WAN22_5B, 0)).id == "wan22-5b"
    assert detect_family(random_wan_state(TINY_WAN21, 0)).id == "wan21"  # the same keys: shapes tell them apart
    assert family_of(TINY_WAN22_5B).latent_dimensions == 3
    assert (TINY_WAN22_5B.latent_channels, TINY_WAN22_5B.extra_channels, TINY_WAN22_5B.image_conditioning) == (48, 0,
                                                                                                              False)
    shapes = {k: TensorShape(s) for k, s in wan_shapes(WAN22_TI2V_5B).items()}
    assert infer_wan_spec(shapes) == WAN22_TI2V_5B and WAN22_TI2V_5B.num_attention_heads == 24
    assert detect_family(shapes).id == "wan22-5b"
    adapter = load_model(ModelRef("tiny:wan22-5b"))
    assert adapter.latent_format is WAN22_LATENT_FORMAT and adapter.video_noise_mask
    with pytest.raises(ValueError, match=r"Wan 2.2 TI2V 5B needs a video LATENT.*48.*Wan22ImageToVideoLatent"):
        adapter.check_latent(torch.zeros(1, 16, 3, 4, 8))


@pytest.fixture(scope="module")
def wan_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "wan22-5b-tiny.safetensors"
    write_random_model(path, TINY_WAN22_5B, seed=5)
    return str(path)


@pytest.fixture(scope="module")
def comfy_model(wan_file):
    model = import_comfy("comfy.sd").load_diffusion_model(wan_file, model_options={"dtype": torch.float32})
    assert type(model.model).__name__ == "WAN22"
    assert type(model.model.model_config).__name__ == "WAN22_T2V"  # stock detection of the 5B
    return model


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_parallel_model_takes_the_stock_model(comfy_model) -> None:
    from nodes_package import nodes_module

    model_patches = nodes_module("model_patches")
    assert model_patches.check_family(comfy_model) == "wan22-5b"
    assert infer_wan_spec(model_patches.base_weights(comfy_model)) == TINY_WAN22_5B


# ---- the per-token timestep ----------------------------------------------------------------------

def test_the_timestep_factor_per_token_is_its_frames_mean_mask_and_cuts_with_the_shards() -> None:
    adapter = load_model(ModelRef("tiny:wan22-5b"))
    ids = adapter.image_ids(8, 8, frames=3)  # (48, 6): 16 tokens a frame
    mask = torch.ones(2, 48, 3, 8, 8)
    mask[:, :, 0] = 0.0
    mask[:, :, 2, :4] = 0.5  # half a frame half-kept: mean 0.75
    with_mask = adapter.with_denoise_mask(ids, mask)
    assert with_mask.shape == (48, 7) and torch.equal(with_mask[:, :6], ids)
    assert with_mask[:16, 6].eq(0).all() and with_mask[16:32, 6].eq(1).all() and with_mask[32:, 6].eq(0.75).all()
    cond, sigma = _conditioning(0), torch.tensor([0.7, 0.4])
    whole = adapter.embed_context(with_mask, cond, sigma)
    assert whole.timestep_proj.shape == (2, 48, 6, 512) and whole.temb.shape == (2, 48, 512)
    for lo, hi in ((0, 12), (10, 35), (32, 48), (18, 30)):  # a shard within one frame or across them: its own rows
        part = adapter.embed_context(with_mask[lo:hi], cond, sigma)
        one_factor = hi <= 16 or lo >= 16 and hi <= 32 or lo >= 32  # then the plain shapes (B, 6, hidden), (B, hidden)
        assert part.timestep_proj.ndim == (3 if one_factor else 4) and part.temb.ndim == (2 if one_factor else 3)
        proj = part.timestep_proj[:, None].expand(-1, hi - lo, -1, -1) if one_factor else part.timestep_proj
        temb = part.temb[:, None].expand(-1, hi - lo, -1) if one_factor else part.temb
        # embedded once per distinct factor: a shard's few rows round apart from the whole's in the last bits only
        torch.testing.assert_close(proj, whole.timestep_proj[:, lo:hi], rtol=0, atol=2e-6)
        torch.testing.assert_close(temb, whole.temb[:, lo:hi], rtol=0, atol=2e-6)
    plain = adapter.embed_context(ids, cond, sigma)  # a factor 1 is the plain timestep
    torch.testing.assert_close(whole.timestep_proj[:, 20], plain.timestep_proj, rtol=0, atol=1e-6)
    mask[1, :, 1] = 0.0
    with pytest.raises(ValueError, match="differs between the batch's videos"):
        adapter.with_denoise_mask(ids, mask)


def test_piecewise_forward_with_a_per_token_timestep_equals_diffusers() -> None:
    adapter = WanAdapter.from_state_dict(random_wan_state(TWO_BLOCKS, 0), spec=TWO_BLOCKS)
    latent = torch.randn(2, 48, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    cond = _conditioning(2)
    sigma = torch.tensor([0.6, 0.6])
    mask = torch.ones(1, 48, 3, 4, 6)
    mask[:, :, 0] = 0.0
    ids = adapter.with_denoise_mask(adapter.image_ids(4, 6, frames=3), mask)
    ours = adapter.unpack(adapter.velocity(adapter.pack(latent), ids, cond, sigma), 4, 6, frames=3)
    for block in adapter.transformer.blocks:  # diffusers' own attention and rotary
        block.attn1.set_processor(WanAttnProcessor())
        block.attn2.set_processor(WanAttnProcessor())
    timestep = sigma[:, None] * 1000 * ids[:, 6][None]  # (B, N): diffusers' Wan 2.2 TI2V per-token timestep
    with torch.no_grad():
        theirs = adapter.transformer(hidden_states=latent, timestep=timestep,
                                     encoder_hidden_states=cond.context.repeat(2, 1, 1)).sample
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 2e-5
    assert float((ours[:, :, 0] - theirs[:, :, 0]).abs().max()) < 1e-4  # the kept frame's timestep 0 too


def test_a_video_noise_mask_stays_refused_for_wan21() -> None:
    ref = ModelRef("tiny:wan21")
    positive, _ = tiny_conditioning(ref, seed=0)
    request = GenerationRequest(model=ref, latent=torch.zeros(1, 16, 3, 4, 8), positive=positive, seed=1, steps=2,
                                noise_mask=torch.ones(1, 1, 3, 4, 8))
    with pytest.raises(ValueError, match="noise mask.*video latent.*stock KSampler"):
        prepare_plan(load_model(ref), request)


# ---- same seed, same latent as stock ComfyUI --------------------------------------------------------

def _stock(model, request: GenerationRequest) -> torch.Tensor:
    comfy_sample = import_comfy("comfy.sample")
    latent = comfy_sample.fix_empty_latent_channels(model, request.latent)
    noise = comfy_sample.prepare_noise(latent, request.seed)
    negative = request.negative or request.positive
    return comfy_sample.sample(model, noise, request.steps, request.cfg, request.sampler, request.scheduler,
                               [[request.positive.context, {}]], [[negative.context, {}]], latent,
                               denoise=request.denoise, noise_mask=request.noise_mask, disable_pbar=True,
                               seed=request.seed)


SAME_SEED_CASES = {
    "t2v-euler-simple": dict(sampler="euler", scheduler="simple", cfg=3.0),
    "t2v-dpmpp-2m-karras": dict(sampler="dpmpp_2m", scheduler="karras", cfg=5.0),
    "t2v-empty-16-channel-latent": dict(sampler="euler", scheduler="simple", cfg=3.0, channels=16),  # widened to 48
    "i2v-euler-simple": dict(sampler="euler", scheduler="simple", cfg=3.0, i2v=True),
    "i2v-uni-pc-batch-2": dict(sampler="uni_pc", scheduler="simple", cfg=4.0, i2v=True, batch=2),
    "i2v-euler-ancestral": dict(sampler="euler_ancestral", scheduler="normal", cfg=4.0, i2v=True),
}


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("case", sorted(SAME_SEED_CASES))
def test_serial_engine_equals_stock_comfyui(case, wan_file, comfy_model) -> None:
    options = dict(SAME_SEED_CASES[case])
    i2v, batch, channels = options.pop("i2v", False), options.pop("batch", 1), options.pop("channels", 48)
    shape = (batch, *VIDEO[1:])
    latent, mask = i2v_latent(4, shape) if i2v else (torch.zeros(batch, channels, *VIDEO[2:]), None)
    request = GenerationRequest(model=ModelRef(wan_file, "fp32"), latent=latent, noise_mask=mask,
                                positive=_conditioning(1), negative=_conditioning(2), seed=77, steps=4, **options)
    theirs = _stock(comfy_model, request).detach()
    ours = Engine(load_model(request.model)).generate(request)
    assert ours.shape == theirs.shape == shape
    error = float((ours - theirs).norm() / theirs.norm())
    assert error < 1e-4, error
    if i2v and request.sampler.startswith("euler"):  # the start frame comes back as it went in; the others moved
        torch.testing.assert_close(ours[:, :, 0], latent[:, :, 0], rtol=0, atol=1e-5)
        assert float((ours[:, :, 1:] - latent[:, :, 1:]).abs().max()) > 0.1


# ---- every parallel layout, image-to-video -----------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _no_process_left() -> Iterator[None]:
    with no_process_left():
        yield


STEPS = 3
P = ParallelConfig
I2V_LAYOUTS = {  # (config, sampler); 3 frames of 4x8 -> 24 tokens, so shards and patches cut frame boundaries
    2: [(P(ulysses_degree=2), "euler"), (P(ring_degree=2), "dpmpp_2m"), (P(cfg_degree=2), "euler_ancestral"),
        (P(pipefusion_degree=2, warmup_steps=STEPS), "dpmpp_2m"), (P(pipefusion_degree=2, num_patches=4), "euler")],
    4: [(P(ulysses_degree=2, ring_degree=2), "dpmpp_2m"), (P(pipefusion_degree=2, ulysses_degree=2), "euler")],
}


def i2v_request(parallel: ParallelConfig, sampler: str) -> GenerationRequest:
    ref = ModelRef("tiny:wan22-5b")
    positive, negative = tiny_conditioning(ref, seed=3)
    latent, mask = i2v_latent(5)
    return GenerationRequest(model=ref, latent=latent, noise_mask=mask, positive=positive, negative=negative, seed=7,
                             steps=STEPS, cfg=2.5, sampler=sampler, parallel=parallel)


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("world", sorted(I2V_LAYOUTS))
def test_image_to_video_every_layout_equals_serial_or_its_reference(world: int) -> None:
    reqs = [i2v_request(config, sampler) for config, sampler in I2V_LAYOUTS[world]]
    results = generate_local_many(reqs, timeout=500)
    adapter = load_model(ModelRef("tiny:wan22-5b"))
    for req, result in zip(reqs, results):
        par = req.parallel
        label = f"{par.describe()} warm-up {par.warmup_steps} {req.sampler}"
        serial = Engine(adapter).generate(dataclasses.replace(req, parallel=ParallelConfig()))
        if par.pipefusion_degree == 1 or par.warmup_steps >= req.steps:
            assert relative(result.latent, serial) < 1e-4, label
        else:
            plan = prepare_plan(adapter, req)
            reference = finish(adapter, plan, pipefusion_reference(adapter, plan, par.patches, par.warmup_steps))
            assert relative(result.latent, reference) < 1e-4, label
            assert relative(result.latent, serial) > 1e-4, f"{label}: stale K/V should differ from serial"
        torch.testing.assert_close(result.latent[:, :, 0], req.latent[:, :, 0], rtol=0, atol=1e-5)  # kept frame


def test_the_cli_makes_the_5b_its_48_channel_latent_at_a_16th() -> None:
    from comfyui_xdit.cli_commands import build_request, make_parser

    def latent(model: str) -> torch.Size:
        args = make_parser().parse_args(["generate", "--model", model, "--height", "64", "--width", "128", "--frames",
                                         "9", "--out", "x.safetensors"])
        return build_request(args).latent.shape

    assert latent("tiny:wan22-5b") == (1, 48, 3, 4, 8)  # Wan22ImageToVideoLatent's size for 9 frames of 64x128
    assert latent("tiny:wan21") == (1, 16, 3, 8, 16)


def test_inputs_and_the_released_size() -> None:
    from comfyui_xdit.input_checks import NODE_INPUTS, check_inputs
    from comfyui_xdit.planning.full_size import FULL_SIZE
    from comfyui_xdit.planning.model_shape import shape_of

    positive, negative = tiny_conditioning(ModelRef("tiny:wan22-5b"), seed=0)
    check_inputs(TINY_WAN22_5B, torch.zeros(1, 48, 3, 4, 8), positive, negative, NODE_INPUTS)
    with pytest.raises(ValueError, match="16 channels.*needs 48.*Wan 2.2 VAE"):
        check_inputs(TINY_WAN22_5B, torch.ones(1, 16, 3, 4, 8), positive, negative, NODE_INPUTS)
    # an empty 16-channel video latent (EmptyHunyuanLatentVideo) is widened as ComfyUI's fix_empty_latent_channels
    plan = prepare_plan(load_model(ModelRef("tiny:wan22-5b")), GenerationRequest(
        model=ModelRef("tiny:wan22-5b"), latent=torch.zeros(1, 16, 3, 4, 8), positive=positive, seed=1, steps=2))
    assert plan.x.shape == (1, 24, 48 * 4)
    spec, _ = FULL_SIZE["wan2.2-ti2v-5b"]
    parameters = shape_of(spec).parameters
    assert parameters == sum(int(torch.Size(s).numel()) for s in wan_shapes(spec).values())
    assert 4.9e9 < parameters < 5.1e9, parameters  # the published 5B
