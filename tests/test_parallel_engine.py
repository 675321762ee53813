"""Sequence x CFG parallel sampling equals serial sampling; traffic equals the formulas.

Every factorisation of 2, 4 and 8 ranks into cfg x ring x ulysses (pipefusion 1) samples tiny:flux on
local gloo ranks, each world spawned once for all its configs.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import pytest
import torch
import torch.distributed as dist

from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.parallel import create_engine
from comfyui_xdit.parallel.launch import RankFailed, generate_local_many, run_ranks
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sampling import GenerationCancelled

from process_check import live_children, no_process_left

MODEL = ModelRef("tiny:flux")
HEADS, HEAD_DIM, LAYERS, TEXT, CHANNELS = 8, 32, 4, 8, 64  # tiny:flux: 2 double + 2 single blocks
LATENT = 16  # 16x16 latent -> 64 tokens, 8 per rank at world 8
STEPS = 3
FP32 = 4


def factorisations(world: int) -> list[ParallelConfig]:
    out = []
    for cfg in (1, 2):
        for ulysses in (1, 2, 4, 8):
            if world % (cfg * ulysses) == 0 and HEADS % ulysses == 0:
                out.append(ParallelConfig(cfg_degree=cfg, ring_degree=world // (cfg * ulysses), ulysses_degree=ulysses))
    return [c for c in out if c.world_size == world]


def request(parallel: ParallelConfig, sampler: str, batch: int = 1) -> GenerationRequest:
    positive, negative = tiny_conditioning(MODEL, seed=3)
    return GenerationRequest(model=MODEL, latent=torch.zeros(batch, 16, LATENT, LATENT), positive=positive,
                             negative=negative, seed=7, steps=STEPS, cfg=2.5, sampler=sampler, parallel=parallel)


def expected_bytes(config: ParallelConfig, batch: int) -> dict[str, int]:
    """Bytes one rank sends in one step, per axis (fp32, both CFG branches present)."""
    tokens = (LATENT // 2) ** 2
    local = tokens // config.sequence_degree  # image tokens per rank
    u, r = config.ulysses_degree, config.ring_degree
    branches = 1 if config.cfg_degree == 2 else 2  # forwards this rank runs per step
    out = {"control": FP32}
    if u > 1:  # q, k, v, out all-to-all (keeping 1/u) + the text output all-gathered over heads
        all_to_all = 4 * batch * local * HEADS * HEAD_DIM * FP32 * (u - 1) // u
        text_gather = (u - 1) * batch * TEXT * (HEADS // u) * HEAD_DIM * FP32
        out["ulysses"] = LAYERS * branches * (all_to_all + text_gather)
    if r > 1:  # image k and v (u shards after Ulysses, h/u heads) to the next rank, r - 1 times
        out["ring"] = LAYERS * branches * (r - 1) * 2 * batch * local * u * (HEADS // u) * HEAD_DIM * FP32
    if r * u > 1:  # velocity shard all-gathered over the sequence group
        out["sequence"] = branches * (r * u - 1) * batch * local * CHANNELS * FP32
    if config.cfg_degree == 2:  # one latent per step
        out["cfg"] = batch * tokens * CHANNELS * FP32
    return out


@pytest.fixture(scope="module")
def serial() -> dict[tuple[str, int], torch.Tensor]:
    adapter = load_model(MODEL)
    return {(s, b): Engine(adapter).generate(request(ParallelConfig(), s, b))
            for s, b in (("euler", 1), ("dpmpp_2m", 1), ("euler", 2))}


@pytest.fixture(scope="module", autouse=True)
def _stop_forkserver() -> Iterator[None]:
    with no_process_left():
        yield


@pytest.mark.parametrize("world", [2, 4, 8])
def test_parallel_equals_serial(world: int, serial: dict) -> None:
    configs = factorisations(world)
    assert len(configs) == {2: 3, 4: 5, 8: 7}[world]
    cases = [(c, ("euler", "dpmpp_2m")[i % 2], 1) for i, c in enumerate(configs)]
    if world == 4:
        cases.append((ParallelConfig(cfg_degree=2, ring_degree=2), "euler", 2))
    results = generate_local_many([request(c, s, b) for c, s, b in cases], timeout=400)
    for (config, sampler, batch), result in zip(cases, results):
        reference = serial[(sampler, batch)]
        error = float((result.latent - reference).abs().max() / reference.abs().max())
        assert error < 1e-4, f"{config.describe()} {sampler} batch {batch}: relative error {error}"
        for step in range(STEPS):
            assert result.comm_bytes[step] == expected_bytes(config, batch), f"{config.describe()} step {step}"


def cancel_on_one_rank(rank: int, world_size: int) -> list[int]:
    """Rank body: only rank 1 asks to stop, at step 1; every rank must stop there."""
    config = ParallelConfig(ulysses_degree=world_size)
    engine = create_engine(load_model(MODEL), config, rank)
    stopped_at = -1
    try:
        engine.generate(request(config, "euler"), should_stop=lambda step: rank == 1 and step == 1)
    except GenerationCancelled as exc:
        stopped_at = int(str(exc).rsplit(" ", 1)[-1])
    gathered = [None] * world_size
    dist.all_gather_object(gathered, stopped_at)
    return gathered  # type: ignore[return-value]


def fail_on_rank_one(rank: int, world_size: int) -> None:
    """Rank body: rank 1 raises while rank 0 waits in a collective that would never finish."""
    if rank == 1:
        raise RuntimeError("boom on purpose")
    dist.barrier()


def test_cancel_stops_all_ranks_at_the_same_step() -> None:
    assert run_ranks(2, cancel_on_one_rank, timeout=240) == [1, 1]


def test_failing_rank_is_named_and_no_rank_survives() -> None:
    before = {p.pid for p in live_children()}  # e.g. a session-wide ComfyUI server is not ours to judge
    with pytest.raises(RankFailed, match="(?s)rank 1 of 2 failed.*boom on purpose"):
        run_ranks(2, fail_on_rank_one, timeout=240)
    assert [p.cmdline() for p in live_children(keep_helpers=True) if p.pid not in before] == []


def test_bad_config_is_a_value_error() -> None:
    odd = dataclasses.replace(request(ParallelConfig(ring_degree=2), "euler"), latent=torch.zeros(1, 16, 10, 10))
    with pytest.raises(ValueError, match="25 image tokens .* multiple of 2"):
        generate_local_many([odd], timeout=240)
