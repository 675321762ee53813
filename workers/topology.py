"""Which rank runs where: ulysses and ring groups inside one host, pipefusion, cfg and data across hosts.

The mesh is ``rank = (((data * C + cfg) * P + pipe) * R + ring) * U + ulysses`` (outer to inner, as in the engine),
so the ``ring * ulysses`` ranks of one sequence-parallel group are consecutive. The pool reserves
each such block as one STRICT_PACK placement group (all bundles on one node); this module decides
the block size and the order of the blocks, and is pure so it is testable without Ray.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence

from comfyui_xdit.parallel.mesh import AXES, groups_along
from comfyui_xdit.parallel_config import ParallelConfig

from .errors import NotEnoughDevices

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slot:
    """One reserved device: the node it is on and its place in the placement groups."""

    node_id: str
    host: str
    group: int  # which placement group (block)
    bundle: int  # bundle index inside that group


def block_size(parallel: ParallelConfig, devices_per_node: Mapping[str, int]) -> int:
    """Ranks that must share a host: ring*ulysses when every block fits, else ulysses alone.

    Raises ``NotEnoughDevices`` when the cluster is too small for the world or a ulysses group
    cannot fit on any host (its all-to-all runs every layer; across Ethernet it would crawl).
    """
    world = parallel.world_size
    total = sum(devices_per_node.values())
    if total < world:
        raise NotEnoughDevices(
            f"parallel config {parallel.describe()} needs {world} devices, the cluster has {total} "
            f"({', '.join(f'{h}: {n}' for h, n in devices_per_node.items()) or 'no hosts'}); "
            f"add hosts or lower the degrees")
    for size in (parallel.ring_degree * parallel.ulysses_degree, parallel.ulysses_degree):
        if sum(n // size for n in devices_per_node.values()) >= world // size:
            if size != parallel.ring_degree * parallel.ulysses_degree:
                logger.warning("ring groups of %s cross hosts: no host has %d free devices",
                               parallel.describe(), parallel.ring_degree * parallel.ulysses_degree)
            return size
    biggest = max(devices_per_node.values(), default=0)
    raise NotEnoughDevices(
        f"ulysses_degree {parallel.ulysses_degree} must fit on one host, the biggest has {biggest} "
        f"devices; use ring_degree for the cross-host part (e.g. ulysses={biggest}, "
        f"ring={parallel.ulysses_degree * parallel.ring_degree // max(biggest, 1)})")


def order_ranks(slots: Sequence[Slot], first_node: str | None = None) -> list[Slot]:
    """Rank order: blocks of one node next to each other, ``first_node`` (the driver's) first.

    Within a block the bundle order is kept, so each block stays consecutive ranks on one host.
    """
    blocks: dict[int, list[Slot]] = defaultdict(list)
    for slot in slots:
        blocks[slot.group].append(slot)
    for group, members in blocks.items():
        nodes = {s.node_id for s in members}
        assert len(nodes) == 1, f"placement group {group} spans nodes {nodes}"

    def key(group: int) -> tuple[int, str, int]:
        node = blocks[group][0].node_id
        return (0 if node == first_node else 1, node, group)

    return [slot for group in sorted(blocks, key=key) for slot in sorted(blocks[group], key=lambda s: s.bundle)]


def group_hosts(parallel: ParallelConfig, rank_nodes: Sequence[str]) -> dict[str, list[set[str]]]:
    """For each axis, the set of nodes each of its groups touches (a test and status helper)."""
    return {axis: [{rank_nodes[r] for r in group} for group in groups_along(parallel, (axis,))]
            for axis in AXES}

