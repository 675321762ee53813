"""Wan 2.2 TI2V 5B image-to-video in the real ComfyUI host (issue 12.5): the stock Wan22ImageToVideoLatent (a
stand-in Wan 2.2 VAE encodes the start image into the first latent frame and sets a noise_mask that keeps it)
feeding stock UNETLoader + KSampler, against the xDiT nodes on the same LATENT: XDiTLoadModel serially, with
Ulysses 2 and with PipeFusion 2 (warm-up over every step, so it equals serial), and XDiTParallelModel taking the
stock MODEL through ModelSamplingSD3. One prompt, on the session's shared host."""

from __future__ import annotations

import pytest
import torch

from comfy_host import ComfyHost, comfy_host  # noqa: F401  (fixture)
from test_comfy_nodes import relative_error, save, saved_latent

FILE = "wan22-5b-tiny.safetensors"
SIZE = 128  # px a side: an 8x8 latent (the Wan 2.2 VAE downscales 16x), 4x4 tokens a frame (patch 2x2)
FRAMES = 9  # video frames: 3 latent frames, the first the start image's
STEPS = 4
PAIRS = {"euler-simple": ("euler", "simple", 3.0), "dpmpp2m-karras": ("dpmpp_2m", "karras", 4.5)}
SAMPLING = {"shift": 5.0}  # ModelSamplingSD3, as Wan workflows use
LOAD_LAYOUTS = {"serial": {}, "ulysses2": {"ulysses_degree": 2},
                "pipefusion2": {"pipefusion_degree": 2, "warmup_steps": STEPS}}  # all-warm-up PipeFusion: serial


def _degrees(**layout) -> dict:
    return {"ulysses_degree": 1, "ring_degree": 1, "pipefusion_degree": 1, "num_patches": 0, "warmup_steps": 1,
            "cfg_parallel": False, **layout}


