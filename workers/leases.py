"""Who holds which devices of a shared cluster: the pools' placement groups, named after their client.

Every world reserves its devices as Ray placement groups named ``xdit/<client>/<group>``, so any
client can read the whole cluster's holders from Ray's placement group table, without a
coordinator of its own. Ray gives a bundle to one placement group at a time (no rank is ever shared
between two jobs) and removes the groups of a client whose process ends (its devices come free).
A group still ``PENDING`` is a client waiting for devices: an idle pool that sees another client
waiting lets its world go (``others_waiting``), so jobs of several clients take turns.
Pure functions over the table's rows; the Ray calls are in ``read_leases``.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Optional

PREFIX = "xdit/"


def new_client_id() -> str:
    """This pool's name in the cluster: host, process and a short random part (several pools per process)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def group_name(client: str, index: int) -> str:
    return f"{PREFIX}{client}/{index}"


def client_of(name: str) -> Optional[str]:
    """The client of a placement group name of ours, else None (another application's group)."""
    if not name.startswith(PREFIX) or "/" not in name[len(PREFIX):]:
        return None
    return name[len(PREFIX):].rsplit("/", 1)[0]


@dataclass(frozen=True)
class Lease:
    """One placement group of one client: ``held`` (created), ``waiting`` (pending: no room) or ``starting``."""

    client: str
    state: str  # "held", "waiting" or "starting"
    devices: int  # bundles: one device (GPU, or CPU rank) each
    kind: str  # "GPU" or "CPU"
    hosts: tuple[str, ...]  # where the held bundles are ("" while waiting)
    group_id: str


def leases_from_table(table: Mapping[str, Mapping[str, Any]], addresses: Mapping[str, str]) -> tuple[Lease, ...]:
    """Our clients' live groups from ``ray.util.placement_group_table()``; removed groups are left out."""
    out = []
    for group_id, row in table.items():
        client = client_of(str(row.get("name", "")))
        state = {"CREATED": "held", "PENDING": "waiting", "RESCHEDULING": "waiting"}.get(str(row.get("state")))
        if client is None or state is None:
            continue
        if state == "waiting" and row.get("stats", {}).get("scheduling_state") != "NO_RESOURCES":
            state = "starting"  # being placed right now (there is room): nobody needs to give devices back
        bundles = row.get("bundles", {})
        kind = "GPU" if any("GPU" in b for b in bundles.values()) else "CPU"
        nodes = [n for n in row.get("bundles_to_node_id", {}).values() if n]
        hosts = tuple(addresses.get(n, n[:8]) for n in nodes) if state == "held" else ()
        out.append(Lease(client, state, len(bundles), kind, hosts, str(group_id)))
    return tuple(sorted(out, key=lambda lease: (lease.client, lease.group_id)))


def others_waiting(leases: tuple[Lease, ...], me: str) -> bool:
    """Whether another client waits for devices (so an idle ``me`` should give its world back)."""
    return any(lease.state == "waiting" and lease.client != me for lease in leases)


def describe_holders(leases: tuple[Lease, ...]) -> str:
    """'client A holds 2 CPU on 10.0.0.1; client B waits for 1 CPU' for messages and status."""
    if not leases:
        return "no pool holds devices"
    parts = []
    for lease in leases:
        if lease.state == "held":
            parts.append(f"{lease.client} holds {lease.devices} {lease.kind} on {', '.join(sorted(set(lease.hosts)))}")
        else:
            parts.append(f"{lease.client} {'waits for' if lease.state == 'waiting' else 'is placing'} "
                         f"{lease.devices} {lease.kind}")
    return "; ".join(parts)


def read_leases() -> tuple[Lease, ...]:
    """The cluster's leases now (one GCS call)."""
    import ray
    from ray.util.placement_group import placement_group_table

    addresses = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes()}
    return leases_from_table(placement_group_table(), addresses)
