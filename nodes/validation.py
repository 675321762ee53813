"""Checks and conversions of node widget values (pure: no ComfyUI import, unit-tested directly).

Each check returns None when the values are fine, else a message naming the fix, which the nodes'
``validate_inputs`` hand to ComfyUI so a bad combination is reported before anything runs.
"""

from __future__ import annotations

from typing import Optional

import torch

from comfyui_xdit.models.families import read_spec
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.planning.pool_plan import LAYOUT_CHOICES, PoolHosts, planned_config

from .handles import PoolHandle

WEIGHT_DTYPES = ["default", "fp32", "bf16", "fp16"]
MAX_DEGREE = 64


def parallel_config(ulysses_degree: int, ring_degree: int, pipefusion_degree: int, num_patches: int,
                    warmup_steps: int, cfg_parallel: bool, data_degree: int = 1) -> ParallelConfig:
    """The node's widgets -> ``ParallelConfig`` (``num_patches`` 0 = one patch per PipeFusion stage)."""
    return ParallelConfig(data_degree=int(data_degree), cfg_degree=2 if cfg_parallel else 1,
                          pipefusion_degree=int(pipefusion_degree),
                          ring_degree=int(ring_degree), ulysses_degree=int(ulysses_degree),
                          num_patches=int(num_patches) if num_patches else None, warmup_steps=int(warmup_steps))


def check_config(unet_path: Optional[str], unet_name: str, **degrees) -> Optional[str]:
    """None when the widgets make a config that fits the file; otherwise the message naming the fix."""
    if unet_path is None:
        return (f"unet_name {unet_name!r} is not in models/diffusion_models; put the model's .safetensors file there "
                "and press R in the UI to refresh the list")
    if degrees["num_patches"] < 0:
        return f"num_patches must be 0 (one per PipeFusion stage) or positive, got {degrees['num_patches']}"
    degrees.setdefault("data_degree", 1)
    for name in ("ulysses_degree", "ring_degree", "pipefusion_degree", "data_degree"):
        if not 1 <= degrees[name] <= MAX_DEGREE:
            return f"{name} must be between 1 and {MAX_DEGREE}, got {degrees[name]}"
    try:
        config = parallel_config(**degrees)
    except ValueError as exc:
        return str(exc)
    try:
        spec = read_spec(unet_path)
    except ValueError as exc:
        return f"cannot use {unet_name!r}: {exc}"
    heads = spec.num_attention_heads
    if heads % config.ulysses_degree:
        usable = [d for d in range(1, heads + 1) if heads % d == 0]
        return (f"ulysses_degree {config.ulysses_degree} does not divide the model's {heads} attention heads; use "
                f"one of {usable} and put the remaining GPUs on ring_degree")
    blocks = spec.num_blocks
    if config.pipefusion_degree > blocks:
        return (f"pipefusion_degree {config.pipefusion_degree} exceeds the model's {blocks} transformer blocks; use "
                f"pipefusion_degree <= {blocks} and put the remaining GPUs on ulysses_degree or ring_degree")
    return None


def layout_inputs() -> list:
    """The optional widgets that let the planner choose the degrees (last, so saved workflows keep working)."""
    from comfy_api.latest import io

    size = dict(default=1024, min=16, max=16384, step=16)
    return [io.Combo.Input("layout", options=list(LAYOUT_CHOICES), default="manual", optional=True,
                           tooltip="manual: the degrees above. auto: the layout planner picks cfg / pipefusion / ring / "
                                   "ulysses / patches for this pool and plan_width x plan_height (logged with its modelled "
                                   "time); 'exact' leaves out PipeFusion (approximate after its warm-up), 'fastest' "
                                   "allows it. cfg_parallel on = the prompt uses true CFG (cfg != 1)."),
            io.Int.Input("plan_width", **size, optional=True, tooltip="The width you will sample, for layout auto."),
            io.Int.Input("plan_height", **size, optional=True, tooltip="The height you will sample, for layout auto.")]


def auto_config(spec, hosts, layout: str, plan_width: int, plan_height: int, cfg_parallel: bool,
                warmup_steps: int, data_degree: int, inter=None) -> ParallelConfig:
    """The planner's layout for the widgets of a node set to an auto ``layout`` (``hosts``: the pool status';
    ``inter``: the link the pool measured between its hosts, None with one host)."""
    if int(data_degree) != 1:
        raise ValueError(f"layout {layout!r} plans one image's layout; set data_degree to 1, or choose the degrees "
                         f"by hand (layout manual)")
    return planned_config(spec, PoolHosts.of(hosts, inter), int(plan_width), int(plan_height), bool(cfg_parallel),
                          layout, warmup_steps=max(1, int(warmup_steps)))


def resolve_dtype(weight_dtype: str, pool: PoolHandle) -> str:
    """``default``: bf16 where the ranks are GPUs (a cluster, or a local GPU), fp32 on CPU ranks."""
    if weight_dtype != "default":
        return weight_dtype
    return "bf16" if pool.address is not None or torch.cuda.is_available() else "fp32"


def normal_gpus(gpus: Optional[str]) -> str:
    """The widget's text in one spelling ('auto', 'all' or '1,2,3'), so equal choices share one pool."""
    value = (gpus or "").strip().lower().replace(" ", "")
    return value if value and value != "auto" else "auto"


def check_gpus(gpus: Optional[str], address: str) -> Optional[str]:
    """None when ``gpus`` is 'auto', 'all' or a list of GPU numbers (and the pool is embedded)."""
    value = normal_gpus(gpus)
    if value in ("auto", "all") or all(part.isdigit() for part in value.split(",")):
        if value != "auto" and address.strip():
            return (f"gpus {value} chooses GPUs of the embedded pool only; with a ray_address choose them on each "
                    "host (CUDA_VISIBLE_DEVICES or --num-gpus before `ray start`) and set gpus to auto")
        parts = value.split(",")
        if len(set(parts)) != len(parts):
            return f"gpus {value} lists a GPU twice; give distinct numbers such as 1,2,3"
        return None
    return f"gpus {gpus!r} must be auto, all, or GPU numbers such as 1,2,3"


def check_address(address: str) -> Optional[str]:
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
