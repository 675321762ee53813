"""The nodes' pure pieces without ComfyUI: conversions, widget checks, the job relay loop."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from comfyui_xdit.models.flux_checkpoint import FluxSpec, write_random_flux
from comfyui_xdit.sampling import StepEvent

from nodes_package import nodes_module

convert = nodes_module("convert")
validation = nodes_module("validation")
progress = nodes_module("progress")
handles = nodes_module("handles")


def flux_cond(guidance=3.5, **extra):
    return [[torch.randn(1, 8, 4096), {"pooled_output": torch.randn(1, 768), "guidance": guidance, **extra}]]


def test_conditioning_conversion() -> None:
    cond = convert.to_conditioning(flux_cond(2.0), "positive")
    assert cond.context.shape == (1, 8, 4096) and cond.pooled.shape == (1, 768) and cond.guidance == 2.0
    value = flux_cond()
    del value[0][1]["guidance"]
    assert convert.to_conditioning(value, "positive").guidance == 3.5  # ComfyUI's Flux default
    assert convert.to_conditioning(flux_cond(None), "positive").guidance is None  # FluxDisableGuidance


@pytest.mark.parametrize("value, words", [
    (flux_cond() + flux_cond(), "one conditioning entry"),
    (flux_cond(area=(8, 8, 0, 0)), "area"),
    ("text", "CONDITIONING"),
])
def test_conditioning_refused_with_the_fix(value, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        convert.to_conditioning(value, "positive")


def test_conditioning_without_a_pooled_vector_is_the_familys_to_judge() -> None:
    """Qwen-Image's and PixArt's text encoders give no pooled_output; a Flux model then says which encoder."""
    from comfyui_xdit.input_checks import NODE_INPUTS, check_inputs
    from comfyui_xdit.models.families import TINY_SPECS

    cond = convert.to_conditioning([[torch.randn(1, 8, 64), {}]], "positive")
    assert cond.pooled.shape == (1, 0)
    check_inputs(TINY_SPECS["qwen-image"], torch.zeros(1, 16, 8, 8), cond, None, NODE_INPUTS)
    with pytest.raises(ValueError, match="pooled vector has width 0.*DualCLIPLoader"):
        check_inputs(TINY_SPECS["flux"], torch.zeros(1, 16, 8, 8), cond, None, NODE_INPUTS)


def test_a_time_axis_of_one_frame_comes_off_and_back_on() -> None:
    """Qwen-Image's LATENT (Wan VAE) is (B, C, 1, H, W): sampled as an image, returned as KSampler returns it."""
    latent = {"samples": torch.zeros(1, 16, 1, 8, 8)}
    assert convert.to_latent_tensor(latent).shape == (1, 16, 8, 8)
    assert convert.to_latent_output(latent, torch.ones(1, 16, 8, 8), latent_dimensions=3)["samples"].shape == \
        (1, 16, 1, 8, 8)
    assert convert.to_latent_output(latent, torch.ones(1, 16, 8, 8))["samples"].shape == (1, 16, 8, 8)
    with pytest.raises(ValueError, match="video latents"):
        convert.to_latent_tensor({"samples": torch.zeros(1, 16, 5, 8, 8)})


def test_latent_conversion_keeps_the_input_untouched() -> None:
    latent = {"samples": torch.zeros(1, 16, 16, 16), "extra": 1}
    out = convert.to_latent_output(latent, torch.ones(1, 16, 16, 16))
    assert latent["samples"].sum() == 0 and out["samples"].sum() > 0 and out["extra"] == 1
    assert convert.image_tokens(latent["samples"]) == 64
    masked = {"samples": torch.zeros(2, 16, 8, 8), "noise_mask": torch.ones(1, 1, 64, 64), "batch_index": [3, 1]}
    assert convert.latent_noise_mask(masked).shape == (1, 1, 64, 64) and convert.latent_batch_index(masked) == (3, 1)
    assert convert.latent_noise_mask(latent) is None and convert.latent_batch_index(latent) is None


@pytest.fixture(scope="module")
def flux_header_file(tmp_path_factory) -> Path:
    """A narrow Flux with 24 heads (of width 32) and 2 blocks: the header is all validation reads."""
    path = tmp_path_factory.mktemp("models") / "flux-header.safetensors"
    spec = FluxSpec(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=24,
                    joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True)
    write_random_flux(path, spec, dtype=torch.float16)
    return path


def degrees(**overrides) -> dict:
    base = dict(ulysses_degree=1, ring_degree=1, pipefusion_degree=1, num_patches=0, warmup_steps=1,
                cfg_parallel=False)
    return {**base, **overrides}


def test_check_config_accepts_good_degrees(flux_header_file: Path) -> None:
    for good in (degrees(), degrees(ulysses_degree=3, ring_degree=2), degrees(pipefusion_degree=2, num_patches=4),
                 degrees(cfg_parallel=True, ulysses_degree=8), degrees(data_degree=2, ulysses_degree=2)):
        assert validation.check_config(str(flux_header_file), "f", **good) is None, good
    assert validation.parallel_config(**degrees(cfg_parallel=True, pipefusion_degree=2)).world_size == 4
    assert validation.parallel_config(**degrees(data_degree=3, ulysses_degree=2)).world_size == 6
    assert validation.parallel_config(**degrees()).data_degree == 1  # a workflow saved without the widget


