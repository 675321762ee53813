"""PipeFusion through ``ParallelEngine`` in every product with CFG, ring and Ulysses parallel.

For every factorisation of 2, 4 and 8 ranks into cfg x pipefusion x ring x ulysses with pipefusion > 1
(tiny:flux has 4 blocks, so pipefusion <= 4; pipefusion 1 is ``test_parallel_engine.py``), plus some
with more patches than stages:

(a) warmup_steps == steps is serial sampling pipelined: the latent equals serial within 1e-4 relative;
(b) warmup_steps < steps equals the single-process ``pipefusion_reference`` (same patches, same stale
    K/V, same patch-wise sampler steps) within 1e-4 relative;

and every rank's bytes per axis per step equal the formulas in ``expected_bytes``. Each world size is
spawned once for all its requests.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import pytest
import torch
import torch.distributed as dist

from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.models.families import TINY_SPECS
from comfyui_xdit.parallel.launch import run_ranks
from comfyui_xdit.parallel.mesh import SEQUENCE_AXES, RankCoords
from comfyui_xdit.parallel.pipefusion_reference import pipefusion_reference
from comfyui_xdit.parallel.pipefusion_schedule import spec_stages
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sampling import finish, prepare_plan

from process_check import no_process_left

MODEL = ModelRef("tiny:flux")
HEADS, HEAD_DIM, BLOCKS, TEXT, HIDDEN, CHANNELS = 8, 32, 4, 8, 256, 64  # tiny:flux: 2 double + 2 single
LATENT = 16  # 16x16 latent -> 64 image tokens
TOKENS = (LATENT // 2) ** 2
STEPS = 3
FP32 = 4
PREVIEW_BYTES = FP32 * 16 * LATENT * LATENT  # the first image's x0 prediction as a 16-channel LATENT


def factorisations(world: int) -> list[ParallelConfig]:
    """cfg x pipefusion x ring x ulysses = ``world`` with 2 <= pipefusion <= BLOCKS, ulysses | HEADS."""
    out = []
    for cfg in (1, 2):
        for pipefusion in range(2, BLOCKS + 1):
            for ulysses in (1, 2, 4, 8):
                rest = world // (cfg * pipefusion * ulysses)
                if HEADS % ulysses == 0 and cfg * pipefusion * ulysses * rest == world:
                    out.append(ParallelConfig(cfg_degree=cfg, pipefusion_degree=pipefusion, ring_degree=rest,
                                              ulysses_degree=ulysses))
    return out


def with_pipefusion(config: ParallelConfig, warmup: int, patches: int | None = None) -> ParallelConfig:
    return ParallelConfig(cfg_degree=config.cfg_degree, pipefusion_degree=config.pipefusion_degree,
                          ring_degree=config.ring_degree, ulysses_degree=config.ulysses_degree,
                          num_patches=patches, warmup_steps=warmup)


def request(parallel: ParallelConfig, sampler: str) -> GenerationRequest:
    positive, negative = tiny_conditioning(MODEL, seed=3)
    return GenerationRequest(model=MODEL, latent=torch.zeros(1, 16, LATENT, LATENT), positive=positive,
                             negative=negative, seed=7, steps=STEPS, cfg=2.5, sampler=sampler, parallel=parallel)


def cases(world: int, both: bool = True) -> list[GenerationRequest]:
    """Each factorisation twice, (a) and (b), samplers alternating (``both=False``: once, (a) and (b)
    alternating); then patches > stages."""
    out = []
    for index, config in enumerate(factorisations(world)):
        sampler = ("euler", "dpmpp_2m")[index % 2]
        if both or index % 2 == 0:
            out.append(request(with_pipefusion(config, STEPS), sampler))  # (a)
        if both or index % 2 == 1:
            out.append(request(with_pipefusion(config, 1), ("dpmpp_2m", "euler")[index % 2]))  # (b)
    extra = {2: [ParallelConfig(pipefusion_degree=2, num_patches=4)],
             4: [ParallelConfig(pipefusion_degree=2, ulysses_degree=2, num_patches=4)],
             8: [ParallelConfig(pipefusion_degree=2, ring_degree=2, ulysses_degree=2, num_patches=4),
                 ParallelConfig(cfg_degree=2, pipefusion_degree=2, ring_degree=2, num_patches=8)]}[world]
    out += [request(config, "dpmpp_2m") for config in extra]  # warm-up 1 < steps: (b)
    return out


def engine_ranks(rank: int, world_size: int, requests: list[GenerationRequest]) -> list[tuple]:
    """Rank body: every request through ``create_engine``; rank 0 gets its latent and every rank's bytes."""
    from comfyui_xdit.parallel import create_engine
    from comfyui_xdit.parallel.comm import CommCounter
    from comfyui_xdit.parallel.mesh import Mesh

    adapter = load_model(MODEL)
    out = []
    for req in requests:
        counter = CommCounter()
        latent = create_engine(adapter, req.parallel, rank, Mesh.build(req.parallel, rank), counter).generate(req)
        counts: list = [None] * world_size
        dist.all_gather_object(counts, counter.per_step())
        out.append((latent, counts))
    return out


