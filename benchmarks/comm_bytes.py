"""Bytes per step per parallel axis: measured on local gloo ranks against the planner's formulas
(``comfyui_xdit.planning.traffic``), then the formulas at full Flux.1-dev size (issue 13.3).

Measured runs use Flux's token counts at 1024 and 2048 px with a narrow Flux (2 blocks, 24 heads of 32
channels instead of 128) so they fit two CPU cores; the formulas are linear in the width and the layer
count, and the table's last columns give them at the full model (57 blocks, 24 x 128), labelled
formula. 4096 px is formula-only (its attention does not fit a CPU run).

    python benchmarks/comm_bytes.py [--json comm_bytes.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.models.families import write_random_model
from comfyui_xdit.models.flux_checkpoint import FluxSpec
from comfyui_xdit.parallel.launch import generate_local_many, stop_helper_processes
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.planning.full_size import FULL_SIZE
from comfyui_xdit.planning.model_shape import shape_of
from comfyui_xdit.planning.traffic import CallShape, pipefusion_call_bytes, sequence_call_bytes
from comfyui_xdit.request import GenerationRequest, ModelRef

NARROW = FluxSpec(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=24,
                  joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True)
TEXT = 64
LAYOUTS = {"ulysses 2": ParallelConfig(ulysses_degree=2), "ring 2": ParallelConfig(ring_degree=2),
           "cfg 2": ParallelConfig(cfg_degree=2),
           "pipefusion 2 (M=4)": ParallelConfig(pipefusion_degree=2, num_patches=4, warmup_steps=1)}


def formula(shape, layout: ParallelConfig, call: CallShape, warm: bool) -> dict[str, int]:
    """Rank 0's bytes in one call: stage 0 under PipeFusion."""
    if layout.pipefusion_degree > 1:
        return pipefusion_call_bytes(shape, layout, call, 0, warm=warm, sends_back=0)
    return sequence_call_bytes(shape, layout, call)


def conditioning(seed: int) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, TEXT, NARROW.joint_attention_dim, generator=g),
                        torch.randn(1, NARROW.pooled_projection_dim, generator=g))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="comm_bytes.json")
    parser.add_argument("--sizes", default="1024,2048", help="px a side measured")
    args = parser.parse_args()
    narrow = shape_of(NARROW, "narrow flux", TEXT)
    full = shape_of(*FULL_SIZE["flux-dev"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "narrow-flux.safetensors")
        write_random_model(path, NARROW)
        ref = ModelRef(path)
        try:
            for px in [int(s) for s in args.sizes.split(",")]:
                tokens = (px // 16) ** 2
                requests = [GenerationRequest(model=ref, latent=torch.zeros(1, 16, px // 8, px // 8),
                                              positive=conditioning(1), negative=conditioning(2), cfg=3.0, steps=2,
                                              parallel=layout) for layout in LAYOUTS.values()]
                results = generate_local_many(requests, timeout=3000)
                for (name, layout), result in zip(LAYOUTS.items(), results):
                    step = 1  # after PipeFusion's warm-up
                    call = CallShape(tokens, cfg_branches=2, activation_bytes=4)
                    expect = formula(narrow, layout, call, warm=False)
                    measured = result.comm_bytes[step]
                    big = formula(full, layout, CallShape(tokens, cfg_branches=2, activation_bytes=2), warm=False)
                    rows.append({"px": px, "layout": name, "measured": measured, "formula": expect,
                                 "equal": measured == expect, "full_flux_dev_bf16_formula": big})
        finally:
            stop_helper_processes()
    for px in (4096,):
        tokens = (px // 16) ** 2
        for name, layout in LAYOUTS.items():
            big = formula(full, layout, CallShape(tokens, cfg_branches=2, activation_bytes=2), warm=False)
            rows.append({"px": px, "layout": name, "measured": None, "formula": None, "equal": None,
                         "full_flux_dev_bf16_formula": big})
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    lines = ["Bytes rank 0 sends per step (true CFG), measured on 2 gloo ranks (narrow Flux, fp32) vs formula, and "
             "the formula at Flux.1-dev (57 blocks, 3072 wide, bf16) in MiB",
             f"{'px':>5} {'layout':20} {'measured':>12} {'formula':>12} {'equal':>6} {'Flux.1-dev MiB (formula)':>26}"]
    for r in rows:
        total = sum(r["full_flux_dev_bf16_formula"].values()) / 2 ** 20
        measured = "-" if r["measured"] is None else str(sum(r["measured"].values()))
        expect = "-" if r["formula"] is None else str(sum(r["formula"].values()))
        lines.append(f"{r['px']:>5} {r['layout']:20} {measured:>12} {expect:>12} {str(r['equal']):>6} {total:26.1f}")
    print("\n".join(lines))  # noqa: T201 - a benchmark prints its table


if __name__ == "__main__":
    main()
