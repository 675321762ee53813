"""HunyuanDiT v1.0 / v1.1 / v1.2: the v-prediction family with two text streams and long skips.

- Tencent's single-file layout (ComfyUI's): detection (v1.0 by its size + style conditions), spec from the
  header, what is refused (odd depth, wrong shapes, diffusers' layout);
- positions: ComfyUI's 2-D rotary ``calc_rope`` bit-equal, per token, so shards and patches rotate right;
- the long skips across PipeFusion stage boundaries: at every boundary the pending skips travel with the
  patch (``carried`` / ``carried_like`` / ``resume``) and the split forward equals the whole one, also with
  each stage's adapter holding only its blocks;
- ComfyUI's discrete schedules for HunyuanDiT and HunyuanDiT1: every scheduler's sigmas bit-equal;
- same seed, same latent as stock ComfyUI (load_diffusion_model + its sampler, in process) on the
  stock-loadable tiny files, v1.1/1.2 (width 128) and v1.0 (width 1408, its detection), with true CFG, masks
  and v1.0's image-size condition;
- the conditioning fields (masks, mT5 tokens, target size) through rows / for_batch, the node converter,
  the input checks, and XDiTParallelModel's reading of ComfyUI's MODEL.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from safetensors.torch import save_file

from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.engine import Engine
from comfyui_xdit.input_checks import NODE_INPUTS, check_inputs
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.models.families import (TINY_SPECS, build_adapter, detect_family, read_spec, stage_state,
                                          write_random_model)
from comfyui_xdit.models.hunyuan_dit import (HUNYUAN_DIT_SAMPLING, HUNYUAN_DIT_V10_SAMPLING, HunyuanDiTAdapter,
                                             rotary, token_ids)
from comfyui_xdit.models.hunyuan_dit_checkpoint import (NARROW_HUNYUAN_DIT, TINY_HUNYUAN_DIT, TINY_HUNYUAN_DIT_V10,
                                                        infer_hunyuan_dit_spec, random_hunyuan_dit_state)
from comfyui_xdit.prediction import V
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sigmas import SCHEDULER_NAMES, sampling_sigmas

from comfy_reference import SKIP_REASON, comfy_path, import_comfy
from nodes_package import nodes_module

logger = logging.getLogger(__name__)

SMALL = NARROW_HUNYUAN_DIT  # narrow, 4 blocks: block 3 takes block 0's skip
SMALL_V10 = dataclasses.replace(SMALL, size_cond=True)
DEEPER = dataclasses.replace(SMALL, num_layers=8)  # 3 skips on the stack at the middle: their order matters


def _cond(spec, seed: int, clip_len: int | None = None, t5_len: int | None = None, text: int = 5,
          **extra) -> Conditioning:
    """CLIP + mT5 tokens for ``spec``, the first ``text`` of each stream text, the rest padding (mask 0)."""
    g = torch.Generator().manual_seed(seed)
    clip_len, t5_len = clip_len or spec.text_len, t5_len or spec.t5_len
    return Conditioning(torch.randn(1, clip_len, spec.text_dim, generator=g), None,
                        context_mask=(torch.arange(clip_len) < text).float()[None],
                        second_context=torch.randn(1, t5_len, spec.t5_dim, generator=g),
                        second_context_mask=(torch.arange(t5_len) < text + 3).float()[None], **extra)


# ---- the file ------------------------------------------------------------------------------------------

def test_spec_read_from_the_header_and_detected(tmp_path) -> None:
    for spec in (SMALL, SMALL_V10):
        path = tmp_path / f"hunyuan-{spec.size_cond}.safetensors"
        write_random_model(path, spec)
        assert read_spec(path) == spec
        assert detect_family(random_hunyuan_dit_state(spec, 0)).id == "hunyuan-dit"
    checkpoint = tmp_path / "hunyuan-checkpoint.safetensors"  # a checkpoint's layout, with a text encoder
    state = {f"model.diffusion_model.{k}": v for k, v in random_hunyuan_dit_state(SMALL, 0).items()}
    state["text_encoders.mt5xl.transformer.shared.weight"] = torch.zeros(2, 4)
    save_file(state, str(checkpoint))
    assert read_spec(checkpoint) == SMALL
    # stock-loadable: ComfyUI's fixed heads and text widths; v1.0's detection is extra_embedder's 3968 inputs
    for name, spec in (("hunyuan-dit", TINY_HUNYUAN_DIT), ("hunyuan-dit-v1.0", TINY_HUNYUAN_DIT_V10)):
        assert TINY_SPECS[name] == spec and spec.family == "hunyuan-dit"
        assert (spec.num_attention_heads, spec.context_dim, spec.second_context_dim) == (16, 1024, 2048)
        assert (spec.text_len, spec.t5_len, spec.num_blocks, spec.pooled_dim) == (77, 256, 4, 0)
    assert TINY_HUNYUAN_DIT_V10.extra_in_dim == 3968 and TINY_HUNYUAN_DIT.extra_in_dim == 1024
    assert TINY_SPECS["hunyuan-dit-narrow"].num_blocks % 2 == 0


def test_what_is_refused_names_the_problem() -> None:
    state = random_hunyuan_dit_state(SMALL, 0)
    wrong = dict(state, **{"blocks.1.attn2.kv_proj.weight": torch.zeros(3, 32)})
    with pytest.raises(ValueError, match=r"looks like HunyuanDiT v1.1/v1.2 \(4 blocks, width 128\).*"
                                         r"blocks.1.attn2.kv_proj.weight: expected \(256, 32\)"):
        infer_hunyuan_dit_spec(wrong)
    odd = {k: v for k, v in random_hunyuan_dit_state(dataclasses.replace(SMALL, num_layers=6), 0).items()
           if not k.startswith("blocks.5.")}
    with pytest.raises(ValueError, match="5 blocks.*depth must be even"):
        infer_hunyuan_dit_spec(odd)
    diffusers_layout = {"time_extra_emb.pooler.q_proj.weight": torch.zeros(1), "pos_embed.proj.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"we run \([^)]*HunyuanDiT[^)]*\): it looks like HunyuanDiT \(diffusers layout\), "
                                         r"which the xDiT nodes do not run yet"):
        detect_family(diffusers_layout, "'hydit.safetensors'")


# ---- positions -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(16, 16), (16, 24), (24, 16), (18, 30), (64, 40), (10, 66), (96, 96)])
def test_rotary_positions_equal_comfyui_calc_rope_per_token(size) -> None:
    hydit = import_comfy("comfy.ldm.hydit.models")
    height, width = size
    adapter_ids = token_ids(height, width)
    cos, sin = rotary(adapter_ids, 88)
    theirs = hydit.calc_rope(torch.zeros(1, 4, height, width), 2, 88)
    assert torch.equal(cos, theirs[0]) and torch.equal(sin, theirs[1])
    part = slice(len(adapter_ids) // 3, len(adapter_ids) // 2)  # a shard or patch: its own tokens' rows
    assert all(torch.equal(a, b[part]) for a, b in zip(rotary(adapter_ids[part], 88), (cos, sin)))


@pytest.mark.parametrize("spec", [SMALL, SMALL_V10], ids=["v1.2", "v1.0"])
def test_piecewise_forward_equals_diffusers(spec) -> None:
    """The renamed weights in diffusers' own ``HunyuanDiT2DModel.forward`` (its attention processors, our rotary
    positions, sizes and style) give our piecewise forward: each text stream exactly as long as the padding table,
    where ComfyUI's and diffusers' text handling agree."""
    from diffusers.models.attention_processor import HunyuanAttnProcessor2_0

    adapter = HunyuanDiTAdapter.from_state_dict(random_hunyuan_dit_state(spec, 0), spec=spec)
    g = torch.Generator().manual_seed(1)
    height, width = 12, 20  # not square: rows and columns differ
    latent = torch.randn(2, 4, height, width, generator=g)
    cond = _cond(spec, 2, text=3, resolution=(512.0, 640.0))
    sigma = torch.tensor([3.0, 3.0])
    ours = adapter.unpack(adapter.velocity(adapter.pack(latent), adapter.image_ids(height, width), cond, sigma),
                          height, width)
    adapter.transformer.set_attn_processor(HunyuanAttnProcessor2_0())  # diffusers' own attention
    meta = torch.tensor([[512.0, 640.0, 512.0, 640.0, 0.0, 0.0]]).repeat(2, 1)
    with torch.no_grad():
        theirs = adapter.transformer(latent, adapter.timestep(sigma),
                                     encoder_hidden_states=cond.context.repeat(2, 1, 1),
                                     text_embedding_mask=cond.context_mask.repeat(2, 1),
                                     encoder_hidden_states_t5=cond.second_context.repeat(2, 1, 1),
                                     text_embedding_mask_t5=cond.second_context_mask.repeat(2, 1),
                                     image_meta_size=meta, style=torch.zeros(2, dtype=torch.long),
                                     image_rotary_emb=rotary(adapter.image_ids(height, width), spec.head_dim)).sample
    torch.testing.assert_close(ours, theirs[:, :4], rtol=1e-5, atol=1e-5)  # v: the first 4 of 8 channels


def test_only_image_self_attention_goes_through_the_seam() -> None:
    adapter = HunyuanDiTAdapter.from_state_dict(random_hunyuan_dit_state(SMALL, 0), spec=SMALL)
    calls = []

    def recording(query, key, value, *, text_len, layer):
        calls.append((layer, text_len, query.shape[1], key.shape[1]))
        return torch.nn.functional.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)).transpose(1, 2)

    adapter.seam.backend = recording
    adapter.velocity(torch.randn(1, 6 * 8, 16), adapter.image_ids(12, 16), _cond(SMALL, 0), torch.tensor([2.0]))
    assert calls == [(layer, 0, 48, 48) for layer in range(SMALL.num_layers)]
    assert adapter.prediction is V and adapter.default_sampling() == HUNYUAN_DIT_SAMPLING


# ---- long skips across PipeFusion stage boundaries ----------------------------------------------------

def _pending_in_comfyui_loop(depth: int, block: int) -> int:
    """Skips on the stack when ``block`` starts, counted by walking ComfyUI's loop (pop, then push)."""
    pending = 0
    for layer in range(block):
        pending -= layer > depth // 2
        pending += layer < depth // 2 - 1
    return pending


