"""XDiTLoadModel and XDiTParallelModel with layout auto in the real host (issue 13.6): the planner picks
the layout for the pool it sees, logs it with its modelled time, and the latent equals stock KSampler's
(the tiny SD3 file, true CFG; warm-up covers every step, so a PipeFusion pick is exact too)."""

from __future__ import annotations

import pytest

from comfy_host import ComfyHost, comfy_host  # noqa: F401  (fixture)
from test_comfy_nodes import relative_error, save, saved_latent

FILE, STEPS, SIZE = "sd3-tiny.safetensors", 4, 128


def auto_prompt() -> dict:
    cond = {"tokens": 8, "guidance": 0.0, "width": 64, "pooled_width": 32}
    settings = {"seed": 42, "steps": STEPS, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
                "denoise": 1.0, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0]}
    manual = {"ulysses_degree": 1, "ring_degree": 1, "pipefusion_degree": 1, "num_patches": 0,
              "warmup_steps": STEPS, "cfg_parallel": True, "plan_width": SIZE, "plan_height": SIZE}
    prompt = {
        "pos": {"class_type": "XDiTTestConditioning", "inputs": {"seed": 1, **cond}},
        "neg": {"class_type": "XDiTTestConditioning", "inputs": {"seed": 2, **cond}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": FILE, "weight_dtype": "default"}},
        "pool": {"class_type": "XDiTPool", "inputs": {"ray_address": "", "network_interface": ""}},
        "load": {"class_type": "XDiTLoadModel", "inputs": {"pool": ["pool", 0], "unet_name": FILE,
                                                            "weight_dtype": "default", **manual,
                                                            "layout": "auto (exact)"}},
        "parallel": {"class_type": "XDiTParallelModel", "inputs": {"pool": ["pool", 0], "model": ["unet", 0],
                                                                   "weight_dtype": "default", **manual,
                                                                   "layout": "auto (fastest)"}},
        "ks": {"class_type": "KSampler", "inputs": {"model": ["unet", 0], **settings}},
    }
    for name in ("load", "parallel"):
        prompt[f"xs_{name}"] = {"class_type": "XDiTSampler", "inputs": {
            "model": [name, 0], **settings, "sigma_shift": "model default", "max_shift": 1.15, "base_shift": 0.5,
            "width": SIZE, "height": SIZE}}
        prompt[f"save_{name}"] = save(f"xs_{name}", f"auto_{name}")
    prompt["save_stock"] = save("ks", "auto_stock")
    return prompt


def test_auto_layout_equals_stock_ksampler_and_logs_its_plan(comfy_host: ComfyHost) -> None:
    with comfy_host.connect() as ws:
        result = ws.run(auto_prompt(), timeout=600)
    assert result.succeeded, result.describe() + "\n" + comfy_host.log_tail()
    executed = result.of_type("executed")
    stock = saved_latent(comfy_host, executed, "save_stock")
    errors = {name: relative_error(saved_latent(comfy_host, executed, f"save_{name}"), stock)
              for name in ("load", "parallel")}
    assert all(error < 1e-3 for error in errors.values()), errors
    log = comfy_host.log_tail(200_000)
    assert "auto layout for sd3 at 128x128" in log and "modelled" in log, log[-2000:]


@pytest.mark.parametrize("layout", ["auto (exact)"])
def test_auto_layout_refuses_a_size_it_cannot_plan(comfy_host: ComfyHost, layout: str) -> None:
    prompt = auto_prompt()
    prompt["load"]["inputs"].update(layout=layout, plan_width=120)  # not a multiple of 16
    keep = {"pos", "neg", "latent", "pool", "load", "xs_load", "save_load"}
    with comfy_host.connect() as ws:
        result = ws.run({k: v for k, v in prompt.items() if k in keep}, timeout=300)
    assert not result.succeeded
    assert "multiple of 16" in result.describe() or "multiple of 16" in comfy_host.log_tail()
