"""xDiT GPU Pool: where the workers are (the embedded local Ray, or a cluster) -> XDIT_POOL."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from comfyui_xdit.environment import require_environment

from .comfy_types import CATEGORY, XDiTPoolType
from .handles import PoolHandle
from .pool_access import registry
from .validation import check_address, check_gpus, normal_gpus

logger = logging.getLogger(__name__)


class XDiTPool(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XDiTPool",
            display_name="xDiT GPU Pool",
            category=CATEGORY,
            description="A persistent pool of Ray workers, one per GPU, on this machine or on a Ray cluster. "
                        "Defaults come from Settings > xDiT.",
            inputs=[
                io.String.Input("ray_address", default="", tooltip="Ray head HOST:PORT (`ray start --head` on "
                                "the ComfyUI machine). Blank = an embedded local pool with this machine's GPUs."),
                io.String.Input("network_interface", default="", tooltip="Network interface gloo/NCCL use "
                                "between hosts (e.g. eth0); blank lets them choose."),
                io.String.Input("gpus", default="auto", optional=True, tooltip="Embedded pool: which GPUs of this "
                                "machine run ranks. auto = all but the one ComfyUI uses for text encoders and VAE "
                                "(when there are others); all; or numbers such as 1,2,3. A cluster chooses on each "
                                "host (CUDA_VISIBLE_DEVICES before `ray start`)."),
            ],
            outputs=[XDiTPoolType.Output(display_name="pool")],
        )

    @classmethod
    def validate_inputs(cls, ray_address: str, network_interface: str, gpus: str = "auto") -> bool | str:
        problem = check_address(ray_address) or check_gpus(gpus, ray_address)
        if problem:
            return problem
        if any(ch.isspace() for ch in network_interface.strip()):
            return f"network_interface {network_interface!r} must be one interface name such as eth0"
        return True

    @classmethod
    def execute(cls, ray_address: str, network_interface: str, gpus: str = "auto") -> io.NodeOutput:
        require_environment()
        handle = PoolHandle(address=ray_address.strip() or None, network_interface=network_interface.strip() or None,
                            gpus=normal_gpus(gpus))
        registry().get(handle)  # start or reach the pool here, so connection errors show on this node
        return io.NodeOutput(handle)
