"""Bytes per step per parallel axis: measured on local gloo ranks against the planner's formulas
(``comfyui_xdit.planning.traffic``), then the formulas at full size (issue 13.3).

Measured runs use narrow models so they fit two CPU cores: a narrow Flux (2 blocks, 24 heads of 32
channels instead of 128) at Flux's token counts for 1024 and 2048 px, and a narrow Wan 2.1 (2 blocks,
2 heads of 128) at 1280x720 with 5 frames (2 latent frames, 7200 tokens). The formulas are linear in
the width, the layer count and the tokens, so the last column gives them at the full model, labelled
formula: Flux.1-dev (57 blocks, 24 x 128) at 1024 / 2048 / 4096 px, Wan 2.1 14B (40 blocks, 40 x 128)
at 720p with 81 frames (21 latent frames, 75600 tokens). 4096 px and 81 frames are formula-only (their
attention does not fit a CPU run).

    python benchmarks/comm_bytes.py [--json comm_bytes.json] [--plot comm_bytes.png]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import torch

from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.models.families import write_random_model
from comfyui_xdit.models.flux_checkpoint import FluxSpec
from comfyui_xdit.models.wan_checkpoint import WanSpec
from comfyui_xdit.parallel.launch import generate_local_many, stop_helper_processes
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.planning.full_size import FULL_SIZE
from comfyui_xdit.planning.model_shape import shape_of
from comfyui_xdit.planning.traffic import CallShape, pipefusion_call_bytes, sequence_call_bytes
from comfyui_xdit.request import GenerationRequest, ModelRef

from plots import bar_plot  # beside this script (python puts a script's folder first on the path)

NARROW = FluxSpec(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=24,
                  joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True)
NARROW_WAN = WanSpec(num_layers=2, hidden_size=256, ffn_dim=256)
TEXT = 64
LAYOUTS = {"ulysses 2": ParallelConfig(ulysses_degree=2), "ring 2": ParallelConfig(ring_degree=2),
           "cfg 2": ParallelConfig(cfg_degree=2),
           "pipefusion 2 (M=4)": ParallelConfig(pipefusion_degree=2, num_patches=4, warmup_steps=1)}


@dataclass(frozen=True)
class Setting:
    """One row group: a narrow model measured at ``latent`` (None: formula only), and the full-size model
    (a ``FULL_SIZE`` name) at ``full_tokens`` image tokens."""

    name: str
    narrow: Any
    latent: Optional[tuple[int, ...]]
    full: str
    full_tokens: int


def settings(flux_sizes: list[int]) -> list[Setting]:
    flux = [Setting(f"Flux {px} px", NARROW, (1, 16, px // 8, px // 8), "flux-dev", (px // 16) ** 2)
            for px in flux_sizes]
    return flux + [Setting("Flux 4096 px", NARROW, None, "flux-dev", (4096 // 16) ** 2),
                   Setting("Wan 720p, 5 frames", NARROW_WAN, (1, 16, 2, 90, 160), "wan2.1-t2v-14b", 2 * 45 * 80),
                   Setting("Wan 720p, 81 frames", NARROW_WAN, None, "wan2.1-t2v-14b", 21 * 45 * 80)]


def formula(shape, layout: ParallelConfig, call: CallShape, warm: bool) -> dict[str, int]:
    """Rank 0's bytes in one call: stage 0 under PipeFusion."""
    if layout.pipefusion_degree > 1:
        return pipefusion_call_bytes(shape, layout, call, 0, warm=warm, sends_back=0)
    return sequence_call_bytes(shape, layout, call)


def conditioning(spec: Any, seed: int) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, TEXT, spec.context_dim, generator=g),
                        torch.randn(1, spec.pooled_dim, generator=g))


def measure(setting: Setting, tmp: str) -> list[dict[str, int]]:
    """Rank 0's bytes in the step after PipeFusion's warm-up, per layout, for a true-CFG request."""
    path = os.path.join(tmp, f"{setting.narrow.family}-narrow.safetensors")
    if not os.path.exists(path):
        write_random_model(path, setting.narrow)
    ref = ModelRef(path)
    positive, negative = conditioning(setting.narrow, 1), conditioning(setting.narrow, 2)
    requests = [GenerationRequest(model=ref, latent=torch.zeros(setting.latent), positive=positive, negative=negative,
                                  cfg=3.0, steps=2, parallel=layout) for layout in LAYOUTS.values()]
    return [result.comm_bytes[1] for result in generate_local_many(requests, timeout=3000)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="comm_bytes.json")
    parser.add_argument("--plot", default="comm_bytes.png")
    parser.add_argument("--sizes", default="1024,2048", help="Flux px a side measured")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for setting in settings([int(s) for s in args.sizes.split(",")]):
                narrow = shape_of(setting.narrow, "narrow", TEXT)
                full = shape_of(*FULL_SIZE[setting.full])
                measured = measure(setting, tmp) if setting.latent is not None else [None] * len(LAYOUTS)
                tokens = math.prod(setting.latent[2:]) // 4 if setting.latent is not None else 0  # 2 x 2 patches
                for (name, layout), sent in zip(LAYOUTS.items(), measured):
                    expect = formula(narrow, layout, CallShape(tokens, cfg_branches=2, activation_bytes=4),
                                     warm=False) if sent is not None else None
                    big = formula(full, layout, CallShape(setting.full_tokens, cfg_branches=2, activation_bytes=2),
                                  warm=False)
                    rows.append({"setting": setting.name, "layout": name, "measured": sent,
                                 "formula": expect,
                                 "equal": sent == expect if sent is not None else None,
                                 "full_model": setting.full, "full_bf16_formula": big})
        finally:
            stop_helper_processes()
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    settings_seen = list(dict.fromkeys(r["setting"] for r in rows))
    bar_plot(args.plot, "bytes rank 0 sends per step, full-size models, bf16 (FORMULA)", settings_seen,
             {name: [sum(r["full_bf16_formula"].values()) / 2 ** 20 for r in rows if r["layout"] == name]
              for name in LAYOUTS}, "MiB per step", log=True)
    lines = ["Bytes rank 0 sends per step (true CFG), measured on 2 gloo ranks (narrow models, fp32) vs formula, and "
             "the formula at full size (Flux.1-dev, Wan 2.1 14B; bf16) in MiB",
             f"{'setting':22} {'layout':20} {'measured':>12} {'formula':>12} {'equal':>6} "
             f"{'full size MiB (formula)':>24}"]
    for r in rows:
        total = sum(r["full_bf16_formula"].values()) / 2 ** 20
        measured = "-" if r["measured"] is None else str(sum(r["measured"].values()))
        expect = "-" if r["formula"] is None else str(sum(r["formula"].values()))
        lines.append(f"{r['setting']:22} {r['layout']:20} {measured:>12} {expect:>12} {str(r['equal']):>6} "
                     f"{total:24.1f}")
    print("\n".join(lines))  # noqa: T201 - a benchmark prints its table


if __name__ == "__main__":
    main()
