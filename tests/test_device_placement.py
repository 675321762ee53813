"""Every engine with the model on another device than the request's tensors (``placement.py``): no
CPU/device mix-up anywhere, the latent and previews come back on the CPU in ComfyUI's shapes.

The model sits on ``meta``; each rank of a layout runs alone over a fake process group.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef

from placement import generate_on_meta

MODEL = ModelRef("tiny:flux")
LATENT = (2, 16, 16, 16)  # batch 2, 64 tokens

LAYOUTS = {
    "serial": ParallelConfig(),
    "ulysses2": ParallelConfig(ulysses_degree=2),
    "ring2": ParallelConfig(ring_degree=2),
    "cfg2": ParallelConfig(cfg_degree=2),
    "cfg2-ring2-ulysses2": ParallelConfig(cfg_degree=2, ring_degree=2, ulysses_degree=2),
    "pipefusion2": ParallelConfig(pipefusion_degree=2, num_patches=4, warmup_steps=1),
    "pipefusion2-cfg2": ParallelConfig(cfg_degree=2, pipefusion_degree=2, num_patches=2, warmup_steps=1),
    "pipefusion4-ulysses2": ParallelConfig(pipefusion_degree=4, ulysses_degree=2, num_patches=4, warmup_steps=2),
    "pipefusion2-ring2": ParallelConfig(pipefusion_degree=2, ring_degree=2, num_patches=2, warmup_steps=1),
}
CASES = [(name, rank) for name, config in LAYOUTS.items() for rank in range(config.world_size)]


@pytest.fixture(scope="module")
def meta_model():
    return load_model(MODEL, device="meta")


def request(parallel: ParallelConfig, sampler: str) -> GenerationRequest:
    positive, negative = tiny_conditioning(MODEL, 0)
    return GenerationRequest(MODEL, torch.zeros(LATENT), positive, negative, seed=1, steps=3, cfg=2.0,
                             sampler=sampler, parallel=parallel)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("layout,rank", CASES, ids=[f"{n}-rank{r}" for n, r in CASES])
def test_model_on_another_device(meta_model, layout: str, rank: int, sampler: str) -> None:
    events = []
    latent = generate_on_meta(meta_model, request(LAYOUTS[layout], sampler), rank, on_step=events.append)
    assert latent.device.type == "cpu" and tuple(latent.shape) == LATENT and latent.dtype == torch.float32
    for event in events:
        assert event.preview is None or event.preview.device.type == "cpu", event


def test_the_mode_catches_a_mix_up(meta_model) -> None:
    """The probe of the review: tokens kept on the CPU next to a velocity from the device."""
    from comfyui_xdit.sampling import denoised_from

    with pytest.raises(RuntimeError, match="not on the expected device"):
        denoised_from(torch.zeros(1, 4, 64), torch.tensor(0.5), torch.zeros(1, 4, 64, device="meta"))
