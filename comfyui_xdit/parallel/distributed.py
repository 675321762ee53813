"""Start and stop this process's torch.distributed world (one process per rank)."""

from __future__ import annotations

import datetime
import logging
import socket
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0


def default_backend(device: torch.device) -> str:
    """nccl between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the rendezvous binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, backend: str = "gloo",
                     timeout: float = DEFAULT_TIMEOUT_S, store_file: Optional[str] = None,
                     store: Optional[dist.Store] = None) -> None:
    """Join the world as ``rank``; every collective then fails after ``timeout`` seconds, never hangs.

    The rendezvous is rank 0's TCP store at ``master_addr:master_port``, which listens on every
    interface (torch offers no bind address). When all ranks share one machine, pass ``store_file``
    (a path that does not exist yet) to meet through a file instead and open no such socket. ``store``: rank
    0's TCP store, already listening at ``master_addr:master_port`` (the pool opens it first, on a port the
    OS chose, so no other process can take the port between choosing and listening).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (GPU), got {backend!r}")
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process; call shutdown_distributed first")
    init_method = f"file://{store_file}" if store_file is not None else f"tcp://{master_addr}:{master_port}"
    if store is not None:
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
    else:
        dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
    logger.info("rank %d/%d joined %s world at %s", rank, world_size, backend, init_method)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