@pytest.mark.parametrize("spec", [SMALL, DEEPER], ids=["4-blocks", "8-blocks"])
def test_every_stage_boundary_carries_the_pending_skips(spec) -> None:
    """Split at every boundary: what crosses is image + text + the pending skips, shaped as ``carried_like``
    says; the second half resumed from it (on an adapter holding only its own blocks) equals the whole
    forward; without the skips it does not."""
    state_dict = random_hunyuan_dit_state(spec, 3)
    whole = HunyuanDiTAdapter.from_state_dict(state_dict, spec=spec)
    height, width = 12, 16
    g = torch.Generator().manual_seed(4)
    tokens, ids = torch.randn(2, (height // 2) * (width // 2), 16, generator=g), whole.image_ids(height, width)
    cond, sigma = _cond(spec, 1), torch.tensor([3.0, 3.0])
    expected = whole.velocity(tokens, ids, cond, sigma)
    depth = spec.num_layers
    for boundary in range(1, depth):
        first = build_adapter(stage_state(state_dict, spec, (0, boundary)), spec, torch.float32, "cpu", "t",
                              (0, boundary))
        second = build_adapter(stage_state(state_dict, spec, (boundary, depth)), spec, torch.float32, "cpu", "t",
                               (boundary, depth))
        with torch.no_grad():
            carried = first.carried(first.run_blocks(first.embed(tokens, ids, cond, sigma), 0, boundary))
            like = second.carried_like(boundary, 2, tokens.shape[1], cond)
            assert [t.shape for t in carried] == [t.shape for t in like], boundary
            assert len(carried) - 2 == _pending_in_comfyui_loop(depth, boundary) == spec.pending_skips(boundary)
            received = [t.clone() for t in carried]
            out = second.head(second.run_blocks(second.resume(second.embed_context(ids, cond, sigma), received),
                                                boundary, depth))
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
            wrong = []  # the skips matter (zeroed ones give another output), and so does their order
            if len(carried) > 2:
                wrong.append(received[:2] + [torch.zeros_like(t) for t in received[2:]])
            if len(carried) > 3:
                wrong.append(received[:2] + received[2:][::-1])
            for skips in wrong:
                other = second.head(second.run_blocks(second.resume(second.embed_context(ids, cond, sigma), skips),
                                                      boundary, depth))
                assert not torch.allclose(other, expected, atol=1e-3), boundary


# ---- ComfyUI's schedules ------------------------------------------------------------------------------

class _FakePatcher:
    def __init__(self, sampling):
        self.sampling = sampling

    def get_model_object(self, name):
        assert name == "model_sampling"
        return self.sampling


@pytest.mark.parametrize("config_name,ours", [("HunyuanDiT", HUNYUAN_DIT_SAMPLING),
                                              ("HunyuanDiT1", HUNYUAN_DIT_V10_SAMPLING)])
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_discrete_sigmas_equal_comfyui_for_every_scheduler(config_name, ours, scheduler) -> None:
    model_base, supported = import_comfy("comfy.model_base"), import_comfy("comfy.supported_models")
    samplers = import_comfy("comfy.samplers")
    config = getattr(supported, config_name)({"image_model": "hydit"})
    sampling = model_base.model_sampling(config, model_base.ModelType.V_PREDICTION)
    for steps, denoise in ((5, 1.0), (7, 0.6)):
        theirs = samplers.KSampler(_FakePatcher(sampling), steps=steps, device="cpu", sampler="euler",
                                   scheduler=scheduler, denoise=denoise).sigmas
        assert torch.equal(sampling_sigmas(ours, scheduler, steps, denoise), theirs), (scheduler, steps)


# ---- same seed, same latent as stock ComfyUI -----------------------------------------------------------

@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> dict[str, tuple]:
    """(stock ComfyUI's MODEL, our adapter) per version, each from its stock-loadable tiny file."""
    if comfy_path() is None:
        pytest.skip(SKIP_REASON)
    comfy_sd = import_comfy("comfy.sd")
    folder = tmp_path_factory.mktemp("models")
    out = {}
    for version, spec, config in (("v1.2", TINY_HUNYUAN_DIT, "HunyuanDiT"), ("v1.0", TINY_HUNYUAN_DIT_V10,
                                                                             "HunyuanDiT1")):
        path = str(folder / f"hunyuan-dit-{version}.safetensors")
        write_random_model(path, spec, seed=5, dtype=torch.bfloat16)  # bf16 values, read as fp32 by both
        model = comfy_sd.load_diffusion_model(path, model_options={"dtype": torch.float32})
        assert type(model.model).__name__ == "HunyuanDiT"
        assert type(model.model.model_config).__name__ == config
        out[version] = (model, load_model(ModelRef(path, "fp32")))
    return out


def _comfy_cond(c: Conditioning) -> list:
    """What HunyuanDiT's CLIPTextEncode gives (plus the width / height keys some encoders add)."""
    extras = {"attention_mask": c.context_mask, "conditioning_mt5xl": c.second_context,
              "attention_mask_mt5xl": c.second_context_mask}
    if c.resolution is not None:
        extras.update(height=c.resolution[0], width=c.resolution[1])
    if c.target_resolution is not None:
        extras.update(target_height=c.target_resolution[0], target_width=c.target_resolution[1])
    return [[c.context.clone(), extras]]


def _stock(model, request: GenerationRequest) -> torch.Tensor:
    comfy_sample = import_comfy("comfy.sample")
    latent = comfy_sample.fix_empty_latent_channels(model, request.latent)
    noise = comfy_sample.prepare_noise(latent, request.seed)
    negative = request.negative or request.positive
    return comfy_sample.sample(model, noise, request.steps, request.cfg, request.sampler, request.scheduler,
                               _comfy_cond(request.positive), _comfy_cond(negative), latent, denoise=request.denoise,
                               disable_pbar=True, seed=request.seed)


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape
    error = float((ours - theirs).norm() / theirs.norm())
    logger.info("relative error against stock ComfyUI: %.2e", error)
    return error


SAME_SEED_CASES = {"euler-normal": dict(sampler="euler", scheduler="normal", cfg=3.0),
                   "dpmpp-2m-karras": dict(sampler="dpmpp_2m", scheduler="karras", cfg=4.5)}
LATENTS = {"v1.2": (16, 24), "v1.0": (8, 16)}  # v1.0's width 1408 is slow on CPUs: fewer tokens


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("version", ["v1.2", "v1.0"])
@pytest.mark.parametrize("case", sorted(SAME_SEED_CASES))
def test_serial_engine_equals_stock_comfyui(version, case, loaded) -> None:
    model, adapter = loaded[version]
    spec = adapter.spec
    # v1.0: the positive carries an image size (and a target), the negative none (the latent's)
    extra = dict(resolution=(1024.0, 768.0), target_resolution=(2048.0, 1536.0)) if spec.size_cond else {}
    request = GenerationRequest(model=ModelRef("unused"), latent=torch.zeros(1, 4, *LATENTS[version]),
                                positive=_cond(spec, 1, **extra), negative=_cond(spec, 2, t5_len=260, text=9),
                                seed=77, steps=2, **SAME_SEED_CASES[case])
    error = _relative(Engine(adapter).generate(request), _stock(model, request))
    assert error < 1e-4, error


def test_the_image_size_condition_and_masks_reach_the_model() -> None:
    """v1.0's sizes and the masks change the output (so the parity above tells them apart)."""
    adapter = HunyuanDiTAdapter.from_state_dict(random_hunyuan_dit_state(SMALL_V10, 0), spec=SMALL_V10)
    assert adapter.default_sampling() == HUNYUAN_DIT_V10_SAMPLING
    ids, tokens, sigma = adapter.image_ids(8, 8), torch.randn(1, 16, 16), torch.tensor([1.5])
    base = _cond(adapter.spec, 1, text=2)  # 2 of 8 CLIP tokens and 5 of 8 mT5 tokens are text
    out = adapter.velocity(tokens, ids, base, sigma)
    for changed in (dataclasses.replace(base, resolution=(1024.0, 1024.0)),
                    dataclasses.replace(base, context_mask=None), dataclasses.replace(base, second_context_mask=None)):
        assert not torch.allclose(adapter.velocity(tokens, ids, changed, sigma), out, atol=1e-4)


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_parallel_model_reads_comfyui_hunyuan_dit_model(loaded) -> None:
    """XDiTParallelModel: ComfyUI's HunyuanDiT MODEL is our family with its own (v-prediction) sampling; a
    ModelSamplingDiscrete node that changes the prediction is not taken for the model's own."""
    model_patches = nodes_module("model_patches")
    advanced = import_comfy("comfy_extras.nodes_model_advanced")
    for version in ("v1.2", "v1.0"):
        model, _ = loaded[version]
        assert model_patches.check_family(model) == "hunyuan-dit"
        assert model_patches.sigma_shift(model).mode == "default"
        (eps,) = advanced.ModelSamplingDiscrete().patch(model, "eps", False)
        assert model_patches.sigma_shift(eps).mode != "default"


# ---- the conditioning ---------------------------------------------------------------------------------

def test_conditioning_rows_and_batches_carry_the_second_stream() -> None:
    cond = _cond(SMALL, 0, resolution=(512.0, 768.0))
    assert cond.rows(3, 1, 2) is cond  # batch 1: shared as is
    two = dataclasses.replace(cond, context=cond.context.repeat(2, 1, 1), context_mask=cond.context_mask.repeat(2, 1),
                              second_context=torch.randn(2, SMALL.t5_len, SMALL.t5_dim),
                              second_context_mask=torch.ones(2, SMALL.t5_len))
    row = two.rows(4, 3, 4)  # image 3 of 4: the second of the 2 prompts repeated
    assert torch.equal(row.second_context, two.second_context[1:2]) and row.context_mask.shape == (1, SMALL.text_len)
    assert row.second_context_mask.shape == (1, SMALL.t5_len) and row.resolution == (512.0, 768.0)
    assert torch.equal(cond.batched("second_context", 2), cond.second_context.repeat(2, 1, 1))
    assert Conditioning(torch.zeros(1, 3, 4), None).batched("second_context", 2) is None
    with pytest.raises(ValueError, match="mask must be"):
        Conditioning(torch.zeros(1, 3, 4), None, context_mask=torch.ones(1, 4))


def test_node_converter_reads_hunyuan_dit_clip_output() -> None:
    convert = nodes_module("convert")
    clip, t5 = torch.randn(1, 77, 1024), torch.randn(1, 256, 2048)
    value = [[clip, {"pooled_output": torch.randn(1, 1024), "attention_mask": torch.ones(1, 77, dtype=torch.long),
                     "conditioning_mt5xl": t5, "attention_mask_mt5xl": torch.ones(1, 256, dtype=torch.long),
                     "width": 1024, "height": 768, "target_width": 2048, "target_height": 1536}]]
    cond = convert.to_conditioning(value, "positive")
    assert torch.equal(cond.second_context, t5) and cond.context_mask.dtype == torch.float32
    assert cond.second_context_mask.shape == (1, 256)
    assert cond.resolution == (768.0, 1024.0) and cond.target_resolution == (1536.0, 2048.0)
    plain = convert.to_conditioning([[clip, {}]], "positive")
    assert plain.second_context is None and plain.context_mask is None and plain.target_resolution is None


def test_input_checks_want_the_mt5_tokens() -> None:
    latent = torch.zeros(1, 4, 16, 16)
    check_inputs(TINY_HUNYUAN_DIT, latent, _cond(TINY_HUNYUAN_DIT, 0), None, NODE_INPUTS)
    with pytest.raises(ValueError, match=r"second stream of text tokens \(mT5-XL, width 2048\).*found none.*"
                                         r"CLIPTextEncodeHunyuanDiT"):
        check_inputs(TINY_HUNYUAN_DIT, latent, Conditioning(torch.zeros(1, 77, 1024), None), None, NODE_INPUTS)
    with pytest.raises(ValueError, match=r"width 4096.*takes tokens of width 1024"):
        check_inputs(TINY_HUNYUAN_DIT, latent, Conditioning(torch.zeros(1, 77, 4096), None), None, NODE_INPUTS)


def test_tiny_conditioning_fills_both_streams() -> None:
    for name in ("hunyuan-dit", "hunyuan-dit-narrow"):
        spec = TINY_SPECS[name]
        positive, negative = tiny_conditioning(ModelRef(f"tiny:{name}"), seed=1)
        check_inputs(spec, torch.zeros(1, 4, 16, 16), positive, negative, NODE_INPUTS)
        assert positive.context.shape[1] >= spec.text_len and positive.second_context.shape[1] >= spec.t5_len
        assert 0 < float(positive.context_mask.sum()) < positive.context_mask.shape[1]  # padding is masked


# ---- the CLI ------------------------------------------------------------------------------------------

def test_cli_make_tiny_then_generate_from_file_with_mt5_cond_equals_builtin(tmp_path) -> None:
    """``make-tiny hunyuan-dit-narrow`` + ``generate --model FILE --cond`` (CLIP and mT5 tokens with their masks)
    gives the latent of ``tiny:hunyuan-dit-narrow`` sampled in process from the same conditioning."""
    from safetensors.torch import load_file

    from comfyui_xdit.cli_commands import build_request, make_parser, run_generate, run_make_tiny

    model = tmp_path / "hunyuan.safetensors"
    assert run_make_tiny(make_parser().parse_args(["make-tiny", "hunyuan-dit-narrow", str(model)])) == 0
    common = ["--seed", "5", "--steps", "2", "--cfg", "2.0", "--height", "64", "--width", "96",
              "--sampler", "dpmpp_2m", "--scheduler", "karras"]
    builtin = build_request(make_parser().parse_args(["generate", "--model", "tiny:hunyuan-dit-narrow", *common,
                                                      "--out", "unused", "--dtype", "fp32"]))
    tensors = {}
    for side, cond in (("positive", builtin.positive), ("negative", builtin.negative)):
        tensors.update({f"{side}_context": cond.context, f"{side}_context_mask": cond.context_mask,
                        f"{side}_second_context": cond.second_context,
                        f"{side}_second_context_mask": cond.second_context_mask})
    cond_file = tmp_path / "cond.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(cond_file))
    out = tmp_path / "out.safetensors"  # the command in this process (test_cli.py runs the entry point)
    assert run_generate(make_parser().parse_args(["generate", "--model", str(model), "--cond", str(cond_file), *common,
                                                  "--dtype", "fp32", "--in-process", "--out", str(out)])) == 0

    ours = Engine(load_model(ModelRef("tiny:hunyuan-dit-narrow"))).generate(builtin)
    assert ours.shape == (1, 4, 8, 12)
    assert torch.equal(load_file(str(out))["samples"], ours)
