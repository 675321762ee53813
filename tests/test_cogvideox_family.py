"""CogVideoX 1.0 text-to-video (issue 12): the xDiT paper's video model through the family seam. ComfyUI has no
CogVideoX, so every reference here is diffusers' own: its ``CogVideoXTransformer3DModel`` forward, its pipeline's
rotary positions, its sin-cos table, its ``CogVideoXDDIMScheduler`` (and a DDIM sampling loop built from them).

- diffusers' file layout: the tensor list equals the module's, spec from the header, detection from keys, the
  2B's sin-cos positions vs the 5B's rotary told apart, the variants we do not run refused naming them;
- our piecewise forward equals diffusers' own forward (rotary and sin-cos), on a (B, C, T, H, W) latent that
  diffusers holds as (B, T, C, H, W); positions per token equal the pipeline's and any shard gets its rows;
- the sampling conventions: ModelSamplingDiscrete (zero-SNR, SNR-shifted) sigmas equal the scheduler's
  alphas_cumprod, v-prediction's x0 equals its DDIM step's, and our serial euler loop equals a diffusers DDIM loop;
- the CLI's ``make-tiny cogvideox`` / ``generate --model FILE --frames``.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.embeddings import get_3d_sincos_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline
from safetensors.torch import load_file, save_file

from comfyui_xdit.cli_commands import build_request, check_request_fits, make_parser, run_make_tiny
from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.engine import Engine
from comfyui_xdit.input_checks import NODE_INPUTS, check_inputs
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.models import families
from comfyui_xdit.models.checkpoint_file import TensorShape
from comfyui_xdit.models.cogvideox import SAMPLING_2B, SAMPLING_5B, CogVideoXAdapter, rotary
from comfyui_xdit.models.cogvideox_checkpoint import (COGVIDEOX_2B, COGVIDEOX_5B, MARKER_KEY, POS_TABLE_KEY,
                                                      TINY_COGVIDEOX, TINY_COGVIDEOX_2B, cogvideox_shapes,
                                                      infer_cogvideox_spec, random_cogvideox_state, sample_pos_table,
                                                      sincos_positions, token_grid)
from comfyui_xdit.models.families import detect_family, read_spec, write_random_model
from comfyui_xdit.noise import prepare_noise
from comfyui_xdit.planning.full_size import FULL_SIZE
from comfyui_xdit.planning.model_shape import shape_of
from comfyui_xdit.prediction import V
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sigmas import ZSNR_LAST_ALPHA_BAR

from comfy_host import comfy_host  # noqa: F401  (fixture)
from comfy_reference import SKIP_REASON, comfy_path, import_comfy
from nodes_package import nodes_module

TEXT_LEN = 7
VARIANTS = {"rotary-5b": TINY_COGVIDEOX, "sincos-2b": TINY_COGVIDEOX_2B}


def _two_blocks(spec):
    """Two blocks, and the 2B's text length as diffusers' forward needs it (its table has exactly that many rows)."""
    return dataclasses.replace(spec, num_layers=2, max_text_len=TEXT_LEN)


def _restore_diffusers_attention(adapter: CogVideoXAdapter) -> None:
    for block in adapter.transformer.transformer_blocks:
        block.attn1.set_processor(CogVideoXAttnProcessor2_0())


def _pipeline_rotary(transformer, frames: int, height: int, width: int):
    """The pipeline's own rotary cos/sin for a latent of ``frames`` x ``height`` x ``width``."""
    pipe = types.SimpleNamespace(vae_scale_factor_spatial=8, transformer=transformer)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, height * 8, width * 8, frames, "cpu")


