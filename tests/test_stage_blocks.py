"""A PipeFusion rank builds only its stage's blocks: no other stage's weights on it, memory that falls
with the degree, and the same numbers as the whole model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.models.flux import AbsentBlock, FluxAdapter
from comfyui_xdit.models.flux_checkpoint import NAMED_SPECS, read_checkpoint, write_random_flux
from comfyui_xdit.parallel.launch import generate_local_many, stop_helper_processes
from comfyui_xdit.parallel.pipefusion_schedule import spec_stages, stage_blocks
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef

SPEC = NAMED_SPECS["flux"]  # 2 double + 2 single blocks
MODEL = ModelRef("tiny:flux")


@pytest.fixture(scope="module", autouse=True)
def _no_helpers_left():
    yield
    stop_helper_processes()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stage") / "tiny.safetensors"
    write_random_flux(path, SPEC, seed=3)
    return path


def block_keys(adapter: FluxAdapter) -> set[int]:
    """Indices (in the adapter's block list) of the blocks whose weights the adapter holds."""
    held = set()
    for name in adapter.transformer.state_dict():
        parts = name.split(".")
        if parts[0] == "transformer_blocks":
            held.add(int(parts[1]))
        elif parts[0] == "single_transformer_blocks":
            held.add(SPEC.num_layers + int(parts[1]))
    return held


@pytest.mark.parametrize("degree", [2, 3, 4])
def test_a_stage_holds_no_other_stages_block(tiny_file: Path, degree: int) -> None:
    whole = FluxAdapter.from_file(tiny_file)
    shared = {k for k in whole.transformer.state_dict() if "transformer_blocks." not in k}
    for start, stop in spec_stages(SPEC, degree):
        stage = FluxAdapter.from_file(tiny_file, blocks=(start, stop))
        assert block_keys(stage) == set(range(start, stop))
        assert shared <= set(stage.transformer.state_dict())  # embedders and head on every stage
        for index, block in enumerate(stage.blocks):
            assert isinstance(block, AbsentBlock) == (not start <= index < stop)
        for index in range(start, stop):
            for (name, a), (_, b) in zip(whole.blocks[index].named_parameters(), stage.blocks[index].named_parameters()):
                assert torch.equal(a, b), name
        assert stage.parameter_bytes() < whole.parameter_bytes()


def test_only_the_stages_tensors_are_read_from_disk(tiny_file: Path) -> None:
    read = read_checkpoint(tiny_file, keep=lambda key: not key.startswith("single_blocks."))
    assert read and not any(k.startswith("single_blocks.") for k in read)
    assert set(read) < set(read_checkpoint(tiny_file))


def test_memory_per_rank_falls_with_the_degree() -> None:
    """The largest stage's weights at degree 1, 2 and 4 (tiny shapes; the README's table is Flux-dev's)."""
    largest = [max(load_model(MODEL, blocks=b).parameter_bytes() for b in spec_stages(SPEC, d))
               for d in (1, 2, 4)]
    assert largest[0] > largest[1] > largest[2]


def test_running_a_block_of_another_stage_is_a_clear_error() -> None:
    stage = load_model(MODEL, blocks=(0, 2))
    with pytest.raises(RuntimeError, match="block 3 belongs to another PipeFusion stage: this rank loaded blocks 0..1"):
        stage.blocks[3](hidden_states=None)


def test_stage_blocks_follow_the_mesh() -> None:
    config = ParallelConfig(pipefusion_degree=2, ulysses_degree=2)  # ranks (pf, ulysses): 0,1 -> stage 0
    assert [stage_blocks(config, r, SPEC) for r in range(4)] == [(0, 2), (0, 2), (2, 4), (2, 4)]
    assert stage_blocks(ParallelConfig(ulysses_degree=2), 1, SPEC) is None
    data = ParallelConfig(data_degree=2, pipefusion_degree=2)  # ranks (data, pf): each data group has both stages
    assert [stage_blocks(data, r, SPEC) for r in range(4)] == [(0, 2), (2, 4), (0, 2), (2, 4)]


def test_stage_only_ranks_sample_exactly_what_serial_does() -> None:
    """PipeFusion with every rank holding only its blocks, warm-up = steps: equal to the whole model, serial."""
    positive, negative = tiny_conditioning(MODEL, seed=5)
    base = GenerationRequest(MODEL, torch.zeros(1, 16, 16, 16), positive, negative, seed=11, steps=3, cfg=2.0)
    layouts = [ParallelConfig(pipefusion_degree=2, num_patches=2, warmup_steps=3),
               ParallelConfig(pipefusion_degree=2, ulysses_degree=2, num_patches=2, warmup_steps=3)]
    serial = Engine(load_model(MODEL)).generate(base)
    for layout in layouts:
        (result,) = generate_local_many([dataclasses.replace(base, parallel=layout)], timeout=300)
        torch.testing.assert_close(result.latent, serial, rtol=1e-4, atol=1e-4, msg=layout.describe())
