"""HunyuanVideo image-to-video v1 (issue 12): the 33-channel model (ComfyUI's ``HunyuanVideoI2V``) as its own family.

- the file's shapes tell it from text-to-video (same keys); ``make-tiny hunyuan-video-i2v`` writes a file stock
  ComfyUI loads as ``HunyuanVideoI2V``; SkyReels (32 channels) stays refused, naming it;
- ``c_concat`` equals ComfyUI's own ``concat_cond`` (process_in, resize with centre crop, frame padding, mask
  rounding and inversion, batch resizing), and each shard gets its own rows of it;
- our piecewise forward equals diffusers' own ``HunyuanVideoTransformer3DModel`` (``image_condition_type``
  "latent_concat") on ``cat(latent, c_concat)``;
- same seed, same latent as stock ComfyUI's sampler in process, with HunyuanImageToVideo's conditioning.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from comfyui_xdit.cli_commands import make_parser, run_make_tiny
from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.engine import Engine
from comfyui_xdit.input_checks import NODE_INPUTS, check_inputs
from comfyui_xdit.model_loader import load_model, tiny_conditioning, tiny_image_conditioning
from comfyui_xdit.models.checkpoint_file import TensorShape
from comfyui_xdit.models.families import detect_family, read_spec
from comfyui_xdit.models.hunyuan_video import HUNYUAN_VIDEO_LATENT_FORMAT, HunyuanVideoI2VAdapter
from comfyui_xdit.models.hunyuan_video_checkpoint import (HUNYUAN_VIDEO_I2V, TINY_HUNYUAN_VIDEO,
                                                          TINY_HUNYUAN_VIDEO_I2V, TINY_HUNYUAN_VIDEO_SKYREELS,
                                                          hunyuan_video_shapes,
                                                          infer_hunyuan_video_spec, random_hunyuan_video_state)
from comfyui_xdit.models.hunyuan_video_concat import concat_condition, concat_tokens
from comfyui_xdit.request import GenerationRequest, ModelRef

from comfy_reference import SKIP_REASON, comfy_path, import_comfy

SPEC = TINY_HUNYUAN_VIDEO_I2V
SKYREELS = TINY_HUNYUAN_VIDEO_SKYREELS
TEXT_LEN = 7
VIDEO = (1, 16, 3, 8, 12)  # 3 latent frames (9 video frames) of 64x96 px


def start_frames(seed: int, shape: tuple[int, ...] = VIDEO, given: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """HunyuanImageToVideo's (concat_latent_image, concat_mask): ``given`` latent frames of a start image's latent,
    the mask 1 everywhere but those frames (over the whole latent's frames)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(shape[0], shape[1], given, *shape[3:], generator=g)
    mask = torch.ones(1, 1, shape[2], *shape[3:])
    mask[:, :, :given] = 0.0
    return latent, mask


def i2v_conditioning(seed: int, image: bool = True) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    context, pooled = torch.randn(1, TEXT_LEN, 4096, generator=g), torch.randn(1, 768, generator=g)
    latent, mask = start_frames(seed + 100) if image else (None, None)
    return Conditioning(context, pooled, guidance=6.0, concat_latent=latent, concat_mask=mask)


# ---- the file ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "hunyuan-video-i2v-tiny.safetensors"
    assert run_make_tiny(make_parser().parse_args(["make-tiny", "hunyuan-video-i2v", str(path)])) == 0
    return str(path)


def test_spec_read_from_the_header_and_told_from_text_to_video(model_file) -> None:
    assert read_spec(model_file) == SPEC and SPEC.family == "hunyuan-video-i2v"
    assert (SPEC.latent_channels, SPEC.extra_channels, SPEC.image_conditioning) == (16, 17, True)
    assert detect_family(random_hunyuan_video_state(SPEC, 0)).id == "hunyuan-video-i2v"
    assert detect_family(random_hunyuan_video_state(TINY_HUNYUAN_VIDEO, 0)).id == "hunyuan-video"
    assert not TINY_HUNYUAN_VIDEO.image_conditioning and TINY_HUNYUAN_VIDEO.latent_channels == 16
    # the release's shapes (24 heads, 20 double + 40 single blocks, no guidance embedder)
    shapes = {k: TensorShape(s) for k, s in hunyuan_video_shapes(HUNYUAN_VIDEO_I2V).items()}
    assert infer_hunyuan_video_spec(shapes) == HUNYUAN_VIDEO_I2V and detect_family(shapes).id == "hunyuan-video-i2v"


def test_skyreels_is_image_to_video_without_the_mask_and_other_widths_are_refused(tmp_path) -> None:
    path = tmp_path / "skyreels.safetensors"
    assert run_make_tiny(make_parser().parse_args(["make-tiny", "hunyuan-video-skyreels-i2v", str(path)])) == 0
    assert read_spec(path) == SKYREELS and detect_family(random_hunyuan_video_state(SKYREELS, 0)).id == SPEC.family
    assert (SKYREELS.latent_channels, SKYREELS.extra_channels, SKYREELS.guidance_embeds) == (16, 16, True)
    other = random_hunyuan_video_state(TINY_HUNYUAN_VIDEO, 0)
    other["img_in.proj.weight"] = torch.zeros(512, 48, 1, 2, 2)
    assert detect_family(other).id == "hunyuan-video"  # its family's check then names it
    with pytest.raises(ValueError, match="48 latent channels.*HunyuanVideo variant.*stock KSampler"):
        infer_hunyuan_video_spec(other)


@pytest.fixture(scope="module")
def comfy_model(model_file):
    model = import_comfy("comfy.sd").load_diffusion_model(model_file, model_options={"dtype": torch.float32})
    assert type(model.model).__name__ == "HunyuanVideoI2V"  # stock detection: supported_models.HunyuanVideoI2V
    return model


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_the_nodes_take_comfyui_hunyuan_video_i2v_models(comfy_model) -> None:
    from nodes_package import nodes_module

    model_patches = nodes_module("model_patches")
    assert model_patches.check_family(comfy_model) == "hunyuan-video-i2v"
    assert infer_hunyuan_video_spec(model_patches.base_weights(comfy_model)) == SPEC


# ---- c_concat ----------------------------------------------------------------------------------------

CONCAT_CASES = {  # (noise shape, start latent shape, mask shape or None, given image?)
    "one-start-frame": ((1, 16, 3, 8, 12), (1, 16, 1, 8, 12), (1, 1, 3, 8, 12), True),
    "all-frames-given": ((1, 16, 3, 8, 12), (1, 16, 3, 8, 12), (1, 1, 3, 8, 12), True),
    "resized-crop-and-batch": ((2, 16, 3, 8, 12), (1, 16, 2, 10, 10), (1, 1, 3, 6, 6), True),
    "batch-of-starts-no-mask": ((4, 16, 2, 8, 8), (2, 16, 1, 8, 8), None, True),
    "no-image": ((1, 16, 3, 8, 12), None, None, False),
}


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("name", sorted(CONCAT_CASES))
def test_concat_equals_comfyui_concat_cond(comfy_model, name) -> None:
    noise_shape, image_shape, mask_shape, given = CONCAT_CASES[name]
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(noise_shape, generator=g)
    image = torch.randn(image_shape, generator=g) if given else None
    mask = None if mask_shape is None else (torch.rand(mask_shape, generator=g) > 0.5).float()
    # ComfyUI's sampler passes the (processed) sampled latent: an empty one here
    theirs = comfy_model.model.concat_cond(noise=noise, concat_latent_image=image, concat_mask=mask, device="cpu",
                                           latent_image=torch.zeros(noise_shape))
    cond = Conditioning(torch.zeros(1, 2, 4096), None, concat_latent=image, concat_mask=mask)
    ours = concat_condition(cond, noise_shape, SPEC.extra_channels, HUNYUAN_VIDEO_LATENT_FORMAT)
    assert ours.shape == theirs.shape == (noise_shape[0], 17, *noise_shape[2:])
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-6)


