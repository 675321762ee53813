"""PipeFusion on gloo CPU ranks against serial sampling and against its single-process reference.

(a) warmup_steps == steps is serial sampling pipelined: equal to the serial loop within 1e-4.
(b) warmup_steps < steps: equal to ``pipefusion_reference`` (same patches, same stale K/V, same
    patch-wise sampler steps) within 1e-4.
(c) the approximation's quality against serial sampling is tested in ``test_pipefusion_quality.py``.
Plus the bytes each stage sends per step against the formulas, step events on rank 0, and cancel.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.distributed as dist

from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.parallel.launch import run_ranks, stop_helper_processes
from comfyui_xdit.parallel.pipefusion import check_pipefusion
from comfyui_xdit.parallel.pipefusion_reference import pipefusion_reference
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sampling import GenerationCancelled, prepare_plan, run_loop

MODEL = ModelRef("tiny:flux")  # 8 heads x 32, 2 double + 2 single blocks
STEPS = 5
LATENT = (1, 16, 16, 16)  # 8 x 8 = 64 image tokens
TEXT_LEN, HIDDEN, LATENT_CHANNELS = 8, 256, 64


@pytest.fixture(scope="module", autouse=True)
def _stop_helpers():
    yield
    stop_helper_processes()


def request(parallel: ParallelConfig, cfg: float = 1.0, sampler: str = "euler", steps: int = STEPS,
            batch: int = 1) -> GenerationRequest:
    positive, negative = tiny_conditioning(MODEL, 0, text_len=TEXT_LEN)
    return GenerationRequest(MODEL, torch.zeros(batch, *LATENT[1:]), positive, negative, seed=7, steps=steps, cfg=cfg,
                             sampler=sampler, parallel=parallel)


def pf(degree: int, patches: int, warmup: int, cfg_degree: int = 1) -> ParallelConfig:
    return ParallelConfig(cfg_degree=cfg_degree, pipefusion_degree=degree, num_patches=patches, warmup_steps=warmup)


def pipefusion_ranks(rank: int, world_size: int, requests: list[GenerationRequest],
                     stop_at: Optional[int] = None) -> list[tuple]:
    """Rank body: every request through ``PipeFusionLoop``; rank 0 gets every rank's byte counts."""
    from comfyui_xdit.parallel.comm import CommCounter
    from comfyui_xdit.parallel.mesh import Mesh
    from comfyui_xdit.parallel.pipefusion import PipeFusionLoop

    adapter = load_model(MODEL)
    out = []
    for req in requests:
        counter, events = CommCounter(), []
        loop = PipeFusionLoop(adapter, req.parallel, Mesh.build(req.parallel, rank), counter)
        should_stop = (lambda step: step >= stop_at) if stop_at is not None and rank == 0 else None
        try:
            x = loop.run(prepare_plan(adapter, req), on_step=lambda e: events.append(e.step) if rank == 0 else None,
                         should_stop=should_stop)
        except GenerationCancelled:
            x = None
        counts: list = [None] * world_size
        dist.all_gather_object(counts, counter.per_step())
        out.append((x, events, counts))
    return out


def serial(req: GenerationRequest) -> torch.Tensor:
    adapter = load_model(MODEL)
    plan = prepare_plan(adapter, req)
    return run_loop(adapter, plan, lambda x, sigma, cond: adapter.velocity(x, plan.image_ids, cond, sigma))


