"""The two places the workers meet the engine: joining the torch.distributed world, building an engine.

World size 1 uses the serial ``Engine`` and no process group. Larger worlds use the parallel engine's
own ``init_distributed`` / ``create_engine`` when ``comfyui_xdit.parallel`` provides them.
"""

from __future__ import annotations

import datetime
import importlib
import logging
from typing import Any, Callable, Optional

import torch

from comfyui_xdit.parallel_config import ParallelConfig

logger = logging.getLogger(__name__)


def _parallel_function(name: str) -> Optional[Callable[..., Any]]:
    try:
        module = importlib.import_module("comfyui_xdit.parallel")
    except ImportError:
        return None
    return getattr(module, name, None)


def init_world(rank: int, world_size: int, master_addr: str, master_port: int, backend: str,
               timeout_s: float) -> None:
    """Join the world of ``world_size`` ranks (nothing to do for one rank)."""
    if world_size == 1:
        return
    init = _parallel_function("init_distributed")
    if init is not None:
        init(rank=rank, world_size=world_size, master_addr=master_addr, master_port=master_port,
             backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        return
    torch.distributed.init_process_group(backend=backend, init_method=f"tcp://{master_addr}:{master_port}",
                                         rank=rank, world_size=world_size,
                                         timeout=datetime.timedelta(seconds=timeout_s))


def leave_world() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def build_engine(adapter: Any, parallel: ParallelConfig, rank: int) -> Any:
    """The engine for this rank: serial for world size 1, else the parallel engine's factory."""
    if parallel.is_serial:
        from comfyui_xdit.engine import Engine

        return Engine(adapter, parallel, rank)
    create = _parallel_function("create_engine")
    if create is None:
        raise RuntimeError(f"parallel config {parallel.describe()} needs comfyui_xdit.parallel.create_engine, "
                           f"which this installation lacks")
    return create(adapter, parallel, rank)
