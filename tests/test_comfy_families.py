"""Families after Flux in the real ComfyUI host (issue 11.4): for each family's stock-loadable tiny file,
stock UNETLoader + KSampler against the xDiT nodes, for two sampler/scheduler pairs with true CFG,
serially and with Ulysses 2 (XDiTLoadModel), and XDiTParallelModel taking the stock MODEL through the
family's model-sampling node. One prompt per family, on the session's shared host."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from comfy_host import FAMILY_FILES, ComfyHost, comfy_host  # noqa: F401  (fixture)
from test_comfy_nodes import relative_error, save, saved_latent

STEPS = 4
PAIRS = {"euler-simple": ("euler", "simple", 3.0), "dpmpp2m-karras": ("dpmpp_2m", "karras", 4.5)}


@dataclass(frozen=True)
class FamilyCase:
    """How one family's file is driven in the host."""

    widths: tuple[int, int]  # conditioning (tokens, pooled) widths; pooled is ignored where the family has none
    sampling: Optional[tuple[str, dict]]  # the family's model-sampling node and its inputs, for XDiTParallelModel
    ulysses: bool  # Ulysses 2 here too (not for the full-width Qwen-Image block: its layouts are tested in
    # process in test_family_parallel.py, keeping two ranks of it out of the host's memory)
    size: int = 128  # px a side (PixArt: ComfyUI's position base size needs (h + w) / 2 >= 264 px)
    tokens: int = 8  # text tokens (HunyuanDiT: its CLIP pads to 77)
    second_tokens: int = 0  # HunyuanDiT: mT5 tokens (padded to 256) and both masks, as its CLIP gives them
    frames: int = 0  # a video family's length (EmptyHunyuanLatentVideo); 0: an image (EmptySD3LatentImage)
    image_to_video: bool = False  # the conditioning and latent from the stock WanImageToVideo (start image, CLIP vision)
    hunyuan_guidance: str = ""  # the positive and latent from the stock HunyuanImageToVideo of this guidance_type

    @property
    def start_image(self) -> bool:
        return self.image_to_video or bool(self.hunyuan_guidance)


FAMILIES = {
    "sd3-tiny.safetensors": FamilyCase((64, 32), ("ModelSamplingSD3", {"shift": 5.0}), True),
    "qwen-image-min.safetensors": FamilyCase((3584, 1), ("ModelSamplingAuraFlow", {"shift": 3.1}), False),
    "pixart-sigma-tiny.safetensors": FamilyCase((4096, 1), None, True, size=288),
    "pixart-alpha-tiny.safetensors": FamilyCase((4096, 1), None, False, size=288),
}
FAMILIES["hunyuan-dit-tiny.safetensors"] = FamilyCase((1024, 1), None, True, tokens=77, second_tokens=256)
# Wan 2.1 T2V: 9 video frames = 3 latent frames of 8x8; ModelSamplingSD3 is what Wan workflows use
FAMILIES["wan21-tiny.safetensors"] = FamilyCase((4096, 1), ("ModelSamplingSD3", {"shift": 3.0}), True, frames=9)
# Wan 2.1 I2V: stock WanImageToVideo sets concat_latent_image, concat_mask and clip_vision_output (a stand-in VAE)
FAMILIES["wan21-i2v-tiny.safetensors"] = FamilyCase((4096, 1), ("ModelSamplingSD3", {"shift": 3.0}), True, frames=9,
                                                    image_to_video=True)
# HunyuanVideo T2V: llama tokens + CLIP-L pooled, the conditioning's guidance (0.0 here) embedded by both;
# 9 video frames = 3 latent frames of 16x16; ModelSamplingSD3 is what HunyuanVideo workflows use
FAMILIES["hunyuan-video-tiny.safetensors"] = FamilyCase((4096, 768), ("ModelSamplingSD3", {"shift": 5.0}), True,
                                                        frames=9)
