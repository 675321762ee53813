"""Resume (issue 14.1): a run continued from the checkpoint of any finished step gives the latent of the
uninterrupted run, bit for bit, for one-call, multistep, ancestral (ordered noise), multi-call, SDE
(Brownian tree) and UniPC samplers, serially and under sequence x CFG parallel; what cannot resume says so.
PipeFusion's resume is in test_resume_pipefusion.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.parallel import create_engine
from comfyui_xdit.parallel.launch import run_ranks, stop_helper_processes
from comfyui_xdit.parallel.mesh import Mesh
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.resume import Checkpoint

MODEL = ModelRef("tiny:flux")
STEPS = 5


def request(sampler: str, parallel: ParallelConfig = ParallelConfig(), **changes) -> GenerationRequest:
    positive, negative = tiny_conditioning(MODEL, seed=3)
    fields = {"latent": torch.zeros(1, 16, 8, 8), "seed": 11, "steps": STEPS, "cfg": 2.0, "scheduler": "karras",
              **changes}
    return GenerationRequest(model=MODEL, positive=positive, negative=negative, sampler=sampler, parallel=parallel,
                             **fields)


@pytest.fixture(scope="module")
def adapter():
    return load_model(MODEL)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral", "heun", "dpmpp_2m_sde", "dpmpp_sde",
                                     "uni_pc", "seeds_3"])
def test_a_resumed_run_equals_the_uninterrupted_one(adapter, sampler: str) -> None:
    engine = Engine(adapter)
    events = []
    whole = engine.generate(request(sampler, checkpoints=True), on_step=events.append)
    assert torch.equal(whole, engine.generate(request(sampler)))  # asking for checkpoints changes nothing
    checkpoints = [e.checkpoint for e in events if e.checkpoint is not None]
    assert len(checkpoints) == len(events) and [c.calls for c in checkpoints] == [e.step for e in events]
    for checkpoint in (checkpoints[0], checkpoints[len(checkpoints) // 2], checkpoints[-2]):
        steps = []
        resumed = engine.generate(request(sampler, resume=checkpoint), on_step=lambda e: steps.append(e.step))
        assert torch.equal(resumed, whole), f"{sampler} resumed after {checkpoint.calls} calls"
        assert steps[0] == checkpoint.calls + 1 and steps[-1] == events[-1].step  # progress goes on from there
    # the checkpoint is the whole state: a resumed run without its noise state draws other noise
    if checkpoints[1].noise_state is not None:
        stale = replace(checkpoints[1], noise_state=checkpoints[0].noise_state)
        assert not torch.equal(engine.generate(request(sampler, resume=stale)), whole)


def _resume_on_ranks(rank: int, world_size: int, parallel: ParallelConfig) -> tuple:
    adapter = load_model(MODEL)
    engine = create_engine(adapter, parallel, rank, Mesh.build(parallel, rank))
    events = []
    whole = engine.generate(request("dpmpp_2m_sde", parallel, checkpoints=True), on_step=events.append)
    resumed = engine.generate(request("dpmpp_2m_sde", parallel, resume=events[1].checkpoint))
    return whole, resumed, events[1].checkpoint


def _resume_from(rank: int, world_size: int, parallel: ParallelConfig, checkpoint: Checkpoint) -> torch.Tensor:
    engine = create_engine(load_model(MODEL), parallel, rank, Mesh.build(parallel, rank))
    batch = torch.zeros(parallel.data_degree, 16, 8, 8)
    return engine.generate(request("euler", parallel, latent=batch, resume=checkpoint))


def test_sequence_and_cfg_parallel_resume_equal_serial(adapter) -> None:
    serial = Engine(adapter).generate(request("dpmpp_2m_sde"))
    try:
        whole, resumed, checkpoint = run_ranks(4, _resume_on_ranks, (ParallelConfig(cfg_degree=2, ulysses_degree=2),))
    finally:
        stop_helper_processes()
    assert torch.equal(resumed, whole)
    assert float((whole - serial).abs().max() / serial.abs().max()) < 1e-4
    # a checkpoint taken on 4 ranks resumes serially too: it holds the whole latent's state
    assert float((Engine(adapter).generate(request("dpmpp_2m_sde", resume=checkpoint)) - serial).abs().max()
                 / serial.abs().max()) < 1e-4


def test_what_cannot_resume_says_so(adapter) -> None:
    engine = Engine(adapter)
    events = []
    engine.generate(request("euler", checkpoints=True), on_step=events.append)
    other = request("euler", latent=torch.zeros(1, 16, 8, 16))
    with pytest.raises(ValueError, match="does not fit this run"):
        engine.generate(replace(other, resume=events[0].checkpoint))
    with pytest.raises(ValueError, match="does not fit this run"):
        engine.generate(request("euler", resume=Checkpoint(STEPS, events[0].checkpoint.x, None)))
    data = ParallelConfig(data_degree=2)  # PipeFusion resumes (test_resume_pipefusion.py); data groups do not
    try:
        with pytest.raises(Exception, match="resuming is available without data parallel only"):
            run_ranks(2, _resume_from, (data, events[0].checkpoint))
    finally:
        stop_helper_processes()
