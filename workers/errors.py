"""Errors the pool raises; each says which rank, host and call, or what to do about it."""

from __future__ import annotations

from typing import Optional


class PoolError(RuntimeError):
    """Base for every failure of the worker pool."""


class WorkerError(PoolError):
    """A rank failed in ``method``; ``cause`` is the worker's own exception (also ``__cause__``)."""

    def __init__(self, rank: int, host: str, method: str, cause: Optional[BaseException] = None,
                 detail: str = "") -> None:
        self.rank, self.host, self.method, self.cause = rank, host, method, cause
        text = detail or (f"{type(cause).__name__}: {cause}" if cause is not None else "unknown failure")
        super().__init__(f"rank {rank} on host {host} failed in {method}: {text}")
        if cause is not None:
            self.__cause__ = cause


class WorkerLost(WorkerError):
    """A rank's actor or its whole host died; the world was torn down."""


class WorkerTimeout(WorkerError):
    """A rank did not answer ``method`` in time."""


class WorkerStalled(WorkerTimeout):
    """A rank stopped making progress (no heartbeat, or stuck at a step its peers passed); the world
    was torn down, its processes killed."""


class PoolUnreachable(PoolError):
    """The Ray head given by address cannot be reached."""


class NotEnoughDevices(PoolError):
    """The cluster has fewer devices than the parallel config's world size."""


class ModelMissing(PoolError):
    """A model file is on neither the worker's host nor the ComfyUI machine."""


class VersionSkew(PoolError):
    """torch / diffusers / comfyui-xdit differ between hosts."""


class InsecureCluster(PoolError):
    """Ray's token authentication is off; the pool refuses to run code on such a cluster."""
