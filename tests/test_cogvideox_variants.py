"""CogVideoX 1.5 and the image-to-video CogVideoX models (issue 12): the variants of the CogVideoX family beside 1.0
text-to-video (test_cogvideox_family.py). ComfyUI has no CogVideoX, so every reference is diffusers' own: its
``CogVideoXTransformer3DModel`` forward (1.5's patching over 2 latent frames, 1.5 I2V's ofs embedding, 5B-I2V's
learned positions), the pipelines' rotary positions and image latents (the start image's latent in frame 0, zeros
after, concatenated on channels), and a DDIM loop of ``CogVideoXDDIMScheduler``.

- diffusers' file layout: tensor lists equal the module's, specs read back from shapes (the released models too),
  a learned table's grid from its length;
- our piecewise forward equals diffusers' forward on the same (concatenated) input; tokens, positions and the
  start latent's rows cut with any shard;
- what cannot run is refused naming what works (an odd latent frame count for 1.5, another size for a learned table);
- serial sampling equals a diffusers DDIM loop; parallel layouts are in test_family_parallel.py;
- the CLI's ``generate --cond`` takes the start latent from the keys Wan image-to-video reads.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline
from safetensors.torch import load_file, save_file

from comfyui_xdit.cli_commands import build_request, check_request_fits, make_parser, run_make_tiny
from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, tiny_conditioning, tiny_image_conditioning
from comfyui_xdit.models.checkpoint_file import TensorShape
from comfyui_xdit.models.cogvideox import (CogVideoXAdapter, pack_frame_pairs, rotary, token_index,
                                           unpack_frame_pairs)
from comfyui_xdit.models.cogvideox_checkpoint import (COGVIDEOX_5B_I2V, COGVIDEOX15_5B, COGVIDEOX15_5B_I2V,
                                                      POS_TABLE_KEY, TINY_COGVIDEOX_I2V, TINY_COGVIDEOX15,
                                                      TINY_COGVIDEOX15_I2V, cogvideox_shapes, infer_cogvideox_spec,
                                                      learned_grid, random_cogvideox_state)
from comfyui_xdit.models.families import detect_family, read_spec, write_random_model
from comfyui_xdit.noise import prepare_noise
from comfyui_xdit.request import GenerationRequest, ModelRef

from test_cogvideox_family import _restore_diffusers_attention, _scheduler

# name -> (spec, latent (T, H, W), text tokens): the learned table takes its sample grid and 226 T5 tokens
VARIANTS = {"1.5": (TINY_COGVIDEOX15, (4, 8, 12), 7), "1.5-i2v": (TINY_COGVIDEOX15_I2V, (4, 8, 12), 7),
            "1.0-i2v": (TINY_COGVIDEOX_I2V, (13, 8, 12), 226)}


def _two_blocks(spec):
    return dataclasses.replace(spec, num_layers=2)


def _adapter(name: str, seed: int = 0) -> CogVideoXAdapter:
    spec = _two_blocks(VARIANTS[name][0])
    return CogVideoXAdapter.from_state_dict(random_cogvideox_state(spec, seed), spec=spec)


def _start(size: tuple[int, int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A start latent of every frame (as WanImageToVideo's, VAE-encoded) and its mask: frame 0 given."""
    latent = torch.randn(1, 16, *size, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(1, 1, *size)
    mask[:, :, :1] = 0.0
    return latent, mask


def _pipeline_image_latents(adapter: CogVideoXAdapter, start: torch.Tensor) -> torch.Tensor:
    """The I2V pipeline's ``image_latents`` in our (B, C, T, H, W): frame 0's latent scaled (1.5: by 1 / 0.7), zeros
    after."""
    image = torch.zeros_like(start)
    image[:, :, 0] = start[:, :, 0] * adapter.image_scale
    return image


def _diffusers_forward(adapter: CogVideoXAdapter, latent: torch.Tensor, context: torch.Tensor,
                       timestep: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' forward on our (B, C, T, H, W) latent (with the image latent concatenated on channels), the
    pipeline's rotary positions and ofs."""
    frames, height, width = latent.shape[2:]
    if image is not None:
        latent = torch.cat([latent, image.expand(latent.shape[0], -1, -1, -1, -1)], dim=1)
    pipe = types.SimpleNamespace(vae_scale_factor_spatial=8, transformer=adapter.transformer)
    rope = CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, height * 8, width * 8, frames, "cpu")
    ofs = torch.full((1,), 2.0) if adapter.spec.ofs else None
    with torch.no_grad():
        out = adapter.transformer(hidden_states=latent.permute(0, 2, 1, 3, 4), encoder_hidden_states=context,
                                  timestep=timestep, ofs=ofs, image_rotary_emb=rope).sample
    return out.permute(0, 2, 1, 3, 4)


# ---- the file layout -----------------------------------------------------------------------------

def test_shapes_equal_the_diffusers_module_and_read_back() -> None:
    for spec in (TINY_COGVIDEOX15, TINY_COGVIDEOX15_I2V, TINY_COGVIDEOX_I2V, COGVIDEOX15_5B, COGVIDEOX15_5B_I2V,
                 COGVIDEOX_5B_I2V):
        with torch.device("meta"):
            module = CogVideoXTransformer3DModel(**spec.diffusers_config())
        shapes = cogvideox_shapes(spec)
        assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == shapes
        assert infer_cogvideox_spec({k: TensorShape(s) for k, s in shapes.items()}) == spec
    # what tells them apart
    assert (COGVIDEOX15_5B.patch_t, COGVIDEOX15_5B.in_channels, COGVIDEOX15_5B.latent_channels) == (2, 16, 16)
    i2v = COGVIDEOX15_5B_I2V
    assert (i2v.in_channels, i2v.latent_channels, i2v.ofs) == (32, 16, True)
    assert COGVIDEOX_5B_I2V.learned_positions and COGVIDEOX_5B_I2V.image_conditioning
    assert cogvideox_shapes(COGVIDEOX_5B_I2V)[POS_TABLE_KEY] == (1, 226 + 13 * 30 * 45, 3072)
    assert not TINY_COGVIDEOX15.image_conditioning and TINY_COGVIDEOX15.image_dim is None


def test_files_are_detected_and_their_spec_read_from_the_header(tmp_path) -> None:
    for name, (spec, _, _) in VARIANTS.items():
        path = tmp_path / f"{name}.safetensors"
        write_random_model(path, spec)
        assert read_spec(path) == spec and detect_family(random_cogvideox_state(spec, 0)).id == "cogvideox"
    for tiny in ("cogvideox15", "cogvideox15-i2v", "cogvideox-i2v"):  # the built-in ids
        assert load_model(ModelRef(f"tiny:{tiny}")).spec.family == "cogvideox"


def test_a_learned_table_grid_is_read_from_its_length() -> None:
    assert learned_grid(226 + 13 * 30 * 45) == (60, 90)  # CogVideoX-5B-I2V's 480 x 720
    assert learned_grid(226 + 13 * 4 * 6) == (8, 12)
    with pytest.raises(ValueError, match="226 text rows and 13 frames of a 2 : 3 token grid"):
        learned_grid(226 + 13 * 5 * 5)


# ---- the forward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_piecewise_forward_equals_diffusers(name: str) -> None:
    adapter = _adapter(name)
    frames, height, width = VARIANTS[name][1]
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(2, 16, frames, height, width, generator=g)
    start, mask = _start((frames, height, width), 2) if adapter.spec.image_conditioning else (None, None)
    cond = Conditioning(context=torch.randn(1, VARIANTS[name][2], 4096, generator=g), pooled=None,
                        concat_latent=start, concat_mask=mask)
    sigma = torch.tensor([3.0, 0.4])
    timestep = adapter.default_sampling().timestep(sigma).float()
    velocity = adapter.velocity(adapter.pack(latent), adapter.image_ids(height, width, frames=frames), cond, sigma)
    ours = adapter.unpack(velocity, height, width, frames=frames)
    _restore_diffusers_attention(adapter)
    image = None if start is None else _pipeline_image_latents(adapter, start)
    theirs = _diffusers_forward(adapter, latent, cond.context.repeat(2, 1, 1), timestep, image)
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    assert error < 2e-6, error


def test_frame_pair_tokens_are_diffusers_patches_and_round_trip() -> None:
    """1.5's token: the patch embedding's (channel, frame, row, column) order, so the linear map of our tokens is
    diffusers' patch embedding; unpack inverts pack; a shard's rows of the positions are its own."""
    adapter = _adapter("1.5")
    latent = torch.randn(1, 16, 4, 6, 10, generator=torch.Generator().manual_seed(3))
    tokens = pack_frame_pairs(latent)
    assert tokens.shape == (1, 2 * 3 * 5, 16 * 8)
    assert torch.equal(unpack_frame_pairs(tokens, 6, 10, 4), latent)
    embed = adapter.transformer.patch_embed
    with torch.no_grad():
        theirs = embed(torch.zeros(1, 1, 4096), latent.permute(0, 2, 1, 3, 4))[:, 1:]  # after the one text token
        ours = embed.proj(tokens)  # 1.5 adds no positions here (rotary)
    assert torch.equal(ours, theirs)
    ids = adapter.image_ids(6, 10, frames=4)
    cos, sin = rotary(ids, adapter.spec.rotary_axes)
    pipe = types.SimpleNamespace(vae_scale_factor_spatial=8, transformer=adapter.transformer)
    their_cos, their_sin = CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, 48, 80, 4, "cpu")
    assert torch.equal(cos.repeat_interleave(2, dim=1), their_cos)
    assert torch.equal(sin.repeat_interleave(2, dim=1), their_sin)
    part_cos, _ = rotary(ids[7:23], adapter.spec.rotary_axes)
    assert torch.equal(part_cos, cos[7:23])


