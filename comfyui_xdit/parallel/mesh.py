"""Rank layout of the hybrid world and its process groups.

Ranks are ``torch.arange(world).reshape(data, cfg, pipefusion, ring, ulysses)``: the innermost axis
(Ulysses, an all-to-all in every attention layer) pairs neighbouring ranks, the outer ones (CFG, one
exchange per step; data, one gather per generation) the farthest ones. A data group (one chunk of the
batch) is a contiguous block of ranks laid out exactly as a world without the data axis. A group along
a set of axes holds the ranks that differ only in those axes, in increasing rank order, so a rank's
index in the group is its coordinate there (row-major over the group's axes).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..parallel_config import ParallelConfig

logger = logging.getLogger(__name__)

AXES: tuple[str, ...] = ("data", "cfg", "pipefusion", "ring", "ulysses")
SEQUENCE_AXES: tuple[str, ...] = ("ring", "ulysses")
# Groups every mesh creates: each axis alone, plus the sequence-parallel pair that gathers a shard.
# (An axis of degree 1 creates no group, so a world without data parallelism has the same groups as before.)
DEFAULT_GROUP_AXES: tuple[tuple[str, ...], ...] = (("data",), ("cfg",), ("pipefusion",), ("ring",), ("ulysses",),
                                                   SEQUENCE_AXES)
# Axes that also get a second group over the same ranks: NCCL runs one communicator's operations in
# order, so PipeFusion's patches going back to stage 0 travel apart from the activations going forward.
DEFAULT_TWIN_AXES: tuple[tuple[str, ...], ...] = (("pipefusion",),)


def degrees(parallel: ParallelConfig) -> tuple[int, ...]:
    return (parallel.data_degree, parallel.cfg_degree, parallel.pipefusion_degree, parallel.ring_degree,
            parallel.ulysses_degree)


def rank_grid(parallel: ParallelConfig) -> torch.Tensor:
    """(data, cfg, pipefusion, ring, ulysses) tensor of global ranks."""
    return torch.arange(parallel.world_size).reshape(degrees(parallel))


def _check_axes(axes: tuple[str, ...]) -> None:
    unknown = [a for a in axes if a not in AXES]
    if unknown or len(set(axes)) != len(axes):
        raise ValueError(f"axes must be distinct names from {AXES}, got {axes}")


def groups_along(parallel: ParallelConfig, axes: tuple[str, ...]) -> list[list[int]]:
    """Every group of ranks that differ only along ``axes``, each in increasing rank order."""
    _check_axes(axes)
    inner = sorted(AXES.index(a) for a in axes)  # keep the mesh order so rows stay increasing
    outer = [i for i in range(len(AXES)) if i not in inner]
    size = math.prod(degrees(parallel)[i] for i in inner)
    # (d, c, p, r, u) -> (outer..., inner...) -> (groups, size)
    rows = rank_grid(parallel).permute(*outer, *inner).reshape(-1, size)
    return [row.tolist() for row in rows]


@dataclass(frozen=True)
class RankCoords:
    """One rank's position along each axis (fields in ``AXES`` order)."""

    data: int
    cfg: int
    pipefusion: int
    ring: int
    ulysses: int

    @classmethod
    def of(cls, rank: int, parallel: ParallelConfig) -> "RankCoords":
        if not 0 <= rank < parallel.world_size:
            raise ValueError(f"rank {rank} is outside a world of {parallel.world_size} ({parallel.describe()})")
        index = (rank_grid(parallel) == rank).nonzero()[0].tolist()
        return cls(*index)

    def index_along(self, parallel: ParallelConfig, axes: tuple[str, ...]) -> int:
        """Row-major index of this rank inside its group along ``axes`` (its rank in that group)."""
        _check_axes(axes)
        index = 0
        for axis in sorted(axes, key=AXES.index):
            index = index * degrees(parallel)[AXES.index(axis)] + getattr(self, axis)
        return index


def _new_groups(parallel: ParallelConfig, axes: tuple[str, ...], rank: int) -> Optional[dist.ProcessGroup]:
    """Every group along ``axes`` (``new_group`` is collective: every rank creates every group, in the same
    order); return this rank's, or ``None`` when it would hold this rank alone."""
    rows = groups_along(parallel, axes)
    mine: Optional[dist.ProcessGroup] = None
    if len(rows[0]) > 1:
        for row in rows:
            group = dist.new_group(row)
            if rank in row:
                mine = group
    return mine


