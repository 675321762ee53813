"""Measure the link between two hosts of the cluster, for the layout planner: bandwidth and latency of
torch.distributed point-to-point messages (gloo over TCP, the way ranks on different hosts talk when they
cannot use NVLink), between two throwaway actors pinned one to each host.

One pair of hosts is measured (the first two that hold ranks) and taken for every pair: the planner's
cluster model has one link between hosts. The actors need no CPU or GPU of their own, so a busy pool
can still be measured; their process group lives and dies with them.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

from comfyui_xdit.planning.hardware import Link

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkProbe:
    """How to measure: ``payload_bytes`` sent ``repeats`` times each way for bandwidth, one float
    ``latency_rounds`` times for latency, everything within ``timeout_s``."""

    payload_bytes: int = 16 << 20
    repeats: int = 3
    latency_rounds: int = 20
    timeout_s: float = 60.0
    network_interface: Optional[str] = None  # GLOO_SOCKET_IFNAME, as the pool's ranks use


class ProbeEnd:
    """One end of the probe (a Ray actor): rank 0 listens, rank 1 connects; rank 0 reports."""

    def endpoint(self) -> tuple[str, int]:
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return host, int(sock.getsockname()[1])

    def run(self, rank: int, addr: str, port: int, probe: LinkProbe) -> Optional[tuple[float, float]]:
        """(bytes per second one way, seconds per message) on rank 0; None on rank 1."""
        import torch
        import torch.distributed as dist

        if probe.network_interface:
            os.environ["GLOO_SOCKET_IFNAME"] = probe.network_interface
        torch.set_num_threads(1)
        timeout = timedelta(seconds=probe.timeout_s)
        store = dist.TCPStore(addr, port, 2, rank == 0, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timeout)
        try:
            peer = 1 - rank
            small, big = torch.zeros(1), torch.zeros(probe.payload_bytes // 4)

            def round_trip(tensor: torch.Tensor) -> None:
                if rank == 0:
                    dist.send(tensor, peer)
                    dist.recv(tensor, peer)
                else:
                    dist.recv(tensor, peer)
                    dist.send(tensor, peer)

            round_trip(small)  # connect
            round_trip(big)  # buffers allocated on both sides
            latency = fastest_one_way(round_trip, small, probe.latency_rounds)
            one_way = fastest_one_way(round_trip, big, probe.repeats)
            # what the payload adds over an empty message; where that is lost in the noise, the whole
            # one-way time (a lower bound on the bandwidth)
            transfer = one_way - latency if one_way - latency > 0.1 * one_way else one_way
            return (big.numel() * 4 / transfer, latency) if rank == 0 else None
        finally:
            dist.destroy_process_group()


def fastest_one_way(round_trip: Callable[[Any], None], tensor: Any, rounds: int) -> float:
    """Half the fastest of ``rounds`` round trips of ``tensor``: other work on the hosts only slows a
    round trip down, so the fastest is the link's."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        round_trip(tensor)
        best = min(best, time.perf_counter() - start)
    return best / 2


def probe_hosts(node_ids: Sequence[str], names: Sequence[str], probe: LinkProbe = LinkProbe()) -> Link:
    """The link between the first two of ``node_ids`` (Ray node ids; ``names`` for the link's name).
    Needs a connected Ray; raises ``TimeoutError`` when the probe does not finish within its timeout."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if len(node_ids) < 2:
        raise ValueError(f"measuring a link needs two hosts, the cluster has {len(node_ids)}")
    remote = ray.remote(ProbeEnd)
    ends = [remote.options(num_cpus=0, max_restarts=0,
                           scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
            for node in node_ids[:2]]
    try:
        addr, port = ray.get(ends[0].endpoint.remote(), timeout=probe.timeout_s)
        results = ray.get([end.run.remote(rank, addr, port, probe) for rank, end in enumerate(ends)],
                          timeout=probe.timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"measuring the link {names[0]} <-> {names[1]} did not finish in {probe.timeout_s:g} s; "
                           f"check that the hosts reach each other on the pool's network interface, or give "
                           f"the link speed by hand (--inter)") from None
    finally:
        for end in ends:
            ray.kill(end)
    bandwidth, latency = results[0]
    link = Link(f"measured {names[0]} <-> {names[1]}", bandwidth, latency)
    logger.info("link %s: %.2f GB/s one way, %.0f us per message", link.name, bandwidth / 1e9, latency * 1e6)
    return link