def test_each_shard_gets_its_own_rows_of_the_concat() -> None:
    cond = i2v_conditioning(0)
    ids = HunyuanVideoI2VAdapter.image_ids(8, 12, frames=3)  # (72, 6)
    whole = concat_tokens(cond, 2, ids, 17, HUNYUAN_VIDEO_LATENT_FORMAT)
    assert whole.shape == (2, 72, 17 * 4)
    for lo, hi in ((0, 24), (20, 53), (53, 72)):  # across frame boundaries
        torch.testing.assert_close(concat_tokens(cond, 2, ids[lo:hi], 17, HUNYUAN_VIDEO_LATENT_FORMAT),
                                   whole[:, lo:hi], rtol=0, atol=0)
    with pytest.raises(ValueError, match="concat_mask.*2 latent frames but the latent has 3"):
        short = dataclasses.replace(cond, concat_mask=torch.ones(1, 1, 2, 8, 12))
        concat_condition(short, VIDEO, 17, HUNYUAN_VIDEO_LATENT_FORMAT)


# ---- the forward ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [SPEC, SKYREELS], ids=["i2v-v1", "skyreels"])
def test_piecewise_forward_equals_diffusers_latent_concat(spec) -> None:
    adapter = HunyuanVideoI2VAdapter.from_state_dict(random_hunyuan_video_state(spec, 1), spec=spec)
    assert adapter.transformer.config.image_condition_type == "latent_concat"
    latent = torch.randn(2, 16, 3, 8, 12, generator=torch.Generator().manual_seed(1))  # 3 frames, not square
    cond = i2v_conditioning(2)
    sigma = torch.tensor([0.6, 0.6])
    ours = adapter.unpack(adapter.velocity(adapter.pack(latent), adapter.image_ids(8, 12, frames=3), cond, sigma),
                          8, 12, frames=3)
    no_image = adapter.unpack(adapter.velocity(adapter.pack(latent), adapter.image_ids(8, 12, frames=3),
                                               dataclasses.replace(cond, concat_latent=None), sigma), 8, 12, frames=3)
    c_concat = concat_condition(cond, tuple(latent.shape), spec.extra_channels, HUNYUAN_VIDEO_LATENT_FORMAT)
    guidance = {"guidance": torch.full((2,), cond.guidance * 1000)} if spec.guidance_embeds else {}
    for block in adapter.blocks:  # diffusers' own attention and rotary
        block.attn.set_processor(HunyuanVideoAttnProcessor2_0())
    with torch.no_grad():
        theirs = adapter.transformer(hidden_states=torch.cat([latent, c_concat], dim=1), timestep=sigma * 1000,
                                     encoder_hidden_states=cond.context.repeat(2, 1, 1),
                                     encoder_attention_mask=torch.ones(2, TEXT_LEN),
                                     pooled_projections=cond.pooled.repeat(2, 1), **guidance).sample
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    print(f"{spec.in_channels} channels: forward vs diffusers: relative max error {error:.1e}")
    assert error < 2e-5, error  # diffusers' rotary tables round differently from ComfyUI's float64 ones
    assert float((no_image - theirs).abs().max() / theirs.abs().max()) > 1e-2  # the start frames matter


