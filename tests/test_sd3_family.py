"""SD3 / SD3.5 (issue 11): the family seam on a second family.

- the MMDiT single-file layout: spec from the header, detection from keys, renaming onto diffusers;
- our piecewise forward equals diffusers' own ``SD3Transformer2DModel.forward`` (SD3 and SD3.5's
  qk-norm and dual-attention blocks);
- same seed, same latent as stock ComfyUI (UNETLoader + KSampler, in process) on a stock-loadable tiny
  file (MMDiT ties width to depth: depth 4 = width 256, 4 heads), plain and through a full checkpoint's
  ``model.diffusion_model.`` prefix, with true CFG and with ModelSamplingSD3's shift.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from safetensors.torch import save_file

from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model
from comfyui_xdit.models.families import detect_family, read_spec, write_random_model
from comfyui_xdit.models.sd3 import SD3Adapter
from comfyui_xdit.models.sd3_checkpoint import TINY_SD3, infer_sd3_spec, random_mmdit_state
from comfyui_xdit.request import GenerationRequest, ModelRef, SigmaShift

from comfy_reference import SKIP_REASON, comfy_path, import_comfy

TEXT_LEN = 10
SD35_LIKE = dataclasses.replace(TINY_SD3, depth=3, num_layers=3, qk_norm=True, dual_attention_layers=(0, 1))


@pytest.mark.parametrize("spec", [TINY_SD3, SD35_LIKE], ids=["sd3", "sd3.5-qknorm-dual"])
def test_piecewise_forward_equals_diffusers(spec) -> None:
    adapter = SD3Adapter.from_state_dict(random_mmdit_state(spec, 0), spec=spec)
    latent = torch.randn(2, 16, 12, 20, generator=torch.Generator().manual_seed(1))  # not square: crop offsets
    cond = Conditioning(context=torch.randn(1, 5, spec.joint_attention_dim), pooled=torch.randn(1, spec.pooled_dim))
    sigma = torch.tensor([0.7, 0.7])
    ours = adapter.unpack(adapter.velocity(adapter.pack(latent), adapter.image_ids(12, 20), cond, sigma), 12, 20)
    for block in adapter.transformer.transformer_blocks:  # diffusers' own attention, image tokens first
        block.attn.set_processor(JointAttnProcessor2_0())
        if block.attn2 is not None:
            block.attn2.set_processor(JointAttnProcessor2_0())
    with torch.no_grad():
        theirs = adapter.transformer(hidden_states=latent, encoder_hidden_states=cond.context.repeat(2, 1, 1),
                                     pooled_projections=cond.pooled.repeat(2, 1), timestep=sigma * 1000).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_spec_read_from_the_header_and_detected(tmp_path) -> None:
    path = tmp_path / "sd35.safetensors"
    write_random_model(path, SD35_LIKE)
    assert read_spec(path) == SD35_LIKE
    assert detect_family(random_mmdit_state(TINY_SD3, 0)).id == "sd3"
    checkpoint = tmp_path / "sd3-checkpoint.safetensors"  # CheckpointLoaderSimple's layout, with a text encoder
    state = {f"model.diffusion_model.{k}": v for k, v in random_mmdit_state(TINY_SD3, 0).items()}
    state["text_encoders.clip_l.transformer.text_model.embeddings.position_ids"] = torch.zeros(1, 77)
    save_file(state, str(checkpoint))
    assert read_spec(checkpoint) == TINY_SD3


def test_wrong_shapes_name_the_tensor() -> None:
    state = random_mmdit_state(TINY_SD3, 0)
    state["joint_blocks.1.x_block.mlp.fc1.weight"] = torch.zeros(3, 256)
    with pytest.raises(ValueError, match=r"looks like SD3.*joint_blocks.1.x_block.mlp.fc1.weight: expected \(1024, 256\)"):
        infer_sd3_spec(state)


def test_too_large_an_image_for_the_position_table_is_refused() -> None:
    adapter = load_model(ModelRef("tiny:sd3"))
    with pytest.raises(ValueError, match="position table covers images up to 512x512 px"):
        adapter.check_latent(torch.zeros(1, 16, 80, 16))


# ---- same seed, same latent as stock ComfyUI --------------------------------------------------------

def _conditioning(seed: int) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, TEXT_LEN, TINY_SD3.joint_attention_dim, generator=g),
                        torch.randn(1, TINY_SD3.pooled_projection_dim, generator=g), guidance=None)


@pytest.fixture(scope="module")
def sd3_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "sd3-tiny.safetensors"
    write_random_model(path, TINY_SD3, seed=5)
    return str(path)


@pytest.fixture(scope="module")
def sd3_engine(sd3_file) -> Engine:
    return Engine(load_model(ModelRef(sd3_file, "fp32")))


@pytest.fixture(scope="module")
def stock_model(sd3_file):
    model = import_comfy("comfy.sd").load_diffusion_model(sd3_file, model_options={"dtype": torch.float32})
    assert type(model.model).__name__ == "SD3"
    return model


def _stock(model, request: GenerationRequest, shift: float | None = None) -> torch.Tensor:
    comfy_sample = import_comfy("comfy.sample")
    if shift is not None:
        advanced = import_comfy("comfy_extras.nodes_model_advanced")
        (model,) = advanced.ModelSamplingSD3().patch(model, shift)
    latent = comfy_sample.fix_empty_latent_channels(model, request.latent)
    noise = comfy_sample.prepare_noise(latent, request.seed)

    def cond(c: Conditioning):
        return [[c.context, {"pooled_output": c.pooled}]]

    negative = request.negative or request.positive
    return comfy_sample.sample(model, noise, request.steps, request.cfg, request.sampler, request.scheduler,
                               cond(request.positive), cond(negative), latent, denoise=request.denoise,
                               disable_pbar=True, seed=request.seed)


def _every_flux_case() -> dict:
    """Every sampler/scheduler case of the Flux same-seed test, with SD3's conditioning and default sampling
    (ModelSamplingFlux's resolution shift is Flux's): the whole sampler list against stock, cheaply."""
    from test_same_seed_as_comfyui import CASES

    out = {}
    for name, options in CASES.items():
        options = dict(options)
        if "negative" in options:
            options["negative"] = _conditioning(2)
        options.pop("shift", None)
        out[f"flux-case-{name}"] = options
    return out


SAME_SEED_CASES = {
    "euler-simple-cfg": dict(sampler="euler", scheduler="simple", cfg=3.0, negative=_conditioning(2)),
    "dpmpp-2m-karras-cfg": dict(sampler="dpmpp_2m", scheduler="karras", cfg=4.5, negative=_conditioning(2)),
    "euler-ancestral-sgm-uniform": dict(sampler="euler_ancestral", scheduler="sgm_uniform"),
    "img2img-denoise": dict(sampler="euler", scheduler="normal", denoise=0.6,
                            latent=torch.randn(1, 16, 16, 24, generator=torch.Generator().manual_seed(4))),
    **(_every_flux_case() if comfy_path() is not None else {}),
}


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("case", sorted(SAME_SEED_CASES))
def test_serial_engine_equals_stock_comfyui(case, sd3_file, stock_model, sd3_engine) -> None:
    options = dict(SAME_SEED_CASES[case])
    latent = options.pop("latent", torch.zeros(1, 16, 16, 24))
    options.setdefault("steps", 4)
    request = GenerationRequest(model=ModelRef(sd3_file, "fp32"), latent=latent, positive=_conditioning(1),
                                seed=77, **options)
    theirs = _stock(stock_model, request)
    ours = sd3_engine.generate(request)
    assert ours.shape == theirs.shape
    error = float((ours - theirs).norm() / theirs.norm())
    assert error < 1e-4, error


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_model_sampling_sd3_shift_equals_stock(sd3_file, stock_model) -> None:
    request = GenerationRequest(model=ModelRef(sd3_file, "fp32"), latent=torch.zeros(1, 16, 16, 16),
                                positive=_conditioning(1), negative=_conditioning(2), cfg=2.0, seed=3, steps=4,
                                sampler="dpmpp_2m", scheduler="beta",
                                shift=SigmaShift(mode="discrete_flow", shift=6.0, multiplier=1000.0))
    theirs = _stock(stock_model, request, shift=6.0)
    ours = Engine(load_model(request.model)).generate(request)
    error = float((ours - theirs).norm() / theirs.norm())
    assert error < 1e-4, error
