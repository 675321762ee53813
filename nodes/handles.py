"""What flows between our nodes: small frozen handles (no weights, no Ray objects)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import ModelRef, SigmaShift


@dataclass(frozen=True)
class PoolHandle:
    """Which pool: the embedded local one (``address`` None) or a Ray cluster, and the NIC ranks talk on."""

    address: Optional[str] = None
    network_interface: Optional[str] = None
    gpus: str = "auto"  # embedded pool: 'auto' (leave ComfyUI's GPU when there are others), 'all', or '1,2,3'

    def describe(self) -> str:
        where = self.address or "embedded local Ray"
        return (where + (f" via {self.network_interface}" if self.network_interface else "")
                + (f", gpus {self.gpus}" if self.gpus != "auto" else ""))


@dataclass(frozen=True)
class ModelHandle:
    """A model the pool runs: which weights, how they are spread over ranks, and facts the nodes check."""

    pool: PoolHandle
    model: ModelRef
    parallel: ParallelConfig
    spec: Any  # the architecture (models/families.py), read from the file's header
    name: str  # the file name as ComfyUI lists it ("MODEL" for XDiTParallelModel)
    shift: Optional[SigmaShift] = None  # the MODEL's model sampling; None: the sampler's sigma_shift widget