@pytest.mark.parametrize("bad, words", [
    (degrees(ulysses_degree=5), ["ulysses_degree 5", "24 attention heads", "ring_degree"]),
    (degrees(pipefusion_degree=2, num_patches=1), ["num_patches", "at least"]),
    (degrees(num_patches=-1), ["num_patches"]),
    (degrees(ring_degree=0), ["ring_degree", "between 1"]),
    (degrees(data_degree=0), ["data_degree", "between 1"]),
    (degrees(warmup_steps=-1), ["warmup_steps"]),
    (degrees(pipefusion_degree=4), ["pipefusion_degree 4", "2 transformer blocks", "ulysses_degree"]),
])
def test_check_config_names_the_fix(flux_header_file: Path, bad: dict, words: list[str]) -> None:
    message = validation.check_config(str(flux_header_file), "f", **bad)
    assert message is not None and all(w in message for w in words), message


def test_check_config_missing_file() -> None:
    message = validation.check_config(None, "nope.safetensors", **degrees())
    assert "models/diffusion_models" in message


def test_check_address_and_dtype() -> None:
    for ok in ("", "  ", "auto", "10.0.0.2:6379", "ray://head:10001", "head.local:6379"):
        assert validation.check_address(ok) is None, ok
    for bad in ("10.0.0.2", "head:port", ":6379", "head:70000"):
        assert "HOST:PORT" in validation.check_address(bad), bad
    remote = handles.PoolHandle(address="10.0.0.2:6379")
    assert validation.resolve_dtype("default", remote) == "bf16"
    assert validation.resolve_dtype("fp16", handles.PoolHandle()) == "fp16"


class FakeJob:
    """Enough of workers.Job for the relay loop: events, wait, result, cancel."""

    def __init__(self, events, stop_after=None) -> None:
        self._events = list(events)
        self._done = threading.Event()
        self.cancelled = False
        self.stop_after = stop_after
        self.latent = torch.ones(1, 16, 2, 2)

    def poll_events(self):
        out, self._events = self._events[:1], self._events[1:]
        if not self._events and self.stop_after is None:
            self._done.set()
        return out

    def wait(self, timeout=None) -> bool:
        return self._done.wait(0.001)

    def cancel(self) -> None:
        self.cancelled = True
        self._done.set()

    def result(self, timeout=None):
        return self.latent


def test_drive_job_relays_every_event_and_returns_the_latent() -> None:
    events = [StepEvent(i, 3) for i in (1, 2, 3)]
    seen = []
    job = FakeJob(events)
    latent = progress.drive_job(job, seen.append, interrupted=lambda: False, on_interrupt=lambda: None, poll_s=0)
    assert [e.step for e in seen] == [1, 2, 3] and latent is job.latent


def test_drive_job_cancels_on_interrupt() -> None:
    class Interrupted(Exception):
        pass

    def raise_interrupt() -> None:
        raise Interrupted()

    job = FakeJob([StepEvent(1, 100)], stop_after=1)
    with pytest.raises(Interrupted):
        progress.drive_job(job, lambda e: None, interrupted=lambda: True, on_interrupt=raise_interrupt, poll_s=0)
    assert job.cancelled


def test_gpus_widget_checks() -> None:
    assert validation.check_gpus("auto", "") is None and validation.check_gpus("", "") is None
    assert validation.check_gpus(" 1, 2 ", "") is None and validation.check_gpus("all", "") is None
    assert "GPU numbers such as 1,2,3" in validation.check_gpus("gpu0", "")
    assert "twice" in validation.check_gpus("1,1", "")
    assert "embedded pool only" in validation.check_gpus("1,2", "10.0.0.1:6379")
    assert validation.check_gpus("auto", "10.0.0.1:6379") is None
    assert validation.normal_gpus(" 1, 2 ") == "1,2" and validation.normal_gpus("") == "auto"
    assert handles.PoolHandle(gpus="1,2").describe() == "embedded local Ray, gpus 1,2"


def test_every_family_has_its_comfyui_latent_format_and_model_class() -> None:
    """Previews use the family's own latent format; XDiTParallelModel knows each family's ComfyUI model."""
    from comfy_reference import import_comfy
    from comfyui_xdit.models.families import FAMILIES

    ids = {family.id for family in FAMILIES}
    assert set(progress.COMFY_LATENT_FORMATS) == ids
    model_patches = nodes_module("model_patches")
    assert set(model_patches.COMFY_MODEL_FAMILIES.values()) | model_patches.LOADER_ONLY_FAMILIES == ids
    latent_formats, supported = import_comfy("comfy.latent_formats"), import_comfy("comfy.supported_models")
    for comfy_model, family in nodes_module("model_patches").COMFY_MODEL_FAMILIES.items():
        config = getattr(supported, comfy_model, None)
        expected = progress.COMFY_LATENT_FORMATS[family]
        assert config is not None and config.latent_format is getattr(latent_formats, expected), (comfy_model, family)


def test_a_video_preview_shows_frames_from_first_to_last_side_by_side() -> None:
    video_preview = nodes_module("video_preview")
    x0 = torch.arange(9, dtype=torch.float32).view(1, 1, 9, 1, 1).expand(1, 2, 9, 3, 2)  # frame t holds t
    strip = video_preview.frame_strip(x0)
    assert strip.shape == (1, 2, 1, 3, 8)  # 4 frames of width 2
    assert strip[0, 0, 0, 0].tolist() == [0, 0, 3, 3, 5, 5, 8, 8]  # frames 0, 3, 5, 8
    assert torch.equal(video_preview.frame_strip(x0[:, :, :2]), torch.cat([x0[:, :, :1], x0[:, :, 1:2]], dim=4))
    image = torch.zeros(1, 16, 8, 8)
    assert video_preview.frame_strip(image) is image and video_preview.frame_strip(x0[:, :, :1]).shape == (1, 2, 1, 3, 2)