# ---- the inputs ----------------------------------------------------------------------------------------

def test_tiny_i2v_gets_start_frames_and_a_non_empty_latent_without_them_is_refused() -> None:
    """What test_family_parallel.py's tiny:hunyuan-video-i2v runs on: a start latent and mask that matter."""
    ref = ModelRef("tiny:hunyuan-video-i2v")
    positive, negative = tiny_conditioning(ref, seed=3)
    with_image = tiny_image_conditioning(ref, positive, VIDEO, seed=3)
    assert with_image.concat_latent.shape == VIDEO and with_image.clip_vision is None
    assert torch.equal(with_image.concat_mask[0, 0, :, 0, 0], torch.tensor([0.0, 1.0, 1.0]))
    check_inputs(SPEC, torch.zeros(VIDEO), with_image, negative, NODE_INPUTS)
    one_frame = i2v_conditioning(1)  # HunyuanImageToVideo's: one latent frame of a start image, padded by the model
    assert one_frame.concat_latent.shape[2] == 1
    check_inputs(SPEC, torch.zeros(VIDEO), one_frame, negative, NODE_INPUTS)
    with pytest.raises(ValueError, match="negative.*no start-frame latent.*non-empty.*stock KSampler"):
        check_inputs(SPEC, torch.ones(VIDEO), with_image, negative, NODE_INPUTS)
    with pytest.raises(ValueError, match="takes no image inputs"):  # the text-to-video model refuses them
        check_inputs(TINY_HUNYUAN_VIDEO, torch.zeros(VIDEO), with_image, negative, NODE_INPUTS)
    engine = Engine(load_model(ref))
    runs = [engine.generate(GenerationRequest(model=ref, latent=torch.zeros(VIDEO), positive=cond, seed=7, steps=2,
                                              cfg=1.0)) for cond in (positive, with_image)]
    assert float((runs[1] - runs[0]).norm() / runs[1].norm()) > 1e-2


