"""Data parallelism over the batch (data_degree): each data group samples its chunk of the images, with every
inner layout, and the gathered batch equals the serial engine (which equals stock ComfyUI)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.parallel.data_parallel import batch_rows, gather_rows
from comfyui_xdit.parallel.engine import ParallelEngine
from comfyui_xdit.parallel.launch import generate_local_many, run_ranks, stop_helper_processes
from comfyui_xdit.parallel.mesh import Mesh
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sampling import GenerationCancelled, prepare_plan

MODEL = ModelRef("tiny:flux")
STEPS = 4
SAMPLERS = ("euler_ancestral", "dpmpp_2m_sde")  # both draw noise while sampling


@pytest.fixture(scope="module", autouse=True)
def _no_helpers_left():
    yield
    stop_helper_processes()


def masked_request(sampler: str, batch: int = 3, **overrides) -> GenerationRequest:
    """tests/test_inpaint.py's request with a batch of three: a noise mask, and a batch_index."""
    positive, negative = tiny_conditioning(MODEL, seed=4)
    mask = torch.zeros(1, 128, 128)
    mask[:, 40:, :] = 1.0
    image = torch.randn(batch, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    options = dict(seed=21, steps=STEPS, cfg=2.0, sampler=sampler, noise_mask=mask,
                   batch_index=(3, 1, 0)[:batch]) | overrides
    return GenerationRequest(MODEL, image, positive, negative, **options)


def test_batch_rows_are_tensor_split_chunks() -> None:
    for batch in range(1, 8):
        for degree in range(1, batch + 1):
            chunks = torch.arange(batch).tensor_split(degree)
            assert [batch_rows(batch, degree, i) for i in range(degree)] == \
                [(int(c[0]), int(c[-1]) + 1) for c in chunks]
    with pytest.raises(ValueError, match="data_degree 3 needs a batch of at least 3 images"):
        batch_rows(2, 3, 0)
    x = torch.randn(3, 4, 2)
    assert gather_rows(x, 3, None, 1, None) is x


def test_plan_rows_cut_tokens_mask_conditioning_and_noise() -> None:
    adapter = load_model(MODEL)
    request = masked_request("euler_ancestral")
    whole = prepare_plan(adapter, request)
    part = whole.rows(1, 3)
    assert torch.equal(part.x, whole.x[1:3]) and torch.equal(part.inpaint.mask, whole.inpaint.mask[1:3])
    assert torch.equal(part.inpaint.noise, whole.inpaint.noise[1:3]) and part.positive is whole.positive
    torch.testing.assert_close(part.step_noise(torch.device("cpu"))(0), whole.step_noise(torch.device("cpu"))(0)[1:3])
    batched = Conditioning(torch.arange(3.0).reshape(3, 1, 1), torch.arange(3.0).reshape(3, 1))
    assert batched.rows(3, 1, 3).pooled.flatten().tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="already holds rows"):
        part.rows(0, 1)


def test_too_small_batch_is_refused() -> None:
    parallel = ParallelConfig(data_degree=2)
    engine = ParallelEngine(load_model(MODEL), parallel, Mesh(parallel, 0, {}))  # refused before any collective
    request = dataclasses.replace(masked_request("euler_ancestral", batch=1), parallel=parallel)
    with pytest.raises(ValueError, match=r"data_degree 2 needs a batch of at least 2 images.*lower data_degree "
                                         r"\(--data-degree\) or raise batch_size"):
        engine.generate(request)


def test_every_layout_with_data_groups_equals_serial() -> None:
    serial = {sampler: Engine(load_model(MODEL)).generate(masked_request(sampler)) for sampler in SAMPLERS}
    pairs = [ParallelConfig(data_degree=2)]
    quads = [ParallelConfig(data_degree=2, ulysses_degree=2), ParallelConfig(data_degree=2, cfg_degree=2),
             ParallelConfig(data_degree=2, pipefusion_degree=2, num_patches=2, warmup_steps=STEPS)]
    for layouts in (pairs, quads):  # one set of spawned ranks per world size
        requests = [dataclasses.replace(masked_request(sampler), parallel=layout)
                    for sampler in SAMPLERS for layout in layouts]
        results = generate_local_many(requests, timeout=500)
        for request, result in zip(requests, results):
            assert result.latent.shape == serial[request.sampler].shape
            torch.testing.assert_close(result.latent, serial[request.sampler], rtol=1e-4, atol=1e-4,
                                       msg=f"{request.sampler} {request.parallel.describe()}")
            assert any("data" in axes for axes in result.comm_bytes.values())  # the chunks were gathered


def cancel_on_rank_0(rank: int, world_size: int, requests: list[GenerationRequest]) -> list[list[str]]:
    """Rank body: only rank 0 is asked to stop (from step 1); every rank of every data group must stop."""
    import torch.distributed as dist

    from comfyui_xdit.parallel import create_engine

    outcomes = []
    for request in requests:
        mesh = Mesh.build(request.parallel, rank)
        engine = create_engine(load_model(MODEL), request.parallel, rank, mesh)
        try:
            engine.generate(request, should_stop=(lambda step: step >= 1) if rank == 0 else None)
            outcomes.append("finished")
        except GenerationCancelled:
            outcomes.append("cancelled")
        mesh.destroy()
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, outcomes)
    return gathered


def test_a_cancel_on_rank_0_stops_every_data_group() -> None:
    layouts = [ParallelConfig(data_degree=2, ulysses_degree=2),
               ParallelConfig(data_degree=2, pipefusion_degree=2, num_patches=2, warmup_steps=1)]
    requests = [dataclasses.replace(masked_request("euler_ancestral", steps=8), parallel=p) for p in layouts]
    assert run_ranks(4, cancel_on_rank_0, (requests,), timeout=400) == [["cancelled", "cancelled"]] * 4
