"""What ``comfyui-xdit pool status`` shows: hosts, their devices, the ranks and their state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .leases import Lease


@dataclass(frozen=True)
class HostStatus:
    node_id: str
    address: str
    alive: bool
    cpus: float
    gpus: float
    is_head: bool


@dataclass(frozen=True)
class RankStatus:
    rank: int
    host: str
    pid: int
    device: str
    state: str  # "idle", "busy", "dead" or "no answer"
    model: Optional[str]
    weights: Optional[str] = None  # how the model reached this rank: local file, object store, built in
    node_id: str = ""
    loads: int = 0  # models this rank built since it started (a prompt that reuses the loaded one adds none)
    step: Optional[int] = None  # the step this rank last started (while a job runs)
    heard_s: Optional[float] = None  # seconds since its last heartbeat (while a job runs)


@dataclass(frozen=True)
class PoolStatus:
    address: str
    embedded: bool
    auth: str
    hosts: tuple[HostStatus, ...]
    ranks: tuple[RankStatus, ...]
    layout: Optional[str]  # the parallel config the world is built for
    queued: int
    running: Optional[str]  # id of the running job
    gpus: str = "chosen on each host"  # the embedded pool's GPUs (and the one left to ComfyUI)
    client: str = ""  # this pool's name on the cluster
    leases: tuple[Lease, ...] = ()  # every pool's devices on the cluster, held or waited for

    def format(self) -> str:
        lines = [f"Ray at {self.address} ({'embedded, this machine only' if self.embedded else 'cluster'}), "
                 f"authentication: {self.auth}",
                 f"GPUs: {self.gpus}",
                 f"hosts: {len(self.hosts)}"]
        for h in self.hosts:
            lines.append(f"  {h.address:<16} node {h.node_id[:12]} {'alive' if h.alive else 'DEAD':<5} "
                         f"cpus {h.cpus:g} gpus {h.gpus:g}{' (head)' if h.is_head else ''}")
        lines.append(f"ranks: {len(self.ranks)}" + (f" ({self.layout})" if self.layout else " (created on the first job)"))
        for r in self.ranks:
            lines.append(f"  rank {r.rank:<3} {r.host:<16} pid {r.pid:<8} {r.device:<8} {r.state:<9} "
                         f"model {r.model or '-'}" + (f" ({r.weights})" if r.weights else "")
                         + (f" step {r.step}" if r.step is not None else "")
                         + (f", heard {r.heard_s:g}s ago" if r.heard_s is not None else ""))
        lines.append(f"jobs: {'running ' + self.running if self.running else 'none running'}, {self.queued} queued")
        lines.append(f"devices by client (this pool: {self.client or '-'}): {len(self.leases)} groups")
        for lease in self.leases:
            where = f"on {', '.join(sorted(set(lease.hosts)))}" if lease.hosts else ""
            lines.append(f"  {lease.client:<28} {lease.state:<7} {lease.devices} {lease.kind} {where}".rstrip())
        return "\n".join(lines)


def host_statuses(nodes: Sequence[dict[str, Any]]) -> tuple[HostStatus, ...]:
    """From ``ray.nodes()`` rows."""
    return tuple(HostStatus(node_id=n["NodeID"], address=n.get("NodeManagerAddress", "?"), alive=bool(n.get("Alive")),
                            cpus=float(n.get("Resources", {}).get("CPU", 0)),
                            gpus=float(n.get("Resources", {}).get("GPU", 0)),
                            is_head=any(k.startswith("node:__internal_head__") for k in n.get("Resources", {})))
                 for n in nodes)