# Wan 2.2 TI2V 5B text-to-video: EmptyHunyuanLatentVideo's empty 16-channel latent widened to 48 (as ComfyUI does)
FAMILIES["wan22-5b-tiny.safetensors"] = FamilyCase((4096, 1), ("ModelSamplingSD3", {"shift": 5.0}), True, frames=9)
# HunyuanVideo I2V v1 (33 channels): stock HunyuanImageToVideo's "v1 (concat)" sets the positive's
# concat_latent_image + concat_mask (the stand-in VAE), the negative has none (stock: the empty latent)
FAMILIES["hunyuan-video-i2v-tiny.safetensors"] = FamilyCase((4096, 768), ("ModelSamplingSD3", {"shift": 5.0}), True,
                                                            frames=9, hunyuan_guidance="v1 (concat)")
# HunyuanVideo v2 (replace) on the 16-channel model: the start latent written into the LATENT's frame 0, kept by its
# noise_mask, and guiding_frame_index 0 on the positive (token replace)
FAMILIES["hunyuan-video-v2-tiny.safetensors"] = FamilyCase((4096, 768), ("ModelSamplingSD3", {"shift": 5.0}), True,
                                                           frames=9, hunyuan_guidance="v2 (replace)")
assert set(FAMILIES) == set(FAMILY_FILES)  # every stock-loadable family file is tested here


