"""GPUs and links as the latency model sees them: a compute rate and how it falls off for small
per-rank work, and a bandwidth and latency per link. Presets are nominal figures, labelled as such."""

from __future__ import annotations

from dataclasses import dataclass, replace

GB = 1e9


@dataclass(frozen=True)
class Link:
    """One kind of connection between two ranks: bytes per second each way, and seconds per message."""

    name: str
    bandwidth: float
    latency: float

    def seconds(self, nbytes: float, messages: int) -> float:
        return nbytes / self.bandwidth + messages * self.latency


@dataclass(frozen=True)
class Device:
    """A GPU (or CPU rank): dense FLOP/s at full occupancy, and ``half_tokens``, the tokens per rank at
    which a forward runs at half that rate (kernel launch and small-matmul overheads)."""

    name: str
    flops: float
    half_tokens: float = 512.0

    def seconds(self, flops: float, tokens_per_rank: float) -> float:
        efficiency = tokens_per_rank / (tokens_per_rank + self.half_tokens)
        return flops / (self.flops * efficiency)


@dataclass(frozen=True)
class Cluster:
    """``hosts`` machines of ``gpus_per_host`` identical devices; ``intra`` joins GPUs of one host,
    ``inter`` the hosts. Ranks fill host 0 first, as the pool places them."""

    hosts: int
    gpus_per_host: int
    device: Device
    intra: Link
    inter: Link

    @property
    def gpus(self) -> int:
        return self.hosts * self.gpus_per_host

    def link_for(self, stride: int, degree: int) -> Link:
        """The slowest link a group of ``degree`` ranks ``stride`` apart (rank 0's group) crosses."""
        hosts = {(k * stride) // self.gpus_per_host for k in range(degree)}
        return self.inter if len(hosts) > 1 else self.intra


# nominal link figures (one direction, effective; latency per collective or send)
NVLINK = Link("NVLink (H100 SXM)", 300 * GB, 10e-6)
PCIE = Link("PCIe 4.0 x16", 20 * GB, 15e-6)
ETHERNET = {speed: Link(f"{speed} GbE", speed * 0.118 * GB, 50e-6) for speed in (10, 25, 100)}
# nominal dense bf16 rates at an assumed 60% of peak; calibrate with ``calibrated`` from a measured time
H100 = Device("H100 SXM (nominal)", 0.6 * 989e12)
L40 = Device("L40 (nominal)", 0.6 * 181e12)
# a CPU rank of the embedded pool on a machine without GPUs: one core, gloo over shared memory
CPU_RANK = Device("CPU core (nominal)", 50e9, half_tokens=16.0)
SHARED_MEMORY = Link("shared memory (gloo)", 2 * GB, 50e-6)
LINKS = {"nvlink": NVLINK, "pcie": PCIE, **{f"{s}gbe": link for s, link in ETHERNET.items()}}


def calibrated(device: Device, flops: float, seconds: float, tokens: float) -> Device:
    """``device`` with the rate that makes one rank take ``seconds`` for ``flops`` at ``tokens`` tokens."""
    efficiency = tokens / (tokens + device.half_tokens)
    return replace(device, flops=flops / (seconds * efficiency))