# ---- same seed, same latent as stock ComfyUI --------------------------------------------------------

def _comfy_cond(cond: Conditioning) -> list:
    extras = {"pooled_output": cond.pooled, "guidance": cond.guidance}
    if cond.concat_latent is not None:  # HunyuanImageToVideo's v1 (concat)
        extras.update(concat_latent_image=cond.concat_latent, concat_mask=cond.concat_mask)
    return [[cond.context, extras]]


def _stock(model, request: GenerationRequest) -> torch.Tensor:
    comfy_sample = import_comfy("comfy.sample")
    noise = comfy_sample.prepare_noise(request.latent, request.seed)
    return comfy_sample.sample(model, noise, request.steps, request.cfg, request.sampler, request.scheduler,
                               _comfy_cond(request.positive), _comfy_cond(request.negative), request.latent,
                               denoise=request.denoise, disable_pbar=True, seed=request.seed)


SAME_SEED_CASES = {
    "euler-simple-cfg": dict(sampler="euler", scheduler="simple", cfg=3.0),
    "dpmpp-2m-normal-cfg": dict(sampler="dpmpp_2m", scheduler="normal", cfg=5.0),
    "euler-ancestral-negative-without-image": dict(sampler="euler_ancestral", scheduler="simple", cfg=4.0,
                                                   negative_image=False),  # HunyuanImageToVideo sets the positive only
}


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("case", sorted(SAME_SEED_CASES))
def test_serial_engine_equals_stock_comfyui(case, model_file, comfy_model) -> None:
    options = dict(SAME_SEED_CASES[case])
    negative_image = options.pop("negative_image", True)
    request = GenerationRequest(model=ModelRef(model_file, "fp32"), latent=torch.zeros(VIDEO),
                                positive=i2v_conditioning(1), negative=i2v_conditioning(2, image=negative_image),
                                seed=77, steps=4, **options)
    theirs = _stock(comfy_model, request)
    ours = Engine(load_model(request.model)).generate(request)
    assert ours.shape == theirs.shape == VIDEO
    error = float((ours - theirs).norm() / theirs.norm())
    print(f"{case}: relative error vs stock {error:.1e}")
    assert error < 1e-4, error
    plain = dataclasses.replace(request, positive=dataclasses.replace(request.positive, concat_latent=None))
    assert float((Engine(load_model(request.model)).generate(plain) - theirs).norm() / theirs.norm()) > 1e-2


# ---- v2 (replace): HunyuanVideo's token replace on the 16-channel model ---------------------------------

T2V = TINY_HUNYUAN_VIDEO  # the v2 replace file is a 16-channel HunyuanVideo (ComfyUI's plain HunyuanVideo class)


def _replace_conditioning(seed: int, index: float | None = 0.0, guidance: float = 4.0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, TEXT_LEN, 4096, generator=g), torch.randn(1, 768, generator=g),
                        guidance=guidance, guiding_frame_index=index)