def _diffusers_forward(adapter: CogVideoXAdapter, latent: torch.Tensor, context: torch.Tensor,
                       timestep: torch.Tensor) -> torch.Tensor:
    """diffusers' forward on our (B, C, T, H, W) latent: (B, T, C, H, W) in and out, the pipeline's positions."""
    frames, height, width = latent.shape[2:]
    rope = _pipeline_rotary(adapter.transformer, frames, height, width) if adapter.spec.rotary else None
    with torch.no_grad():
        out = adapter.transformer(hidden_states=latent.permute(0, 2, 1, 3, 4), encoder_hidden_states=context,
                                  timestep=timestep, image_rotary_emb=rope).sample
    return out.permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_piecewise_forward_equals_diffusers(variant: str) -> None:
    spec = _two_blocks(VARIANTS[variant])
    adapter = CogVideoXAdapter.from_state_dict(random_cogvideox_state(spec, 0), spec=spec)
    latent = torch.randn(2, 16, 3, 8, 12, generator=torch.Generator().manual_seed(1))  # 3 frames, not square
    cond = Conditioning(context=torch.randn(1, TEXT_LEN, 4096, generator=torch.Generator().manual_seed(2)),
                        pooled=None)
    sigma = torch.tensor([3.0, 0.4])
    timestep = adapter.default_sampling().timestep(sigma).float()
    velocity = adapter.velocity(adapter.pack(latent), adapter.image_ids(8, 12, frames=3), cond, sigma)
    ours = adapter.unpack(velocity, 8, 12, frames=3)
    _restore_diffusers_attention(adapter)
    theirs = _diffusers_forward(adapter, latent, cond.context.repeat(2, 1, 1), timestep)
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    assert error < 2e-6, error  # the patch convolution as a matmul rounds differently


def test_shapes_equal_the_diffusers_module() -> None:
    for spec in (TINY_COGVIDEOX, TINY_COGVIDEOX_2B, COGVIDEOX_2B, COGVIDEOX_5B):
        with torch.device("meta"):
            module = CogVideoXTransformer3DModel(**spec.diffusers_config())
        assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == cogvideox_shapes(spec)


def test_planning_sizes_the_released_models_as_diffusers_builds_them() -> None:
    """``plan --model full:cogvideox-5b``: the block sizes (built on meta) count diffusers' parameters (and the 2B's
    sin-cos table, which its files may hold)."""
    for name, table in (("cogvideox-2b", True), ("cogvideox-5b", False)):
        spec, text = FULL_SIZE[name]
        with torch.device("meta"):
            module = CogVideoXTransformer3DModel(**spec.diffusers_config())
        parameters = sum(p.numel() for p in module.parameters())
        extra = sample_pos_table(spec).numel() if table else 0
        assert shape_of(spec, text_tokens=text).parameters == parameters + extra and text == 226
    assert sum(p.numel() for p in module.parameters()) == pytest.approx(5.57e9, rel=0.01)  # CogVideoX-5B


@pytest.mark.parametrize("size", [(3, 8, 12), (2, 12, 6), (13, 60, 90), (1, 4, 4)])
def test_rotary_positions_equal_the_pipeline_and_cut_with_the_tokens(size) -> None:
    frames, height, width = size
    adapter = CogVideoXAdapter.from_state_dict(random_cogvideox_state(_two_blocks(TINY_COGVIDEOX), 0),
                                               spec=_two_blocks(TINY_COGVIDEOX))
    ids = adapter.image_ids(height, width, frames=frames)
    cos, sin = rotary(ids, TINY_COGVIDEOX.rotary_axes)
    their_cos, their_sin = _pipeline_rotary(adapter.transformer, frames, height, width)  # (N, D) pairs repeated
    assert torch.equal(cos.repeat_interleave(2, dim=1), their_cos)
    assert torch.equal(sin.repeat_interleave(2, dim=1), their_sin)
    lo, hi = 5, min(40, ids.shape[0])  # any contiguous shard (across a frame boundary): its own rows
    part_cos, part_sin = rotary(ids[lo:hi], TINY_COGVIDEOX.rotary_axes)
    assert torch.equal(part_cos, cos[lo:hi]) and torch.equal(part_sin, sin[lo:hi])


def test_sincos_positions_equal_diffusers_table() -> None:
    width, frames, rows, cols = 128, 3, 4, 6
    theirs = get_3d_sincos_pos_embed(width, (cols, rows), frames, 1.875, 1.0, output_type="pt").flatten(0, 1)
    ours = sincos_positions(token_grid(frames, rows, cols), width)
    assert ours.shape == theirs.shape and torch.equal(ours, theirs.to(ours.dtype))
    shard = token_grid(frames, rows, cols)[7:30]  # a shard's rows
    assert torch.equal(sincos_positions(shard, width), ours[7:30])
    # what a tiny 2B file holds: diffusers' own table at the training grid
    config = dataclasses.replace(TINY_COGVIDEOX_2B, num_layers=0).diffusers_config()
    patch_embed = CogVideoXTransformer3DModel(**config).patch_embed
    assert torch.equal(sample_pos_table(TINY_COGVIDEOX_2B), patch_embed.pos_embedding.to(torch.float64))


