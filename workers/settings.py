"""Pool settings: where the Ray cluster is, how ranks talk, where models live, how long to wait."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .gpu_choice import AUTO, GpuRequest, format_gpus

HOST_MODELS_FOLDER_ENV = "COMFYUI_XDIT_MODELS_FOLDER"  # set on a GPU host (before `ray start`): its models folder
HOST_NO_LOCAL_WEIGHTS_ENV = "COMFYUI_XDIT_NO_LOCAL_WEIGHTS"  # "1" on a host: never read model files from its disk


@dataclass(frozen=True)
class Timeouts:
    """Seconds each kind of wait may last; nothing in the pool waits without one of these."""

    connect_s: float = 10.0  # reaching a Ray head given by address
    start_s: float = 180.0  # starting/joining Ray, placement groups, creating actors
    rpc_s: float = 60.0  # small control calls (ping, node info, rendezvous)
    rendezvous_s: float = 120.0  # torch.distributed init on every rank
    load_s: float = 900.0  # loading a model on every rank
    step_s: float = 600.0  # silence allowed between two step events (the first step included)
    stall_s: float = 90.0  # a rank silent to heartbeats, or stuck at a step others passed, this long is stalled
    heartbeat_s: float = 1.0  # how often the driver pings each rank of a running job
    job_s: float = 24 * 3600.0  # default for Job.result()
    shutdown_s: float = 10.0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"timeout {name} must be positive, got {value}")


@dataclass(frozen=True)
class PoolSettings:
    """How the pool finds and uses its workers.

    ``address``: None = an embedded local Ray runtime in this process (loopback, dashboard off);
    ``"HEAD:6379"`` = join the cluster started with ``ray start --head`` on that machine.
    ``network_interface``: the NIC gloo/NCCL use between hosts (``GLOO_SOCKET_IFNAME`` /
    ``NCCL_SOCKET_IFNAME``), for hosts with several interfaces; None lets them pick (loopback when
    embedded). ``models_folder``: where workers look for a model file by name when the exact path
    is missing on their host. ``use_gpus``: None = one rank per GPU when the cluster has GPUs, else
    CPU ranks. ``gpus``: ``auto`` (every GPU but ``host_gpu`` when there are others), ``all``, or cuda
    ordinals (embedded pool only). ``retry_once``: after a worker or host dies, rebuild the world and run the job again once.
    ``models_per_rank``: how many models every rank keeps loaded, so alternating ones (two experts, a refiner)
    are not loaded again for each prompt.
    """

    address: Optional[str] = None
    network_interface: Optional[str] = None
    models_folder: Optional[str] = None
    use_gpus: Optional[bool] = None
    gpus: GpuRequest = AUTO  # embedded pool: which of this machine's GPUs (gpu_choice.py)
    host_gpu: Optional[int] = None  # the GPU ComfyUI itself computes on; ``auto`` leaves it when others exist
    cpus_per_rank: float = 1.0
    embedded_num_cpus: Optional[int] = None  # CPUs the embedded runtime offers (None: all of them)
    embedded_num_gpus: Optional[int] = None
    ship_code: Optional[bool] = None  # send our packages through Ray's runtime env; None = with an address, or
    # when comfyui-xdit is not installed in this Python (a plain copy in custom_nodes)
    retry_once: bool = True
    models_per_rank: int = 2  # models each rank keeps loaded (least recently used goes first): Wan 2.2's two experts
    namespace: str = "comfyui-xdit"
    system_config: tuple[tuple[str, object], ...] = ()  # extra Ray _system_config for the embedded runtime
    timeouts: Timeouts = field(default_factory=Timeouts)

    def __post_init__(self) -> None:
        if self.models_per_rank < 1:
            raise ValueError(f"models_per_rank must be at least 1, got {self.models_per_rank}")
        if self.cpus_per_rank <= 0:
            raise ValueError(f"cpus_per_rank must be positive, got {self.cpus_per_rank}")
        if self.address is not None and not self.address.strip():
            raise ValueError("address must be HOST:PORT or None for the embedded runtime, got an empty string")
        if self.address is not None and self.gpus != AUTO:
            raise ValueError(f"gpus {format_gpus(self.gpus)} chooses GPUs of the embedded pool only; on a cluster "
                             "choose them on each host (CUDA_VISIBLE_DEVICES or --num-gpus before `ray start`) "
                             "and leave gpus at auto")

    @property
    def embedded(self) -> bool:
        return self.address is None

    @property
    def sends_code(self) -> bool:
        return (not self.embedded) if self.ship_code is None else self.ship_code
