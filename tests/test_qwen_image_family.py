"""Qwen-Image (issue 11): the family seam on a third family.

- ComfyUI's single-file layout: spec from the header, detection from keys, the (identity) renaming onto
  diffusers;
- our piecewise forward equals diffusers' own ``QwenImageTransformer2DModel.forward``;
- per-token rotary positions equal ComfyUI's for the whole image, odd token-grid sides included, and any
  shard of the tokens gets its rows of them;
- same seed, same latent as stock ComfyUI (UNETLoader + KSampler, in process) with true CFG. ComfyUI fixes
  every Qwen-Image width (3072 = 24 heads of 128, text 3584), so that file is the smallest it loads: one
  full-width block (random weights, ~0.75 GB in bf16), written once per module.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0
from safetensors.torch import save_file

from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.engine import Engine
from comfyui_xdit.input_checks import NODE_INPUTS, check_inputs
from comfyui_xdit.latent_format import QWEN_IMAGE_LATENT_FORMAT
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.models.families import detect_family, read_spec, write_random_model
from comfyui_xdit.models.qwen_image import QwenImageAdapter
from comfyui_xdit.models.qwen_image_checkpoint import (COMFY_MIN_QWEN_IMAGE, TINY_QWEN_IMAGE, infer_qwen_image_spec,
                                                       random_qwen_image_state)
from comfyui_xdit.models.qwen_image_rope import joint_positions, rotary
from comfyui_xdit.request import GenerationRequest, ModelRef

from comfy_reference import SKIP_REASON, comfy_path, import_comfy

TEXT_LEN = 10
NO_POOLED = torch.zeros(1, 0)  # Qwen-Image takes no pooled vector
WIDE_HEADS = dataclasses.replace(TINY_QWEN_IMAGE, num_layers=2, attention_head_dim=64, num_attention_heads=2,
                                 joint_attention_dim=48)


@pytest.mark.parametrize("spec", [TINY_QWEN_IMAGE, WIDE_HEADS], ids=["tiny", "2-heads-of-64"])
def test_piecewise_forward_equals_diffusers(spec) -> None:
    adapter = QwenImageAdapter.from_state_dict(random_qwen_image_state(spec, 0), spec=spec)
    # not square; even token-grid sides (6 x 10), where diffusers' rotary centring agrees with ComfyUI's
    latent = torch.randn(2, 16, 12, 20, generator=torch.Generator().manual_seed(1))
    cond = Conditioning(context=torch.randn(1, 5, spec.joint_attention_dim), pooled=NO_POOLED)
    sigma = torch.tensor([0.7, 0.7])
    tokens = adapter.pack(latent)
    ours = adapter.velocity(tokens, adapter.image_ids(12, 20), cond, sigma)
    for block in adapter.transformer.transformer_blocks:  # diffusers' own attention and rotary
        block.attn.set_processor(QwenDoubleStreamAttnProcessor2_0())
    with torch.no_grad():
        theirs = adapter.transformer(hidden_states=tokens, encoder_hidden_states=cond.context.repeat(2, 1, 1),
                                     timestep=sigma, img_shapes=[(1, 6, 10)] * 2).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("height,width", [(10, 12), (12, 20), (14, 6)], ids=["5x6", "6x10", "7x3"])
def test_rotary_positions_equal_comfyui_and_cut_with_the_tokens(height, width) -> None:
    qwen = import_comfy("comfy.ldm.qwen_image.model")
    ops = import_comfy("comfy.ops")
    spec = COMFY_MIN_QWEN_IMAGE
    # stock widths, no blocks, weights on meta: only its position code runs
    comfy_model = qwen.QwenImageTransformer2DModel(num_layers=0, device="meta", operations=ops.disable_weight_init)
    # ComfyUI's _forward: image ids from process_img, the text's after them, EmbedND
    x = torch.zeros(1, 16, 1, height, width)
    _, img_ids, _ = comfy_model.process_img(x)
    start = round(max(((width + 1) // 2) // 2, ((height + 1) // 2) // 2))
    txt_ids = torch.arange(start, start + TEXT_LEN).reshape(1, -1, 1).repeat(1, 1, 3)
    # (1, 1, S, D/2, 2, 2) -> (S, D/2, 2, 2): [[cos, -sin], [sin, cos]] per pair
    freqs = comfy_model.pe_embedder(torch.cat((txt_ids, img_ids), dim=1)).squeeze(1)[0]
    image_ids = QwenImageAdapter.image_ids(height, width)
    cos, sin = rotary(joint_positions(image_ids, TEXT_LEN), spec.axes_dims_rope)
    assert torch.equal(cos, freqs[..., 0, 0]) and torch.equal(sin, freqs[..., 1, 0])
    tokens = image_ids.shape[0]
    lo, hi = tokens // 3, tokens - 1  # any contiguous shard: the text's rows, then its own
    part_cos, part_sin = rotary(joint_positions(image_ids[lo:hi], TEXT_LEN), spec.axes_dims_rope)
    rows = torch.cat([torch.arange(TEXT_LEN), TEXT_LEN + torch.arange(lo, hi)])
    assert torch.equal(part_cos, cos[rows]) and torch.equal(part_sin, sin[rows])


def test_spec_read_from_the_header_and_detected(tmp_path) -> None:
    path = tmp_path / "qwen-image.safetensors"
    write_random_model(path, WIDE_HEADS)
    assert read_spec(path) == WIDE_HEADS
    assert detect_family(random_qwen_image_state(TINY_QWEN_IMAGE, 0)).id == "qwen-image"
    checkpoint = tmp_path / "qwen-checkpoint.safetensors"  # a full checkpoint's prefix, with a text encoder
    state = {f"model.diffusion_model.{k}": v for k, v in random_qwen_image_state(TINY_QWEN_IMAGE, 0).items()}
    state["text_encoders.qwen25_7b.transformer.model.norm.weight"] = torch.ones(8)
    save_file(state, str(checkpoint))
    assert read_spec(checkpoint) == TINY_QWEN_IMAGE
    assert TINY_QWEN_IMAGE.pooled_dim == 0 and TINY_QWEN_IMAGE.latent_channels == 16


def test_wrong_shapes_name_the_tensor() -> None:
    state = random_qwen_image_state(TINY_QWEN_IMAGE, 0)
    state["transformer_blocks.2.img_mlp.net.0.proj.weight"] = torch.zeros(3, 128)
    with pytest.raises(ValueError, match=r"looks like Qwen-Image.*transformer_blocks.2.img_mlp.net.0.proj.weight: "
                                         r"expected \(512, 128\)"):
        infer_qwen_image_spec(state)


def test_a_latent_with_a_frame_axis_is_refused_naming_the_fix() -> None:
    adapter = load_model(ModelRef("tiny:qwen-image"))
    with pytest.raises(ValueError, match="EmptySD3LatentImage"):
        adapter.check_latent(torch.zeros(1, 16, 1, 16, 16))


def test_inputs_check_the_token_width_and_take_any_pooled_vector() -> None:
    positive, negative = tiny_conditioning(ModelRef("tiny:qwen-image"), seed=0)
    assert positive.pooled.shape == (1, 0)
    check_inputs(TINY_QWEN_IMAGE, torch.zeros(1, 16, 8, 8), positive, negative, NODE_INPUTS)
    spec = COMFY_MIN_QWEN_IMAGE
    qwen_tokens = Conditioning(torch.randn(1, 8, 3584), torch.randn(1, 3584))  # a pooled vector is ignored
    check_inputs(spec, torch.zeros(1, 16, 8, 8), qwen_tokens, None, NODE_INPUTS)
    with pytest.raises(ValueError, match=r"width 4096 \(looks like T5-XXL\).*width 3584 \(looks like "
                                         r"Qwen2.5-VL-7B\).*CLIPLoader \(type qwen_image"):
        check_inputs(spec, torch.zeros(1, 16, 8, 8), Conditioning(torch.randn(1, 8, 4096), NO_POOLED), None,
                     NODE_INPUTS)


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_latent_format_equals_comfyui_wan21() -> None:
    formats = import_comfy("comfy.latent_formats")
    theirs = formats.Wan21()
    latent = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(3))
    ours_in = QWEN_IMAGE_LATENT_FORMAT.process_in(latent)
    assert torch.equal(ours_in, theirs.process_in(latent.unsqueeze(2)).squeeze(2))
    ours_out = QWEN_IMAGE_LATENT_FORMAT.process_out(ours_in)
    assert torch.equal(ours_out, theirs.process_out(ours_in.unsqueeze(2)).squeeze(2))


# ---- same seed, same latent as stock ComfyUI --------------------------------------------------------

def _conditioning(seed: int) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, TEXT_LEN, COMFY_MIN_QWEN_IMAGE.joint_attention_dim, generator=g), NO_POOLED,
                        guidance=None)


@pytest.fixture(scope="module")
def qwen_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "qwen-image-comfy-min.safetensors"
    write_random_model(path, COMFY_MIN_QWEN_IMAGE, seed=5, dtype=torch.bfloat16)
    return str(path)


@pytest.fixture(scope="module")
def comfy_model(qwen_file):
    comfy_sd = import_comfy("comfy.sd")
    model = comfy_sd.load_diffusion_model(qwen_file, model_options={"dtype": torch.float32})
    assert type(model.model).__name__ == "QwenImage"  # stock detection
    return model


@pytest.fixture(scope="module")
def our_engine(qwen_file):
    return Engine(load_model(ModelRef(qwen_file, "fp32")))


def _stock(model, request: GenerationRequest) -> torch.Tensor:
    comfy_sample = import_comfy("comfy.sample")
    latent = comfy_sample.fix_empty_latent_channels(model, request.latent)  # (B, 16, 1, H, W): Wan21's frame axis
    noise = comfy_sample.prepare_noise(latent, request.seed)

    def cond(c: Conditioning):
        return [[c.context, {}]]

    negative = request.negative or request.positive
    out = comfy_sample.sample(model, noise, request.steps, request.cfg, request.sampler, request.scheduler,
                              cond(request.positive), cond(negative), latent, denoise=request.denoise,
                              disable_pbar=True, seed=request.seed)
    return out.squeeze(2)  # (B, 16, 1, H, W) -> (B, 16, H, W)


SAME_SEED_CASES = {
    "euler-simple-cfg": dict(sampler="euler", scheduler="simple", cfg=3.0),
    "dpmpp-2m-karras-cfg": dict(sampler="dpmpp_2m", scheduler="karras", cfg=4.5),
    "img2img-denoise": dict(sampler="euler", scheduler="normal", cfg=2.0, denoise=0.6,  # Wan21's process_in
                            latent=torch.randn(1, 16, 10, 12, generator=torch.Generator().manual_seed(4))),
}


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("case", sorted(SAME_SEED_CASES))
def test_serial_engine_equals_stock_comfyui(case, qwen_file, comfy_model, our_engine) -> None:
    options = dict(SAME_SEED_CASES[case])
    # 10 x 12 latent: a 5 x 6 token grid, odd rows (ComfyUI's centring, not diffusers')
    latent = options.pop("latent", torch.zeros(1, 16, 10, 12))
    request = GenerationRequest(model=ModelRef(qwen_file, "fp32"), latent=latent, positive=_conditioning(1),
                                negative=_conditioning(2), seed=77, steps=4, **options)
    theirs = _stock(comfy_model, request)
    ours = our_engine.generate(request)
    assert ours.shape == theirs.shape
    error = float((ours - theirs).norm() / theirs.norm())
    assert error < 1e-4, error
