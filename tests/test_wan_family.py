"""Wan 2.1 text-to-video (issue 12): the first video family through the family seam.

- ComfyUI's single-file layout: spec from the header, detection from keys, the variants we do not run
  refused naming what the file is, the renaming onto diffusers' ``WanTransformer3DModel``;
- a video latent (B, 16, T, H, W) packs frame-major into T x H/2 x W/2 tokens and back;
- our piecewise forward equals diffusers' own forward; per-token 3-D rotary positions equal ComfyUI's
  ``rope_encode`` and any shard of the tokens gets its rows of them;
- same seed, same latent as stock ComfyUI (UNETLoader's loader + KSampler, in process) with true CFG on
  several frames; the CLI's ``make-tiny wan21`` / ``generate --frames``.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from safetensors.torch import load_file, save_file

from comfyui_xdit.cli_commands import build_request, make_parser, run_make_tiny
from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.engine import Engine
from comfyui_xdit.input_checks import NODE_INPUTS, check_inputs
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.models.checkpoint_file import TensorShape
from comfyui_xdit.models import packing
from comfyui_xdit.models.families import detect_family, read_spec, write_random_model
from comfyui_xdit.models.qwen_image_rope import rotary
from comfyui_xdit.models.wan import WanAdapter
from comfyui_xdit.models.wan_checkpoint import (TINY_WAN21, WAN21_T2V_1_3B, WAN21_T2V_14B, infer_wan_spec,
                                                random_wan_state, wan_shapes)
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sampling import prepare_plan, preview_latent

from comfy_reference import SKIP_REASON, comfy_path, import_comfy

TEXT_LEN = 7
TWO_BLOCKS = dataclasses.replace(TINY_WAN21, num_layers=2)


def test_video_latent_packs_frame_major_and_back() -> None:
    latent = torch.randn(2, 16, 3, 6, 10, generator=torch.Generator().manual_seed(0))
    tokens = packing.pack(latent)
    assert tokens.shape == (2, 3 * 3 * 5, 64)
    # token (frame 2, row 1, column 4) holds that frame's 2x2 pixels, channel-major
    index = 2 * 15 + 1 * 5 + 4
    assert torch.equal(tokens[1, index].view(16, 2, 2), latent[1, :, 2, 2:4, 8:10])
    assert torch.equal(packing.unpack(tokens, 6, 10, frames=3), latent)
    assert torch.equal(packing.pack(latent[:, :, 0]), tokens[:, :15])  # one frame: the image packing


def test_piecewise_forward_equals_diffusers() -> None:
    adapter = WanAdapter.from_state_dict(random_wan_state(TWO_BLOCKS, 0), spec=TWO_BLOCKS)
    latent = torch.randn(2, 16, 3, 8, 12, generator=torch.Generator().manual_seed(1))  # 3 frames, not square
    cond = Conditioning(context=torch.randn(1, TEXT_LEN, 4096, generator=torch.Generator().manual_seed(2)),
                        pooled=None)
    sigma = torch.tensor([0.6, 0.6])
    velocity = adapter.velocity(adapter.pack(latent), adapter.image_ids(8, 12, frames=3), cond, sigma)
    ours = adapter.unpack(velocity, 8, 12, frames=3)
    for block in adapter.transformer.blocks:  # diffusers' own attention and rotary
        block.attn1.set_processor(WanAttnProcessor())
        block.attn2.set_processor(WanAttnProcessor())
    with torch.no_grad():
        theirs = adapter.transformer(hidden_states=latent, timestep=sigma * 1000,
                                     encoder_hidden_states=cond.context.repeat(2, 1, 1)).sample
    # diffusers' rotary tables and timestep frequencies round differently from ComfyUI's, which we follow
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 2e-5


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_rotary_positions_equal_comfyui_and_cut_with_the_tokens() -> None:
    wan = import_comfy("comfy.ldm.wan.model")
    ops = import_comfy("comfy.ops")
    # stock widths, no blocks, weights on meta: only its position code runs
    comfy_model = wan.WanModel(dim=TINY_WAN21.hidden_size, num_heads=TINY_WAN21.num_attention_heads, num_layers=0,
                               ffn_dim=TINY_WAN21.ffn_dim, device="meta", operations=ops.disable_weight_init)
    frames, height, width = 3, 10, 6
    # (1, S, 1, D/2, 2, 2) -> (S, D/2, 2, 2): [[cos, -sin], [sin, cos]] per pair
    freqs = comfy_model.rope_encode(frames, height, width, device="cpu", dtype=torch.float32)[0, :, 0]
    image_ids = WanAdapter.image_ids(height, width, frames=frames)[:, :3]  # (frame, row, column); then the grid
    cos, sin = rotary(image_ids, TINY_WAN21.axes_dims_rope)
    assert torch.equal(cos, freqs[..., 0, 0]) and torch.equal(sin, freqs[..., 1, 0])
    lo, hi = 7, 40  # any contiguous shard (across a frame boundary): its own rows
    part_cos, part_sin = rotary(image_ids[lo:hi], TINY_WAN21.axes_dims_rope)
    assert torch.equal(part_cos, cos[lo:hi]) and torch.equal(part_sin, sin[lo:hi])


def test_spec_read_from_the_header_and_detected(tmp_path) -> None:
    path = tmp_path / "wan.safetensors"
    write_random_model(path, TWO_BLOCKS)
    assert read_spec(path) == TWO_BLOCKS
    assert detect_family(random_wan_state(TINY_WAN21, 0)).id == "wan21"
    checkpoint = tmp_path / "wan-checkpoint.safetensors"  # a full checkpoint's prefix, with a text encoder
    state = {f"model.diffusion_model.{k}": v for k, v in random_wan_state(TWO_BLOCKS, 0).items()}
    state["text_encoders.umt5xxl.transformer.shared.weight"] = torch.ones(8, 4)
    save_file(state, str(checkpoint))
    assert read_spec(checkpoint) == TWO_BLOCKS
    assert TINY_WAN21.num_attention_heads == 4 and TINY_WAN21.pooled_dim == 0 and TINY_WAN21.latent_channels == 16
    # the released shapes: 12 heads / 30 blocks and 40 heads / 40 blocks, read back from their shapes
    for spec in (WAN21_T2V_1_3B, WAN21_T2V_14B):
        shapes = {k: TensorShape(s) for k, s in wan_shapes(spec).items()}
        assert infer_wan_spec(shapes) == spec
    assert (WAN21_T2V_1_3B.num_attention_heads, WAN21_T2V_14B.num_attention_heads) == (12, 40)


def test_variants_we_do_not_run_are_refused_naming_them() -> None:
    camera = random_wan_state(TWO_BLOCKS, 0)  # image-to-video runs (test_wan_i2v.py); camera control does not
    camera["control_adapter.conv.weight"] = torch.zeros(512, 1024, 2, 2)
    with pytest.raises(ValueError, match="Wan camera control"):
        infer_wan_spec(camera)
    ti2v = random_wan_state(TWO_BLOCKS, 0)
    ti2v["patch_embedding.weight"] = torch.zeros(512, 48, 1, 2, 2)
    with pytest.raises(ValueError, match="48 latent channels.*Wan 2.2 TI2V 5B"):
        infer_wan_spec(ti2v)
    wrong = random_wan_state(TWO_BLOCKS, 0)
    wrong["blocks.1.ffn.2.weight"] = torch.zeros(3, 512)
    with pytest.raises(ValueError, match=r"looks like Wan 2.1.*blocks.1.ffn.2.weight: expected \(512, 512\)"):
        infer_wan_spec(wrong)


def test_inputs_need_a_video_latent_and_umt5_tokens() -> None:
    positive, negative = tiny_conditioning(ModelRef("tiny:wan21"), seed=0)
    check_inputs(TINY_WAN21, torch.zeros(1, 16, 3, 8, 8), positive, negative, NODE_INPUTS)
    with pytest.raises(ValueError, match=r"video LATENT.*EmptyHunyuanLatentVideo"):
        check_inputs(TINY_WAN21, torch.zeros(1, 16, 8, 8), positive, negative, NODE_INPUTS)
    with pytest.raises(ValueError, match=r"width 3584.*type wan, umt5_xxl"):
        check_inputs(TINY_WAN21, torch.zeros(1, 16, 3, 8, 8), Conditioning(torch.randn(1, 8, 3584), None), None,
                     NODE_INPUTS)


def test_previews_keep_every_frame_and_pool_only_rows_and_columns() -> None:
    adapter = load_model(ModelRef("tiny:wan21"))
    positive, negative = tiny_conditioning(ModelRef("tiny:wan21"), seed=0)
    plan = prepare_plan(adapter, GenerationRequest(model=ModelRef("tiny:wan21"), latent=torch.zeros(1, 16, 2, 132, 68),
                                                   positive=positive, seed=1, steps=2))
    assert (plan.frames, plan.height, plan.width) == (2, 132, 68) and plan.image_ids.shape == (2 * 66 * 34, 6)
    denoised = torch.randn(plan.x.shape, generator=torch.Generator().manual_seed(0))
    preview = preview_latent(adapter, plan, denoised)  # 132 a side > 64: pooled by 3
    latent = adapter.latent_format.process_out(packing.unpack(denoised, 132, 68, frames=2))
    assert preview.shape == (1, 16, 2, 44, 22)
    torch.testing.assert_close(preview[:, :, 1], torch.nn.functional.avg_pool2d(latent[:, :, 1], 3))


def test_the_nodes_keep_a_video_latent_whole() -> None:
    from nodes_package import nodes_module

    convert = nodes_module("convert")
    one_frame = {"samples": torch.zeros(1, 16, 1, 8, 8)}  # EmptyHunyuanLatentVideo's length 1
    assert convert.to_latent_tensor(one_frame, video=True).shape == (1, 16, 1, 8, 8)
    assert convert.to_latent_tensor(one_frame).shape == (1, 16, 8, 8)  # an image family's (Qwen-Image)
    with pytest.raises(ValueError, match="video latent.*EmptyHunyuanLatentVideo"):
        convert.to_latent_tensor({"samples": torch.zeros(1, 16, 8, 8)}, video=True)
    assert convert.image_tokens(torch.zeros(1, 16, 3, 8, 12)) == 3 * 4 * 6


# ---- same seed, same latent as stock ComfyUI --------------------------------------------------------

def _conditioning(seed: int) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, TEXT_LEN, 4096, generator=g), None, guidance=None)


@pytest.fixture(scope="module")
def wan_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "wan21-tiny.safetensors"
    write_random_model(path, TINY_WAN21, seed=5)
    return str(path)


@pytest.fixture(scope="module")
def comfy_model(wan_file):
    comfy_sd = import_comfy("comfy.sd")
    model = comfy_sd.load_diffusion_model(wan_file, model_options={"dtype": torch.float32})
    assert type(model.model).__name__ == "WAN21"  # stock detection: WAN21_T2V
    return model


def _stock(model, request: GenerationRequest) -> torch.Tensor:
    comfy_sample = import_comfy("comfy.sample")
    latent = comfy_sample.fix_empty_latent_channels(model, request.latent)
    noise = comfy_sample.prepare_noise(latent, request.seed)
    negative = request.negative or request.positive
    return comfy_sample.sample(model, noise, request.steps, request.cfg, request.sampler, request.scheduler,
                               [[request.positive.context, {}]], [[negative.context, {}]], latent,
                               denoise=request.denoise, disable_pbar=True, seed=request.seed)


SAME_SEED_CASES = {
    "euler-simple-cfg": dict(sampler="euler", scheduler="simple", cfg=3.0),
    "dpmpp-2m-karras-cfg": dict(sampler="dpmpp_2m", scheduler="karras", cfg=5.0),
    "euler-ancestral-video2video": dict(sampler="euler_ancestral", scheduler="normal", cfg=4.0, denoise=0.7,
                                        latent=torch.randn(1, 16, 3, 8, 12,
                                                           generator=torch.Generator().manual_seed(4))),
}


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("case", sorted(SAME_SEED_CASES))
def test_serial_engine_equals_stock_comfyui(case, wan_file, comfy_model) -> None:
    options = dict(SAME_SEED_CASES[case])
    latent = options.pop("latent", torch.zeros(1, 16, 3, 8, 12))  # 3 latent frames (9 video frames) of 64x96 px
    request = GenerationRequest(model=ModelRef(wan_file, "fp32"), latent=latent, positive=_conditioning(1),
                                negative=_conditioning(2), seed=77, steps=4, **options)
    theirs = _stock(comfy_model, request)
    ours = Engine(load_model(request.model)).generate(request)
    assert ours.shape == theirs.shape == (1, 16, 3, 8, 12)
    error = float((ours - theirs).norm() / theirs.norm())
    assert error < 1e-4, error


# ---- the CLI --------------------------------------------------------------------------------------

def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "comfyui_xdit.cli", *args], capture_output=True, text=True,
                            timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_make_tiny_then_generate_frames_from_the_file_equals_the_builtin(tmp_path) -> None:
    model = tmp_path / "wan21.safetensors"
    assert run_make_tiny(make_parser().parse_args(["make-tiny", "wan21", str(model)])) == 0  # in process: no start-up
    positive, negative = tiny_conditioning(ModelRef("tiny:wan21"), seed=5)
    cond = tmp_path / "cond.safetensors"
    save_file({"positive_context": positive.context, "negative_context": negative.context}, str(cond))
    out = tmp_path / "out.safetensors"
    _cli("generate", "--model", str(model), "--cond", str(cond), "--frames", "9", "--height", "64", "--width", "96",
         "--seed", "5", "--steps", "2", "--cfg", "3.0", "--in-process", "--out", str(out))
    latent = load_file(str(out))["samples"]
    assert latent.shape == (1, 16, 3, 8, 12)  # 9 video frames -> 3 latent frames
    builtin = Engine(load_model(ModelRef("tiny:wan21"))).generate(GenerationRequest(
        model=ModelRef("tiny:wan21"), latent=torch.zeros(1, 16, 3, 8, 12), positive=positive, negative=negative,
        seed=5, steps=2, cfg=3.0))
    assert torch.equal(latent, builtin)


def test_generate_asks_a_video_model_for_frames() -> None:
    def request(*extra: str) -> GenerationRequest:
        args = make_parser().parse_args(["generate", "--model", "tiny:wan21", "--height", "64", "--width", "96",
                                         "--out", "x.safetensors", *extra])
        return build_request(args)

    with pytest.raises(ValueError, match="makes video: pass --frames"):
        request()
    assert request("--frames", "81").latent.shape == (1, 16, 21, 8, 12)  # EmptyHunyuanLatentVideo's length 81
    assert request("--frames", "1").latent.shape == (1, 16, 1, 8, 12)
