"""The hybrid-parallel engine: mesh, USP attention, sequence and CFG parallel, local launch.

``create_engine`` is what a worker calls once it knows its rank and has joined the world.
"""

from __future__ import annotations

from typing import Optional, Union

from ..engine import Engine
from ..models.adapter import Adapter
from ..parallel_config import ParallelConfig
from .comm import CommCounter
from .distributed import free_port, init_distributed, shutdown_distributed
from .engine import ParallelEngine
from .mesh import Mesh, RankCoords

__all__ = ["CommCounter", "Mesh", "ParallelEngine", "RankCoords", "create_engine", "free_port", "init_distributed",
           "shutdown_distributed"]


def create_engine(adapter: Adapter, parallel: ParallelConfig, rank: int, mesh: Optional[Mesh] = None,
                  counter: Optional[CommCounter] = None, batch_cfg: bool = True) -> Union[Engine, ParallelEngine]:
    """The serial ``Engine`` for a world of one, else a ``ParallelEngine`` for ``rank``.

    Without ``mesh`` the groups are created here, which is collective: call it on all ranks alike,
    after ``init_distributed``. ``batch_cfg``: both CFG branches in one forward where ComfyUI batches them.
    """
    if parallel.is_serial:
        return Engine(adapter, parallel, rank, batch_cfg=batch_cfg)
    return ParallelEngine(adapter, parallel, mesh if mesh is not None else Mesh.build(parallel, rank), counter,
                          batch_cfg=batch_cfg)
