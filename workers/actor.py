"""One rank of the pool: a Ray actor per GPU (or per CPU rank), with a fixed lifecycle.

create (nothing touched) -> ``setup`` (env, rank, device) -> ``join_world`` (torch.distributed) ->
``load`` (weights into the model cache) -> ``generate`` (many times). The class is plain Python; the
pool wraps it with ``ray.remote``. Errors are logged here and re-raised, so the pool can name the
rank and host, because a silent rank deadlocks the others.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch

from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sampling import StepEvent

from . import engine_bridge
from .versions import host_versions
from .weights import WeightSource, find_local

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankSetup:
    """What a rank learns after creation."""

    rank: int
    world_size: int
    device_kind: str  # "cuda" or "cpu"
    env: tuple[tuple[str, str], ...] = ()  # GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME, ...


class RankWorker:
    """One rank: device, process-group membership, a cache of loaded models and the engine."""

    def __init__(self, models_per_rank: int = 2) -> None:
        self.store: Any = None  # rank 0's listening rendezvous store, between open_rendezvous and join_world
        self.setup_info: Optional[RankSetup] = None
        self.device: Optional[torch.device] = None
        self.model_key: Optional[tuple] = None  # ModelRef.identity + the stage's blocks + the shard group
        self.adapter: Any = None
        self.models_per_rank = models_per_rank
        self.cached: "OrderedDict[tuple, tuple[Any, Optional[str]]]" = OrderedDict()  # key -> (adapter, how), LRU last
        self.shards: dict[tuple, Any] = {}  # key of a cached sharded model -> its ShardedWeights
        self.engine_key: Optional[tuple[str, str, str, ParallelConfig]] = None
        self.engine: Any = None
        self.busy = False
        self.step: Optional[int] = None  # the step this rank last started in generate (its heartbeat reports it)
        self.weights_how: Optional[str] = None
        self.loads = 0  # models built by this rank (status: a cached model is not built again)
        self.nccl_rules: Any = None  # the NCCL-semantics shim of a gloo world under test, else None

    # ---- identity -----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Host, node, process and versions, without touching any device."""
        import ray

        context = ray.get_runtime_context()
        return {"host": ray.util.get_node_ip_address(), "hostname": socket.gethostname(),
                "node_id": context.get_node_id(), "pid": os.getpid(), "versions": host_versions(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def ping(self) -> dict[str, Any]:
        """The heartbeat: answered on another of the actor's threads, so also while ``generate`` runs."""
        rank = self.setup_info.rank if self.setup_info else None
        model = self.model_key[0] if self.model_key else None
        return {"rank": rank, "busy": self.busy, "model": model, "device": str(self.device), "weights": self.weights_how,
                "loads": self.loads, "step": self.step}

    def has_file(self, ref: ModelRef, models_folder: Optional[str]) -> Optional[str]:
        return find_local(ref, models_folder)

    # ---- lifecycle ----------------------------------------------------------------------------
    def setup(self, info: RankSetup) -> str:
        """Set the environment, learn the rank, then pick the device (only now is it touched)."""
        for key, value in info.env:
            os.environ[key] = value
        self.setup_info = info
        if info.device_kind == "cuda":
            torch.cuda.set_device(0)  # Ray's CUDA_VISIBLE_DEVICES shows this actor its one GPU
            self.device = torch.device("cuda", 0)
        else:
            self.device = torch.device("cpu")
        logger.info("rank %d/%d on %s", info.rank, info.world_size, self.device)
        return str(self.device)

    def open_rendezvous(self, timeout_s: float) -> tuple[str, int]:
        """Rank 0: listen for the world's rendezvous now, on a port the OS picks (binding it here, not
        probing a free one for later, so no other process can take it in between); its address for the others."""
        import ray
        import torch.distributed as dist

        info = self._info()
        self.store = dist.TCPStore(ray.util.get_node_ip_address(), 0, info.world_size, is_master=True,
                                   timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        return ray.util.get_node_ip_address(), int(self.store.port)

    def join_world(self, master_addr: str, master_port: int, timeout_s: float,
                   store_file: Optional[str] = None) -> None:
        info = self._info()
        backend = "nccl" if info.device_kind == "cuda" else "gloo"
        store, self.store = self.store, None  # rank 0 listens since open_rendezvous; the others connect to it
        if store_file is None and store is None and info.world_size > 1:
            import torch.distributed as dist

            store = dist.TCPStore(master_addr, master_port, info.world_size, is_master=False,
                                  timeout=timedelta(seconds=timeout_s))
        self.nccl_rules = engine_bridge.init_world(info.rank, info.world_size, master_addr, master_port, backend,
                                                   timeout_s, store_file, store)

    def leave_world(self) -> None:
        self.engine, self.engine_key = None, None
        for key in list(self.shards):  # a sharded model holds 1/N of its weights: useless outside this world
            self.shards.pop(key).release()
            self.cached.pop(key, None)
            if self.model_key == key:
                self.adapter, self.model_key, self.weights_how = None, None, None
        engine_bridge.leave_world(self.nccl_rules)
        self.nccl_rules = None

    def load(self, source: WeightSource, parallel: ParallelConfig) -> str:
        """Load (or reuse) the model, then (re)build the engine only when the config changed."""
        from comfyui_xdit.lora import merge_lora
        from comfyui_xdit.model_loader import load_model, model_spec
        from comfyui_xdit.models.families import adapter_from_file, build_adapter, infer_spec, read_spec
        from comfyui_xdit.models.fp8_weights import stored_state, unpickled
        from comfyui_xdit.parallel.pipefusion_schedule import stage_blocks
        from comfyui_xdit.parallel.weight_sharding import shard_weights, sharing

        info = self._info()
        ref = source.ref
        spec = model_spec(ref) if ref.is_tiny else read_spec(source.local_path) if source.local_path else source.spec
        # a PipeFusion stage builds only its blocks (shipped weights already hold only those)
        blocks = None if spec is None else stage_blocks(parallel, info.rank, spec)
        # a stage-only model serves only that stage; a sharded one only its shard group
        key = (*ref.identity, blocks, sharing(parallel, info.rank))
        if self.model_key != key and key in self.cached:
            self._activate(key)
        elif self.model_key != key:
            if self.engine is not None:
                engine_bridge.release_engine(self.engine)
            self.adapter, self.model_key, self.engine, self.engine_key = None, None, None, None
            while len(self.cached) >= self.models_per_rank:  # room for this one: the least recently used goes
                gone, _ = self.cached.popitem(last=False)
                if gone in self.shards:  # every rank evicts alike, so each frees its stage group
                    self.shards.pop(gone).release()
            # a sharded model is built in host memory: only its shards (and shared tensors) reach the device
            built_on = torch.device("cpu") if parallel.shard_weights else self.device
            if ref.is_tiny:
                self.adapter = load_model(ref, built_on, blocks=blocks)
            elif source.local_path is not None:
                self.adapter = adapter_from_file(source.local_path, ref.torch_dtype, built_on, blocks=blocks,
                                                 weight_dtype=ref.weight_dtype)
            else:
                import ray

                state = unpickled(ray.get(source.shipped))  # fp8 tensors travel as bytes
                if source.lora is not None:  # merged here, in float32, as ComfyUI merges them
                    # onto the weights as stored (fp8 rounded first, as ComfyUI's fp8 weights are)
                    state = merge_lora(stored_state(state, ref.weight_dtype),
                                       [p for p in ray.get(source.lora) if p.key in state])
                self.adapter = build_adapter(state, spec if spec is not None else infer_spec(state, ref.path),
                                             ref.torch_dtype, built_on, f"{ref.path!r} (object store)", blocks,
                                             ref.weight_dtype)
            how = source.how if blocks is None or source.blocks else f"{source.how} (blocks {blocks[0]}-{blocks[1] - 1})"
            if parallel.shard_weights:  # collective: every rank shards right after building, alike
                self.shards[key] = shard_weights(self.adapter, parallel, info.rank, self.device)
                how = f"{how}, sharded over ranks {list(self.shards[key].ranks)}"
            self.model_key, self.weights_how = key, how
            self.cached[key] = (self.adapter, how)
            self.loads += 1
        self._engine_for(ref, parallel)
        return source.how

    def switch(self, ref: ModelRef, parallel: ParallelConfig) -> bool:
        """Run a model this rank keeps loaded (for ``parallel``'s stage of it); False when it has none."""
        from comfyui_xdit.parallel.pipefusion_schedule import stage_blocks
        from comfyui_xdit.parallel.weight_sharding import sharing

        rank = self._info().rank
        for key, (adapter, _) in self.cached.items():
            if key[:4] == ref.identity and \
                    key[4:] == (stage_blocks(parallel, rank, adapter.spec), sharing(parallel, rank)):
                self._activate(key)
                self._engine_for(ref, parallel)
                return True
        return False

    def _activate(self, key: tuple) -> None:
        if self.engine is not None:
            engine_bridge.release_engine(self.engine)
        self.engine, self.engine_key = None, None
        self.cached.move_to_end(key)
        self.adapter, self.weights_how = self.cached[key]
        self.model_key = key

    def _engine_for(self, ref: ModelRef, parallel: ParallelConfig) -> None:
        """The engine of the active model for ``parallel``, (re)built when either changed."""
        info = self._info()
        if self.engine_key != (*ref.identity, parallel):
            if self.engine is not None:
                engine_bridge.release_engine(self.engine)
            self.engine = engine_bridge.build_engine(self.adapter, parallel, info.rank)
            self.engine_key = (*ref.identity, parallel)

    def generate(self, job: str, request: GenerationRequest, channel: Any) -> Optional[torch.Tensor]:
        """Sample ``request``; rank 0 posts events and returns the latent, other ranks return None."""
        import ray

        info = self._info()
        if self.engine is None or self.engine_key != (*request.model.identity, request.parallel):
            raise RuntimeError(f"rank {info.rank} has no engine for {request.model} / "
                               f"{request.parallel.describe()}; load it first")

        def on_step(event: StepEvent) -> None:
            preview = event.preview.detach().cpu() if event.preview is not None else None
            # fire and forget; the checkpoint (when the pool asked for them) lets a retry resume from this step
            channel.post.remote(job, StepEvent(event.step, event.total, preview, event.checkpoint))

        first = info.rank == 0

        def should_stop(step: int) -> bool:
            self.step = step  # every rank's progress, for the driver's stall detection
            return first and bool(ray.get(channel.should_stop.remote(job, step), timeout=60.0))

        def on_part(part: Any) -> None:  # PipeFusion: this rank's share of a step's checkpoint, fire and forget
            channel.post.remote(job, part)

        # every PipeFusion rank holds some of a step's state (resume.py); the other loops report it from rank 0
        parts = {"on_part": on_part} if request.parallel.pipefusion_degree > 1 and request.checkpoints else {}
        self.busy, self.step = True, None
        try:
            # Rank 0 asks the channel; the engine makes every rank agree on the step (a tiny all-reduce).
            latent = self.engine.generate(request, on_step=on_step if first else None, should_stop=should_stop,
                                          **parts)
        except Exception:
            logger.exception("rank %d failed in generate", info.rank)
            raise
        finally:
            self.busy = False
        return latent.cpu() if info.rank == 0 and latent is not None else None

    def _info(self) -> RankSetup:
        if self.setup_info is None:
            raise RuntimeError("rank used before setup(): the pool must tell each actor its rank first")
        return self.setup_info
