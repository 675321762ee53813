"""Wan image-to-video (issue 12 items 1, 4, 5): Wan 2.1 I2V (36 input channels, CLIP vision embedder, image
cross-attention) and Wan 2.2 I2V A14B (36 channels, neither).

- ComfyUI's single-file layout: spec from the header, stock detection picks WAN21_I2V / a 36-channel WAN21_T2V;
- ``c_concat`` equals ComfyUI's own ``WAN21.concat_cond`` (resize with centre crop, process_in, mask inversion,
  time padding, batch resizing) and each shard gets its rows of it;
- our piecewise forward equals diffusers' ``WanTransformer3DModel`` with its image embedder;
- same seed, same latent as stock ComfyUI's WAN21 i2v model (in process) with a start-frame latent, its mask
  and CLIP vision tokens, with true CFG (the branches batched as ComfyUI batches them).
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from comfyui_xdit.cond_batch import stack
from comfyui_xdit.conditioning import Conditioning, resize_to_batch
from comfyui_xdit.engine import Engine
from comfyui_xdit.input_checks import NODE_INPUTS, check_inputs
from comfyui_xdit.latent_format import WAN21_LATENT_FORMAT
from comfyui_xdit.model_loader import load_model
from comfyui_xdit.models.checkpoint_file import TensorShape
from comfyui_xdit.models.families import detect_family, read_spec, write_random_model
from comfyui_xdit.models.wan import WanAdapter
from comfyui_xdit.models.wan_checkpoint import (TINY_WAN21_I2V, TINY_WAN22_I2V, WAN21_I2V_14B, WAN22_I2V_A14B,
                                                infer_wan_spec, random_wan_state, wan_shapes)
from comfyui_xdit.models.wan_concat import concat_condition, concat_tokens
from comfyui_xdit.request import GenerationRequest, ModelRef

from comfy_reference import SKIP_REASON, comfy_path, import_comfy

TEXT_LEN = 7
CLIP_TOKENS = 5  # a real CLIP ViT-H gives 257; any count runs the same code
TWO_BLOCKS = dataclasses.replace(TINY_WAN21_I2V, num_layers=2)
VIDEO = (1, 16, 3, 8, 12)  # 3 latent frames of 64x96 px


def start_frames(seed: int, shape: tuple[int, ...] = VIDEO, given: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A start-frame latent and its mask as WanImageToVideo makes them: the latent of the whole clip, mask
    (1, 1, T, H, W) 0 on the ``given`` first latent frames, 1 after."""
    latent = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(1, 1, *shape[2:])
    mask[:, :, :given] = 0.0
    return latent, mask


def i2v_conditioning(seed: int, text_len: int = TEXT_LEN, shape: tuple[int, ...] = VIDEO,
                     clip: bool = True) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    latent, mask = start_frames(100, shape)  # one start image for both branches, as WanImageToVideo
    return Conditioning(torch.randn(1, text_len, 4096, generator=g), None, guidance=None, concat_latent=latent,
                        concat_mask=mask, clip_vision=torch.randn(1, CLIP_TOKENS, 1280, generator=g) if clip else None)


# ---- the file --------------------------------------------------------------------------------------

def test_spec_read_from_the_header_and_the_released_shapes(tmp_path) -> None:
    for spec in (TWO_BLOCKS, dataclasses.replace(TINY_WAN22_I2V, num_layers=2)):
        path = tmp_path / f"{spec.image_dim}.safetensors"
        write_random_model(path, spec)
        assert read_spec(path) == spec
        assert detect_family(random_wan_state(spec, 0)).id == "wan21"
        assert (spec.latent_channels, spec.extra_channels, spec.image_conditioning) == (16, 20, True)
    for spec in (WAN21_I2V_14B, WAN22_I2V_A14B):
        shapes = {k: TensorShape(s) for k, s in wan_shapes(spec).items()}
        assert infer_wan_spec(shapes) == spec
    assert TINY_WAN21_I2V.image_to_video and not TINY_WAN22_I2V.image_to_video


