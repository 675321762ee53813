"""Every parallel mode for the families after Flux (issue 11.3), on their tiny models.

Each world size (2, 4, 8 local gloo ranks, NCCL's rules on) is spawned once for all its layouts:
sequence parallel (Ulysses, Ring, USP) and CFG parallel equal serial to float tolerance; PipeFusion
equals serial when warm-up = steps and its single-process reference after (stale K/V), in products with
the other axes. Flux has the same matrix in test_parallel_engine.py / test_pipefusion_hybrid.py.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import pytest
import torch

from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, model_spec, tiny_conditioning, tiny_image_conditioning
from comfyui_xdit.parallel.launch import generate_local_many
from comfyui_xdit.parallel.pipefusion_reference import pipefusion_reference
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sampling import finish, prepare_plan

from process_check import no_process_left

FAMILY_MODELS = ["tiny:sd3", "tiny:qwen-image"]  # each 4 heads, 4 blocks: every layout below fits
FAMILY_MODELS += ["tiny:pixart-sigma-narrow"]  # 16 heads (of 16), 4 blocks; EPS, text by cross-attention
# HunyuanDiT (narrow text widths): 16 heads of 8, 4 blocks; v-prediction, two text streams by cross-attention, long
# skips: every PipeFusion stage boundary (2 at 2 stages; 1, 2, 3 at 4: both sides of the middle block 2) carries
# block 0's output, pending for block 3
FAMILY_MODELS += ["tiny:hunyuan-dit-narrow"]
LATENT = 16  # 16x16 latent -> 64 image tokens
# PixArt's smallest size is larger (ComfyUI's position base size needs (h + w) / 2 >= 33): 32x40 -> 320 tokens
LATENTS = {"tiny:pixart-sigma-narrow": (32, 40)}
# Wan 2.1 (4 heads of 128, 4 blocks): a video latent of 3 frames of 4x8 -> 24 tokens (8 a frame), so sequence
# shards and PipeFusion patches (6 tokens each at 4) cut across frame boundaries
FAMILY_MODELS += ["tiny:wan21"]
LATENTS["tiny:wan21"] = (3, 4, 8)
# Wan 2.1 I2V: the same video with a start-frame latent, its mask (c_concat, cut with the tokens) and CLIP vision
# tokens (image cross-attention, carried whole to every stage)
FAMILY_MODELS += ["tiny:wan21-i2v"]
LATENTS["tiny:wan21-i2v"] = (3, 4, 8)
# HunyuanVideo (4 heads of 128, 2 double + 2 single blocks): joint text + video attention, the same 3 x 4x8 latent
FAMILY_MODELS += ["tiny:hunyuan-video"]
LATENTS["tiny:hunyuan-video"] = (3, 4, 8)
# CogVideoX (4 heads of 32, 4 blocks): T5 tokens joint with the video in every block, v-prediction, the same 3 x 4x8
# latent; the 5B's rotary positions and the 2B's sin-cos table, both computed per token and cut with the shards
FAMILY_MODELS += ["tiny:cogvideox", "tiny:cogvideox-2b"]
LATENTS["tiny:cogvideox"] = LATENTS["tiny:cogvideox-2b"] = (3, 4, 8)
# Wan 2.2 TI2V 5B (4 heads of 128, 4 blocks, 48 channels): text-to-video on the same 3 x 4x8 latent (its
# image-to-video, a noise mask keeping the first frame and a per-token timestep, in test_wan22_5b.py)
FAMILY_MODELS += ["tiny:wan22-5b"]
LATENTS["tiny:wan22-5b"] = (3, 4, 8)
# HunyuanVideo I2V v1 (33 channels in): the T2V blocks with a start-frame latent + inverted mask (c_concat, cut with
# the tokens), the same 3 x 4x8 latent; a variant (VARIANTS below): world 2 in the default suite
FAMILY_MODELS += ["tiny:hunyuan-video-i2v"]
LATENTS["tiny:hunyuan-video-i2v"] = (3, 4, 8)
# CogVideoX 1.5 (a token: 2 latent frames x 2x2) T2V and I2V (32 channels in, ofs): 4 x 4x12 latent frames -> 24 tokens
# (12 a frame pair; 4 PipeFusion patches of 6 and 8 pieces of 3 cut inside a pair); CogVideoX-5B-I2V-like (learned
# positions, only its sample grid): 13 x 8x12 -> 312 tokens (shards of 156 cut a frame). The start latent is cut
# with the tokens
FAMILY_MODELS += ["tiny:cogvideox15", "tiny:cogvideox15-i2v", "tiny:cogvideox-i2v"]
LATENTS["tiny:cogvideox15"] = LATENTS["tiny:cogvideox15-i2v"] = (4, 4, 12)
LATENTS["tiny:cogvideox-i2v"] = (13, 8, 12)
STEPS = 3
P = ParallelConfig

LAYOUTS = {  # (config, sampler); warm-up = steps unless the config says otherwise
    2: [(P(ulysses_degree=2), "euler"), (P(ring_degree=2), "dpmpp_2m"), (P(cfg_degree=2), "euler_ancestral"),
        (P(pipefusion_degree=2, warmup_steps=STEPS), "dpmpp_2m"), (P(pipefusion_degree=2, num_patches=4), "euler")],
    4: [(P(ulysses_degree=4), "euler"), (P(ulysses_degree=2, ring_degree=2), "dpmpp_2m"),
        (P(cfg_degree=2, ulysses_degree=2), "euler"), (P(pipefusion_degree=4, warmup_steps=STEPS), "euler"),
        (P(pipefusion_degree=2, ulysses_degree=2, warmup_steps=STEPS), "dpmpp_2m"),
        (P(pipefusion_degree=2, ring_degree=2), "dpmpp_2m")],
    8: [(P(cfg_degree=2, ulysses_degree=2, ring_degree=2), "dpmpp_2m"),
        (P(pipefusion_degree=4, ulysses_degree=2, warmup_steps=STEPS), "euler"),
        (P(cfg_degree=2, pipefusion_degree=2, ring_degree=2, num_patches=4), "euler")],
}


def latent_size(model: str) -> tuple[int, ...]:
    """(H, W) of an image latent, (T, H, W) of a video one."""
    return LATENTS.get(model, (LATENT, LATENT))


def request(model: str, parallel: ParallelConfig, sampler: str) -> GenerationRequest:
    ref = ModelRef(model)
    positive, negative = tiny_conditioning(ref, seed=3)
    shape = (1, model_spec(ref).latent_channels, *latent_size(model))  # 48 channels for Wan 2.2 TI2V 5B
    positive, negative = (tiny_image_conditioning(ref, cond, shape, seed=3) for cond in (positive, negative))
    return GenerationRequest(model=ref, latent=torch.zeros(shape), positive=positive,
                             negative=negative, seed=7, steps=STEPS, cfg=2.5, sampler=sampler, parallel=parallel)


@pytest.fixture(scope="module", autouse=True)
def _no_process_left() -> Iterator[None]:
    with no_process_left():
        yield


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


# 8 ranks take ~30 s a family on 2 cores: the default suite runs them for a video family (tokens cut across frames)
# and HunyuanDiT (long skips across stages); every family at 8 in the slow suite (Flux's 8 in test_pipefusion_hybrid)
WORLD8_DEFAULT = {"tiny:wan21", "tiny:hunyuan-dit-narrow"}
# variants that share a family's parallel paths above (an input's extra channels, a patch over frames): 2 ranks in
# the default suite, 4 and 8 in the slow one
VARIANTS = {"tiny:hunyuan-video-i2v", "tiny:cogvideox15", "tiny:cogvideox15-i2v", "tiny:cogvideox-i2v"}


def in_default_suite(model: str, world: int) -> bool:
    return world == 2 or (model not in VARIANTS and (world == 4 or model in WORLD8_DEFAULT))


WORLD_CASES = [(model, world) if in_default_suite(model, world) else pytest.param(model, world, marks=pytest.mark.slow)
               for world in (2, 4, 8) for model in FAMILY_MODELS]


@pytest.mark.parametrize("model,world", WORLD_CASES, ids=[f"{w}-{m}" for w in (2, 4, 8) for m in FAMILY_MODELS])
def test_every_mode_equals_serial_or_its_reference(model: str, world: int) -> None:
    reqs = [request(model, config, sampler) for config, sampler in LAYOUTS[world]]
    results = generate_local_many(reqs, timeout=500)
    adapter = load_model(ModelRef(model))
    for req, result in zip(reqs, results):
        par = req.parallel
        label = f"{model} {par.describe()} warm-up {par.warmup_steps} {req.sampler}"
        serial = Engine(adapter).generate(dataclasses.replace(req, parallel=ParallelConfig()))
        if par.pipefusion_degree == 1 or par.warmup_steps >= req.steps:
            assert relative(result.latent, serial) < 1e-4, label
        else:
            plan = prepare_plan(adapter, req)
            reference = finish(adapter, plan, pipefusion_reference(adapter, plan, par.patches, par.warmup_steps))
            assert relative(result.latent, reference) < 1e-4, label
            assert relative(result.latent, serial) > 1e-4, f"{label}: stale K/V should differ from serial"


@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_layouts_that_cannot_work_are_refused_naming_one_that_does(model: str) -> None:
    spec = model_spec(ModelRef(model))
    heads, blocks = spec.num_attention_heads, spec.num_blocks
    *frames, height, width = latent_size(model)
    tokens = (frames or [1])[0] * (height // 2) * (width // 2)
    with pytest.raises(ValueError, match=rf"{heads}"):
        P(ulysses_degree=heads * 2).validate_for(heads * 2, heads, tokens, 2.5, num_blocks=blocks)
    with pytest.raises(ValueError, match=rf"{blocks}"):
        P(pipefusion_degree=blocks * 2).validate_for(blocks * 2, heads, tokens, 2.5, num_blocks=blocks)