class Mesh:
    """This rank's coordinates and the torch.distributed groups it belongs to.

    Build it with ``Mesh.build`` on every rank in the same order (``new_group`` is collective). An axis
    set of size 1 gets no group (``None``); the collectives in ``comm`` treat that as local.
    """

    def __init__(self, parallel: ParallelConfig, rank: int,
                 groups: dict[tuple[str, ...], Optional[dist.ProcessGroup]],
                 twins: Optional[dict[tuple[str, ...], Optional[dist.ProcessGroup]]] = None) -> None:
        self.parallel = parallel
        self.rank = rank
        self.coords = RankCoords.of(rank, parallel)
        self._groups = {self._key(axes): group for axes, group in groups.items()}
        self._twins = {self._key(axes): group for axes, group in (twins or {}).items()}

    def destroy(self) -> None:
        """Release this mesh's groups (all ranks alike, e.g. before building the mesh of a new layout)."""
        for group in [*self._groups.values(), *self._twins.values()]:
            if group is not None:
                dist.destroy_process_group(group)
        self._groups = {axes: None for axes in self._groups}
        self._twins = {axes: None for axes in self._twins}

    @staticmethod
    def _key(axes: tuple[str, ...]) -> tuple[str, ...]:
        _check_axes(axes)
        return tuple(sorted(axes, key=AXES.index))

    @classmethod
    def build(cls, parallel: ParallelConfig, rank: int,
              group_axes: tuple[tuple[str, ...], ...] = DEFAULT_GROUP_AXES,
              twin_axes: tuple[tuple[str, ...], ...] = DEFAULT_TWIN_AXES) -> "Mesh":
        """Create the groups along each of ``group_axes``, and a second one along each of ``twin_axes``
        (collective: call on all ranks alike)."""
        if parallel.world_size > 1:
            if not dist.is_initialized():
                raise RuntimeError("torch.distributed is not initialised; call init_distributed first")
            if dist.get_world_size() != parallel.world_size:
                raise ValueError(f"{parallel.describe()} needs {parallel.world_size} ranks but torch.distributed has "
                                 f"{dist.get_world_size()}; start the world with {parallel.world_size} ranks")
        groups = {axes: _new_groups(parallel, axes, rank) for axes in group_axes}
        twins = {axes: _new_groups(parallel, axes, rank) for axes in twin_axes}
        logger.debug("rank %d: mesh %s, coords %s", rank, parallel.describe(), RankCoords.of(rank, parallel))
        return cls(parallel, rank, groups, twins)

    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    def group(self, axes: tuple[str, ...]) -> Optional[dist.ProcessGroup]:
        """The group along ``axes``; ``None`` when it would hold this rank alone."""
        key = self._key(axes)
        if key not in self._groups:
            raise KeyError(f"no group along {axes}; build the mesh with group_axes containing it")
        return self._groups[key]

    def twin(self, axes: tuple[str, ...]) -> Optional[dist.ProcessGroup]:
        """The second group along ``axes`` (same ranks as ``group(axes)``, its own message stream)."""
        key = self._key(axes)
        if key not in self._twins:
            raise KeyError(f"no twin group along {axes}; build the mesh with twin_axes containing it")
        return self._twins[key]

    def size(self, axes: tuple[str, ...]) -> int:
        return math.prod(degrees(self.parallel)[AXES.index(a)] for a in self._key(axes))

    def index(self, axes: tuple[str, ...]) -> int:
        return self.coords.index_along(self.parallel, axes)

    def rank_at(self, **coords: int) -> int:
        """Global rank at this rank's coordinates with some replaced, e.g. ``rank_at(pipefusion=0)``."""
        _check_axes(tuple(coords))
        merged = {**self.coords.__dict__, **coords}
        return int(rank_grid(self.parallel)[tuple(merged[a] for a in AXES)])

    def peer(self, axis: str, offset: int) -> int:
        """Global rank ``offset`` steps along ``axis`` (cyclic), e.g. the next PipeFusion stage."""
        _check_axes((axis,))
        size = degrees(self.parallel)[AXES.index(axis)]
        return self.rank_at(**{axis: (getattr(self.coords, axis) + offset) % size})