@pytest.mark.parametrize("name", ["1.5-i2v", "1.0-i2v"])
def test_a_shard_gets_its_own_rows_of_the_start_latent(name: str) -> None:
    """The start latent's tokens of any contiguous shard (cut across frames) are the whole's rows; frames whose
    mask is 1 and a conditioning without a start latent give zeros; the scale is the pipeline's."""
    adapter = _adapter(name)
    frames, height, width = VARIANTS[name][1]
    start, mask = _start((frames, height, width), 4)
    cond = Conditioning(torch.zeros(1, 3, 4096), None, concat_latent=start, concat_mask=mask)
    ids = adapter.image_ids(height, width, frames=frames)
    whole = adapter.concat_tokens(cond, 2, ids)
    assert torch.equal(whole, adapter.pack(_pipeline_image_latents(adapter, start)).expand(2, -1, -1))
    assert torch.equal(token_index(ids), torch.arange(ids.shape[0]))
    lo, hi = 5, ids.shape[0] - 7
    assert torch.equal(adapter.concat_tokens(cond, 2, ids[lo:hi]), whole[:, lo:hi])
    assert torch.count_nonzero(adapter.concat_tokens(Conditioning(torch.zeros(1, 3, 4096), None), 1, ids)) == 0
    first = Conditioning(torch.zeros(1, 3, 4096), None, concat_latent=start[:, :, :1])  # the start image's only
    assert adapter.spec.pads_start_frames and torch.equal(adapter.concat_tokens(first, 2, ids), whole)
    factor = adapter.latent_format.scale_factor  # 0.7: 1.0 multiplies by it, 1.5 (invert_scale_latents) divides
    assert adapter.image_scale == pytest.approx(1 / factor if adapter.spec.patch_t == 2 else factor)


