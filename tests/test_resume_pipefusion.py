"""PipeFusion resume (issue 14.1): every rank hands its share of each step's state to the driver (the last
stage the tokens, history and noise; every rank its stale K/V); a run resumed from those parts equals the
uninterrupted PipeFusion run bit for bit, in warm-up and after, for a multistep, an ancestral and an SDE
sampler, with CFG and sequence parallel inside the stages. Without the K/V (a model too big to keep it) the
resumed run re-warms one step over the whole latent: exact in warm-up, close after."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.parallel import create_engine
from comfyui_xdit.parallel.launch import run_ranks, stop_helper_processes
from comfyui_xdit.parallel.mesh import Mesh
from comfyui_xdit.parallel.pipefusion_schedule import Work, producer_of_input, resumed_work, stage_work
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.resume import CheckpointPart, CheckpointParts, pipefusion_kv_bytes

MODEL = ModelRef("tiny:flux")
STEPS = 6
WARMUP = 2


def request(sampler: str, parallel: ParallelConfig, **changes) -> GenerationRequest:
    positive, negative = tiny_conditioning(MODEL, seed=3)
    fields = {"latent": torch.zeros(1, 16, 8, 8), "seed": 11, "steps": STEPS, "cfg": 2.0, "scheduler": "karras",
              **changes}
    return GenerationRequest(model=MODEL, positive=positive, negative=negative, sampler=sampler, parallel=parallel,
                             **fields)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _resume_on_ranks(rank: int, world_size: int, parallel: ParallelConfig, sampler: str) -> dict:
    """The uninterrupted run with checkpoint parts; every rank's parts gathered to each rank and put together;
    runs resumed from a warm-up step, the first step after it and a late step, with and without the K/V."""
    engine = create_engine(load_model(MODEL), parallel, rank, Mesh.build(parallel, rank))
    mine: list[CheckpointPart] = []
    events = []
    whole = engine.generate(request(sampler, parallel, checkpoints=True), on_step=events.append if rank == 0 else None,
                            on_part=mine.append)
    plain = engine.generate(request(sampler, parallel))
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, mine)
    parts, checkpoints = CheckpointParts(), {}
    for part in sorted((p for rank_parts in everyone for p in rank_parts), key=lambda p: (p.calls, p.rank)):
        done = parts.add(part)
        if done is not None:
            checkpoints[done.calls] = done
    out = {"whole": whole, "plain": plain, "calls": sorted(checkpoints), "resumed": {}, "rewarmed": {},
           "steps": [e.step for e in events], "kv_ranks": {c: sorted(k.kv or {}) for c, k in checkpoints.items()}}
    for calls in (1, WARMUP, STEPS - 1):
        resumed_events = []
        out["resumed"][calls] = engine.generate(request(sampler, parallel, resume=checkpoints[calls]),
                                                on_step=resumed_events.append if rank == 0 else None)
        out.setdefault("resumed_steps", {})[calls] = [e.step for e in resumed_events]
        out["rewarmed"][calls] = engine.generate(request(sampler, parallel, resume=replace(checkpoints[calls], kv=None)))
    return out


CASES = [(2, ParallelConfig(pipefusion_degree=2, num_patches=2, warmup_steps=WARMUP), "dpmpp_2m"),
         (4, ParallelConfig(cfg_degree=2, pipefusion_degree=2, num_patches=2, warmup_steps=WARMUP), "euler_ancestral"),
         (4, ParallelConfig(pipefusion_degree=2, ulysses_degree=2, num_patches=2, warmup_steps=WARMUP),
          "dpmpp_2m_sde")]


@pytest.mark.parametrize("world, parallel, sampler", CASES, ids=[c[1].describe() for c in CASES])
def test_a_resumed_pipefusion_run_equals_the_uninterrupted_one(world: int, parallel: ParallelConfig,
                                                               sampler: str) -> None:
    try:
        out = run_ranks(world, _resume_on_ranks, (parallel, sampler))
    finally:
        stop_helper_processes()
    whole = out["whole"]
    assert torch.equal(whole, out["plain"])  # asking for checkpoints changes nothing
    assert out["calls"] == list(range(1, STEPS))  # one whole checkpoint after every step but the last
    # the K/V of every rank after warm-up; none in warm-up (its next step refills every buffer)
    assert all(out["kv_ranks"][c] == (list(range(world)) if c >= WARMUP else []) for c in out["calls"])
    for calls, resumed in out["resumed"].items():
        assert torch.equal(resumed, whole), f"resumed after {calls} calls"
        assert out["resumed_steps"][calls] == list(range(calls + 1, STEPS + 1))  # progress goes on from there
    # without the K/V: exact when the first resumed step is a warm-up step anyway, else one extra fresh step
    assert torch.equal(out["rewarmed"][1], whole)
    for calls in (WARMUP, STEPS - 1):
        error = relative(out["rewarmed"][calls], whole)
        assert 0 < error < 0.05, f"re-warmed after {calls} calls: {error:.2e}"


def test_a_resumed_schedule_re_warms_only_without_the_kv() -> None:
    items = list(stage_work(5, 2, 3))
    assert resumed_work(items, 1, rewarm=True) == [w for w in items if w.step >= 1]  # in warm-up: as it was
    later = resumed_work(items, 3, rewarm=False)
    assert later == [Work(3, p) for p in range(3)] + [Work(4, p) for p in range(3)]
    rewarmed = resumed_work(items, 3, rewarm=True)
    assert rewarmed == [Work(3, None)] + [Work(4, p) for p in range(3)]
    # the step after a re-warm step starts from the whole latent it wrote
    assert producer_of_input(Work(4, 1), 2, frozenset({3})) == Work(3, None)
    assert producer_of_input(Work(4, 1), 2) == Work(3, 1)


def test_parts_make_a_checkpoint_only_when_all_are_in() -> None:
    x = torch.zeros(1, 4, 2)
    from comfyui_xdit.resume import Checkpoint
    core = Checkpoint(3, x, None)
    kv = ((((0, x, x),),),)
    parts = CheckpointParts()
    assert parts.add(CheckpointPart(3, 1, 2, kv=kv[0])) is None  # rank 0's part (with the core) is missing
    done = parts.add(CheckpointPart(3, 0, 2, kv=kv[0], core=core))
    assert done is not None and done.calls == 3 and sorted(done.kv) == [0, 1]
    assert parts.add(CheckpointPart(4, 0, 1, core=Checkpoint(4, x, None))).kv is None  # without K/V: the core alone


def test_kv_bytes_count_k_and_v_of_every_block_and_token() -> None:
    from comfyui_xdit.planning.full_size import FULL_SIZE

    flux_dev = FULL_SIZE["flux-dev"][0]
    # Flux-dev at 1024 px (128x128 latent: 4096 tokens), bf16, both CFG branches: 57 blocks of K and V
    assert pipefusion_kv_bytes(flux_dev, (1, 16, 128, 128), 2, 2) == 2 * 57 * 4096 * 3072 * 2 * 2
    tiny = load_model(MODEL).spec
    assert pipefusion_kv_bytes(tiny, (1, 16, 8, 8), 2, 4) == 2 * 4 * 16 * 256 * 4 * 2  # 4 blocks, 16 tokens, width 256
    # a video latent: tokens of every frame
    wan = FULL_SIZE["wan2.1-t2v-14b"][0]
    assert pipefusion_kv_bytes(wan, (1, 16, 21, 90, 160), 1, 2) == 2 * 40 * 21 * 45 * 80 * 5120 * 2
