"""Inputs that do not fit the model are refused before any rank runs, naming what to change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.input_checks import CLI_INPUTS, NODE_INPUTS, check_inputs
from comfyui_xdit.models.flux_checkpoint import COMFY_MIN_FLUX, TINY_FLUX

FLUX = COMFY_MIN_FLUX  # T5 width 4096, pooled 768: the real Flux widths


def cond(width: int = 4096, pooled: int = 768, batch: int = 1) -> Conditioning:
    return Conditioning(torch.randn(batch, 8, width), torch.randn(batch, pooled))


def latent(channels: int = 16, h: int = 16, w: int = 16, batch: int = 1, value: float = 0.5) -> torch.Tensor:
    return torch.full((batch, channels, h, w), value)


def test_fitting_inputs_pass() -> None:
    check_inputs(FLUX, latent(), cond(), cond(), NODE_INPUTS)
    check_inputs(FLUX, latent(channels=4, value=0.0), cond(), None, NODE_INPUTS)  # empty latent: widened later


@pytest.mark.parametrize("width,pooled,expect", [
    (2048, 1280, "looks like CLIP-L + CLIP-G (SDXL)"),
    (768, 768, "looks like CLIP-L (SD1.5)"),
    (4096, 1280, "pooled vector has width 1280 (looks like CLIP-G)"),
])
def test_wrong_text_encoder_names_the_node_to_change(width: int, pooled: int, expect: str) -> None:
    with pytest.raises(ValueError) as info:
        check_inputs(FLUX, latent(), cond(width, pooled), None, NODE_INPUTS)
    message = str(info.value)
    assert expect in message and "xDiT Sampler's positive input" in message and "DualCLIPLoader" in message, message


def test_negative_is_checked_too() -> None:
    with pytest.raises(ValueError, match="xDiT Sampler's negative input: text tokens have width 2048"):
        check_inputs(FLUX, latent(), cond(), cond(2048, 1280), NODE_INPUTS)


def test_wrong_latent_channels_and_sizes() -> None:
    with pytest.raises(ValueError, match="the latent has 4 channels .* EmptySD3LatentImage"):
        check_inputs(FLUX, latent(channels=4), cond(), None, NODE_INPUTS)
    with pytest.raises(ValueError, match=r"image size 120x128 px .* divisible by 16, e.g. 112x128"):
        check_inputs(FLUX, latent(h=16, w=15), cond(), None, NODE_INPUTS)
    with pytest.raises(ValueError, match="expected an image LATENT"):
        check_inputs(FLUX, torch.zeros(1, 16, 4, 16, 16), cond(), None, NODE_INPUTS)


def test_conditioning_batch_must_divide_the_latent_batch() -> None:
    check_inputs(FLUX, latent(batch=4), cond(batch=2), None, NODE_INPUTS)
    with pytest.raises(ValueError, match="batch 3, which does not divide the latent batch 4"):
        check_inputs(FLUX, latent(batch=4), cond(batch=3), None, NODE_INPUTS)


def test_cli_names_its_flags() -> None:
    with pytest.raises(ValueError, match="--cond's positive_context/positive_pooled: text tokens have width 2048"):
        check_inputs(FLUX, latent(), cond(2048, 1280), None, CLI_INPUTS)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comfyui_xdit.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_refuses_a_cond_file_of_the_wrong_shapes(tmp_path: Path) -> None:
    model = tmp_path / "tiny.safetensors"
    assert cli("make-tiny", "flux", str(model)).returncode == 0
    base = ["generate", "--model", str(model), "--steps", "1", "--height", "64", "--width", "64", "--in-process",
            "--out", str(tmp_path / "out.safetensors")]
    wrong_width = tmp_path / "sdxl.safetensors"
    save_file({"positive_context": torch.zeros(1, 8, 2048), "positive_pooled": torch.zeros(1, 1280)}, wrong_width)
    proc = cli(*base, "--cond", str(wrong_width))
    assert proc.returncode == 2 and "text tokens have width 2048" in proc.stderr, proc.stderr
    assert f"width {TINY_FLUX.joint_attention_dim}" in proc.stderr and "Traceback" not in proc.stderr
    flat = tmp_path / "flat.safetensors"
    save_file({"positive_context": torch.zeros(8, 64), "positive_pooled": torch.zeros(1, 32)}, flat)
    proc = cli(*base, "--cond", str(flat))
    assert proc.returncode == 2 and "must be (batch, tokens, dim)" in proc.stderr, proc.stderr
    half = tmp_path / "half.safetensors"
    save_file({"positive_context": torch.zeros(1, 8, 64), "positive_pooled": torch.zeros(1, 32),
               "negative_context": torch.zeros(1, 8, 64)}, half)
    proc = cli(*base, "--cond", str(half), "--cfg", "2")
    # Flux needs the negative's pooled vector too: the family's check names the width and the text encoders
    assert proc.returncode == 2 and "negative_pooled: the pooled vector has width 0" in proc.stderr, proc.stderr
    assert not (tmp_path / "out.safetensors").exists()