# ---- the file layout -------------------------------------------------------------------------------

def test_spec_read_from_the_header_and_detected(tmp_path) -> None:
    for spec in VARIANTS.values():
        path = tmp_path / f"{spec.rotary}.safetensors"
        write_random_model(path, spec)
        assert read_spec(path) == spec
        assert detect_family(random_cogvideox_state(spec, 0)).id == "cogvideox"
    assert TINY_COGVIDEOX.num_attention_heads == 4 and TINY_COGVIDEOX.pooled_dim == 0
    # the released shapes: 2B (30 heads, sin-cos) and 5B (48 heads, rotary), read back from their shapes alone
    for spec in (COGVIDEOX_2B, COGVIDEOX_5B):
        assert infer_cogvideox_spec({k: TensorShape(s) for k, s in cogvideox_shapes(spec).items()}) == spec
    assert (COGVIDEOX_2B.rotary, COGVIDEOX_5B.rotary) == (False, True)
    assert POS_TABLE_KEY in random_cogvideox_state(TINY_COGVIDEOX_2B, 0)


def test_the_marker_key_is_ours_alone() -> None:
    """No other family's marker (nor a key of the families we refuse by name) is in a CogVideoX file, and no other
    family's tiny file holds CogVideoX's marker."""
    ours = random_cogvideox_state(TINY_COGVIDEOX_2B, 0)
    assert not [f.id for f in families.FAMILIES if f.id != "cogvideox" and f.marker_key in ours]
    assert not [k for k in families._NOT_YET if k in ours]
    for name, spec in families.TINY_SPECS.items():
        if spec.family != "cogvideox":
            with torch.device("meta"):
                assert MARKER_KEY not in families.random_state(spec, 0), name


def test_a_sharded_diffusers_file_is_read_from_all_its_shards(tmp_path) -> None:
    """The 5B ships as diffusion_pytorch_model-00001-of-00002.safetensors and -00002-of-00002: either names it."""
    state = random_cogvideox_state(TINY_COGVIDEOX, 0)
    keys = sorted(state)
    names = [tmp_path / f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    save_file({k: state[k] for k in keys[:40]}, str(names[0]))
    save_file({k: state[k] for k in keys[40:]}, str(names[1]))
    assert read_spec(names[1]) == TINY_COGVIDEOX
    ours = load_model(ModelRef(str(names[0])))
    builtin = load_model(ModelRef("tiny:cogvideox"))
    assert all(torch.equal(v, builtin.transformer.state_dict()[k]) for k, v in ours.transformer.state_dict().items())
    names[1].unlink()
    with pytest.raises(ValueError, match="one shard of a model in 2 files.*00002-of-00002"):
        read_spec(names[0])


def _shapes(spec, **changes) -> dict[str, TensorShape]:
    shapes = {k: TensorShape(s) for k, s in cogvideox_shapes(spec).items()}
    shapes.update({k: TensorShape(v) for k, v in changes.items() if v is not None})
    return {k: v for k, v in shapes.items() if changes.get(k, True) is not None}


def test_variants_we_do_not_run_are_refused_naming_them() -> None:
    spec = TINY_COGVIDEOX
    # CogVideoX 1.5 and the image-to-video models are read (test_cogvideox_variants.py); channels in that are neither
    # the output's nor twice them are not CogVideoX
    with pytest.raises(ValueError, match="take 24 channels in and give 16 out"):
        infer_cogvideox_spec(_shapes(spec, **{"patch_embed.proj.weight": (128, 24, 2, 2)}))
    with pytest.raises(ValueError, match="take 12 channels in and give 8 out"):  # 1.5's patching, 1.0's output
        infer_cogvideox_spec(_shapes(spec, **{"patch_embed.proj.weight": (128, 96)}))
    with pytest.raises(ValueError, match="CogView"):
        infer_cogvideox_spec(_shapes(spec, **{"time_embedding.linear_1.weight": None}))
    with pytest.raises(ValueError, match="only part of one"):  # a shard of a sharded 5B, renamed
        infer_cogvideox_spec(_shapes(spec, **{"proj_out.weight": None, "norm_final.weight": None}))
    with pytest.raises(ValueError, match=r"looks like CogVideoX.*transformer_blocks.1.ff.net.2.weight"):
        infer_cogvideox_spec(_shapes(spec, **{"transformer_blocks.1.ff.net.2.weight": (128, 3)}))


def test_inputs_need_a_video_latent_and_t5_tokens() -> None:
    positive, negative = tiny_conditioning(ModelRef("tiny:cogvideox"), seed=0)
    check_inputs(TINY_COGVIDEOX, torch.zeros(1, 16, 3, 8, 8), positive, negative, NODE_INPUTS)
    with pytest.raises(ValueError, match=r"video LATENT"):
        check_inputs(TINY_COGVIDEOX, torch.zeros(1, 16, 8, 8), positive, negative, NODE_INPUTS)
    with pytest.raises(ValueError, match=r"width 3584.*t5xxl"):
        check_inputs(TINY_COGVIDEOX, torch.zeros(1, 16, 3, 8, 8), Conditioning(torch.randn(1, 8, 3584), None), None,
                     NODE_INPUTS)


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_comfyui_cannot_load_it_and_the_parallel_model_node_names_the_loader(tmp_path) -> None:
    """No stock CogVideoX: ComfyUI's UNETLoader refuses the file, so XDiTParallelModel (which takes a stock MODEL)
    never sees one, and its refusal of what it does not run names xDiT Load DiT for CogVideoX."""
    path = tmp_path / "cogvideox.safetensors"
    write_random_model(path, TINY_COGVIDEOX)
    with pytest.raises(RuntimeError, match="detect model type"):
        import_comfy("comfy.sd").load_diffusion_model(str(path))
    model_patches = nodes_module("model_patches")
    with pytest.raises(ValueError, match="CogVideoX.*xDiT Load DiT"):
        model_patches.check_family(types.SimpleNamespace(model=object()))


# ---- the sampling conventions -----------------------------------------------------------------------

def _scheduler(snr_shift: float) -> CogVideoXDDIMScheduler:
    """The released CogVideoX scheduler configs (2B: snr_shift_scale 3.0; 5B: 1.0)."""
    return CogVideoXDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
                                  snr_shift_scale=snr_shift, timestep_spacing="trailing", clip_sample=False)