def test_first_last_frame_and_unknown_widths_are_refused() -> None:
    flf = random_wan_state(TWO_BLOCKS, 0)
    flf["img_emb.emb_pos"] = torch.zeros(1, 514, 1280)
    with pytest.raises(ValueError, match="first-last-frame"):
        infer_wan_spec(flf)
    embedder_on_t2v = random_wan_state(dataclasses.replace(TWO_BLOCKS, in_channels=16), 0)
    with pytest.raises(ValueError, match="16 latent channels.*CLIP vision embedder"):
        infer_wan_spec(embedder_on_t2v)


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("spec, config", [(TWO_BLOCKS, "WAN21_I2V"),
                                          (dataclasses.replace(TINY_WAN22_I2V, num_layers=2), "WAN21_T2V")])
def test_stock_comfyui_loads_the_files_as_its_i2v_configs(tmp_path, spec, config) -> None:
    path = tmp_path / "wan-i2v.safetensors"
    write_random_model(path, spec)
    model = import_comfy("comfy.sd").load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    assert type(model.model.model_config).__name__ == config
    assert model.model.diffusion_model.patch_embedding.weight.shape[1] == 36


# ---- c_concat -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stock_models(tmp_path_factory) -> dict:
    """ComfyUI's WAN21 models of the two tiny I2V layouts (weights never run here but by the sampling test)."""
    comfy_sd = import_comfy("comfy.sd")
    out = {}
    for name, spec in (("wan21-i2v", TINY_WAN21_I2V), ("wan22-i2v", TINY_WAN22_I2V)):
        path = tmp_path_factory.mktemp("models") / f"{name}.safetensors"
        write_random_model(path, spec, seed=5)
        out[name] = (str(path), comfy_sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32}))
    return out


CONCAT_CASES = {  # (noise shape, concat latent shape, mask shape or None, given image?)
    "same-size": ((1, 16, 3, 8, 12), (1, 16, 3, 8, 12), (1, 1, 3, 8, 12), True),
    "resized-cropped": ((1, 16, 3, 8, 12), (1, 16, 3, 10, 10), (1, 1, 2, 10, 10), True),
    "batch-2-from-1": ((2, 16, 3, 8, 12), (1, 16, 3, 8, 12), (1, 1, 3, 8, 12), True),
    "batch-4-from-2": ((4, 16, 2, 4, 8), (2, 16, 2, 4, 8), (2, 4, 2, 4, 8), True),
    "no-mask": ((1, 16, 3, 8, 12), (1, 16, 3, 8, 12), None, True),
    "no-image": ((1, 16, 3, 8, 12), None, (1, 1, 3, 8, 12), False),
}


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("name", ["wan21-i2v", "wan22-i2v"])
@pytest.mark.parametrize("case", sorted(CONCAT_CASES))
def test_concat_equals_comfyui_concat_cond(stock_models, name, case) -> None:
    noise_shape, image_shape, mask_shape, given = CONCAT_CASES[case]
    g = torch.Generator().manual_seed(3)
    image = torch.randn(image_shape, generator=g) if given else None
    mask = None if mask_shape is None else (torch.rand(mask_shape, generator=g) > 0.5).float()
    noise = torch.randn(noise_shape, generator=g)
    theirs = stock_models[name][1].model.concat_cond(noise=noise, concat_latent_image=image, concat_mask=mask,
                                                       device="cpu")
    spec = TINY_WAN21_I2V if name == "wan21-i2v" else TINY_WAN22_I2V
    cond = Conditioning(torch.zeros(1, 2, 4096), None, concat_latent=image, concat_mask=mask)
    ours = concat_condition(cond, noise_shape, spec.extra_channels, spec.image_to_video, WAN21_LATENT_FORMAT)
    assert ours.shape == theirs.shape == (noise_shape[0], 20, *noise_shape[2:])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_each_shard_gets_its_own_rows_of_the_concat() -> None:
    cond = i2v_conditioning(0)
    ids = WanAdapter.image_ids(8, 12, frames=3)
    whole = concat_tokens(cond, 2, ids, 20, True, WAN21_LATENT_FORMAT)
    assert whole.shape == (2, 3 * 4 * 6, 80)
    for lo, hi in ((0, 24), (7, 40), (50, 72)):  # any contiguous shard, across frame boundaries
        torch.testing.assert_close(concat_tokens(cond, 2, ids[lo:hi], 20, True, WAN21_LATENT_FORMAT),
                                   whole[:, lo:hi], rtol=0, atol=0)
    perm = torch.randperm(72, generator=torch.Generator().manual_seed(0))  # any set of tokens
    assert torch.equal(concat_tokens(cond, 2, ids[perm], 20, True, WAN21_LATENT_FORMAT), whole[:, perm])


