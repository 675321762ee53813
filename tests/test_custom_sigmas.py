"""A custom SIGMAS schedule replaces steps / scheduler / denoise (as SamplerCustom), serial and parallel."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.parallel.launch import generate_local_many, stop_helper_processes
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sampling import model_sampling_for
from comfyui_xdit.sigmas import sampling_sigmas

MODEL = ModelRef("tiny:flux")


@pytest.fixture(scope="module", autouse=True)
def _no_helpers_left():
    yield
    stop_helper_processes()


def request(**overrides) -> GenerationRequest:
    positive, negative = tiny_conditioning(MODEL, seed=2)
    options = dict(seed=9, steps=4, cfg=2.0, sampler="dpmpp_2m") | overrides
    return GenerationRequest(MODEL, torch.zeros(1, 16, 16, 16), positive, negative, **options)


def test_sigmas_of_a_scheduler_give_that_schedulers_result_bit_for_bit() -> None:
    adapter = load_model(MODEL)
    by_scheduler = request(scheduler="karras", denoise=0.75)
    sigmas = sampling_sigmas(model_sampling_for(adapter, by_scheduler), "karras", 4, 0.75)
    custom = request(scheduler="simple", steps=30, sigmas=sigmas)  # steps / scheduler / denoise ignored
    assert custom.sampling_steps == len(sigmas) - 1
    assert torch.equal(Engine(adapter).generate(custom), Engine(adapter).generate(by_scheduler))


@pytest.mark.parametrize("bad,match", [(torch.ones(2, 3), "1-D schedule"), (torch.tensor([1.0]), "at least 2"),
                                       (torch.tensor([1.0, float("nan")]), "finite"),
                                       (torch.tensor([0.5, -0.1]), "not negative")])
def test_unusable_sigmas_are_refused(bad: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        request(sigmas=bad)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "res_multistep", "euler_ancestral"])
def test_parallel_modes_take_custom_sigmas(sampler: str) -> None:
    sigmas = torch.tensor([1.0, 0.7, 0.45, 0.2, 0.0])
    serial = Engine(load_model(MODEL)).generate(request(sigmas=sigmas, sampler=sampler))
    layouts = [ParallelConfig(ulysses_degree=2), ParallelConfig(pipefusion_degree=2, num_patches=2, warmup_steps=4)]
    results = generate_local_many([dataclasses.replace(request(sigmas=sigmas, sampler=sampler), parallel=p)
                                   for p in layouts], timeout=300)
    for layout, result in zip(layouts, results):
        torch.testing.assert_close(result.latent, serial, rtol=1e-4, atol=1e-4, msg=layout.describe())
