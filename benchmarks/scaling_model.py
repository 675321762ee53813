"""Modelled latency of Flux.1-dev for 1-16 GPUs over NVLink, PCIe and 10/25/100 GbE, beside xDiT's
published numbers (issue 13.5). Every predicted figure is MODELLED by ``comfyui_xdit.planning``: compute
from the model's FLOPs at a rate calibrated on published single-GPU times, communication from the
engine's byte formulas (tested equal to its counted bytes) over nominal link speeds.

Calibration, per GPU kind, from its single-GPU 1024 px time only: the transformer's rate (the whole
published time is taken as the sampling loop). Every other published number is held out: the model
predicts it, it is not fitted to it. Where they differ, the ratio column says by how much.

    python benchmarks/scaling_model.py [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from comfyui_xdit.planning.full_size import FULL_SIZE
from comfyui_xdit.planning.hardware import ETHERNET, H100, L40, NVLINK, PCIE, Cluster, Device, Link, calibrated
from comfyui_xdit.planning.model_shape import ModelShape, shape_of
from comfyui_xdit.planning.planner import PlanRequest, plan_layouts
from comfyui_xdit.planning.traffic import CallShape

from plots import pyplot  # beside this script (python puts a script's folder first on the path)

STEPS = 28
TOKENS = {1024: 4096, 4096: 65536}  # Flux packed tokens at that many px a side


@dataclass(frozen=True)
class Published:
    """One of xDiT's published Flux.1-dev times (28 steps): the setting and the seconds."""

    device: str
    px: int
    hosts: int
    gpus_per_host: int
    seconds: float
    note: str


PUBLISHED = (Published("h100", 1024, 1, 1, 6.71, "xDiT, 1 H100"),
             Published("h100", 1024, 1, 4, 4.24, "xDiT, Ulysses 4, H100 NVLink"),
             Published("l40", 1024, 1, 1, 18.36, "xDiT, 1 L40"),
             Published("l40", 1024, 1, 8, 5.53, "xDiT, 8 L40 (PCIe)"),
             Published("l40", 1024, 2, 8, 4.78, "xDiT, 2x8 L40 over Ethernet"),
             Published("l40", 4096, 1, 1, 855.0, "xDiT, 1 L40, 4096 px"),
             Published("l40", 4096, 2, 8, 70.3, "xDiT, 2x8 L40 over Ethernet, 4096 px"))
INTRA = {"h100": NVLINK, "l40": PCIE}


def calibrate(shape: ModelShape) -> dict[str, Device]:
    """Each GPU kind's rate, so that one GPU takes its published 1024 px time for 28 steps."""
    out = {}
    for kind, nominal in (("h100", H100), ("l40", L40)):
        seconds = next(p.seconds for p in PUBLISHED if p.device == kind and p.px == 1024 and p.hosts * p.gpus_per_host == 1)
        out[kind] = calibrated(nominal, STEPS * shape.forward_flops(TOKENS[1024]), seconds, TOKENS[1024])
    return out


def best(shape: ModelShape, device: Device, px: int, hosts: int, per_host: int, intra: Link,
         inter: Link) -> tuple[str, float]:
    cluster = Cluster(hosts, per_host, device, intra, inter)
    call = CallShape(TOKENS.get(px, (px // 16) ** 2), cfg_branches=1)  # Flux-dev: guidance-distilled, one branch
    top = plan_layouts(shape, cluster, PlanRequest(call, STEPS, use_all_gpus=True))[0]
    return top.layout.describe(), top.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="scaling_model.json")
    parser.add_argument("--plot", default="scaling_model.png")
    args = parser.parse_args()
    shape = shape_of(*FULL_SIZE["flux-dev"])
    cal = calibrate(shape)
    checks = []
    for pub in PUBLISHED:
        layout, seconds = best(shape, cal[pub.device], pub.px, pub.hosts, pub.gpus_per_host, INTRA[pub.device],
                               ETHERNET[25])
        role = "calibration" if pub.hosts * pub.gpus_per_host == 1 and pub.px == 1024 else "held out"
        checks.append({"setting": pub.note, "published_s": pub.seconds, "modelled_s": round(seconds, 2),
                       "ratio": round(seconds / pub.seconds, 2), "layout": layout, "role": role})
    grid = []
    for intra_name, intra in (("NVLink", NVLINK), ("PCIe", PCIE)):
        for speed in (10, 25, 100):
            for gpus in (1, 2, 4, 8, 16):
                hosts, per_host = (1, gpus) if gpus <= 8 else (gpus // 8, 8)
                layout, seconds = best(shape, cal["h100"], 1024, hosts, per_host, intra, ETHERNET[speed])
                grid.append({"intra": intra_name, "inter": f"{speed} GbE", "gpus": gpus, "seconds": round(seconds, 2),
                             "layout": layout})
    with open(args.json, "w") as f:
        json.dump({"calibration_flops_per_s": {k: v.flops for k, v in cal.items()}, "published_vs_modelled": checks, "grid": grid}, f, indent=1)
    _plot(grid, args.plot)
    lines = ["Flux.1-dev, 28 steps (MODELLED; published numbers are xDiT's; calibrated rates "
             + ", ".join(f"{k} {v.flops / 1e12:.0f} TFLOP/s" for k, v in cal.items()) + ")",
             f"{'setting':44} {'published':>9} {'modelled':>9} {'ratio':>6}  {'role':11} layout"]
    lines += [f"{c['setting']:44} {c['published_s']:9.2f} {c['modelled_s']:9.2f} {c['ratio']:6.2f}  {c['role']:11} "
              f"{c['layout']}" for c in checks]
    lines += ["", "H100, 1024 px, fastest layout over every GPU (MODELLED), seconds:",
              f"{'intra':7} {'inter':7} " + " ".join(f"{g:>6}" for g in (1, 2, 4, 8, 16))]
    for intra_name in ("NVLink", "PCIe"):
        for speed in (10, 25, 100):
            row = [g["seconds"] for g in grid if g["intra"] == intra_name and g["inter"] == f"{speed} GbE"]
            lines.append(f"{intra_name:7} {speed:3} GbE " + " ".join(f"{s:6.2f}" for s in row))
    print("\n".join(lines))  # noqa: T201 - a benchmark prints its table


def _plot(grid: list[dict], path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for intra in ("NVLink", "PCIe"):
        for speed in (10, 25, 100):
            rows = [g for g in grid if g["intra"] == intra and g["inter"] == f"{speed} GbE"]
            ax.plot([g["gpus"] for g in rows], [g["seconds"] for g in rows], marker="o", label=f"{intra} + {speed} GbE")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("seconds (modelled)")
    ax.set_title("Flux.1-dev 1024 px, 28 steps, H100 (modelled)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