def test_batches_are_resized_as_comfyui_and_the_branches_stack() -> None:
    rows = torch.arange(2.0)[:, None]
    assert resize_to_batch(rows, 4).flatten().tolist() == [0, 0, 1, 1]  # ComfyUI's resize, not a repeat
    assert resize_to_batch(torch.arange(4.0)[:, None], 2).flatten().tolist() == [0, 3]
    two = dataclasses.replace(i2v_conditioning(0), concat_latent=torch.randn(2, 16, 3, 8, 12))
    assert torch.equal(two.rows(4, 1, 3).concat_latent, two.concat_latent[[0, 1]])  # rows 1, 2 of [a, a, b, b]
    both = stack(i2v_conditioning(1), i2v_conditioning(2), 1)
    assert both is not None and both.concat_latent.shape[0] == both.clip_vision.shape[0] == 2
    assert stack(i2v_conditioning(1), i2v_conditioning(2, clip=False), 1) is None  # clip_fea in one branch only


def test_a_family_without_image_inputs_refuses_them() -> None:
    from comfyui_xdit.models.wan_checkpoint import TINY_WAN21

    with pytest.raises(ValueError, match="image-to-video.*WanImageToVideo"):
        check_inputs(TINY_WAN21, torch.zeros(VIDEO), i2v_conditioning(0), None, NODE_INPUTS)
    check_inputs(TINY_WAN21_I2V, torch.zeros(VIDEO), i2v_conditioning(0), i2v_conditioning(1), NODE_INPUTS)
    with pytest.raises(ValueError, match="start-frame latent.*3 frames.*latent_image input has 5"):
        check_inputs(TINY_WAN21_I2V, torch.zeros(1, 16, 5, 8, 12), i2v_conditioning(0), None, NODE_INPUTS)


def test_the_nodes_carry_wan_image_to_video_conditioning() -> None:
    from nodes_package import nodes_module

    convert = nodes_module("convert")
    latent, mask = start_frames(0)
    clip = types.SimpleNamespace(penultimate_hidden_states=torch.randn(1, CLIP_TOKENS, 1280))
    context = torch.randn(1, TEXT_LEN, 4096)
    cond = convert.to_conditioning([[context, {"concat_latent_image": latent, "concat_mask": mask,
                                               "clip_vision_output": clip}]], "positive")
    assert torch.equal(cond.concat_latent, latent) and torch.equal(cond.concat_mask, mask)
    assert torch.equal(cond.clip_vision, clip.penultimate_hidden_states)
    plain = convert.to_conditioning([[context, {}]], "negative")
    assert plain.concat_latent is None and plain.concat_mask is None and plain.clip_vision is None
    with pytest.raises(ValueError, match="time_dim_concat"):
        convert.to_conditioning([[context, {"time_dim_concat": latent}]], "positive")


def test_the_cli_reads_image_to_video_conditioning(tmp_path) -> None:
    from safetensors.torch import save_file

    from comfyui_xdit.cli_commands import read_cond_file

    cond = i2v_conditioning(0)
    path = tmp_path / "cond.safetensors"
    save_file({"positive_context": cond.context, "positive_concat_latent": cond.concat_latent,
               "positive_concat_mask": cond.concat_mask, "positive_clip_vision": cond.clip_vision,
               "negative_context": cond.context.clone()}, str(path))
    positive, negative = read_cond_file(str(path))
    assert torch.equal(positive.concat_latent, cond.concat_latent)
    assert torch.equal(positive.clip_vision, cond.clip_vision)
    assert torch.equal(positive.concat_mask, cond.concat_mask) and negative.concat_latent is None


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_parallel_model_takes_comfyui_wan_i2v_models(stock_models) -> None:
    from nodes_package import nodes_module

    model_patches = nodes_module("model_patches")
    for name in ("wan21-i2v", "wan22-i2v"):  # WAN21_I2V, and WAN21_T2V of 36 channels (Wan 2.2 I2V A14B)
        model = stock_models[name][1]
        assert model_patches.check_family(model) == "wan21"
        weights = model_patches.base_weights(model)
        assert infer_wan_spec(weights) == (TINY_WAN21_I2V if name == "wan21-i2v" else TINY_WAN22_I2V)