# ---- refusals -------------------------------------------------------------------------------------

def test_what_cannot_run_is_refused_naming_what_works() -> None:
    adapter = _adapter("1.5")
    adapter.check_latent(torch.zeros(1, 16, 22, 8, 8))  # 85 frames: the pipeline's padded 81
    with pytest.raises(ValueError, match=r"multiple of 2 frames; got 21 \(video 81 frames\)"
                                         r".*77 \(20 latent frames\) or 85 \(22 latent"):
        adapter.check_latent(torch.zeros(1, 16, 21, 8, 8))
    request = GenerationRequest(model=ModelRef("tiny:cogvideox15"), latent=torch.zeros(1, 16, 3, 4, 4),
                                positive=Conditioning(torch.zeros(1, 3, 4096), None), negative=None, seed=0, steps=1,
                                cfg=1.0)
    with pytest.raises(ValueError, match=r"got 3 \(video 9 frames\).*5 \(2 latent frames\) or 13 \(4 latent"):
        Engine(adapter).generate(request)  # where a request meets the model
    learned = _adapter("1.0-i2v")
    learned.check_latent(torch.zeros(1, 16, 13, 8, 12))
    with pytest.raises(ValueError, match=r"only its training size, 96x64 px x 49 frames"):
        learned.check_latent(torch.zeros(1, 16, 13, 8, 8))
    with pytest.raises(ValueError, match="at most 226 T5 tokens"):
        learned.velocity(learned.pack(torch.zeros(1, 16, 13, 8, 12)), learned.image_ids(8, 12, frames=13),
                         Conditioning(torch.zeros(1, 227, 4096), None), torch.tensor([1.0]))


