"""Rank layout ``arange(world).reshape(data, cfg, pipefusion, ring, ulysses)`` and its process groups."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
import torch.distributed as dist

from comfyui_xdit.parallel.launch import run_ranks, stop_helper_processes
from comfyui_xdit.parallel.mesh import AXES, DEFAULT_GROUP_AXES, Mesh, RankCoords, groups_along, rank_grid
from comfyui_xdit.parallel_config import ParallelConfig

CONFIG = ParallelConfig(cfg_degree=2, pipefusion_degree=1, ring_degree=2, ulysses_degree=2)


def test_rank_grid_is_a_reshape() -> None:
    grid = rank_grid(CONFIG)
    assert grid.shape == (1, 2, 1, 2, 2) and grid.flatten().tolist() == list(range(8))


DATA = ParallelConfig(data_degree=2, cfg_degree=2, ulysses_degree=2)


def test_data_axis_is_outermost() -> None:
    """A data group is a block of consecutive ranks laid out as the world without the data axis."""
    assert rank_grid(DATA).shape == (2, 2, 1, 1, 2) and DATA.world_size == 8 and DATA.group_size == 4
    assert groups_along(DATA, ("data",)) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups_along(DATA, ("ulysses",)) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups_along(DATA, ("cfg",)) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups_along(DATA, ("cfg", "pipefusion", "ring", "ulysses")) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert RankCoords.of(6, DATA) == RankCoords(data=1, cfg=1, pipefusion=0, ring=0, ulysses=0)
    assert RankCoords.of(6, DATA).index_along(DATA, ("cfg",)) == 1
    assert "data 2 x cfg 2" in DATA.describe() and "data" not in CONFIG.describe()


def test_groups_along_each_axis() -> None:
    assert groups_along(CONFIG, ("ulysses",)) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups_along(CONFIG, ("ring",)) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups_along(CONFIG, ("cfg",)) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups_along(CONFIG, ("ring", "ulysses")) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups_along(CONFIG, ("ulysses", "ring")) == groups_along(CONFIG, ("ring", "ulysses"))
    with pytest.raises(ValueError, match="axes must be distinct names"):
        groups_along(CONFIG, ("tensor",))


def test_coords_and_index_match_group_position() -> None:
    for axes in DEFAULT_GROUP_AXES:
        for row in groups_along(CONFIG, axes):
            for position, rank in enumerate(row):
                assert RankCoords.of(rank, CONFIG).index_along(CONFIG, axes) == position
    assert RankCoords.of(6, CONFIG) == RankCoords(data=0, cfg=1, pipefusion=0, ring=1, ulysses=0)
    with pytest.raises(ValueError, match="outside a world of 8"):
        RankCoords.of(8, CONFIG)


def test_serial_mesh_needs_no_distributed() -> None:
    mesh = Mesh.build(ParallelConfig(), 0)
    assert all(mesh.group(axes) is None for axes in DEFAULT_GROUP_AXES)
    assert mesh.size(("ring", "ulysses")) == 1 and mesh.index(("cfg",)) == 0


def check_groups(rank: int, world_size: int, configs: list[ParallelConfig]) -> list[str]:
    """Rank body: in every group, an all-reduce of the members' ranks equals the expected sum."""
    problems = []
    for config in configs:
        mesh = Mesh.build(config, rank)
        for axes in DEFAULT_GROUP_AXES:
            row = next(r for r in groups_along(config, axes) if rank in r)
            group = mesh.group(axes)
            if len(row) == 1:
                problems += [f"{config} {axes}: expected no group"] if group is not None else []
                continue
            value = torch.tensor([rank])
            dist.all_reduce(value, group=group)
            if value.item() != sum(row) or dist.get_rank(group) != mesh.index(axes):
                problems.append(f"{config.describe()} {axes} rank {rank}: sum {value.item()} != {sum(row)}")
        next_stage = (mesh.coords.pipefusion + 1) % config.pipefusion_degree
        if mesh.peer("pipefusion", 1) != mesh.rank_at(pipefusion=next_stage):
            problems.append(f"{config.describe()} rank {rank}: peer")
        twin = mesh.twin(("pipefusion",))
        if (twin is None) != (config.pipefusion_degree == 1) or (twin is not None and twin is mesh.group(("pipefusion",))):
            problems.append(f"{config.describe()} rank {rank}: PipeFusion's return group")
        elif twin is not None:
            value = torch.tensor([rank])
            dist.all_reduce(value, group=twin)
            row = next(r for r in groups_along(config, ("pipefusion",)) if rank in r)
            problems += [] if value.item() == sum(row) else [f"{config.describe()} rank {rank}: twin sum"]
        released = [g for g in (mesh.group(axes) for axes in DEFAULT_GROUP_AXES) if g is not None]
        released += [twin] if twin is not None else []
        mesh.destroy()  # a new layout must not pile up groups
        for group in released:
            try:
                dist.get_rank(group)
                problems.append(f"{config.describe()} rank {rank}: a group survived destroy()")
            except ValueError:
                pass
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, problems)
    return [p for per_rank in gathered for p in per_rank]


@pytest.fixture(scope="module", autouse=True)
def _stop_forkserver() -> Iterator[None]:
    yield
    stop_helper_processes()


def test_groups_on_four_ranks() -> None:
    configs = [ParallelConfig(cfg_degree=2, ring_degree=2), ParallelConfig(pipefusion_degree=2, ulysses_degree=2),
               ParallelConfig(ring_degree=2, ulysses_degree=2), ParallelConfig(pipefusion_degree=4),
               ParallelConfig(data_degree=2, pipefusion_degree=2), ParallelConfig(data_degree=2, cfg_degree=2),
               ParallelConfig(data_degree=4)]
    assert run_ranks(4, check_groups, (configs,), timeout=240) == []


def test_axes_are_outer_to_inner() -> None:
    assert AXES == ("data", "cfg", "pipefusion", "ring", "ulysses")
