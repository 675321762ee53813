"""xDiT GPU Pool: where the workers are (the embedded local Ray, or a cluster) -> XDIT_POOL."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from .comfy_types import CATEGORY, XDiTPoolType
from .handles import PoolHandle
from .pool_access import registry

logger = logging.getLogger(__name__)


def check_address(address: str) -> str | None:
    """None when ``address`` is blank, ``auto`` or HOST:PORT; otherwise what to type instead."""
    value = address.strip()
    if not value or value == "auto":
        return None
    host, sep, port = value.rpartition(":")
    if value.startswith("ray://"):
        host, sep, port = value[len("ray://"):].rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return (f"ray_address {address!r} is not HOST:PORT; give the head's address as printed by "
                "`ray start --head` (e.g. 192.168.1.10:6379), or leave it blank for the embedded local pool")
    return None


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
            ],
            outputs=[XDiTPoolType.Output(display_name="pool")],
        )

    @classmethod
    def validate_inputs(cls, ray_address: str, network_interface: str) -> bool | str:
        problem = check_address(ray_address)
        if problem:
            return problem
        if any(ch.isspace() for ch in network_interface.strip()):
            return f"network_interface {network_interface!r} must be one interface name such as eth0"
        return True

    @classmethod
    def execute(cls, ray_address: str, network_interface: str) -> io.NodeOutput:
        handle = PoolHandle(address=ray_address.strip() or None, network_interface=network_interface.strip() or None)
        registry().get(handle)  # start or reach the pool here, so connection errors show on this node
        return io.NodeOutput(handle)