@pytest.mark.parametrize("sampling, snr_shift", [(SAMPLING_2B, 3.0), (SAMPLING_5B, 1.0)])
def test_sigmas_equal_the_scheduler_alphas_cumprod(sampling, snr_shift) -> None:
    alphas_cumprod = _scheduler(snr_shift).alphas_cumprod.double()  # (1000,), float32 betas, the last exactly 0
    theirs = ((1 - alphas_cumprod[:-1]) / alphas_cumprod[:-1]).sqrt()
    ours = sampling.table().double()
    torch.testing.assert_close(ours[:-1], theirs, rtol=2e-5, atol=0)  # float32 betas there, float64 here
    stand_in = ((1 - ZSNR_LAST_ALPHA_BAR) / ZSNR_LAST_ALPHA_BAR) ** 0.5  # ComfyUI's finite last sigma
    assert alphas_cumprod[-1] == 0 and float(ours[-1]) == pytest.approx(stand_in)
    # the timestep a sigma is given is the scheduler's timestep
    t = torch.tensor([0, 249, 499, 998])
    assert torch.equal(sampling.timestep(sampling.table()[t]), t)


def test_v_prediction_x0_equals_the_ddim_step() -> None:
    scheduler = _scheduler(1.0)
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    sample_vp, v = torch.randn(1, 3, 16, 4, 4, generator=g), torch.randn(1, 3, 16, 4, 4, generator=g)
    for t in (749, 249):
        sigma = SAMPLING_5B.table()[t].double()
        x = sample_vp.double() * (sigma ** 2 + 1) ** 0.5  # our (variance-exploding) x for diffusers' sample
        torch.testing.assert_close(V.model_input(x, sigma), sample_vp.double())
        x0 = scheduler.step(v, t, sample_vp).pred_original_sample
        torch.testing.assert_close(V.denoised(x, sigma, v.double()).float(), x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_serial_euler_equals_a_diffusers_ddim_loop(variant: str) -> None:
    """DDIM (eta 0) is Euler in sigma: our engine on the scheduler's timesteps equals the pipeline's loop (model
    forward, CFG on v, ``scheduler.step``), up to the zero-SNR stand-in for alpha-bar 0 at the first timestep."""
    spec = _two_blocks(VARIANTS[variant])
    adapter = CogVideoXAdapter.from_state_dict(random_cogvideox_state(spec, 3), spec=spec)
    g = torch.Generator().manual_seed(4)
    positive = Conditioning(torch.randn(1, TEXT_LEN, 4096, generator=g), None)
    negative = Conditioning(torch.randn(1, TEXT_LEN, 4096, generator=g), None)
    steps, cfg, latent = 4, 5.0, torch.zeros(1, 16, 2, 8, 8)
    scheduler = _scheduler(1.0 if spec.rotary else 3.0)
    scheduler.set_timesteps(steps)
    sampling = adapter.default_sampling()
    sigmas = torch.cat([sampling.table()[scheduler.timesteps.long()], torch.zeros(1)])
    ref = ModelRef("tiny:cogvideox" if spec.rotary else "tiny:cogvideox-2b")  # the engine runs ``adapter``
    request = GenerationRequest(model=ref, latent=latent, positive=positive, negative=negative, seed=11, steps=steps,
                                cfg=cfg, sampler="euler", sigmas=sigmas)
    ours = Engine(adapter).generate(request)
    _restore_diffusers_attention(adapter)
    x = prepare_noise(latent, 11)  # scheduler.init_noise_sigma is 1
    context = torch.cat([negative.context, positive.context])
    for t in scheduler.timesteps:
        v = _diffusers_forward(adapter, torch.cat([x, x]), context, t.expand(2).float())
        v_uncond, v_cond = v.chunk(2)
        guided = (v_uncond + cfg * (v_cond - v_uncond)).permute(0, 2, 1, 3, 4)  # the scheduler's (B, T, C, H, W)
        x = scheduler.step(guided, t, x.permute(0, 2, 1, 3, 4)).prev_sample.permute(0, 2, 1, 3, 4)
    theirs = x / adapter.latent_format.scale_factor  # the pipeline's latent before VAE decoding
    error = float((ours - theirs).norm() / theirs.norm())
    assert error < 2e-3, error  # sqrt(4.9e-8) = 2.2e-4: the first x0 carries that much of the noise


# ---- the CLI --------------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "comfyui_xdit.cli", *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_generate_asks_for_frames_and_refuses_layouts_naming_one_that_works() -> None:
    def request(*extra: str) -> GenerationRequest:
        args = make_parser().parse_args(["generate", "--model", "tiny:cogvideox", "--height", "64", "--width", "96",
                                         "--out", "x.safetensors", *extra])
        return build_request(args)

    with pytest.raises(ValueError, match="makes video: pass --frames"):
        request()
    assert request("--frames", "49").latent.shape == (1, 16, 13, 8, 12)  # CogVideoX's 49 frames: 13 latent frames
    check_request_fits(request("--frames", "9", "--ulysses", "4", "--ring", "2"))  # 4 heads, 72 tokens: fits
    with pytest.raises(ValueError, match=r"4 attention heads.*ring 2 x ulysses 4"):
        check_request_fits(request("--frames", "9", "--ulysses", "8"))
    with pytest.raises(ValueError, match=r"72 image tokens.*ring 5"):
        check_request_fits(request("--frames", "9", "--ring", "5"))


@pytest.mark.parametrize("name", ["cogvideox", "cogvideox-2b"])
def test_make_tiny_then_generate_frames_from_the_file_equals_the_builtin(tmp_path, name: str) -> None:
    model = tmp_path / f"{name}.safetensors"
    assert run_make_tiny(make_parser().parse_args(["make-tiny", name, str(model)])) == 0  # in process: no start-up
    positive, negative = tiny_conditioning(ModelRef(f"tiny:{name}"), seed=5)
    cond = tmp_path / "cond.safetensors"
    save_file({"positive_context": positive.context, "negative_context": negative.context}, str(cond))
    out = tmp_path / "out.safetensors"
    _cli("generate", "--model", str(model), "--cond", str(cond), "--frames", "9", "--height", "64", "--width", "96",
         "--seed", "5", "--steps", "2", "--cfg", "3.0", "--sampler", "dpmpp_2m", "--in-process", "--out", str(out))
    latent = load_file(str(out))["samples"]
    assert latent.shape == (1, 16, 3, 8, 12)  # 9 video frames -> 3 latent frames
    builtin = Engine(load_model(ModelRef(f"tiny:{name}"))).generate(GenerationRequest(
        model=ModelRef(f"tiny:{name}"), latent=torch.zeros(1, 16, 3, 8, 12), positive=positive, negative=negative,
        seed=5, steps=2, cfg=3.0, sampler="dpmpp_2m"))
    assert torch.isfinite(builtin).all() and builtin.abs().max() > 0
    assert torch.equal(latent, builtin)


# ---- the nodes, in the real ComfyUI host ---------------------------------------------------------------

HOST_FILE = "cogvideox-tiny.safetensors"  # comfy_host.LOADER_ONLY_FILES: tiny:cogvideox's weights (seed 0)


def _host_prompt(size: tuple[int, int], frames: int, steps: int, cfg: float) -> dict:
    """XDiTLoadModel (serial and Ulysses 2) + XDiTSampler on a CogVideoX file, EmptyHunyuanLatentVideo's latent."""
    width, height = size
    cond = {"tokens": 8, "guidance": 0.0, "width": 4096, "pooled_width": 1}
    prompt = {
        "pos": {"class_type": "XDiTTestConditioning", "inputs": {"seed": 1, **cond}},
        "neg": {"class_type": "XDiTTestConditioning", "inputs": {"seed": 2, **cond}},
        "latent": {"class_type": "EmptyHunyuanLatentVideo",
                   "inputs": {"width": width, "height": height, "length": frames, "batch_size": 1}},
        "pool": {"class_type": "XDiTPool", "inputs": {"ray_address": "", "network_interface": ""}},
    }
    for layout, ulysses in (("serial", 1), ("ulysses2", 2)):
        prompt[f"load_{layout}"] = {"class_type": "XDiTLoadModel", "inputs": {
            "pool": ["pool", 0], "unet_name": HOST_FILE, "weight_dtype": "default", "ulysses_degree": ulysses,
            "ring_degree": 1, "pipefusion_degree": 1, "num_patches": 0, "warmup_steps": 1, "cfg_parallel": False}}
        prompt[f"xs_{layout}"] = {"class_type": "XDiTSampler", "inputs": {
            "model": [f"load_{layout}", 0], "seed": 42, "steps": steps, "cfg": cfg, "sampler_name": "euler",
            "scheduler": "simple", "denoise": 1.0, "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0], "sigma_shift": "model default", "max_shift": 1.15, "base_shift": 0.5,
            "width": width, "height": height}}
        prompt[f"save_{layout}"] = {"class_type": "SaveLatent",
                                    "inputs": {"samples": [f"xs_{layout}", 0], "filename_prefix": f"cogvideox_{layout}"}}
    return prompt


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_xdit_nodes_load_and_sample_a_cogvideox_file(comfy_host) -> None:
    """The nodes' path (file picked from diffusion_models, ComfyUI conditioning and video LATENT in, LATENT out):
    equal to our engine in process, serially and with Ulysses 2."""
    from test_comfy_nodes import saved_latent

    size, frames, steps, cfg = (64, 96), 9, 3, 4.0
    with comfy_host.connect() as ws:
        result = ws.run(_host_prompt(size, frames, steps, cfg), timeout=600)
    assert result.succeeded, result.describe() + "\n" + comfy_host.log_tail()
    executed = result.of_type("executed")

    def conditioning(seed: int) -> Conditioning:  # XDiTTestConditioning's draw
        return Conditioning(torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(seed)), None)

    reference = Engine(load_model(ModelRef("tiny:cogvideox"))).generate(GenerationRequest(
        model=ModelRef("tiny:cogvideox"), latent=torch.zeros(1, 16, 3, size[1] // 8, size[0] // 8),
        positive=conditioning(1), negative=conditioning(2), seed=42, steps=steps, cfg=cfg, sampler="euler",
        scheduler="simple"))
    errors = {}
    for layout in ("serial", "ulysses2"):
        latent = saved_latent(comfy_host, executed, f"save_{layout}")
        assert latent.shape == (1, 16, 3, size[1] // 8, size[0] // 8), layout
        errors[layout] = float((latent - reference).norm() / reference.norm())
    print(f"{HOST_FILE}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert all(error < 1e-4 for error in errors.values()), errors