def test_generate_counts_two_frames_per_token_for_the_parallel_checks() -> None:
    def request(*extra: str) -> GenerationRequest:
        args = make_parser().parse_args(["generate", "--model", "tiny:cogvideox15", "--height", "64", "--width", "96",
                                         "--frames", "13", "--out", "x.safetensors", *extra])
        return build_request(args)

    assert request().latent.shape == (1, 16, 4, 8, 12)  # 4 latent frames: 2 x 4 x 6 = 48 tokens
    check_request_fits(request("--ring", "2", "--ulysses", "4"))
    with pytest.raises(ValueError, match=r"48 image tokens.*ring 5"):
        check_request_fits(request("--ring", "5"))


# ---- sampling --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_serial_euler_equals_a_diffusers_ddim_loop(name: str) -> None:
    """Our engine on the scheduler's timesteps equals the pipelines' loop (model forward on the noisy latent with the
    image latents concatenated, CFG on v, ``scheduler.step``), as for 1.0 (test_cogvideox_family.py)."""
    adapter = _adapter(name, seed=3)
    _, size, text = VARIANTS[name]
    g = torch.Generator().manual_seed(4)
    positive = Conditioning(torch.randn(1, text, 4096, generator=g), None)
    negative = Conditioning(torch.randn(1, text, 4096, generator=g), None)
    image = None
    if adapter.spec.image_conditioning:
        start, mask = _start(size, 5)
        positive, negative = (dataclasses.replace(c, concat_latent=start, concat_mask=mask)
                              for c in (positive, negative))
        image = _pipeline_image_latents(adapter, start)
    steps, cfg, latent = 4, 5.0, torch.zeros(1, 16, *size)
    scheduler = _scheduler(1.0)
    scheduler.set_timesteps(steps)
    sigmas = torch.cat([adapter.default_sampling().table()[scheduler.timesteps.long()], torch.zeros(1)])
    tiny = {"1.5": "tiny:cogvideox15", "1.5-i2v": "tiny:cogvideox15-i2v", "1.0-i2v": "tiny:cogvideox-i2v"}[name]
    request = GenerationRequest(model=ModelRef(tiny), latent=latent, positive=positive, negative=negative, seed=11,
                                steps=steps, cfg=cfg, sampler="euler", sigmas=sigmas)
    ours = Engine(adapter).generate(request)  # the engine runs ``adapter``; ``tiny`` only names it
    _restore_diffusers_attention(adapter)
    x = prepare_noise(latent, 11)
    context = torch.cat([negative.context, positive.context])
    for t in scheduler.timesteps:
        v_uncond, v_cond = _diffusers_forward(adapter, torch.cat([x, x]), context, t.expand(2).float(), image).chunk(2)
        guided = (v_uncond + cfg * (v_cond - v_uncond)).permute(0, 2, 1, 3, 4)
        x = scheduler.step(guided, t, x.permute(0, 2, 1, 3, 4)).prev_sample.permute(0, 2, 1, 3, 4)
    theirs = x / adapter.latent_format.scale_factor
    error = float((ours - theirs).norm() / theirs.norm())
    print(f"CogVideoX {name} serial euler vs diffusers DDIM: {error:.2e}")
    assert error < 2e-3, error  # the zero-SNR stand-in for alpha-bar 0 at the first step, as for 1.0


