"""PipeFusion stages cut where the user (or a block-time measurement) says: ``ParallelConfig.stage_split``
reaches every rank, the weight loaders and the pool, is checked up front naming the fix, and a run with it
equals serial in warm-up and its single-process reference after."""

from __future__ import annotations

import pytest
import torch

from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, model_spec, tiny_conditioning
from comfyui_xdit.parallel.block_timing import block_seconds, measured_split
from comfyui_xdit.parallel.launch import generate_local_many, stop_helper_processes
from comfyui_xdit.parallel.pipefusion_reference import pipefusion_reference
from comfyui_xdit.parallel.pipefusion_schedule import parallel_stages, spec_stages, stage_blocks
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sampling import finish, prepare_plan

MODEL = ModelRef("tiny:flux")  # 2 double + 2 single blocks


def request(parallel: ParallelConfig, steps: int = 3) -> GenerationRequest:
    positive, negative = tiny_conditioning(MODEL, seed=1)
    return GenerationRequest(model=MODEL, latent=torch.zeros(1, 16, 8, 8), positive=positive, negative=negative,
                             seed=4, steps=steps, cfg=2.0, parallel=parallel)


def test_a_split_sets_every_stage_and_is_checked_naming_the_fix() -> None:
    spec = model_spec(MODEL)
    split = ParallelConfig(pipefusion_degree=2, stage_split=(1,))
    assert parallel_stages(split, spec) == ((0, 1), (1, 4))
    assert [stage_blocks(split, rank, spec) for rank in (0, 1)] == [(0, 1), (1, 4)]
    assert parallel_stages(ParallelConfig(pipefusion_degree=2), spec) == spec_stages(spec, 2)  # default: by FLOPs
    assert "stages from blocks 0, 1" in split.describe()
    with pytest.raises(ValueError, match=r"first block of each of the 1 PipeFusion stages after the first"):
        ParallelConfig(pipefusion_degree=2, stage_split=(1, 2))
    with pytest.raises(ValueError, match="increasing from 1"):
        ParallelConfig(pipefusion_degree=3, stage_split=(2, 2))
    with pytest.raises(ValueError, match="the model has 4 blocks .* start every stage below 4"):
        ParallelConfig(pipefusion_degree=2, stage_split=(4,)).validate_for(2, 4, 16, 2.0, num_blocks=4)


def test_measured_times_cut_where_the_slow_blocks_are() -> None:
    # 2 double blocks 1.5x as slow as 5 single ones: the FLOP cut (4 | 3 blocks) leaves stage 0 5/8 of the time;
    # by time, 2 double + 1 single | 4 single: 4 | 4
    assert measured_split([1.5, 1.5, 1, 1, 1, 1, 1], 2) == (3,)
    assert measured_split([3, 1, 1, 1], 2) == (1,)
    seconds = block_seconds(load_model(MODEL), request(ParallelConfig()), repeats=1)
    assert len(seconds) == 4 and all(s > 0 for s in seconds)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_pipefusion_with_a_split_equals_serial_in_warm_up_and_its_reference_after() -> None:
    adapter = load_model(MODEL)
    serial = Engine(adapter).generate(request(ParallelConfig()))
    patched = ParallelConfig(pipefusion_degree=2, num_patches=2, warmup_steps=1, stage_split=(3,))
    try:
        warm, stale = generate_local_many([request(ParallelConfig(pipefusion_degree=2, warmup_steps=3,
                                                                  stage_split=(3,))), request(patched)])
    finally:
        stop_helper_processes()
    assert relative(warm.latent, serial) < 1e-4
    plan = prepare_plan(adapter, request(patched))
    reference = finish(adapter, plan, pipefusion_reference(adapter, plan, patched.patches, patched.warmup_steps))
    assert relative(stale.latent, reference) < 1e-4 and relative(stale.latent, serial) > 1e-4


def test_the_cli_passes_a_split() -> None:
    from comfyui_xdit.cli_commands import build_request, make_parser

    args = make_parser().parse_args(["generate", "--model", "tiny:flux", "--pipefusion", "2", "--stage-split", "3",
                                     "--out", "x.safetensors", "--in-process"])
    assert build_request(args).parallel.stage_split == (3,)