def test_token_replace_blocks_equal_diffusers_token_replace_model() -> None:
    """diffusers' HunyuanVideoTokenReplace* blocks (its token-replace vector carries no guidance and its output norm
    no token replace, unlike ComfyUI's: so a model without guidance, compared before the output norm)."""
    from comfyui_xdit.models.hunyuan_video import HunyuanVideoAdapter
    from diffusers import HunyuanVideoTransformer3DModel

    spec = dataclasses.replace(T2V, guidance_embeds=False)
    adapter = HunyuanVideoAdapter.from_state_dict(random_hunyuan_video_state(spec, 3), spec=spec)
    config = {**spec.diffusers_config(), "image_condition_type": "token_replace"}
    theirs_model = HunyuanVideoTransformer3DModel(**config)
    theirs_model.load_state_dict(adapter.transformer.state_dict(), strict=True)
    latent = torch.randn(2, 16, 3, 8, 12, generator=torch.Generator().manual_seed(4))
    cond, sigma = _replace_conditioning(5), torch.tensor([0.7, 0.7])
    ids = adapter.image_ids(8, 12, frames=3)
    with torch.no_grad():
        ours = adapter.run_blocks(adapter.embed(adapter.pack(latent), ids, cond, sigma), 0, spec.num_blocks).hidden
        plain = adapter.run_blocks(adapter.embed(adapter.pack(latent), ids,
                                                 dataclasses.replace(cond, guiding_frame_index=None), sigma),
                                   0, spec.num_blocks).hidden
        captured = []
        hook = theirs_model.norm_out.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        theirs_model(hidden_states=latent, timestep=sigma * 1000, encoder_hidden_states=cond.context.repeat(2, 1, 1),
                     encoder_attention_mask=torch.ones(2, TEXT_LEN), pooled_projections=cond.pooled.repeat(2, 1))
        hook.remove()
    theirs = captured[0]
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    print(f"token replace blocks vs diffusers: relative max error {error:.1e}")
    assert error < 2e-5, error
    frame = 4 * 6  # latent frame 0's tokens: only they change
    assert float((plain[:, :frame] - ours[:, :frame]).abs().max()) > 1e-3


@pytest.fixture(scope="module")
def t2v_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "hunyuan-video-tiny.safetensors"
    assert run_make_tiny(make_parser().parse_args(["make-tiny", "hunyuan-video", str(path)])) == 0
    return str(path)


@pytest.fixture(scope="module")
def comfy_t2v(t2v_file):
    model = import_comfy("comfy.sd").load_diffusion_model(t2v_file, model_options={"dtype": torch.float32})
    assert type(model.model).__name__ == "HunyuanVideo"
    return model


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_token_replace_forward_equals_comfyui(t2v_file, comfy_t2v) -> None:
    """Our forward with guiding_frame_index against stock's own HunyuanVideo forward (guidance on both vectors,
    the final layer's token replace), on every shard of the tokens too."""
    adapter = load_model(ModelRef(t2v_file, "fp32"))
    g = torch.Generator().manual_seed(6)
    latent = torch.randn(1, 16, 3, 8, 12, generator=g)
    cond, sigma = _replace_conditioning(7), torch.tensor([0.6])
    ids = adapter.image_ids(8, 12, frames=3)
    ours = adapter.unpack(adapter.velocity(adapter.pack(latent), ids, cond, sigma), 8, 12, frames=3)
    with torch.no_grad():
        theirs = comfy_t2v.model.diffusion_model(latent, sigma * 1000, cond.context, y=cond.pooled,
                                                 guidance=torch.tensor([cond.guidance]),
                                                 guiding_frame_index=torch.tensor([0.0]))
        plain = comfy_t2v.model.diffusion_model(latent, sigma * 1000, cond.context, y=cond.pooled,
                                                guidance=torch.tensor([cond.guidance]))
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    print(f"token replace forward vs stock: relative max error {error:.1e}")
    assert error < 2e-5, error
    assert float((plain - theirs).abs().max() / theirs.abs().max()) > 1e-2  # token replace changes the output


