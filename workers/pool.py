"""The pool: a persistent set of rank actors on the local machine or a Ray cluster, fed jobs in order.

``XDiTPool(settings).submit(request) -> Job``. Jobs run one at a time in submission order on the
world built for their parallel layout (built lazily, kept across jobs, rebuilt when the layout
changes or a rank dies). A model loads once per (file, dtype, parallel config) and stays loaded.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import queue
import threading
import time
from typing import Any, Optional

import torch

from comfyui_xdit.models.fp8_weights import picklable
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.planning.hardware import Link
from comfyui_xdit.model_loader import model_spec
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sampling import GenerationCancelled, OnStep

from .channel import JobChannel
from .errors import PoolError, WorkerError, WorkerLost, WorkerTimeout
from .job import Job
from .leases import new_client_id, others_waiting, read_leases
from .runtime import RayRuntime, start_or_join
from .security import auth_mode
from .settings import PoolSettings
from .status import PoolStatus, host_statuses, rank_statuses
from .weights import weight_sources
from .link_probe import LinkProbe, probe_hosts
from .resume_policy import resumable
from .world import World, cluster_devices, node_addresses

logger = logging.getLogger(__name__)



HELD_MODELS = 2  # ComfyUI MODELs (and LoRA sets) whose weights a pool keeps for re-shipping
YIELD_CHECK_S = 1.0  # how often an idle pool looks for other clients waiting for devices
STATUS_PING_S = 1.0  # an idle rank that does not answer the status within this is shown as "no answer"


class XDiTPool:
    """Owns the Ray connection, the job channel, the world of rank actors and the job queue."""

    def __init__(self, settings: PoolSettings = PoolSettings()) -> None:
        self.settings = settings
        self.client = new_client_id()  # this pool's name on the cluster (its placement groups carry it)
        self._runtime: Optional[RayRuntime] = None
        self._channel: Any = None
        self._world: Optional[World] = None
        self._queue: "queue.Queue[Job]" = queue.Queue()
        self._ids = itertools.count(1)
        self._running: Optional[Job] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._world_lock = threading.RLock()  # the job thread and warm() both build worlds
        self._held: dict[str, Any] = {}  # in-memory model path -> its base BFL state dict (XDiTParallelModel)
        self._held_patches: dict[str, Any] = {}  # patches digest -> tuple[LoraPatch, ...]
        self._links: dict[tuple[str, ...], Any] = {}  # host node ids -> the measured Link between them

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "XDiTPool":
        """Connect to (or start) Ray and the job thread; rank actors come with the first job."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        with self._lock:
            if self._thread is not None:
                return self
            self._runtime = start_or_join(self.settings)
            # On this machine: the channel must outlive any GPU host that leaves.
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self._channel = ray.remote(JobChannel).options(num_cpus=0, max_concurrency=1,
                                                           scheduling_strategy=here).remote()
            ray.get(self._channel.ping.remote(), timeout=self.settings.timeouts.start_s)
            self._stop.clear()
            self._thread = threading.Thread(target=self._serve, name="xdit-pool", daemon=True)
            self._thread.start()
            atexit.register(self.shutdown)
        return self

    def shutdown(self) -> None:
        """Fail queued jobs, kill the actors, stop Ray when the pool started it. Idempotent."""
        import ray

        with self._lock:
            if self._thread is None:
                return
            self._stop.set()
            if self._running is not None:
                self.cancel(self._running)
            self._thread.join(timeout=self.settings.timeouts.shutdown_s)
            self._thread = None
            while True:
                try:
                    self._queue.get_nowait()._fail(PoolError("the pool shut down before this job ran"))
                except queue.Empty:
                    break
            world, self._world = self._world, None  # no lock: a stuck job must not block shutdown
            if world is not None:
                world.teardown()
            try:
                ray.kill(self._channel)
            except Exception as exc:  # noqa: BLE001 - the runtime may already be gone
                logger.debug("channel kill failed: %s", exc)
            if self._runtime is not None and self._runtime.owned:
                ray.shutdown()
            self._runtime = None
            atexit.unregister(self.shutdown)

    def __enter__(self) -> "XDiTPool":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- jobs ----------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Job:
        """Queue ``request``; returns at once. Jobs run in submission order."""
        if self._thread is None:
            self.start()
        job = Job(f"job-{next(self._ids)}", request, self.settings.timeouts.job_s, self.cancel)
        self._queue.put(job)
        return job

    def generate(self, request: GenerationRequest, on_step: Optional[OnStep] = None,
                 timeout: Optional[float] = None) -> torch.Tensor:
        """Submit and wait: calls ``on_step`` for each event, returns the latent."""
        job = self.submit(request)
        for event in job.events(timeout=timeout):
            if on_step is not None:
                on_step(event)
        return job.result(timeout=timeout)

    def cancel(self, job: Job) -> None:
        """Used by ``Job.cancel``: a running job's ranks all stop at the same next step."""
        job.cancel_requested = True
        if job is self._running and self._channel is not None:
            self._channel.cancel.remote(job.id)

    def warm(self, parallel: ParallelConfig = ParallelConfig()) -> None:
        """Build the world for ``parallel`` now instead of on the first job; waits for a running job."""
        if self._thread is None:
            self.start()
        if not self._world_lock.acquire(timeout=self.settings.timeouts.job_s):
            raise TimeoutError(f"the pool stayed busy for {self.settings.timeouts.job_s:.0f}s")
        try:
            self._world_for(parallel)
        finally:
            self._world_lock.release()

    def _serve(self) -> None:
        checked = 0.0
        while not self._stop.is_set():
            try:
                job = self._queue.get(timeout=0.25)
            except queue.Empty:
                if time.monotonic() - checked > YIELD_CHECK_S:  # idle: give the devices to a waiting client
                    checked = time.monotonic()
                    self._yield_devices(wait_s=0.0)
                continue
            self._yield_devices(wait_s=10.0)  # between jobs too, so clients with long queues take turns
            if self._stop.is_set():
                job._fail(PoolError("the pool shut down before this job ran"))
                continue
            if not job._start():
                continue
            self._running = job
            try:
                with self._world_lock:  # warm() waits for the running job instead of pulling its world away
                    self._run(job)
            finally:
                self._running = None

    def _run(self, job: Job) -> None:
        attempts = 2 if self.settings.retry_once else 1
        for attempt in range(attempts):
            job.attempts = attempt + 1
            try:
                job._finish(self._attempt(job))
                return
            except (WorkerLost, WorkerTimeout) as exc:
                logger.warning("job %s: %s; tearing the world down", job.id, exc)
                self._drop_world()
                if attempt + 1 < attempts and not job.cancel_requested and not self._stop.is_set():
                    logger.warning("job %s: retrying once on a rebuilt world", job.id)
                    continue
                job._fail(exc)
            except GenerationCancelled as exc:
                job._fail(exc)
            except WorkerError as exc:
                if job.request.parallel.world_size > 1:  # other ranks may sit in a collective
                    self._drop_world()
                job._fail(exc)
            except PoolError as exc:  # a clear, expected failure: no traceback in the log
                logger.warning("job %s failed: %s", job.id, exc)
                job._fail(exc)
            except Exception as exc:  # noqa: BLE001 - every failure must reach the caller
                logger.exception("job %s failed", job.id)
                job._fail(exc)
            return

    def _attempt(self, job: Job) -> torch.Tensor:
        import ray

        request = resumable(job, self._spec_of)
        if request.resume is not None:
            job._catch_up(request.resume.calls)
        world = self._world_for(request.parallel)
        self._load(world, request)
        channel, timeouts = self._channel, self.settings.timeouts
        ray.get(channel.open.remote(job.id), timeout=timeouts.rpc_s)
        if job.cancel_requested:
            channel.cancel.remote(job.id)
        try:
            def on_poll() -> bool:
                events = ray.get(channel.drain.remote(job.id), timeout=timeouts.rpc_s)
                for event in events:
                    job._post(event)
                return bool(events)

            shared = ray.put(request)  # one copy in the object store for all ranks
            results = world.call_each("generate", [(job.id, shared, channel)] * world.world_size,
                                      timeout_s=timeouts.step_s, on_poll=on_poll, watch=True)
            on_poll()
        finally:
            channel.close.remote(job.id)
        latent = results[0]
        assert isinstance(latent, torch.Tensor), "rank 0 returned no latent"
        return latent

    def _yield_devices(self, wait_s: float) -> None:
        """Drop the idle world when another client waits for devices; then wait (up to ``wait_s``) until
        it got them, so that this pool's next world queues behind it instead of overtaking it."""
        if self._world is None:
            return
        try:
            if not others_waiting(read_leases(), self.client):
                return
            logger.info("pool %s: another client waits for devices; letting this pool's world go", self.client)
            self._drop_world()
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and others_waiting(read_leases(), self.client):
                time.sleep(0.2)
        except Exception as exc:  # noqa: BLE001 - a failed look at the cluster must not stop the job thread
            logger.warning("pool %s: could not read the cluster's device leases: %s", self.client, exc)

    def _spec_of(self, ref: ModelRef) -> Any:
        """The architecture of ``ref`` as this process can read it (None when it cannot: a file only the
        hosts hold)."""
        from comfyui_xdit.models.families import infer_spec

        try:
            if ref.is_in_memory:
                return infer_spec(self._held[ref.path], ref.path) if ref.path in self._held else None
            return model_spec(ref)
        except Exception:  # noqa: BLE001 - unknown here only means no K/V in the checkpoints
            return None

    # ---- world and model -----------------------------------------------------------------------
    def _world_for(self, parallel: ParallelConfig) -> World:
        with self._world_lock:
            candidate = World(self.settings, parallel, self.client)
            if self._world is not None and not self._world.broken and self._world.key == candidate.key:
                return self._world
            self._drop_world()
            self._world = candidate.build()
            return self._world

    def _drop_world(self) -> None:
        with self._world_lock:
            if self._world is not None:
                self._world.teardown()
                self._world = None

    def hold_model(self, path: str, state: Any, digest: str = "", patches: Any = ()) -> None:
        """Keep a ComfyUI MODEL's base weights (and LoRA patches) for jobs whose ModelRef names ``path``
        (and ``digest``): the pool ships them to the ranks when a job needs them loaded."""
        self._held.pop(path, None)  # re-inserted last: the most recently used stays
        self._held[path] = picklable(state)  # fp8 tensors as bytes: torch cannot unpickle fp8
        if digest:
            self._held_patches.pop(digest, None)
            self._held_patches[digest] = tuple(patches)
        for held in (self._held, self._held_patches):  # older MODELs' weights are let go
            while len(held) > HELD_MODELS:
                held.pop(next(iter(held)))

    def _load(self, world: World, request: GenerationRequest) -> None:
        key = (request.model, request.parallel)
        if world.loaded == key:
            return
        ref, folder, timeouts = request.model, self.settings.models_folder, self.settings.timeouts
        if key in world.resident and all(world.call("switch", ref, request.parallel, timeout_s=timeouts.rpc_s)):
            world.loaded, world.resident = key, _most_recent(world.resident, key, self.settings.models_per_rank)
            logger.info("running %s, kept loaded on %d ranks", ref.path, world.world_size)
            return
        sources = weight_sources(world, ref, request.parallel, self._held, self._held_patches, folder,
                                 timeouts.rpc_s)
        world.loaded = None
        logger.info("loading %s (%s) on %d ranks", ref.path, ref.dtype, world.world_size)
        hows = world.call_each("load", [(s, request.parallel) for s in sources], timeout_s=timeouts.load_s)
        del sources  # the object-store copies go once every rank has its model
        world.loaded, world.resident = key, _most_recent(world.resident, key, self.settings.models_per_rank)
        logger.info("loaded %s on %d ranks (%s)", ref.path, world.world_size, ", ".join(sorted(set(hows))))

    # ---- status --------------------------------------------------------------------------------
    def inter_host_link(self, probe: Optional[LinkProbe] = None) -> Optional[Link]:
        """The measured link between the pool's hosts (the first two holding devices), for the layout
        planner; None with one host. Measured once per set of hosts, then remembered."""
        if self._runtime is None:
            self.start()
        _, devices = cluster_devices(self.settings)
        hosts = tuple(sorted(node for node, count in devices.items() if count > 0))
        if len(hosts) < 2:
            return None
        if hosts not in self._links:
            names = node_addresses()
            interface = self.settings.network_interface
            self._links[hosts] = probe_hosts(hosts, [names.get(h, h[:8]) for h in hosts],
                                             probe or LinkProbe(network_interface=interface))
        return self._links[hosts]

    def status(self) -> PoolStatus:
        import ray

        if self._runtime is None:
            self.start()
        world = self._world
        ranks = rank_statuses(world, STATUS_PING_S) if world is not None else []
        running = self._running
        layout = world.loaded[1].describe() if world is not None and world.loaded else None
        leases = read_leases()
        assert self._runtime is not None
        return PoolStatus(address=self._runtime.address, embedded=self.settings.embedded, auth=auth_mode(),
                          hosts=host_statuses(ray.nodes()), ranks=tuple(ranks), layout=layout,
                          queued=self._queue.qsize(), running=running.id if running else None,
                          client=self.client, leases=leases,
                          gpus=self._runtime.gpus.describe() if self._runtime.gpus is not None else
                          "chosen on each host (cluster)" if not self.settings.embedded else "as Ray was started")


def _most_recent(resident: tuple, key: tuple, keep: int) -> tuple:
    """The models every rank keeps after ``key`` ran, oldest first: the actors' own LRU rule."""
    return (tuple(k for k in resident if k != key) + (key,))[-keep:]


WorkerPool = XDiTPool