def test_ancestral_noise_is_packed_like_the_tokens() -> None:
    """An SDE / ancestral sampler's per-step noise (drawn as the LATENT) is packed into 1.5's 2-frame tokens: the
    engine runs, and its tiny I2V conditioning (tiny_image_conditioning) reaches the model."""
    ref = ModelRef("tiny:cogvideox15-i2v")
    positive, negative = tiny_conditioning(ref, seed=1)
    shape = (1, 16, 4, 4, 12)
    positive, negative = (tiny_image_conditioning(ref, c, shape, seed=1) for c in (positive, negative))
    assert positive.concat_latent is not None
    adapter = load_model(ref)
    request = GenerationRequest(model=ref, latent=torch.zeros(shape), positive=positive, negative=negative, seed=2,
                                steps=2, cfg=2.5, sampler="euler_ancestral")
    out = Engine(adapter).generate(request)
    assert out.shape == shape and torch.isfinite(out).all()
    plain = Engine(adapter).generate(dataclasses.replace(request, positive=dataclasses.replace(
        positive, concat_latent=None, concat_mask=None)))
    assert (out - plain).abs().max() > 1e-3  # the start latent changes the result


# ---- the CLI ----------------------------------------------------------------------------------------

def test_generate_takes_the_start_latent_from_the_cond_file(tmp_path) -> None:
    """``generate --cond``'s 'positive_concat_latent' / 'positive_concat_mask' (the keys Wan image-to-video reads, as
    WanImageToVideo sets them) are a CogVideoX I2V file's start latent: the result equals the engine's in process with
    that conditioning, and differs from the result without it."""
    model = tmp_path / "cogvideox15-i2v.safetensors"
    assert run_make_tiny(make_parser().parse_args(["make-tiny", "cogvideox15-i2v", str(model)])) == 0
    ref = ModelRef("tiny:cogvideox15-i2v")
    positive, negative = tiny_conditioning(ref, seed=5)
    start, mask = _start((4, 8, 12), 6)
    cond = tmp_path / "cond.safetensors"
    save_file({"positive_context": positive.context, "negative_context": negative.context,
               "positive_concat_latent": start, "positive_concat_mask": mask,
               "negative_concat_latent": start.clone(), "negative_concat_mask": mask.clone()}, str(cond))
    out = tmp_path / "out.safetensors"
    result = subprocess.run([sys.executable, "-m", "comfyui_xdit.cli", "generate", "--model", str(model), "--cond",
                             str(cond), "--frames", "13", "--height", "64", "--width", "96", "--seed", "5", "--steps",
                             "2", "--cfg", "3.0", "--in-process", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    latent = load_file(str(out))["samples"]
    assert latent.shape == (1, 16, 4, 8, 12)  # 13 video frames -> 4 latent frames: 2 frame pairs
    with_image = [dataclasses.replace(c, concat_latent=start, concat_mask=mask) for c in (positive, negative)]
    request = GenerationRequest(model=ref, latent=torch.zeros(1, 16, 4, 8, 12), positive=with_image[0],
                                negative=with_image[1], seed=5, steps=2, cfg=3.0, sampler="euler")
    adapter = load_model(ref)
    assert torch.equal(latent, Engine(adapter).generate(request))
    without = Engine(adapter).generate(dataclasses.replace(request, positive=positive, negative=negative))
    assert (latent - without).abs().max() > 1e-3
