"""The CLI end to end: make-tiny, generate on tiny:flux and on a file with --cond, errors with exit 2."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_xdit.model_loader import tiny_conditioning
from comfyui_xdit.request import ModelRef


def _cli(*args, check=True):
    """Run the CLI; ``generate`` in-process (the pool path has its own tests in test_pool_cli.py)."""
    if args[0] == "generate":
        args = (*args, "--in-process")
    result = subprocess.run([sys.executable, "-m", "comfyui_xdit.cli", *args], capture_output=True, text=True,
                            timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen-image"])
def test_make_tiny_then_generate_from_file_equals_builtin(tmp_path, family):
    model = tmp_path / "tiny.safetensors"
    _cli("make-tiny", family, str(model))
    positive, negative = tiny_conditioning(ModelRef(f"tiny:{family}"), seed=5)
    cond = tmp_path / "cond.safetensors"
    save_file({"positive_context": positive.context, "positive_pooled": positive.pooled,
               "negative_context": negative.context, "negative_pooled": negative.pooled,
               "guidance": torch.tensor([positive.guidance])}, str(cond))
    common = ["--seed", "5", "--steps", "2", "--cfg", "2.0", "--height", "64", "--width", "96",
              "--sampler", "dpmpp_2m", "--scheduler", "beta"]
    _cli("generate", "--model", f"tiny:{family}", *common, "--out", str(tmp_path / "a.safetensors"))
    _cli("generate", "--model", str(model), "--cond", str(cond), *common, "--out", str(tmp_path / "b.safetensors"))
    a = load_file(str(tmp_path / "a.safetensors"))["samples"]
    b = load_file(str(tmp_path / "b.safetensors"))["samples"]
    assert a.shape == (1, 16, 8, 12)
    assert torch.equal(a, b)


def test_image_to_image_from_a_saved_latent(tmp_path):
    init = tmp_path / "init.safetensors"
    save_file({"samples": torch.randn(1, 16, 8, 8)}, str(init))
    _cli("generate", "--model", "tiny:flux", "--steps", "2", "--height", "64", "--width", "64", "--denoise", "0.5",
         "--init-latent", str(init), "--out", str(tmp_path / "out.safetensors"))
    assert load_file(str(tmp_path / "out.safetensors"))["samples"].shape == (1, 16, 8, 8)


def test_errors_are_one_line_with_exit_2(tmp_path):
    bad = _cli("generate", "--model", "tiny:flux", "--height", "100", "--width", "64", "--out",
               str(tmp_path / "x.safetensors"), check=False)
    assert bad.returncode == 2 and "multiples of 16" in bad.stderr and "Traceback" not in bad.stderr
    missing = _cli("generate", "--model", str(tmp_path / "none.safetensors"), "--cond", str(tmp_path / "c"),
                   "--height", "64", "--width", "64", "--out", str(tmp_path / "x.safetensors"), check=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    no_cond = _cli("generate", "--model", str(tmp_path / "m.safetensors"), "--height", "64", "--width", "64",
                   "--out", str(tmp_path / "x.safetensors"), check=False)
    assert no_cond.returncode == 2 and "--cond" in no_cond.stderr


def test_pipefusion_in_process_equals_serial_and_bad_stages_fail_before_ranks(tmp_path):
    common = ["--model", "tiny:flux", "--seed", "2", "--steps", "2", "--cfg", "2.0", "--height", "64", "--width", "64",
              "--in-process"]
    _cli("generate", *common, "--out", str(tmp_path / "serial.safetensors"))
    _cli("generate", *common, "--pipefusion", "2", "--ulysses", "2", "--patches", "4", "--warmup-steps", "2",
         "--out", str(tmp_path / "pf.safetensors"))
    serial = load_file(str(tmp_path / "serial.safetensors"))["samples"]
    torch.testing.assert_close(load_file(str(tmp_path / "pf.safetensors"))["samples"], serial, rtol=1e-4, atol=1e-4)
    bad = _cli("generate", *common, "--pipefusion", "8", "--out", str(tmp_path / "x.safetensors"), check=False)
    assert bad.returncode == 2 and "pipefusion_degree <= 4" in bad.stderr and "Traceback" not in bad.stderr
    assert "xdit-rank" not in bad.stderr  # refused here, not by a rank


def test_data_degree_splits_the_batch_and_a_small_batch_fails_before_ranks(tmp_path):
    common = ["--model", "tiny:flux", "--seed", "3", "--steps", "2", "--height", "64", "--width", "64",
              "--sampler", "euler_ancestral", "--in-process"]
    _cli("generate", *common, "--batch-size", "2", "--out", str(tmp_path / "serial.safetensors"))
    _cli("generate", *common, "--batch-size", "2", "--data-degree", "2", "--out", str(tmp_path / "dp.safetensors"))
    serial = load_file(str(tmp_path / "serial.safetensors"))["samples"]
    assert serial.shape == (2, 16, 8, 8)
    torch.testing.assert_close(load_file(str(tmp_path / "dp.safetensors"))["samples"], serial, rtol=1e-4, atol=1e-4)
    bad = _cli("generate", *common, "--data-degree", "2", "--out", str(tmp_path / "x.safetensors"), check=False)
    assert bad.returncode == 2 and "data_degree 2 needs a batch of at least 2 images" in bad.stderr
    assert "Traceback" not in bad.stderr and "xdit-rank" not in bad.stderr
