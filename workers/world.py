"""A world: the actors of one torch.distributed world, their placement groups, and collective calls.

Built from the live cluster for one parallel layout; torn down whole when any rank dies (a rank
cannot rejoin a torch.distributed world). ``call`` is the collective RPC: every rank runs the method
and the first failure is re-raised as ``WorkerError(rank, host, method)`` with the worker's cause.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import ModelRef
from comfyui_xdit.sampling import GenerationCancelled

from .actor import RankSetup, RankWorker
from .errors import NotEnoughDevices, WorkerError, WorkerLost, WorkerStalled, WorkerTimeout
from .heartbeat import Heartbeats
from .leases import describe_holders, group_name, read_leases
from .liveness import describe_beats, find_stall
from .settings import PoolSettings
from .topology import Slot, block_size, order_ranks
from .versions import check_versions, host_versions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankInfo:
    rank: int
    host: str
    node_id: str
    pid: int
    device: str


def cluster_devices(settings: PoolSettings) -> tuple[str, dict[str, int]]:
    """('cuda' | 'cpu', devices per alive node id) from the cluster's total resources."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    has_gpus = any(n["Resources"].get("GPU", 0) >= 1 for n in nodes)
    kind = "cuda" if (settings.use_gpus if settings.use_gpus is not None else has_gpus) else "cpu"
    if kind == "cuda":
        return kind, {n["NodeID"]: int(n["Resources"].get("GPU", 0)) for n in nodes}
    return kind, {n["NodeID"]: int(n["Resources"].get("CPU", 0) // settings.cpus_per_rank) for n in nodes}


def node_addresses() -> dict[str, str]:
    import ray

    return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes()}


def worker_failure(rank: RankInfo, method: str, exc: BaseException) -> BaseException:
    """Translate a Ray failure of ``rank``'s call into our error (or the cancellation it carries)."""
    import ray.exceptions as rex

    host = f"{rank.host} (node {rank.node_id[:8]}, pid {rank.pid})"
    if isinstance(exc, rex.RayTaskError):
        cause = getattr(exc, "cause", None) or exc
        if isinstance(cause, GenerationCancelled):
            return cause
        return WorkerError(rank.rank, host, method, cause)
    if isinstance(exc, (rex.RayActorError, rex.NodeDiedError, rex.ObjectLostError, rex.OwnerDiedError)):
        return WorkerLost(rank.rank, host, method, exc, detail=f"the worker process or its host died ({exc})")
    return WorkerError(rank.rank, host, method, exc)


class World:
    """The live actors of one layout; ``key`` says which layouts it can serve without a rebuild."""

    def __init__(self, settings: PoolSettings, parallel: ParallelConfig, client: str = "anonymous") -> None:
        self.settings = settings
        self.client = client  # names the placement groups: the cluster's status shows who holds the devices
        self.world_size = parallel.world_size
        self.device_kind, devices = cluster_devices(settings)
        self.block = block_size(parallel, devices)
        self.groups: list[Any] = []
        self.actors: list[Any] = []
        self.ranks: list[RankInfo] = []
        self.loaded: Optional[tuple[ModelRef, ParallelConfig]] = None  # what the ranks run now
        self.resident: tuple[tuple[ModelRef, ParallelConfig], ...] = ()  # what they keep loaded, oldest first
        self.broken = False
        self.heartbeats: Optional[Heartbeats] = None  # the ranks' heartbeats during the running job

    @property
    def key(self) -> tuple[int, int]:
        return self.world_size, self.block

    # ---- building ------------------------------------------------------------------------------
    def build(self) -> "World":
        try:
            slots = self._reserve()
            self._create_actors(order_ranks(slots, first_node=_driver_node()))
            self._join()
        except BaseException:
            self.teardown()
            raise
        return self

    def _reserve(self) -> list[Slot]:
        import ray
        from ray.exceptions import GetTimeoutError
        from ray.util.placement_group import placement_group, placement_group_table

        bundle = {"GPU": 1.0} if self.device_kind == "cuda" else {"CPU": self.settings.cpus_per_rank}
        self.groups = [placement_group([dict(bundle)] * self.block, strategy="STRICT_PACK",
                                       name=group_name(self.client, index))
                       for index in range(self.world_size // self.block)]
        timeout = self.settings.timeouts.start_s
        try:
            ray.get([g.ready() for g in self.groups], timeout=timeout)
        except GetTimeoutError:
            _, free = cluster_devices(self.settings)
            raise NotEnoughDevices(
                f"could not reserve {self.world_size} {self.device_kind} ranks in groups of {self.block} "
                f"per host within {timeout:.0f}s; devices per host: {free}; {describe_holders(read_leases())} "
                f"(pools with a job running keep their devices until it ends), or a host just left") from None
        addresses = node_addresses()
        slots = []
        for index, group in enumerate(self.groups):
            table = placement_group_table(group)
            for b, node in sorted(table["bundles_to_node_id"].items()):
                slots.append(Slot(node_id=node, host=addresses.get(node, "?"), group=index, bundle=int(b)))
        return slots

    def _create_actors(self, slots: Sequence[Slot]) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cuda = self.device_kind == "cuda"
        remote = ray.remote(RankWorker)
        for slot in slots:
            strategy = PlacementGroupSchedulingStrategy(self.groups[slot.group],
                                                        placement_group_bundle_index=slot.bundle)
            self.actors.append(remote.options(num_gpus=1 if cuda else 0,
                                              num_cpus=0 if cuda else self.settings.cpus_per_rank,
                                              scheduling_strategy=strategy, max_restarts=0,
                                              max_concurrency=4).remote(self.settings.models_per_rank))  # + heartbeat, status, blame
        provisional = [RankInfo(r, s.host, s.node_id, -1, "?") for r, s in enumerate(slots)]
        self.ranks = provisional
        facts = self.call("describe", timeout_s=self.settings.timeouts.start_s)
        check_versions(host_versions(), [(f"rank {r} on {f['host']}", f["versions"]) for r, f in enumerate(facts)])
        env = self._env()
        devices = self.call_each("setup", [(RankSetup(r, self.world_size, self.device_kind, env),)
                                           for r in range(self.world_size)], timeout_s=self.settings.timeouts.rpc_s)
        self.ranks = [RankInfo(r, f["host"], f["node_id"], f["pid"], d) for r, (f, d) in enumerate(zip(facts, devices))]
        logger.info("world of %d %s ranks: %s", self.world_size, self.device_kind,
                    ", ".join(f"{r.rank}@{r.host}" for r in self.ranks))

    def _env(self) -> tuple[tuple[str, str], ...]:
        interface = self.settings.network_interface or ("lo" if self.settings.embedded else None)
        if interface is None:
            return ()
        return (("GLOO_SOCKET_IFNAME", interface), ("NCCL_SOCKET_IFNAME", interface))

    def _join(self) -> None:
        if self.world_size == 1:
            return
        if self.settings.embedded:
            # Every rank is on this machine: meet through a file, so no TCP store listens beyond loopback.
            addr, port = "127.0.0.1", 0
            store_file: Optional[str] = os.path.join(tempfile.gettempdir(), f"xdit-world-{uuid.uuid4().hex}")
        else:
            addr, port = self.call_one(0, "open_rendezvous", self.settings.timeouts.rendezvous_s,
                                       timeout_s=self.settings.timeouts.rpc_s)
            store_file = None
        self.call("join_world", addr, port, self.settings.timeouts.rendezvous_s, store_file,
                  timeout_s=self.settings.timeouts.rendezvous_s + self.settings.timeouts.rpc_s)

    # ---- collective calls ----------------------------------------------------------------------
    def call(self, method: str, *args: Any, timeout_s: float) -> list[Any]:
        """Run ``method(*args)`` on every rank; results in rank order."""
        return self.call_each(method, [args] * len(self.actors), timeout_s=timeout_s)

    def call_each(self, method: str, args: Sequence[tuple], timeout_s: float,
                  on_poll: Optional[Callable[[], bool]] = None, watch: bool = False) -> list[Any]:
        """``watch``: heartbeat every rank meanwhile and fail fast (``WorkerStalled``) on a stalled one."""
        heartbeats = Heartbeats(self.actors, self.settings.timeouts.heartbeat_s) if watch else None
        refs = [getattr(actor, method).remote(*a) for actor, a in zip(self.actors, args)]
        self.heartbeats = heartbeats
        try:
            return self.gather(refs, method, timeout_s, on_poll, heartbeats=heartbeats)
        finally:
            self.heartbeats = None

    def call_one(self, rank: int, method: str, *args: Any, timeout_s: float) -> Any:
        ref = getattr(self.actors[rank], method).remote(*args)
        return self.gather([ref], method, timeout_s, ranks=[rank])[0]

    def gather(self, refs: Sequence[Any], method: str, timeout_s: float,
               on_poll: Optional[Callable[[], bool]] = None, ranks: Optional[Sequence[int]] = None,
               poll_s: float = 0.2, heartbeats: Optional[Heartbeats] = None) -> list[Any]:
        """Wait for every ref and return their values in order.

        The first real failure is raised at once (ranks stuck in a collective with a dead peer would
        never answer); a cancellation only after every rank has stopped. ``timeout_s`` bounds the
        wait; ``on_poll`` runs between polls and restarts the clock when it returns True (progress);
        ``heartbeats``: a rank they show stalled fails the call within ``Timeouts.stall_s``.
        """
        import ray

        ranks = list(range(len(refs))) if ranks is None else list(ranks)
        pending = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        cancelled: Optional[BaseException] = None
        deadline = time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                stuck = sorted(ranks[i] for i in pending.values())
                info = self.ranks[stuck[0]]
                beats = f"; {describe_beats(heartbeats.beats(), time.monotonic())}" if heartbeats else ""
                raise WorkerTimeout(info.rank, self._where(info), method,
                                    detail=f"no answer within {timeout_s:.0f}s from ranks {stuck}{beats}")
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=min(left, poll_s))
            for ref in ready:
                i = pending.pop(ref)
                try:
                    results[i] = ray.get(ref, timeout=self.settings.timeouts.rpc_s)
                except Exception as exc:  # noqa: BLE001 - translated and re-raised below
                    failure = worker_failure(self.ranks[ranks[i]], method, exc)
                    if isinstance(failure, GenerationCancelled):
                        cancelled = failure
                        continue
                    if isinstance(failure, WorkerError) and not isinstance(failure, WorkerLost):
                        failure = self._blame_dead_peer(failure)  # a collective error may mean a lost peer
                    raise failure from exc
            if on_poll is not None and on_poll():
                deadline = time.monotonic() + timeout_s
            if heartbeats is not None and pending:
                heartbeats.poll()
                stall = find_stall(heartbeats.beats(), time.monotonic(), self.settings.timeouts.stall_s)
                if stall is not None:
                    info = self.ranks[stall.rank]
                    raise WorkerStalled(info.rank, self._where(info), method, detail=f"stalled: {stall.reason}")
        if cancelled is not None:
            raise cancelled
        return results

    def _blame_dead_peer(self, failure: WorkerError, timeout_s: float = 10.0) -> WorkerError:
        """When another rank is dead or silent, that rank is the cause: say so as ``WorkerLost``."""
        import ray

        if len(self.actors) < 2:
            return failure
        refs = {actor.ping.remote(): info for actor, info in zip(self.actors, self.ranks) if info.rank != failure.rank}
        ready, silent = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        for ref in ready:
            try:
                ray.get(ref, timeout=1.0)
            except Exception as exc:  # noqa: BLE001 - a dead peer is what we are looking for
                lost = worker_failure(refs[ref], failure.method, exc)
                if isinstance(lost, WorkerLost):
                    return WorkerLost(lost.rank, lost.host, lost.method, exc,
                                      detail=f"the worker process or its host died (rank {failure.rank} then "
                                             f"failed: {failure.cause})")
        if silent:
            info = refs[silent[0]]
            return WorkerLost(info.rank, self._where(info), failure.method,
                              detail=f"no answer to a ping within {timeout_s:.0f}s (rank {failure.rank} "
                                     f"failed: {failure.cause})")
        return failure

    @staticmethod
    def _where(info: RankInfo) -> str:
        return f"{info.host} (node {info.node_id[:8]}, pid {info.pid})"

    # ---- ending --------------------------------------------------------------------------------
    def teardown(self) -> None:
        """Kill every actor and free the placement groups (no graceful path: ranks may be stuck)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:  # noqa: BLE001 - already dead actors raise; nothing to do
                logger.debug("kill failed: %s", exc)
        _kill_stopped_here(self.ranks)
        for group in self.groups:
            try:
                remove_placement_group(group)
            except Exception as exc:  # noqa: BLE001
                logger.debug("placement group removal failed: %s", exc)
        self.actors, self.groups, self.loaded, self.broken = [], [], None, True
        self.resident = ()


def _kill_stopped_here(ranks: Sequence[RankInfo]) -> None:
    """SIGKILL this machine's rank processes that are stopped (SIGSTOP, a debugger): they cannot act on
    ``ray.kill``, which reaches them only after the raylet's grace period. Remote ones: Ray's job."""
    import psutil

    here = _driver_node()
    for info in ranks:
        if info.node_id != here or info.pid <= 0:
            continue
        try:
            process = psutil.Process(info.pid)
            if process.status() == psutil.STATUS_STOPPED and "RankWorker" in " ".join(process.cmdline()):
                logger.warning("rank %d (pid %d) is stopped: killing it", info.rank, info.pid)
                process.kill()
        except psutil.Error:
            continue  # gone already


def _driver_node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()