def family_prompt(file: str) -> dict:
    case = FAMILIES[file]
    (width, pooled), size = case.widths, case.size
    cond = {"tokens": case.tokens, "guidance": 0.0, "width": width, "pooled_width": pooled,
            **({"second_tokens": case.second_tokens} if case.second_tokens else {})}
    prompt = {
        "pos": {"class_type": "XDiTTestConditioning", "inputs": {"seed": 1, **cond}},
        "neg": {"class_type": "XDiTTestConditioning", "inputs": {"seed": 2, **cond}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}}
        if not case.frames else {"class_type": "EmptyHunyuanLatentVideo",
                                 "inputs": {"width": size, "height": size, "length": case.frames, "batch_size": 1}},
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": file, "weight_dtype": "default"}},
        "pool": {"class_type": "XDiTPool", "inputs": {"ray_address": "", "network_interface": ""}},
        "parallel_model": {"class_type": "XDiTParallelModel",
                           "inputs": {"pool": ["pool", 0], "model": ["sampling" if case.sampling else "unet", 0],
                                      "weight_dtype": "default",
                                      "ulysses_degree": 1, "ring_degree": 1, "pipefusion_degree": 1,
                                      "num_patches": 0, "warmup_steps": 1, "cfg_parallel": False}},
    }
    sources = {"positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0]}
    if case.image_to_video:
        prompt["image_inputs"] = {"class_type": "XDiTTestWanImageInputs",
                                  "inputs": {"seed": 3, "width": size, "height": size, "clip_tokens": 9}}
        prompt["i2v"] = {"class_type": "WanImageToVideo", "inputs": {
            "positive": ["pos", 0], "negative": ["neg", 0], "vae": ["image_inputs", 0], "width": size,
            "height": size, "length": case.frames, "batch_size": 1, "start_image": ["image_inputs", 1],
            "clip_vision_output": ["image_inputs", 2]}}
        sources = {"positive": ["i2v", 0], "negative": ["i2v", 1], "latent_image": ["i2v", 2]}
    if case.hunyuan_guidance:
        prompt["image_inputs"] = {"class_type": "XDiTTestWanImageInputs",
                                  "inputs": {"seed": 3, "width": size, "height": size, "clip_tokens": 1}}
        prompt["i2v"] = {"class_type": "HunyuanImageToVideo", "inputs": {
            "positive": ["pos", 0], "vae": ["image_inputs", 0], "width": size, "height": size,
            "length": case.frames, "batch_size": 1, "guidance_type": case.hunyuan_guidance,
            "start_image": ["image_inputs", 1]}}
        sources = {"positive": ["i2v", 0], "negative": ["neg", 0], "latent_image": ["i2v", 1]}
    if case.sampling is not None:
        node, inputs = case.sampling
        prompt["sampling"] = {"class_type": node, "inputs": {"model": ["unet", 0], **inputs}}
    for layout, ulysses in (("serial", 1), ("ulysses2", 2))[:2 if case.ulysses else 1]:
        prompt[f"load_{layout}"] = {"class_type": "XDiTLoadModel", "inputs": {
            "pool": ["pool", 0], "unet_name": file, "weight_dtype": "default", "ulysses_degree": ulysses,
            "ring_degree": 1, "pipefusion_degree": 1, "num_patches": 0, "warmup_steps": 1, "cfg_parallel": False}}

    def settings(pair: str) -> dict:
        sampler, scheduler, cfg = PAIRS[pair]
        return {"seed": 42, "steps": STEPS, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
                "denoise": 1.0, **sources}

    def xdit(model: str, pair: str) -> dict:
        return {"class_type": "XDiTSampler", "inputs": {
            "model": [model, 0], **settings(pair), "sigma_shift": "model default", "max_shift": 1.15,
            "base_shift": 0.5, "width": size, "height": size}}

    for pair in PAIRS:
        prompt[f"ks_{pair}"] = {"class_type": "KSampler", "inputs": {"model": ["unet", 0], **settings(pair)}}
        prompt[f"save_stock_{pair}"] = save(f"ks_{pair}", f"stock_{pair}")
        prompt[f"xs_{pair}"] = xdit("load_serial", pair)
        prompt[f"save_xdit_{pair}"] = save(f"xs_{pair}", f"xdit_{pair}")
    if case.sampling is not None:
        prompt["ks_sampling"] = {"class_type": "KSampler",
                                 "inputs": {"model": ["sampling", 0], **settings("euler-simple")}}
        prompt["save_stock_sampling"] = save("ks_sampling", "stock_sampling")
    if case.ulysses:
        prompt["xs_ulysses2"] = xdit("load_ulysses2", "euler-simple")
        prompt["save_xdit_ulysses2"] = save("xs_ulysses2", "xdit_ulysses2")
    if case.start_image:  # stock without WanImageToVideo: so the parity tells the image inputs apart
        plain = {**settings("euler-simple"), "positive": ["pos", 0], "negative": ["neg", 0],
                 "latent_image": ["latent", 0]}
        prompt["ks_no_image"] = {"class_type": "KSampler", "inputs": {"model": ["unet", 0], **plain}}
        prompt["save_stock_no_image"] = save("ks_no_image", "stock_no_image")
    prompt["xs_parallel_model"] = xdit("parallel_model", "euler-simple")
    prompt["save_xdit_parallel_model"] = save("xs_parallel_model", "xdit_parallel_model")
    return prompt


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_run(request, comfy_host: ComfyHost):
    with comfy_host.connect() as ws:
        result = ws.run(family_prompt(request.param), timeout=600)
    assert result.succeeded, result.describe() + "\n" + comfy_host.log_tail()
    return comfy_host, result.of_type("executed"), request.param


CHECKS = {"euler-simple": ("stock_euler-simple", "xdit_euler-simple"),
          "dpmpp2m-karras": ("stock_dpmpp2m-karras", "xdit_dpmpp2m-karras"),
          "ulysses2": ("stock_euler-simple", "xdit_ulysses2"),
          "parallel-model": ("stock_euler-simple", "xdit_parallel_model"),  # without a model-sampling node
          "parallel-model-with-model-sampling": ("stock_sampling", "xdit_parallel_model")}


def test_xdit_nodes_equal_stock_ksampler(family_run) -> None:
    host, executed, file = family_run
    case = FAMILIES[file]
    wanted = {"euler-simple", "dpmpp2m-karras", *(["ulysses2"] if case.ulysses else []),
              "parallel-model-with-model-sampling" if case.sampling else "parallel-model"}
    errors = {}
    for check in sorted(wanted):
        stock, ours = CHECKS[check]
        reference = saved_latent(host, executed, f"save_{stock}")
        latent = saved_latent(host, executed, f"save_{ours}")
        assert latent.shape == reference.shape and latent.shape[-2:] == (case.size // 8, case.size // 8), check
        assert torch.isfinite(latent).all(), check
        errors[check] = relative_error(latent, reference)
    print(f"{file}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert all(error < 1e-3 for error in errors.values()), errors
    if case.start_image:
        plain = saved_latent(host, executed, "save_stock_no_image")
        assert relative_error(plain, saved_latent(host, executed, "save_stock_euler-simple")) > 1e-2
    if case.sampling is not None:  # so the ModelSampling parity really tells the shifts apart
        plain = saved_latent(host, executed, "save_stock_euler-simple")
        assert relative_error(plain, saved_latent(host, executed, "save_stock_sampling")) > 1e-2
