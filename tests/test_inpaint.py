"""Noise mask and batch_index in every parallel mode: equal to the serial engine (which equals stock
ComfyUI, tests/test_same_seed_as_comfyui.py), and PipeFusion after warm-up equal to its reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfyui_xdit.engine import Engine
from comfyui_xdit.inpaint import mask_to_latent
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.parallel.launch import generate_local_many, stop_helper_processes
from comfyui_xdit.parallel.pipefusion_reference import pipefusion_reference
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sampling import finish, prepare_plan

MODEL = ModelRef("tiny:flux")
STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def _no_helpers_left():
    yield
    stop_helper_processes()


def masked_request(sampler: str = "dpmpp_2m", **overrides) -> GenerationRequest:
    positive, negative = tiny_conditioning(MODEL, seed=4)
    mask = torch.zeros(1, 128, 128)
    mask[:, 40:, :] = 1.0  # repaint the lower part; the band boundary falls inside a PipeFusion patch
    image = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    options = dict(seed=21, steps=STEPS, cfg=2.0, sampler=sampler, noise_mask=mask, batch_index=(3, 1)) | overrides
    return GenerationRequest(MODEL, image, positive, negative, **options)


def test_mask_follows_comfyui_reshape() -> None:
    mask = mask_to_latent(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]), (3, 16, 4, 4))  # (1, 2, 2) pixels
    assert mask.shape == (3, 16, 4, 4) and torch.equal(mask[0], mask[2]) and torch.equal(mask[:, 0], mask[:, 15])
    assert float(mask[0, 0, 0, 0]) == 0.0 and float(mask[0, 0, 0, 3]) == 1.0


def test_kept_region_stays_the_input_latent() -> None:
    request = masked_request(noise_mask=torch.zeros(1, 128, 128))  # keep everything
    out = Engine(load_model(MODEL)).generate(request)
    torch.testing.assert_close(out, request.latent, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde"])
def test_every_parallel_mode_equals_serial_with_a_mask(sampler: str) -> None:
    serial = Engine(load_model(MODEL)).generate(masked_request(sampler))
    layouts = [ParallelConfig(ulysses_degree=2), ParallelConfig(ring_degree=2), ParallelConfig(cfg_degree=2),
               ParallelConfig(pipefusion_degree=2, num_patches=2, warmup_steps=STEPS)]
    results = generate_local_many([dataclasses.replace(masked_request(sampler), parallel=p) for p in layouts],
                                  timeout=400)
    for layout, result in zip(layouts, results):
        torch.testing.assert_close(result.latent, serial, rtol=1e-4, atol=1e-4, msg=layout.describe())


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ipndm_v", "euler_ancestral", "lcm", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"])
def test_pipefusion_after_warmup_equals_its_reference_with_a_mask(sampler: str) -> None:
    layout = ParallelConfig(pipefusion_degree=2, num_patches=4, warmup_steps=1)
    request = dataclasses.replace(masked_request(sampler), parallel=layout)
    adapter = load_model(MODEL)
    plan = prepare_plan(adapter, request)
    reference = finish(adapter, plan, pipefusion_reference(adapter, plan, num_patches=4, warmup_steps=1))
    (result,) = generate_local_many([request], timeout=400)
    torch.testing.assert_close(result.latent, reference, rtol=1e-4, atol=1e-4)