def expected_bytes(req: GenerationRequest, rank: int, step: int) -> dict[str, int]:
    """Bytes ``rank`` sends in ``step``, per axis (fp32, batch 1, both CFG branches present)."""
    par = req.parallel
    coords = RankCoords.of(rank, par)
    u, r, p = par.ulysses_degree, par.ring_degree, par.sequence_degree
    warm = step < par.warmup_steps
    items = 1 if warm else par.patches  # whole-latent item, or one item per patch
    local = TOKENS // items // p  # image tokens of one item on this rank
    branches = 2 if par.cfg_degree == 1 else 1  # forwards per item on this rank
    start, stop = spec_stages(TINY_SPECS["flux"], par.pipefusion_degree)[coords.pipefusion]
    per_item = (stop - start) * branches  # attention layers this rank runs per item
    is_last = coords.pipefusion == par.pipefusion_degree - 1
    out = {"control": FP32 * items}  # the stop vote, one per work item
    texts = 1  # Flux's prompt rides with a step's first item only (pipefusion_text.py)
    if u > 1:  # q, k, v, out all-to-all (keeping 1/u) + the text output all-gathered over heads (items with text)
        all_to_all = 4 * local * HEADS * HEAD_DIM * FP32 * (u - 1) // u
        out["ulysses"] = per_item * (items * all_to_all + texts * (u - 1) * TEXT * (HEADS // u) * HEAD_DIM * FP32)
    if r > 1:  # image k and v after Ulysses (u shards, h/u heads) all-gathered over the ring
        out["ring"] = items * per_item * 2 * (r - 1) * local * u * (HEADS // u) * HEAD_DIM * FP32
    if not is_last:  # one shard of activations per item per branch, + the text stream of the items with it
        out["pipefusion"] = branches * HIDDEN * FP32 * (items * local + texts * TEXT)
        return out
    if p > 1:  # the item's x0 prediction all-gathered over ring x ulysses
        out["sequence"] = items * branches * (p - 1) * local * CHANNELS * FP32
    if par.cfg_degree == 2:  # one latent per step
        out["cfg"] = TOKENS * CHANNELS * FP32
    sent_back = 0
    if step < req.steps - 1:  # this rank's shard of each updated item; the whole latent after the warm-up
        sent_back = TOKENS if warm and step + 1 >= par.warmup_steps else items * local
    preview = PREVIEW_BYTES if coords.index_along(par, SEQUENCE_AXES) == 0 else 0
    if sent_back or preview:
        out["pipefusion"] = sent_back * CHANNELS * FP32 + preview
    return out


@pytest.fixture(scope="module", autouse=True)
def _no_process_left() -> Iterator[None]:
    with no_process_left():
        yield


@pytest.fixture(scope="module")
def adapter():
    return load_model(MODEL)


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def test_every_factorisation_is_counted() -> None:
    assert [len(factorisations(w)) for w in (2, 4, 8)] == [1, 4, 8]


# 8 ranks: the default suite runs each factorisation once (10 requests, ~50 s on 2 cores), the slow suite twice
@pytest.mark.parametrize("world,both", [(2, True), (4, True), (8, False), pytest.param(8, True, marks=pytest.mark.slow)],
                         ids=["2", "4", "8", "8-both"])
def test_pipefusion_hybrid_equals_serial_and_reference(world: int, both: bool, adapter) -> None:
    reqs = cases(world, both)
    results = run_ranks(world, engine_ranks, (reqs,), timeout=400)
    for req, (latent, counts) in zip(reqs, results):
        par = req.parallel
        label = f"{par.describe()} warm-up {par.warmup_steps} {req.sampler}"
        serial = Engine(adapter).generate(dataclasses.replace(req, parallel=ParallelConfig()))
        if par.warmup_steps >= req.steps:
            assert relative(latent, serial) < 1e-4, label
        else:
            plan = prepare_plan(adapter, req)
            reference = finish(adapter, plan, pipefusion_reference(adapter, plan, par.patches, par.warmup_steps))
            assert relative(latent, reference) < 1e-4, label
            assert relative(latent, serial) > 1e-3, f"{label}: stale K/V should differ from serial"
        for rank, per_step in enumerate(counts):
            for step in range(req.steps):
                assert per_step[step] == expected_bytes(req, rank, step), f"{label} rank {rank} step {step}"


def test_stage_zero_gets_back_what_it_reads_next() -> None:
    from comfyui_xdit.parallel.pipefusion import returned_range, shard_range
    from comfyui_xdit.parallel.pipefusion_schedule import Work, patch_bounds
    from comfyui_xdit.parallel.sequence_parallel import SequenceShard

    bounds, shard = patch_bounds(64, 4), SequenceShard(1, 4)  # patches of 16 tokens, 4 shards each
    assert shard_range(shard, 16, 32) == (20, 24)
    assert returned_range(Work(0, None), 2, bounds, 64, shard) == (16, 32)  # warm-up -> warm-up: its shard
    assert returned_range(Work(1, None), 2, bounds, 64, shard) == (0, 64)  # warm-up -> patches: everything
    assert returned_range(Work(2, 3), 2, bounds, 64, shard) == (52, 56)  # patch -> same patch: its shard