def i2v_prompt() -> dict:
    cond = {"tokens": 8, "guidance": 0.0, "width": 4096, "pooled_width": 1}
    prompt = {
        "pos": {"class_type": "XDiTTestConditioning", "inputs": {"seed": 1, **cond}},
        "neg": {"class_type": "XDiTTestConditioning", "inputs": {"seed": 2, **cond}},
        "image_inputs": {"class_type": "XDiTTestWan22ImageInputs", "inputs": {"seed": 3, "width": SIZE,
                                                                               "height": SIZE}},
        "i2v": {"class_type": "Wan22ImageToVideoLatent", "inputs": {
            "vae": ["image_inputs", 0], "width": SIZE, "height": SIZE, "length": FRAMES, "batch_size": 1,
            "start_image": ["image_inputs", 1]}},
        "t2v": {"class_type": "Wan22ImageToVideoLatent", "inputs": {  # no start image: an empty latent, no mask
            "vae": ["image_inputs", 0], "width": SIZE, "height": SIZE, "length": FRAMES, "batch_size": 1}},
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": FILE, "weight_dtype": "default"}},
        "sampling": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["unet", 0], **SAMPLING}},
        "pool": {"class_type": "XDiTPool", "inputs": {"ray_address": "", "network_interface": ""}},
        "parallel_model": {"class_type": "XDiTParallelModel", "inputs": {
            "pool": ["pool", 0], "model": ["sampling", 0], "weight_dtype": "default", **_degrees()}},
        "save_i2v_latent": save("i2v", "i2v_latent"),
    }
    for layout, degrees in LOAD_LAYOUTS.items():
        prompt[f"load_{layout}"] = {"class_type": "XDiTLoadModel", "inputs": {
            "pool": ["pool", 0], "unet_name": FILE, "weight_dtype": "default", **_degrees(**degrees)}}

    def settings(pair: str, latent: str = "i2v") -> dict:
        sampler, scheduler, cfg = PAIRS[pair]
        return {"seed": 42, "steps": STEPS, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
                "denoise": 1.0, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": [latent, 0]}

    def xdit(model: str, pair: str) -> dict:
        return {"class_type": "XDiTSampler", "inputs": {
            "model": [model, 0], **settings(pair), "sigma_shift": "model default", "max_shift": 1.15,
            "base_shift": 0.5, "width": SIZE, "height": SIZE}}

    def add(node: str, inputs: dict, name: str) -> None:
        prompt[node] = inputs
        prompt[f"save_{name}"] = save(node, name)

    for pair in PAIRS:
        add(f"ks_{pair}", {"class_type": "KSampler", "inputs": {"model": ["unet", 0], **settings(pair)}},
            f"stock_{pair}")
        add(f"xs_{pair}", xdit("load_serial", pair), f"xdit_{pair}")
    add("ks_sampling", {"class_type": "KSampler", "inputs": {"model": ["sampling", 0], **settings("euler-simple")}},
        "stock_sampling")
    add("ks_no_image", {"class_type": "KSampler", "inputs": {"model": ["unet", 0],
                                                            **settings("euler-simple", "t2v")}}, "stock_no_image")
    for layout in ("ulysses2", "pipefusion2"):
        add(f"xs_{layout}", xdit(f"load_{layout}", "euler-simple"), f"xdit_{layout}")
    add("xs_parallel_model", xdit("parallel_model", "euler-simple"), "xdit_parallel_model")
    return prompt


CHECKS = {"euler-simple": ("stock_euler-simple", "xdit_euler-simple"),
          "dpmpp2m-karras": ("stock_dpmpp2m-karras", "xdit_dpmpp2m-karras"),
          "ulysses2": ("stock_euler-simple", "xdit_ulysses2"),
          "pipefusion2": ("stock_euler-simple", "xdit_pipefusion2"),
          "parallel-model-with-model-sampling": ("stock_sampling", "xdit_parallel_model")}


@pytest.fixture(scope="module")
def i2v_run(comfy_host: ComfyHost):
    with comfy_host.connect() as ws:
        result = ws.run(i2v_prompt(), timeout=600)
    assert result.succeeded, result.describe() + "\n" + comfy_host.log_tail()
    executed = result.of_type("executed")
    return {node[len("save_"):]: saved_latent(comfy_host, executed, node)
            for node in {e["node"] for e in executed} if node.startswith("save_")}


def test_xdit_nodes_equal_stock_ksampler_on_wan22_image_to_video(i2v_run) -> None:
    latents = i2v_run
    start = latents["i2v_latent"]
    assert start.shape == (1, 48, 3, SIZE // 16, SIZE // 16)
    errors = {}
    for check, (stock, ours) in CHECKS.items():
        latent, reference = latents[ours], latents[stock]
        assert latent.shape == reference.shape == start.shape, check
        assert torch.isfinite(latent).all(), check
        errors[check] = relative_error(latent, reference)
    print(f"{FILE} image-to-video: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert all(error < 1e-3 for error in errors.values()), errors


def test_the_start_frame_is_kept_and_the_image_matters(i2v_run) -> None:
    latents = i2v_run
    start = latents["i2v_latent"]
    for name in ("stock_euler-simple", "xdit_euler-simple", "xdit_ulysses2", "xdit_parallel_model"):
        # euler's last step lands on the blended x0: the noise mask's 0 frame comes back as the VAE encoded it
        torch.testing.assert_close(latents[name][:, :, 0], start[:, :, 0], rtol=0, atol=1e-4, msg=name)
        assert float((latents[name][:, :, 1:] - start[:, :, 1:]).abs().max()) > 0.1, name
    # the same sampling from the empty latent (no start image, no mask): so the parity tells the image inputs apart
    assert relative_error(latents["stock_no_image"], latents["stock_euler-simple"]) > 1e-2
    # and the model-sampling parity tells the shifts apart
    assert relative_error(latents["stock_sampling"], latents["stock_euler-simple"]) > 1e-2
