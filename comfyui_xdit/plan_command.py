"""``comfyui-xdit plan``: the fastest layouts for a model, a size and a pool, by the latency model."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .models.families import TINY_SPECS, read_spec
from .planning.full_size import FULL_SIZE
from .planning.hardware import H100, L40, LINKS, Cluster, Device
from .planning.model_shape import ModelShape, shape_of
from .planning.planner import PlanRequest, plan_layouts
from .planning.traffic import CallShape

DEVICES = {"h100": H100, "l40": L40}
SPATIAL = 16  # image pixels per packed token side: the VAE's 8 x the 2 x 2 patch, in every family we run
TEMPORAL = 4  # video frames per latent frame (Wan, HunyuanVideo, CogVideoX)


def model_shape(model: str) -> ModelShape:
    """``tiny:NAME``, ``full:NAME`` (a released model's shapes) or a file (its header only)."""
    if model.startswith("tiny:"):
        spec, text = TINY_SPECS[model[5:]], 8
    elif model.startswith("full:"):
        if model[5:] not in FULL_SIZE:
            raise ValueError(f"unknown full-size model {model[5:]!r}; choose one of {', '.join(FULL_SIZE)}")
        spec, text = FULL_SIZE[model[5:]]
    else:
        spec, text = read_spec(model), 256
    return shape_of(spec, model, text)


def image_tokens(width: int, height: int, frames: int) -> int:
    for name, value in (("width", width), ("height", height)):
        if value % SPATIAL:
            raise ValueError(f"{name} {value} is not a multiple of {SPATIAL} px (the VAE's 8 x the 2 x 2 patch)")
    latent_frames = 1 if frames <= 1 else (frames - 1) // TEMPORAL + 1
    return (width // SPATIAL) * (height // SPATIAL) * latent_frames


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="the fastest parallel layouts for a model, size and pool (modelled)")
    p.add_argument("--model", required=True, help="a model file, tiny:NAME, or full:NAME "
                                                   f"({', '.join(FULL_SIZE)})")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--frames", type=int, default=1, help="video frames (latent frames = (frames - 1) / 4 + 1)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--cfg", type=float, default=1.0, help="!= 1.0: true CFG (two branches per step)")
    p.add_argument("--address", default=None, help="a Ray cluster: plan for its hosts and GPUs")
    p.add_argument("--hosts", type=int, default=1)
    p.add_argument("--gpus-per-host", type=int, default=8)
    p.add_argument("--device", choices=list(DEVICES), default="h100")
    p.add_argument("--intra", choices=list(LINKS), default="nvlink", help="link between GPUs of one host")
    p.add_argument("--inter", choices=list(LINKS), default=None,
                   help="link between hosts (default: measured between two hosts of --address, else 25gbe)")
    p.add_argument("--exact", action="store_true", help="leave out PipeFusion (approximate after warm-up)")
    p.add_argument("--top", type=int, default=5)


def run_plan(args: argparse.Namespace) -> int:
    shape = model_shape(args.model)
    if args.address:
        from comfyui_xdit_workers.cli_pool import cluster_gpus  # lazily: the engine package never imports Ray

        hosts, per_host, measured = cluster_gpus(args.address, measure_link=args.inter is None)
    else:
        hosts, per_host, measured = args.hosts, args.gpus_per_host, None
    device: Device = DEVICES[args.device]
    inter = measured or LINKS[args.inter or "25gbe"]
    cluster = Cluster(hosts, per_host, device, LINKS[args.intra], inter)
    call = CallShape(image_tokens(args.width, args.height, args.frames), cfg_branches=1 if args.cfg == 1.0 else 2)
    ranked = plan_layouts(shape, cluster, PlanRequest(call, args.steps, exact=args.exact))
    out: list[Any] = [f"plan for {args.model} at {args.width}x{args.height}"
                      + (f", {args.frames} frames" if args.frames > 1 else "")
                      + f" ({call.image_tokens} image tokens), {args.steps} steps, "
                      f"{'true CFG' if call.cfg_branches == 2 else 'no CFG branch'}, on {hosts} x {per_host} "
                      f"{device.name} ({cluster.intra.name} within a host, {cluster.inter.name} between hosts)",
                      "MODELLED, not measured: seconds of the transformer's sampling loop only"]
    for index, prediction in enumerate(ranked[:args.top], 1):
        layout = prediction.layout
        out.append(f"{index}. cfg {layout.cfg_degree}, pipefusion {layout.pipefusion_degree}, ring "
                   f"{layout.ring_degree}, ulysses {layout.ulysses_degree}, patches {layout.patches}"
                   f" ({layout.world_size} GPUs): {prediction.seconds:.2f} s")
    serial = next((p for p in ranked if p.layout.world_size == 1), None)
    if serial is not None:
        out.append(f"serial: {serial.seconds:.2f} s")
    sys.stdout.write("\n".join(out) + "\n")
    return 0



