"""BFL-layout files: round trip, dtypes, ComfyUI prefix, and clear errors for files that are not Flux."""

import pytest
import torch
from safetensors.torch import save_file

from comfyui_xdit.model_loader import load_model
from comfyui_xdit.models.flux import FluxAdapter
from comfyui_xdit.models.flux_checkpoint import (TINY_FLUX, infer_flux_spec, random_bfl_state, read_checkpoint,
                                                 read_flux_spec as read_spec, write_random_flux)
from comfyui_xdit.request import ModelRef


def _velocity(adapter):
    g = torch.Generator().manual_seed(0)
    from comfyui_xdit.conditioning import Conditioning
    cond = Conditioning(torch.randn(1, 4, 64, generator=g), torch.randn(1, 32, generator=g))
    return adapter.velocity(torch.randn(1, 16, 64, generator=g), adapter.image_ids(8, 8), cond, torch.tensor([0.5]))


def test_file_round_trip_equals_tiny_model(tmp_path):
    path = tmp_path / "tiny.safetensors"
    write_random_flux(path, TINY_FLUX, seed=0)
    assert infer_flux_spec(read_checkpoint(path)) == TINY_FLUX
    from_file = load_model(ModelRef(str(path)))
    builtin = load_model(ModelRef("tiny:flux"))
    assert torch.equal(_velocity(from_file), _velocity(builtin))


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_files_load_in_requested_dtype(tmp_path, file_dtype):
    path = tmp_path / "half.safetensors"
    write_random_flux(path, TINY_FLUX, seed=0, dtype=file_dtype)
    adapter = FluxAdapter.from_file(path, dtype=torch.float32)
    assert adapter.dtype == torch.float32
    reference = FluxAdapter.from_state_dict(
        {k: v.to(file_dtype).float() for k, v in random_bfl_state(TINY_FLUX, 0).items()})
    assert torch.equal(_velocity(adapter), _velocity(reference))


def test_comfyui_checkpoint_prefix_is_stripped(tmp_path):
    state = {"model.diffusion_model." + k: v for k, v in random_bfl_state(TINY_FLUX, 0).items()}
    path = tmp_path / "prefixed.safetensors"
    save_file(state, str(path))
    assert infer_flux_spec(read_checkpoint(path)) == TINY_FLUX


def test_schnell_is_detected_by_missing_guidance(tmp_path):
    state = {k: v for k, v in random_bfl_state(TINY_FLUX, 0).items() if not k.startswith("guidance_in")}
    spec = infer_flux_spec(state)
    assert spec.guidance_embeds is False
    adapter = FluxAdapter.from_state_dict(state)
    assert type(adapter.default_sampling()).__name__ == "DiscreteFlowShift"


def test_not_a_family_we_run_names_what_was_found(tmp_path):
    path = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match=r"not a diffusion transformer we run \(Flux, SD3/SD3.5, Qwen-Image[^)]*\).*SD1.5/SDXL UNet"):
        load_model(ModelRef(str(path)))
    other = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.some.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ValueError, match=r"not a diffusion transformer we run.*found 1 tensors \(some.weight"):
        load_model(ModelRef(str(other)))


def test_truncated_file_is_a_clear_error(tmp_path):
    good = tmp_path / "good.safetensors"
    write_random_flux(good, TINY_FLUX)
    data = good.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(ModelRef(str(bad)))


def test_missing_file_and_wrong_shapes(tmp_path):
    with pytest.raises(ValueError, match="model file not found"):
        load_model(ModelRef(str(tmp_path / "nope.safetensors")))
    state = random_bfl_state(TINY_FLUX, 0)
    state["double_blocks.1.img_mlp.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"do not fit: double_blocks.1.img_mlp.0.weight: expected \(1024, 256\)"):
        infer_flux_spec(state)


def test_unknown_tiny_name_and_bad_dtype():
    with pytest.raises(ValueError, match="tiny:flux"):
        load_model(ModelRef("tiny:sd1"))
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        ModelRef("tiny:flux", dtype="fp8")


def test_gguf_is_refused_naming_the_safetensors_release(tmp_path):
    path = tmp_path / "flux1-dev-Q4_K_S.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    for read in (read_checkpoint, read_spec):
        with pytest.raises(ValueError, match="GGUF file.*use the .safetensors release"):
            read(path)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_files_load_upcast_exactly(tmp_path, fp8):
    """flux1-dev-fp8-style files: the Linear weights stay fp8 (upcast at each call, models/fp8_weights.py), the
    rest holds the fp8 values, exactly, in the compute dtype."""
    path = tmp_path / "tiny-fp8.safetensors"
    write_random_flux(path, TINY_FLUX, seed=2, dtype=fp8)
    stored = read_checkpoint(path)
    adapter = FluxAdapter.from_file(path, torch.float32)
    embedder = adapter.transformer.x_embedder
    assert stored["img_in.weight"].dtype == fp8 and embedder.weight.dtype == fp8 and adapter.dtype == torch.float32
    assert torch.equal(embedder.weight.float(), stored["img_in.weight"].float())
    assert embedder.bias.dtype == torch.float32 and torch.equal(embedder.bias, stored["img_in.bias"].float())
