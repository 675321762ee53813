"""Wan 2.2's expert switch in the real ComfyUI host (issue 12 item 3): the stock graph (two UNETLoader, two
KSamplerAdvanced: the high-noise expert's steps 0-2 of 4 with leftover noise, then the low-noise expert's
without added noise) against two XDiTLoadModel + two xDiT Sampler (Advanced) on the pool, serially and with
Ulysses 2. One prompt, on the session's shared host; the second expert is a tiny Wan file with other weights
written into the host's models folder. Slow (about 45 s on 2 busy cores: two worlds, four model loads); the
default suite checks the split in process against stock (tests/test_expert_split.py) and the node's inputs
against KSamplerAdvanced's in the host (tests/test_comfy_nodes.py)."""

from __future__ import annotations

import pytest
import torch

from comfy_host import ComfyHost, comfy_host  # noqa: F401  (fixture)
from test_comfy_nodes import relative_error, save, saved_latent

HIGH = "wan21-tiny.safetensors"  # the host's Wan file (comfy_host.FAMILY_FILES)
LOW = "wan22-low-noise-tiny.safetensors"
SIZE, FRAMES, STEPS, SWITCH = 64, 9, 4, 2
LAYOUTS = (("serial", 1), ("ulysses2", 2))
SAMPLING = dict(noise_seed=42, steps=STEPS, cfg=3.0, sampler_name="euler_ancestral", scheduler="simple")


def write_low_noise_expert(host: ComfyHost) -> None:
    from comfyui_xdit.models.families import TINY_SPECS, write_random_model

    target = host.base_dir / "models" / "diffusion_models" / LOW
    if not target.exists():
        partial = target.with_suffix(".partial")
        write_random_model(partial, TINY_SPECS["wan21"], seed=1)
        partial.rename(target)


def expert_prompt() -> dict:
    cond = {"tokens": 8, "guidance": 0.0, "width": 4096, "pooled_width": 1}
    prompt = {
        "pos": {"class_type": "XDiTTestConditioning", "inputs": {"seed": 1, **cond}},
        "neg": {"class_type": "XDiTTestConditioning", "inputs": {"seed": 2, **cond}},
        "latent": {"class_type": "EmptyHunyuanLatentVideo",
                   "inputs": {"width": SIZE, "height": SIZE, "length": FRAMES, "batch_size": 1}},
        "pool": {"class_type": "XDiTPool", "inputs": {"ray_address": "", "network_interface": ""}},
    }

    def sampler(kind: str, model: str, latent: str, high: bool) -> dict:
        inputs = {"model": [model, 0], **SAMPLING, "positive": ["pos", 0], "negative": ["neg", 0],
                  "latent_image": [latent, 0], "add_noise": "enable" if high else "disable",
                  "start_at_step": 0 if high else SWITCH, "end_at_step": SWITCH if high else 10000,
                  "return_with_leftover_noise": "enable" if high else "disable"}
        if kind == "XDiTSamplerAdvanced":
            inputs |= {"sigma_shift": "model default", "max_shift": 1.15, "base_shift": 0.5, "width": SIZE,
                       "height": SIZE}
        return {"class_type": kind, "inputs": inputs}

    for name, file in (("high", HIGH), ("low", LOW)):
        prompt[f"unet_{name}"] = {"class_type": "UNETLoader", "inputs": {"unet_name": file, "weight_dtype": "default"}}
    prompt["ks_high"] = sampler("KSamplerAdvanced", "unet_high", "latent", True)
    prompt["ks_low"] = sampler("KSamplerAdvanced", "unet_low", "ks_high", False)
    prompt["save_stock_high"], prompt["save_stock_low"] = save("ks_high", "stock_high"), save("ks_low", "stock_low")
    for layout, ulysses in LAYOUTS:
        for name, file in (("high", HIGH), ("low", LOW)):
            prompt[f"load_{name}_{layout}"] = {"class_type": "XDiTLoadModel", "inputs": {
                "pool": ["pool", 0], "unet_name": file, "weight_dtype": "default", "ulysses_degree": ulysses,
                "ring_degree": 1, "pipefusion_degree": 1, "num_patches": 0, "warmup_steps": 1, "cfg_parallel": False}}
        prompt[f"xs_high_{layout}"] = sampler("XDiTSamplerAdvanced", f"load_high_{layout}", "latent", True)
        prompt[f"xs_low_{layout}"] = sampler("XDiTSamplerAdvanced", f"load_low_{layout}", f"xs_high_{layout}", False)
        prompt[f"save_xdit_high_{layout}"] = save(f"xs_high_{layout}", f"xdit_high_{layout}")
        prompt[f"save_xdit_low_{layout}"] = save(f"xs_low_{layout}", f"xdit_low_{layout}")
    return prompt


@pytest.mark.slow
def test_xdit_advanced_samplers_equal_stock_ksampler_advanced(comfy_host: ComfyHost) -> None:
    write_low_noise_expert(comfy_host)
    with comfy_host.connect() as ws:
        result = ws.run(expert_prompt(), timeout=600)
    assert result.succeeded, result.describe() + "\n" + comfy_host.log_tail()
    executed = result.of_type("executed")
    errors = {}
    for part in ("high", "low"):
        reference = saved_latent(comfy_host, executed, f"save_stock_{part}")
        assert reference.shape == (1, 16, 3, SIZE // 8, SIZE // 8), reference.shape
        for layout, _ in LAYOUTS:
            latent = saved_latent(comfy_host, executed, f"save_xdit_{part}_{layout}")
            assert latent.shape == reference.shape and torch.isfinite(latent).all(), (part, layout)
            errors[f"{part}-{layout}"] = relative_error(latent, reference)
    print("expert switch: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert all(error < 1e-3 for error in errors.values()), errors
    # the low-noise expert's part matters: the high-noise expert's leftover alone is far from the result
    assert relative_error(saved_latent(comfy_host, executed, "save_stock_high"),
                          saved_latent(comfy_host, executed, "save_stock_low")) > 1e-2
