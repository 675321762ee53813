"""Families after Flux in the real ComfyUI host (issue 11.4): for each family's stock-loadable tiny file,
stock UNETLoader + KSampler against the xDiT nodes, for two sampler/scheduler pairs with true CFG,
serially and with Ulysses 2 (XDiTLoadModel), and XDiTParallelModel taking the stock MODEL through the
family's model-sampling node. One prompt per family, on the session's shared host."""

from __future__ import annotations

import pytest
import torch

from comfy_host import FAMILY_FILES, ComfyHost, comfy_host  # noqa: F401  (fixture)
from test_comfy_nodes import relative_error, save, saved_latent

SIZE = 128  # px: 16x16 latent, 64 tokens
STEPS = 4
PAIRS = {"euler-simple": ("euler", "simple", 3.0), "dpmpp2m-karras": ("dpmpp_2m", "karras", 4.5)}
FAMILIES = {  # file -> (conditioning widths (tokens, pooled), the family's model-sampling node and its inputs,
    # whether Ulysses 2 runs here too: not for the full-width Qwen-Image block, whose layouts are tested in
    # process in test_family_parallel.py, to keep two ranks of it out of the host's memory)
    "sd3-tiny.safetensors": ((64, 32), ("ModelSamplingSD3", {"shift": 5.0}), True),
    "qwen-image-min.safetensors": ((3584, 1), ("ModelSamplingAuraFlow", {"shift": 3.1}), False),
}
assert set(FAMILIES) == set(FAMILY_FILES)  # every stock-loadable family file is tested here


def family_prompt(file: str) -> dict:
    (width, pooled), (sampling_node, sampling_inputs), with_ulysses = FAMILIES[file]
    cond = {"tokens": 8, "guidance": 0.0, "width": width, "pooled_width": pooled}
    prompt = {
        "pos": {"class_type": "XDiTTestConditioning", "inputs": {"seed": 1, **cond}},
        "neg": {"class_type": "XDiTTestConditioning", "inputs": {"seed": 2, **cond}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": file, "weight_dtype": "default"}},
        "sampling": {"class_type": sampling_node, "inputs": {"model": ["unet", 0], **sampling_inputs}},
        "pool": {"class_type": "XDiTPool", "inputs": {"ray_address": "", "network_interface": ""}},
        "parallel_model": {"class_type": "XDiTParallelModel",
                           "inputs": {"pool": ["pool", 0], "model": ["sampling", 0], "weight_dtype": "default",
                                      "ulysses_degree": 1, "ring_degree": 1, "pipefusion_degree": 1,
                                      "num_patches": 0, "warmup_steps": 1, "cfg_parallel": False}},
    }
    for layout, ulysses in (("serial", 1), ("ulysses2", 2))[:2 if with_ulysses else 1]:
        prompt[f"load_{layout}"] = {"class_type": "XDiTLoadModel", "inputs": {
            "pool": ["pool", 0], "unet_name": file, "weight_dtype": "default", "ulysses_degree": ulysses,
            "ring_degree": 1, "pipefusion_degree": 1, "num_patches": 0, "warmup_steps": 1, "cfg_parallel": False}}

    def settings(pair: str) -> dict:
        sampler, scheduler, cfg = PAIRS[pair]
        return {"seed": 42, "steps": STEPS, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
                "denoise": 1.0, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0]}

    def xdit(model: str, pair: str) -> dict:
        return {"class_type": "XDiTSampler", "inputs": {
            "model": [model, 0], **settings(pair), "sigma_shift": "model default", "max_shift": 1.15,
            "base_shift": 0.5, "width": SIZE, "height": SIZE}}

    for pair in PAIRS:
        prompt[f"ks_{pair}"] = {"class_type": "KSampler", "inputs": {"model": ["unet", 0], **settings(pair)}}
        prompt[f"save_stock_{pair}"] = save(f"ks_{pair}", f"stock_{pair}")
        prompt[f"xs_{pair}"] = xdit("load_serial", pair)
        prompt[f"save_xdit_{pair}"] = save(f"xs_{pair}", f"xdit_{pair}")
    prompt["ks_sampling"] = {"class_type": "KSampler", "inputs": {"model": ["sampling", 0], **settings("euler-simple")}}
    prompt["save_stock_sampling"] = save("ks_sampling", "stock_sampling")
    if with_ulysses:
        prompt["xs_ulysses2"] = xdit("load_ulysses2", "euler-simple")
        prompt["save_xdit_ulysses2"] = save("xs_ulysses2", "xdit_ulysses2")
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
          "parallel-model-with-model-sampling": ("stock_sampling", "xdit_parallel_model")}


def test_xdit_nodes_equal_stock_ksampler(family_run) -> None:
    host, executed, file = family_run
    errors = {}
    for check, (stock, ours) in CHECKS.items():
        if check == "ulysses2" and not FAMILIES[file][2]:
            continue
        reference = saved_latent(host, executed, f"save_{stock}")
        latent = saved_latent(host, executed, f"save_{ours}")
        assert latent.shape == reference.shape and latent.shape[-2:] == (SIZE // 8, SIZE // 8), check
        assert torch.isfinite(latent).all(), check
        errors[check] = relative_error(latent, reference)
    print(f"{file}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert all(error < 1e-3 for error in errors.values()), errors


def test_the_model_sampling_node_changes_the_picture(family_run) -> None:
    """So the ModelSampling parity above really tells the shifts apart."""
    host, executed, _ = family_run
    plain = saved_latent(host, executed, "save_stock_euler-simple")
    shifted = saved_latent(host, executed, "save_stock_sampling")
    assert relative_error(plain, shifted) > 1e-2