def reference(req: GenerationRequest) -> torch.Tensor:
    adapter = load_model(MODEL)
    return pipefusion_reference(adapter, prepare_plan(adapter, req), req.parallel.patches, req.parallel.warmup_steps)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def expected_stage_bytes(req: GenerationRequest, stage: int, step: int) -> int:
    """PipeFusion bytes a stage sends in one step (fp32): one patch of activations per patch per branch
    forward, and Flux's text stream once a step (with the step's first patch, ``pipefusion_text.py``); from
    the last stage, the updated patches and the step's preview back to stage 0."""
    par = req.parallel
    batch, tokens = req.latent.shape[0], (LATENT[2] // 2) * (LATENT[3] // 2)
    branches = 2 if req.uses_cfg and par.cfg_degree == 1 else 1
    if stage < par.pipefusion_degree - 1:
        return branches * 4 * batch * HIDDEN * (tokens + TEXT_LEN)
    sent = 4 * batch * LATENT_CHANNELS * tokens if step < req.steps - 1 else 0
    return sent + 4 * LATENT[1] * LATENT[2] * LATENT[3]  # preview: first image, small enough not to be pooled


def check_bytes(req: GenerationRequest, counts: list[dict]) -> None:
    par = req.parallel
    stage_of = [r % par.pipefusion_degree for r in range(par.world_size)]  # ranks (cfg, pipefusion), ring = ulysses = 1
    for rank, per_step in enumerate(counts):
        for step in range(req.steps):
            assert per_step[step]["pipefusion"] == expected_stage_bytes(req, stage_of[rank], step), (rank, step)
            items = 1 if step < par.warmup_steps else par.patches
            assert per_step[step]["control"] == 4 * items  # the stop vote, one per work item
        if stage_of[rank] == par.pipefusion_degree - 1 and par.cfg_degree == 2:
            latent_bytes = 4 * req.latent.shape[0] * LATENT_CHANNELS * (LATENT[2] // 2) * (LATENT[3] // 2)
            assert all(per_step[s]["cfg"] == latent_bytes for s in range(req.steps))  # one latent per step


WORLD2 = [request(pf(2, 2, STEPS)),  # (a)
          request(pf(2, 2, 2)),  # (b)
          request(pf(2, 4, 1), cfg=3.0, sampler="dpmpp_2m", batch=2)]  # (b), patches > stages, both branches
WORLD4 = [request(pf(4, 4, STEPS), cfg=3.0),  # (a)
          request(pf(4, 8, 1), sampler="dpmpp_2m"),  # (b), patches > stages
          request(pf(2, 2, STEPS, cfg_degree=2), cfg=3.0),  # (a) with CFG parallel
          request(pf(2, 4, 2, cfg_degree=2), cfg=3.0, sampler="dpmpp_2m")]  # (b) with CFG parallel


@pytest.mark.parametrize("world,cases", [(2, WORLD2), (4, WORLD4)], ids=["world2", "world4"])
def test_pipefusion_equals_serial_and_reference(world: int, cases: list[GenerationRequest]) -> None:
    results = run_ranks(world, pipefusion_ranks, (cases,), timeout=240)
    for req, (x, events, counts) in zip(cases, results):
        label = req.parallel.describe()
        if req.parallel.warmup_steps >= req.steps:
            assert_close(x, serial(req))
        else:
            assert_close(x, reference(req))
            assert (x - serial(req)).abs().max() > 1e-3, f"{label}: stale K/V should differ from serial"
        assert events == list(range(1, req.steps + 1)), label
        check_bytes(req, counts)


@pytest.mark.parametrize("world,parallel", [(2, pf(2, 2, 1)), (2, pf(2, 4, 8)), (4, pf(4, 4, 1))],
                         ids=["patches", "warm-up", "four-stages"])
def test_cancel_stops_every_rank_within_the_step(world: int, parallel: ParallelConfig) -> None:
    """Asked before step 3: every rank stops before step 3 ends, as the serial loop does (the vote lags
    stages - 1 patches, less than a step; whole-latent steps are honoured at once)."""
    cases = [request(parallel, steps=8)]
    (x, events, counts), *_ = run_ranks(world, pipefusion_ranks, (cases, 3), timeout=240)
    assert x is None
    assert events == [1, 2, 3]


def test_loop_refuses_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="pipefusion_degree <= 4"):
        check_pipefusion(ParallelConfig(pipefusion_degree=8), 4)
    with pytest.raises(ValueError, match="sequence-parallel loop"):
        check_pipefusion(ParallelConfig(ulysses_degree=2), 4)
    check_pipefusion(ParallelConfig(pipefusion_degree=2, ring_degree=2, ulysses_degree=2), 4)  # hybrid is fine


def test_reference_with_one_patch_is_serial() -> None:
    req = request(pf(2, 2, 1), cfg=3.0, sampler="dpmpp_2m")
    adapter = load_model(MODEL)
    torch.testing.assert_close(pipefusion_reference(adapter, prepare_plan(adapter, req), 1, 1), serial(req),
                               rtol=0, atol=0)
