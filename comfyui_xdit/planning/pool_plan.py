"""The planner for a pool the nodes see: its hosts' GPUs (or CPU ranks where it has none) and a model
spec -> the layout to build, with the prediction logged. Imports without ComfyUI or Ray."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..parallel_config import ParallelConfig
from .hardware import CPU_RANK, ETHERNET, H100, NVLINK, SHARED_MEMORY, Cluster, Link
from .model_shape import shape_of
from .planner import PlanRequest, plan_layouts
from .traffic import CallShape

logger = logging.getLogger(__name__)

SPATIAL = 16  # image pixels per packed token side: the VAE's 8 x the 2 x 2 patch, in every family we run
LAYOUT_CHOICES = ("manual", "auto (exact)", "auto (fastest)")  # fastest: PipeFusion allowed


@dataclass(frozen=True)
class PoolHosts:
    """What the planner needs of a pool: devices per alive host, and whether they are GPUs."""

    per_host: tuple[int, ...]
    gpus: bool
    inter: Optional[Link] = None  # measured between hosts (the pool's ``inter_host_link``); None: 25 GbE

    @classmethod
    def of(cls, hosts: Sequence[Any], inter: Optional[Link] = None) -> "PoolHosts":
        """From the pool status' hosts (``alive``, ``gpus``, ``cpus``): GPUs where any host has them, else
        one CPU rank per core."""
        alive = [h for h in hosts if h.alive]
        if any(h.gpus > 0 for h in alive):
            return cls(tuple(int(h.gpus) for h in alive if h.gpus > 0), True, inter)
        return cls(tuple(int(h.cpus) for h in alive if h.cpus >= 1), False, inter)  # a CPU-less head holds none

    def cluster(self) -> Cluster:
        if not self.per_host:
            raise ValueError("the pool has no alive host to plan for; start the pool (or a Ray cluster) first")
        device, intra = (H100, NVLINK) if self.gpus else (CPU_RANK, SHARED_MEMORY)
        return Cluster(len(self.per_host), min(self.per_host), device, intra, self.inter or ETHERNET[25])


def planned_config(spec: Any, hosts: PoolHosts, width: int, height: int, true_cfg: bool, choice: str,
                   steps: int = 20, warmup_steps: int = 1) -> ParallelConfig:
    """The fastest layout for ``spec`` at ``width`` x ``height`` px on ``hosts`` (``choice``: one of the
    auto entries of ``LAYOUT_CHOICES``), logged with its modelled time; ``ValueError`` names the fix."""
    if choice not in LAYOUT_CHOICES[1:]:
        raise ValueError(f"layout {choice!r} is not planned; choose one of {', '.join(LAYOUT_CHOICES[1:])}")
    for name, value in (("width", width), ("height", height)):
        if value % SPATIAL:
            raise ValueError(f"plan_{name} {value} is not a multiple of {SPATIAL} px; set the size you will sample")
    shape = shape_of(spec, spec.family)
    cluster = hosts.cluster()
    call = CallShape((width // SPATIAL) * (height // SPATIAL), cfg_branches=2 if true_cfg else 1)
    ranked = plan_layouts(shape, cluster, PlanRequest(call, steps, exact=choice == "auto (exact)",
                                                      warmup_steps=warmup_steps))
    best = ranked[0]
    serial = next((p.seconds for p in ranked if p.layout.world_size == 1), None)
    logger.info("auto layout for %s at %dx%d on %d host(s) x %d %s (%s between hosts): %s; modelled %.2f s for %d "
                "steps%s", spec.family, width, height, cluster.hosts, cluster.gpus_per_host,
                "GPUs" if hosts.gpus else "CPU ranks", cluster.inter.name,
                best.layout.describe(), best.seconds, steps,
                f" (serial {serial:.2f} s)" if serial is not None else "")
    return best.layout
