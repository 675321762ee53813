"""Start and stop this process's torch.distributed world (one process per rank)."""

from __future__ import annotations

import datetime
import logging
import socket

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
                     timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the world as ``rank``; every collective then fails after ``timeout`` seconds, never hangs."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (GPU), got {backend!r}")
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process; call shutdown_distributed first")
    dist.init_process_group(backend=backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout))
    logger.info("rank %d/%d joined %s world at %s:%d", rank, world_size, backend, master_addr, master_port)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
