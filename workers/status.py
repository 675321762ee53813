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


def rank_statuses(world: Any, ping_s: float) -> list[RankStatus]:
    """Each rank of ``world`` (a ``World``) as the status shows it: from the running job's heartbeats, else
    from a ping answered within ``ping_s`` (an idle rank that does not answer is "no answer")."""
    heartbeats = world.heartbeats  # a job runs: its heartbeats answer, nobody waits on a busy rank
    answers = heartbeats.answers() if heartbeats is not None else _ping_all(world.actors, ping_s)
    ranks = []
    for info, (answer, age, dead) in zip(world.ranks, answers):
        state, model, weights, loads, step = "no answer", None, None, 0, None
        if dead:
            state = "dead"
        elif answer is None and heartbeats is not None:
            state = "busy"  # in the job, no heartbeat answered yet (the stall watch bounds this)
        elif answer is not None:
            state, model, weights = ("busy" if answer["busy"] else "idle"), answer["model"], answer["weights"]
            loads, step = answer.get("loads", 0), answer.get("step")
        ranks.append(RankStatus(info.rank, info.host, info.pid, info.device, state, model, weights,
                                info.node_id, loads, step, round(age, 1) if age is not None else None))
    return ranks


def _ping_all(actors: list[Any], timeout_s: float) -> list[tuple[Optional[dict], Optional[float], bool]]:
    """(answer or None, None, dead) per actor, waiting at most ``timeout_s`` for all of them together."""
    import ray

    refs = [a.ping.remote() for a in actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    out: list[tuple[Optional[dict], Optional[float], bool]] = []
    for ref in refs:
        if ref not in ready:
            out.append((None, None, False))
            continue
        try:
            out.append((ray.get(ref, timeout=0), None, False))
        except Exception:  # noqa: BLE001 - a dead actor is a status, not an error
            out.append((None, None, True))
    return out