# ---- the forward -----------------------------------------------------------------------------------

def test_piecewise_forward_equals_diffusers_with_its_image_embedder() -> None:
    adapter = WanAdapter.from_state_dict(random_wan_state(TWO_BLOCKS, 0), spec=TWO_BLOCKS)
    latent = torch.randn(2, 16, 3, 8, 12, generator=torch.Generator().manual_seed(1))
    cond = i2v_conditioning(2, text_len=512)  # diffusers splits its context 512 text tokens from the end
    sigma = torch.tensor([0.6, 0.6])
    velocity = adapter.velocity(adapter.pack(latent), adapter.image_ids(8, 12, frames=3), cond, sigma)
    ours = adapter.unpack(velocity, 8, 12, frames=3)
    c_concat = concat_condition(cond, tuple(latent.shape), 20, True, WAN21_LATENT_FORMAT)
    for block in adapter.transformer.blocks:  # diffusers' own attention, rotary and image embedder
        block.attn1.set_processor(WanAttnProcessor())
        block.attn2.set_processor(WanAttnProcessor())
    with torch.no_grad():
        theirs = adapter.transformer(hidden_states=torch.cat([latent, c_concat], dim=1), timestep=sigma * 1000,
                                     encoder_hidden_states=cond.context.repeat(2, 1, 1),
                                     encoder_hidden_states_image=cond.clip_vision.repeat(2, 1, 1)).sample
        no_image = adapter.transformer(hidden_states=torch.cat([latent, c_concat], dim=1), timestep=sigma * 1000,
                                       encoder_hidden_states=cond.context.repeat(2, 1, 1)).sample
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 2e-5
    assert float((no_image - theirs).abs().max() / theirs.abs().max()) > 1e-2  # the image tokens matter


def test_the_tiny_i2v_models_get_start_frames_that_change_the_video() -> None:
    """What test_family_parallel.py's tiny:wan21-i2v runs on: a start latent, its mask and CLIP tokens that matter."""
    from comfyui_xdit.model_loader import tiny_conditioning, tiny_image_conditioning

    ref = ModelRef("tiny:wan21-i2v")
    positive, negative = tiny_conditioning(ref, seed=3)
    with_image = tiny_image_conditioning(ref, positive, (1, 16, 3, 4, 8), seed=3)
    assert with_image.concat_latent.shape == (1, 16, 3, 4, 8) and with_image.clip_vision.shape == (1, 5, 1280)
    assert tiny_image_conditioning(ModelRef("tiny:wan22-i2v"), positive, (1, 16, 3, 4, 8), 3).clip_vision is None
    assert tiny_image_conditioning(ModelRef("tiny:wan21"), positive, (1, 16, 3, 4, 8), 3) is positive
    engine = Engine(load_model(ref))
    runs = [engine.generate(GenerationRequest(model=ref, latent=torch.zeros(1, 16, 3, 4, 8), positive=cond, seed=7,
                                              steps=2, cfg=1.0))
            for cond in (positive, with_image, dataclasses.replace(with_image, clip_vision=None))]
    assert float((runs[1] - runs[0]).norm() / runs[1].norm()) > 1e-2
    assert float((runs[1] - runs[2]).norm() / runs[1].norm()) > 1e-3


# ---- same seed, same latent as stock ComfyUI --------------------------------------------------------

def _comfy_cond(cond: Conditioning) -> list:
    extras = {"concat_latent_image": cond.concat_latent, "concat_mask": cond.concat_mask}
    if cond.clip_vision is not None:  # what extra_conds reads of a CLIP_VISION_OUTPUT
        extras["clip_vision_output"] = types.SimpleNamespace(penultimate_hidden_states=cond.clip_vision)
    return [[cond.context, extras]]


def _stock(model, request: GenerationRequest) -> torch.Tensor:
    comfy_sample = import_comfy("comfy.sample")
    noise = comfy_sample.prepare_noise(request.latent, request.seed)
    return comfy_sample.sample(model, noise, request.steps, request.cfg, request.sampler, request.scheduler,
                               _comfy_cond(request.positive), _comfy_cond(request.negative), request.latent,
                               denoise=request.denoise, disable_pbar=True, seed=request.seed)


