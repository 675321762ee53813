"""The two places the workers meet the engine: joining the torch.distributed world, building an engine.

World size 1 uses the serial ``Engine`` and no process group; larger worlds go through the parallel
engine's ``init_distributed`` and ``create_engine`` (collective: every rank calls it alike).
"""

from __future__ import annotations

from typing import Any, Optional

from comfyui_xdit.parallel import create_engine, init_distributed, shutdown_distributed
from comfyui_xdit.parallel.nccl_semantics import from_env, install, uninstall
from comfyui_xdit.parallel_config import ParallelConfig


def init_world(rank: int, world_size: int, master_addr: str, master_port: int, backend: str,
               timeout_s: float, store_file: Optional[str] = None, store: Any = None) -> Any:
    """Join the world of ``world_size`` ranks (nothing to do for one rank); ``store_file`` and ``store`` (rank
    0's listening TCP store): see init_distributed.
    A gloo world obeys NCCL's rules when ``COMFYUI_XDIT_NCCL_SEMANTICS=1`` (the tests); the returned
    handle goes back to ``leave_world``."""
    if world_size == 1:
        return None
    init_distributed(rank, world_size, master_addr, master_port, backend=backend, timeout=timeout_s,
                     store_file=store_file, store=store)
    return install(from_env(), timeout_s) if backend == "gloo" else None


def leave_world(nccl_rules: Any = None) -> None:
    uninstall(nccl_rules)
    shutdown_distributed()


def release_engine(engine: Any) -> None:
    """Free the process groups of an engine that a new layout replaces (every rank does it alike)."""
    mesh = getattr(engine, "mesh", None)  # the serial Engine has none
    if mesh is not None:
        mesh.destroy()


def build_engine(adapter: Any, parallel: ParallelConfig, rank: int) -> Any:
    """The engine for this rank: serial for world size 1, else the parallel engine."""
    return create_engine(adapter, parallel, rank)