def _stock_masked(model, request: GenerationRequest) -> torch.Tensor:
    comfy_sample = import_comfy("comfy.sample")
    noise = comfy_sample.prepare_noise(request.latent, request.seed)

    def comfy_cond(cond: Conditioning) -> list:
        extras = {"pooled_output": cond.pooled, "guidance": cond.guidance}
        if cond.guiding_frame_index is not None:
            extras["guiding_frame_index"] = int(cond.guiding_frame_index)  # as HunyuanImageToVideo sets it
        return [[cond.context, extras]]

    return comfy_sample.sample(model, noise, request.steps, request.cfg, request.sampler, request.scheduler,
                               comfy_cond(request.positive), comfy_cond(request.negative), request.latent,
                               denoise=request.denoise, disable_pbar=True, seed=request.seed,
                               noise_mask=request.noise_mask)


REPLACE_CASES = {
    "euler-simple-cfg": dict(sampler="euler", scheduler="simple", cfg=3.0),
    "dpmpp-2m-normal-cfg": dict(sampler="dpmpp_2m", scheduler="normal", cfg=5.0),
}


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("case", sorted(REPLACE_CASES))
def test_v2_replace_serial_equals_stock_comfyui(case, t2v_file, comfy_t2v) -> None:
    """HunyuanImageToVideo's v2 (replace): the start latent written into frame 0 of the LATENT, kept by its noise mask
    (shown to the model clean), guiding_frame_index 0 on the positive only."""
    start, mask = start_frames(11)
    latent = torch.zeros(VIDEO)
    latent[:, :, :1] = start
    request = GenerationRequest(model=ModelRef(t2v_file, "fp32"), latent=latent, noise_mask=mask,
                                positive=_replace_conditioning(1), negative=_replace_conditioning(2, index=None),
                                seed=77, steps=4, **REPLACE_CASES[case])
    theirs = _stock_masked(comfy_t2v, request)
    ours = Engine(load_model(request.model)).generate(request)
    assert ours.shape == theirs.shape == VIDEO
    error = float((ours - theirs).norm() / theirs.norm())
    print(f"v2 replace {case}: relative error vs stock {error:.1e}")
    assert error < 1e-4, error
    assert torch.allclose(ours[:, :, :1], start, atol=1e-5)  # the start frame is kept
    plain = dataclasses.replace(request, positive=dataclasses.replace(request.positive, guiding_frame_index=None))
    assert float((Engine(load_model(request.model)).generate(plain) - theirs).norm() / theirs.norm()) > 1e-3


def test_v2_replace_is_refused_where_it_does_not_run() -> None:
    from nodes_package import nodes_module

    convert = nodes_module("convert")
    cond = _replace_conditioning(0)
    carried = convert.to_conditioning([[cond.context, {"pooled_output": cond.pooled, "guiding_frame_index": 0}]],
                                      "positive")
    assert carried.guiding_frame_index == 0.0
    check_inputs(T2V, torch.zeros(VIDEO), carried, None, NODE_INPUTS)
    with pytest.raises(ValueError, match="guiding_frame_index.*v2 \\(replace\\).*v1 \\(concat\\)"):
        check_inputs(SPEC, torch.zeros(VIDEO), dataclasses.replace(carried, concat_latent=torch.zeros(VIDEO)), None,
                     NODE_INPUTS)
    with pytest.raises(ValueError, match="ref_latent"):  # the custom guidance type stays refused
        convert.to_conditioning([[cond.context, {"pooled_output": cond.pooled, "ref_latent": torch.zeros(1)}]],
                                "positive")


# ---- v2 (replace) in every parallel mode at world 2: frame 0's tokens lead whichever shard or patch holds them ---

def _replace_request(parallel, sampler: str) -> GenerationRequest:
    start, mask = start_frames(12, shape=(1, 16, 3, 4, 8))  # 8 tokens a frame, 24 in all
    latent = torch.zeros(1, 16, 3, 4, 8)
    latent[:, :, :1] = start
    return GenerationRequest(model=ModelRef("tiny:hunyuan-video"), latent=latent, noise_mask=mask,
                             positive=_replace_conditioning(1), negative=_replace_conditioning(2, index=None),
                             seed=7, steps=3, cfg=2.5, sampler=sampler, parallel=parallel)