SAME_SEED_CASES = {
    "wan21-i2v-euler-cfg": dict(model="wan21-i2v", sampler="euler", scheduler="simple", cfg=3.0),
    "wan21-i2v-dpmpp-2m-no-clip": dict(model="wan21-i2v", sampler="dpmpp_2m", scheduler="normal", cfg=4.0,
                                       clip=False),
    "wan22-i2v-euler-ancestral": dict(model="wan22-i2v", sampler="euler_ancestral", scheduler="simple", cfg=3.5),
}


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("case", sorted(SAME_SEED_CASES))
def test_serial_engine_equals_stock_comfyui(case, stock_models) -> None:
    options = dict(SAME_SEED_CASES[case])
    path, model = stock_models[options.pop("model")]
    clip = options.pop("clip", True)
    request = GenerationRequest(model=ModelRef(path, "fp32"), latent=torch.zeros(VIDEO),
                                positive=i2v_conditioning(1, clip=clip), negative=i2v_conditioning(2, clip=clip),
                                seed=77, steps=4, **options)
    theirs = _stock(model, request)
    ours = Engine(load_model(request.model)).generate(request)
    assert ours.shape == theirs.shape == VIDEO
    error = float((ours - theirs).norm() / theirs.norm())
    assert error < 1e-4, error
    plain = dataclasses.replace(request, positive=dataclasses.replace(request.positive, concat_latent=None),
                                negative=dataclasses.replace(request.negative, concat_latent=None))
    assert float((Engine(load_model(request.model)).generate(plain) - theirs).norm() / theirs.norm()) > 1e-2


# ---- Wan 2.2 I2V A14B: two experts split one schedule (KSamplerAdvanced), the same image inputs to both --------

def _stock_advanced(model, request: GenerationRequest) -> torch.Tensor:
    """ComfyUI's KSamplerAdvanced on ``request``'s values (zero noise when add_noise is disabled, force_full_denoise
    unless the leftover noise is returned)."""
    comfy_sample = import_comfy("comfy.sample")
    noise = comfy_sample.prepare_noise(request.latent, request.seed) if request.add_noise \
        else torch.zeros_like(request.latent)
    return comfy_sample.sample(model, noise, request.steps, request.cfg, request.sampler, request.scheduler,
                               _comfy_cond(request.positive), _comfy_cond(request.negative), request.latent,
                               disable_noise=not request.add_noise, start_step=request.start_step,
                               last_step=request.end_step if request.end_step is not None else 10000,
                               force_full_denoise=not request.leftover_noise, disable_pbar=True, seed=request.seed)


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_wan22_i2v_expert_switch_equals_stock_ksampler_advanced(tmp_path) -> None:
    comfy_sd = import_comfy("comfy.sd")
    paths = [tmp_path / "wan22-i2v-high.safetensors", tmp_path / "wan22-i2v-low.safetensors"]
    for seed, path in enumerate(paths, start=11):
        write_random_model(path, TINY_WAN22_I2V, seed=seed)
    stock = [comfy_sd.load_diffusion_model(str(p), model_options={"dtype": torch.float32}) for p in paths]
    high, low = (ModelRef(str(p), "fp32") for p in paths)
    request = GenerationRequest(model=high, latent=torch.zeros(VIDEO), positive=i2v_conditioning(1, clip=False),
                                negative=i2v_conditioning(2, clip=False), seed=77, steps=4, sampler="euler",
                                scheduler="simple", cfg=3.5)
    first = dataclasses.replace(request, end_step=2, leftover_noise=True)
    second = dataclasses.replace(request, model=low, start_step=2, end_step=10000, add_noise=False)
    theirs_first = _stock_advanced(stock[0], first)
    ours_first = Engine(load_model(high)).generate(first)
    assert float((ours_first - theirs_first).norm() / theirs_first.norm()) < 1e-4, "high-noise expert"
    theirs = _stock_advanced(stock[1], dataclasses.replace(second, latent=theirs_first))
    ours = Engine(load_model(low)).generate(dataclasses.replace(second, latent=ours_first))
    error = float((ours - theirs).norm() / theirs.norm())
    assert error < 1e-4, error
