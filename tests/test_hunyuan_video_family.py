"""HunyuanVideo text-to-video (issue 12): Flux-like joint blocks over a video latent through the family seam.

- ComfyUI's single-file layout: spec from the header, detection from keys (before Flux, whose marker key its
  files share), the original release's names renamed as ComfyUI renames them, unknown channel counts refused;
- our piecewise forward equals diffusers' own ``HunyuanVideoTransformer3DModel`` forward (guidance, pooled
  CLIP, token refiner, 3-D rotary) and any shard of the tokens gets its rows of the rotary positions;
- same seed, same latent as stock ComfyUI (UNETLoader's loader + KSampler, in process) with true CFG on
  several frames, a text mask included; the CLI's ``make-tiny hunyuan-video`` / ``generate --frames``.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
from safetensors.torch import load_file, save_file

from comfyui_xdit.cli_commands import make_parser, run_make_tiny
from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.engine import Engine
from comfyui_xdit.input_checks import NODE_INPUTS, check_inputs
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.models.checkpoint_file import TensorShape
from comfyui_xdit.models.families import adapter_from_file, detect_family, read_spec, write_random_model
from comfyui_xdit.models.hunyuan_video import HunyuanVideoAdapter
from comfyui_xdit.models.hunyuan_video_checkpoint import (HUNYUAN_VIDEO_T2V, ROPE_AXES, ROPE_THETA,
                                                          TINY_HUNYUAN_VIDEO, comfy_name, hunyuan_video_shapes,
                                                          infer_hunyuan_video_spec, random_hunyuan_video_state)
from comfyui_xdit.models.qwen_image_rope import rotary
from comfyui_xdit.request import GenerationRequest, ModelRef

from comfy_reference import SKIP_REASON, comfy_path, import_comfy
from nodes_package import nodes_module

TEXT_LEN = 7
SPEC = TINY_HUNYUAN_VIDEO


@pytest.fixture(scope="module")
def adapter() -> HunyuanVideoAdapter:
    return HunyuanVideoAdapter.from_state_dict(random_hunyuan_video_state(SPEC, 0), spec=SPEC)


def _conditioning(seed: int, guidance: float = 6.0, mask: torch.Tensor | None = None) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, TEXT_LEN, 4096, generator=g), torch.randn(1, 768, generator=g),
                        guidance=guidance, context_mask=mask)


def test_piecewise_forward_equals_diffusers() -> None:
    adapter = HunyuanVideoAdapter.from_state_dict(random_hunyuan_video_state(SPEC, 1), spec=SPEC)  # its own module
    latent = torch.randn(2, 16, 3, 8, 12, generator=torch.Generator().manual_seed(1))  # 3 frames, not square
    cond = _conditioning(2, guidance=4.5)
    sigma = torch.tensor([0.6, 0.6])
    velocity = adapter.velocity(adapter.pack(latent), adapter.image_ids(8, 12, frames=3), cond, sigma)
    ours = adapter.unpack(velocity, 8, 12, frames=3)
    other_guidance = adapter.velocity(adapter.pack(latent), adapter.image_ids(8, 12, frames=3),
                                      dataclasses.replace(cond, guidance=1.0), sigma)
    assert float((other_guidance - velocity).abs().max()) > 1e-3  # the guidance reaches the output
    for block in adapter.blocks:  # diffusers' own attention and rotary
        block.attn.set_processor(HunyuanVideoAttnProcessor2_0())
    with torch.no_grad():
        theirs = adapter.transformer(hidden_states=latent, timestep=sigma * 1000,
                                     encoder_hidden_states=cond.context.repeat(2, 1, 1),
                                     encoder_attention_mask=torch.ones(2, TEXT_LEN),
                                     pooled_projections=cond.pooled.repeat(2, 1),
                                     guidance=torch.full((2,), 4.5 * 1000)).sample
    # diffusers' rotary tables round differently from ComfyUI's float64 ones, which we follow
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 2e-5


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_rotary_positions_equal_comfyui_and_cut_with_the_tokens() -> None:
    embed = import_comfy("comfy.ldm.flux.layers").EmbedND(dim=128, theta=int(ROPE_THETA), axes_dim=list(ROPE_AXES))
    hunyuan = import_comfy("comfy.ldm.hunyuan_video.model")
    frames, height, width = 3, 10, 6
    ids = hunyuan.HunyuanVideo.img_ids(type("P", (), {"patch_size": [1, 2, 2]})(), torch.zeros(1, 16, frames, height,
                                                                                             width))
    # (1, 1, S, D/2, 2, 2) -> (S, D/2, 2, 2): [[cos, -sin], [sin, cos]] per pair
    freqs = embed(ids)[0, 0]
    image_ids = HunyuanVideoAdapter.image_ids(height, width, frames=frames)
    assert torch.equal(image_ids, ids[0])
    cos, sin = rotary(image_ids, ROPE_AXES, ROPE_THETA)
    assert torch.equal(cos, freqs[..., 0, 0]) and torch.equal(sin, freqs[..., 1, 0])
    lo, hi = 7, 40  # any contiguous shard (across a frame boundary): its own rows
    part_cos, part_sin = rotary(image_ids[lo:hi], ROPE_AXES, ROPE_THETA)
    assert torch.equal(part_cos, cos[lo:hi]) and torch.equal(part_sin, sin[lo:hi])


def test_spec_read_from_the_header_and_detected(tmp_path) -> None:
    path = tmp_path / "hunyuan-video.safetensors"
    write_random_model(path, SPEC)
    assert read_spec(path) == SPEC
    assert detect_family(random_hunyuan_video_state(SPEC, 0)).id == "hunyuan-video"  # not Flux: same double blocks
    checkpoint = tmp_path / "hunyuan-video-checkpoint.safetensors"  # a full checkpoint's prefix, with a VAE
    state = {f"model.diffusion_model.{k}": v for k, v in random_hunyuan_video_state(SPEC, 0).items()}
    state["vae.decoder.conv_in.weight"] = torch.ones(8, 4)
    save_file(state, str(checkpoint))
    assert read_spec(checkpoint) == SPEC
    assert (SPEC.num_attention_heads, SPEC.num_blocks, SPEC.pooled_dim, SPEC.context_dim) == (4, 4, 768, 4096)
    # the release's shapes: 24 heads, 20 double + 40 single blocks, read back from their shapes
    shapes = {k: TensorShape(s) for k, s in hunyuan_video_shapes(HUNYUAN_VIDEO_T2V).items()}
    assert infer_hunyuan_video_spec(shapes) == HUNYUAN_VIDEO_T2V and HUNYUAN_VIDEO_T2V.num_attention_heads == 24
    no_guidance = {k: v for k, v in shapes.items() if not k.startswith("guidance_in.")}
    assert not infer_hunyuan_video_spec(no_guidance).guidance_embeds


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_the_original_release_names_are_renamed_as_comfyui_does() -> None:
    supported = import_comfy("comfy.supported_models")
    # the original release's names of a few of each kind of tensor (as in diffusers' single-file conversion)
    original = ["txt_in.t_embedder.mlp.0.weight", "txt_in.c_embedder.linear_2.bias", "time_in.mlp.0.weight",
                "guidance_in.mlp.2.bias", "vector_in.in_layer.weight",
                "txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight",
                "txt_in.individual_token_refiner.blocks.0.self_attn_proj.bias",
                "txt_in.individual_token_refiner.blocks.0.mlp.fc1.weight", "double_blocks.3.img_mod.linear.weight",
                "double_blocks.0.txt_attn_qkv.bias", "double_blocks.1.img_attn_q_norm.weight",
                "double_blocks.1.txt_attn_k_norm.weight", "double_blocks.2.img_attn_proj.weight",
                "double_blocks.2.txt_mlp.fc2.bias", "single_blocks.5.q_norm.weight", "single_blocks.5.k_norm.weight",
                "single_blocks.0.modulation.linear.bias", "single_blocks.0.linear1.weight",
                "final_layer.adaLN_modulation.1.weight"]
    theirs = supported.HunyuanVideo.process_unet_state_dict(None, {k: k for k in original})
    assert {comfy_name(k): k for k in original} == {new: old for new, old in theirs.items()}
    known = set(hunyuan_video_shapes(dataclasses.replace(SPEC, num_layers=4, num_single_layers=6)))
    assert {comfy_name(k) for k in original} <= known


def test_image_to_video_and_other_variants_are_refused_naming_them() -> None:
    # 33 channels (I2V v1) and 32 (SkyReels I2V) run: tests/test_hunyuan_video_i2v.py
    i2v = random_hunyuan_video_state(SPEC, 0)
    i2v["img_in.proj.weight"] = torch.zeros(512, 24, 1, 2, 2)
    with pytest.raises(ValueError, match="24 latent channels.*HunyuanVideo variant.*stock KSampler"):
        infer_hunyuan_video_spec(i2v)
    wrong = random_hunyuan_video_state(SPEC, 0)
    wrong["single_blocks.1.linear2.weight"] = torch.zeros(3, 512)
    with pytest.raises(ValueError, match=r"looks like HunyuanVideo.*single_blocks.1.linear2.weight: expected "
                                         r"\(512, 2560\)"):
        infer_hunyuan_video_spec(wrong)


def test_inputs_need_a_video_latent_llama_tokens_and_a_pooled_clip() -> None:
    positive, negative = tiny_conditioning(ModelRef("tiny:hunyuan-video"), seed=0)
    check_inputs(SPEC, torch.zeros(1, 16, 3, 8, 8), positive, negative, NODE_INPUTS)
    with pytest.raises(ValueError, match=r"video LATENT.*EmptyHunyuanLatentVideo"):
        check_inputs(SPEC, torch.zeros(1, 16, 8, 8), positive, negative, NODE_INPUTS)
    with pytest.raises(ValueError, match=r"pooled vector has width 1280.*clip_l \+ llava_llama3"):
        check_inputs(SPEC, torch.zeros(1, 16, 3, 8, 8), Conditioning(torch.randn(1, 8, 4096), torch.randn(1, 1280)),
                     None, NODE_INPUTS)


def test_a_text_mask_drops_the_padding_after_the_refiners_mean(adapter) -> None:
    latent = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    ids = adapter.image_ids(4, 4, frames=2)
    sigma = torch.tensor([0.5])
    mask = (torch.arange(TEXT_LEN) < 4).float()[None]  # 4 text tokens, 3 padding
    masked = _conditioning(4, mask=mask)
    assert adapter.text_len(masked) == 4 and adapter.text_len(_conditioning(4)) == TEXT_LEN
    ours = adapter.velocity(adapter.pack(latent), ids, masked, sigma)
    changed = masked.context.clone()
    changed[:, 4:] += 1.0  # other padding: its values reach the output only through the refiner's mean
    assert float((adapter.velocity(adapter.pack(latent), ids, dataclasses.replace(masked, context=changed),
                                   sigma) - ours).abs().max()) > 1e-4
    unmasked = adapter.velocity(adapter.pack(latent), ids, _conditioning(4), sigma)
    assert float((unmasked - ours).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="text mask differs between the rows"):
        two = dataclasses.replace(masked, context_mask=torch.cat([mask, torch.ones(1, TEXT_LEN)]))
        adapter.velocity(adapter.pack(latent.repeat(2, 1, 1, 1, 1)), ids, two, sigma.repeat(2))


def test_a_pipefusion_stage_reads_only_its_blocks_across_double_and_single(tmp_path, adapter) -> None:
    path = tmp_path / "hunyuan-video.safetensors"
    write_random_model(path, SPEC, seed=0)  # the fixture's weights
    stage = adapter_from_file(path, torch.float32, "cpu", blocks=(1, 3))  # the last double + the first single block
    kinds = [type(block).__name__ for block in stage.blocks]
    assert kinds == ["AbsentBlock", "HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock",
                     "AbsentBlock"]
    assert stage.parameter_bytes() < adapter.parameter_bytes() * 0.8
    latent = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    ids, cond, sigma = adapter.image_ids(4, 4, frames=2), _conditioning(6), torch.tensor([0.3])
    with torch.no_grad():
        entering = adapter.run_blocks(adapter.embed(adapter.pack(latent), ids, cond, sigma), 0, 1)
        whole = adapter.run_blocks(entering, 1, 3)
        resumed = stage.resume(stage.embed_context(ids, cond, sigma), adapter.carried(entering))
        ours = stage.run_blocks(resumed, 1, 3)
    assert torch.equal(ours.hidden, whole.hidden) and torch.equal(ours.encoder_hidden, whole.encoder_hidden)


def test_the_nodes_refuse_hunyuan_image_to_video_conditioning_and_default_the_guidance() -> None:
    convert = nodes_module("convert")
    cond = _conditioning(0)
    # HunyuanImageToVideo's custom guidance type (v2 (replace) runs: test_hunyuan_video_i2v.py)
    for key in ("ref_latent",):
        with pytest.raises(ValueError, match=key):
            convert.to_conditioning([[cond.context, {"pooled_output": cond.pooled, key: torch.zeros(1)}]], "positive")
    plain = [[cond.context, {"pooled_output": cond.pooled}]]
    assert convert.to_conditioning(plain, "positive", SPEC.default_guidance).guidance == 6.0
    assert convert.to_conditioning(plain, "positive").guidance == 3.5  # Flux's, for the other families


# ---- same seed, same latent as stock ComfyUI --------------------------------------------------------

@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "hunyuan-video-tiny.safetensors"
    write_random_model(path, SPEC, seed=5)
    return str(path)


@pytest.fixture(scope="module")
def comfy_model(model_file):
    comfy_sd = import_comfy("comfy.sd")
    model = comfy_sd.load_diffusion_model(model_file, model_options={"dtype": torch.float32})
    assert type(model.model).__name__ == "HunyuanVideo"  # stock detection: supported_models.HunyuanVideo
    return model


def _comfy_cond(cond: Conditioning) -> list:
    extras = {"pooled_output": cond.pooled}
    if cond.guidance is not None:  # None: the conditioning carries none (no FluxGuidance node)
        extras["guidance"] = cond.guidance
    if cond.context_mask is not None:
        extras["attention_mask"] = cond.context_mask.long()  # as the llama encoder gives it
    return [[cond.context, extras]]


def _stock(model, request: GenerationRequest) -> torch.Tensor:
    comfy_sample = import_comfy("comfy.sample")
    latent = comfy_sample.fix_empty_latent_channels(model, request.latent)
    noise = comfy_sample.prepare_noise(latent, request.seed)
    negative = request.negative or request.positive
    return comfy_sample.sample(model, noise, request.steps, request.cfg, request.sampler, request.scheduler,
                               _comfy_cond(request.positive), _comfy_cond(negative), latent,
                               denoise=request.denoise, disable_pbar=True, seed=request.seed)


MASK = (torch.arange(TEXT_LEN) < 5).float()[None]  # 5 text tokens, 2 padding
SAME_SEED_CASES = {
    "euler-simple-cfg": dict(sampler="euler", scheduler="simple", cfg=3.0),
    "dpmpp-2m-karras-cfg": dict(sampler="dpmpp_2m", scheduler="karras", cfg=5.0),
    "euler-ancestral-video2video": dict(sampler="euler_ancestral", scheduler="normal", cfg=4.0, denoise=0.7,
                                        latent=torch.randn(1, 16, 3, 8, 12,
                                                           generator=torch.Generator().manual_seed(4))),
    # ComfyUI's text mask (its batch of two masked prompts breaks there, so the distilled model's cfg 1 here)
    "euler-masked-text-cfg1": dict(sampler="euler", scheduler="simple", cfg=1.0, mask=MASK),
    "euler-no-guidance-given": dict(sampler="euler", scheduler="simple", cfg=2.0, guidance=None),  # stock: 6.0
}


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("case", sorted(SAME_SEED_CASES))
def test_serial_engine_equals_stock_comfyui(case, model_file, comfy_model) -> None:
    options = dict(SAME_SEED_CASES[case])
    latent = options.pop("latent", torch.zeros(1, 16, 3, 8, 12))  # 3 latent frames (9 video frames) of 64x96 px
    mask, guidance = options.pop("mask", None), options.pop("guidance", 4.0)
    request = GenerationRequest(model=ModelRef(model_file, "fp32"), latent=latent,
                                positive=_conditioning(1, guidance=guidance, mask=mask),
                                negative=_conditioning(2, guidance=guidance, mask=mask), seed=77, steps=4, **options)
    theirs = _stock(comfy_model, request)
    if guidance is None:  # what the xDiT Sampler makes of a conditioning without guidance: the family's default
        convert = nodes_module("convert")
        request = dataclasses.replace(request, **{side: convert.to_conditioning(
            _comfy_cond(getattr(request, side)), side, SPEC.default_guidance) for side in ("positive", "negative")})
        assert request.positive.guidance == 6.0
    ours = Engine(load_model(request.model)).generate(request)
    assert ours.shape == theirs.shape == (1, 16, 3, 8, 12)
    error = float((ours - theirs).norm() / theirs.norm())
    print(f"{case}: relative error {error:.1e}")
    assert error < 1e-4, error


# ---- the CLI --------------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "comfyui_xdit.cli", *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_make_tiny_then_generate_frames_from_the_file_equals_the_builtin(tmp_path) -> None:
    model = tmp_path / "hunyuan-video.safetensors"
    assert run_make_tiny(make_parser().parse_args(["make-tiny", "hunyuan-video", str(model)])) == 0
    positive, negative = tiny_conditioning(ModelRef("tiny:hunyuan-video"), seed=5, guidance=6.0)
    cond = tmp_path / "cond.safetensors"  # no 'guidance': HunyuanVideo's 6.0, as ComfyUI's model without FluxGuidance
    save_file({"positive_context": positive.context, "positive_pooled": positive.pooled,
               "negative_context": negative.context, "negative_pooled": negative.pooled}, str(cond))
    out = tmp_path / "out.safetensors"
    _cli("generate", "--model", str(model), "--cond", str(cond), "--frames", "9", "--height", "64", "--width", "96",
         "--seed", "5", "--steps", "2", "--cfg", "3.0", "--in-process", "--out", str(out))
    latent = load_file(str(out))["samples"]
    assert latent.shape == (1, 16, 3, 8, 12)  # 9 video frames -> 3 latent frames
    builtin = Engine(load_model(ModelRef("tiny:hunyuan-video"))).generate(GenerationRequest(
        model=ModelRef("tiny:hunyuan-video"), latent=torch.zeros(1, 16, 3, 8, 12), positive=positive,
        negative=negative, seed=5, steps=2, cfg=3.0))
    assert torch.equal(latent, builtin)