def test_v2_replace_parallel_modes_equal_serial_or_their_reference() -> None:
    from comfyui_xdit.parallel.launch import generate_local_many, stop_helper_processes
    from comfyui_xdit.parallel.pipefusion_reference import pipefusion_reference
    from comfyui_xdit.parallel_config import ParallelConfig as P
    from comfyui_xdit.sampling import finish, prepare_plan

    layouts = [(P(ulysses_degree=2), "euler"), (P(ring_degree=2), "dpmpp_2m"), (P(cfg_degree=2), "euler_ancestral"),
               (P(pipefusion_degree=2, warmup_steps=3), "dpmpp_2m"), (P(pipefusion_degree=2, num_patches=4), "euler")]
    requests = [_replace_request(config, sampler) for config, sampler in layouts]
    try:
        results = generate_local_many(requests, timeout=500)
    finally:
        stop_helper_processes()
    adapter = load_model(ModelRef("tiny:hunyuan-video"))
    for req, result in zip(requests, results):
        par = req.parallel
        label = f"{par.describe()} warm-up {par.warmup_steps} {req.sampler}"
        serial = Engine(adapter).generate(dataclasses.replace(req, parallel=P()))
        if par.pipefusion_degree == 1 or par.warmup_steps >= req.steps:
            expected = serial
        else:
            plan = prepare_plan(adapter, req)
            expected = finish(adapter, plan, pipefusion_reference(adapter, plan, par.patches, par.warmup_steps))
            assert float((result.latent - serial).abs().max() / serial.abs().max()) > 1e-4, label  # stale K/V
        error = float((result.latent - expected).abs().max() / expected.abs().max())
        print(f"v2 replace {label}: relative max error {error:.1e}")
        assert error < 1e-4, label


# ---- SkyReels I2V (32 channels: the start latent alone) against stock ----------------------------------

@pytest.fixture(scope="module")
def skyreels_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "hunyuan-video-skyreels-i2v-tiny.safetensors"
    assert run_make_tiny(make_parser().parse_args(["make-tiny", "hunyuan-video-skyreels-i2v", str(path)])) == 0
    model = import_comfy("comfy.sd").load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    assert type(model.model).__name__ == "HunyuanVideoSkyreelsI2V"  # stock detection: in_channels 32
    return str(path), model


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_skyreels_concat_and_sampling_equal_comfyui(skyreels_model) -> None:
    from nodes_package import nodes_module

    path, model = skyreels_model
    assert nodes_module("model_patches").check_family(model) == "hunyuan-video-i2v"
    for name, (noise_shape, image_shape, mask_shape, given) in sorted(CONCAT_CASES.items()):
        g = torch.Generator().manual_seed(3)
        noise = torch.randn(noise_shape, generator=g)
        image = torch.randn(image_shape, generator=g) if given else None
        mask = None if mask_shape is None else (torch.rand(mask_shape, generator=g) > 0.5).float()
        theirs = model.model.concat_cond(noise=noise, concat_latent_image=image, concat_mask=mask, device="cpu",
                                         latent_image=torch.zeros(noise_shape))
        cond = Conditioning(torch.zeros(1, 2, 4096), None, concat_latent=image, concat_mask=mask)
        ours = concat_condition(cond, noise_shape, SKYREELS.extra_channels, HUNYUAN_VIDEO_LATENT_FORMAT)
        assert ours.shape == theirs.shape == noise_shape, name
        torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-6, msg=name)
    request = GenerationRequest(model=ModelRef(path, "fp32"), latent=torch.zeros(VIDEO), positive=i2v_conditioning(1),
                                negative=i2v_conditioning(2, image=False), seed=77, steps=4, sampler="euler",
                                scheduler="simple", cfg=3.0)
    theirs = _stock(model, request)
    ours = Engine(load_model(request.model)).generate(request)
    error = float((ours - theirs).norm() / theirs.norm())
    print(f"skyreels euler-simple-cfg: relative error vs stock {error:.1e}")
    assert error < 1e-4, error
