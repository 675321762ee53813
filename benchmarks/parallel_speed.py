"""Seconds per step and bytes sent per step for serial and parallel configs, as a table (issue 13.2).

Runs on local CPU ranks (gloo, one torch thread per rank) through ``comfyui_xdit.parallel.launch``, so
one rank against two is one core against two. ``--model heavy-flux`` (the default) is a compute-heavy
random Flux (1024 wide, 8 heads of 128, ``--blocks`` 4 double + 8 single: Flux-dev's 1:2) at 1024-4096
tokens, where compute, not overhead, decides; ``tiny:flux`` shows overheads instead. Target on 2
cores: >= 1.6x for CFG and PipeFusion. PipeFusion runs twice: stages cut by the blocks' FLOPs (the
default) and by their times measured here first (``parallel/block_timing.py``), and with M = 4 and
M = 2 patches. Flux's prompt runs once a step under PipeFusion (``parallel/pipefusion_text.py``).

    python benchmarks/parallel_speed.py [--model heavy-flux|tiny:NAME] [--size 512] [--steps 4] [--blocks 4 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace

import torch

from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.model_loader import load_model, model_spec, tiny_conditioning
from comfyui_xdit.parallel.block_timing import block_seconds, measured_split
from comfyui_xdit.parallel.pipefusion_schedule import spec_stages
from comfyui_xdit.models.families import write_random_model
from comfyui_xdit.models.flux_checkpoint import FluxSpec
from comfyui_xdit.parallel.launch import run_ranks, stop_helper_processes
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef

from plots import bar_plot  # beside this script (python puts a script's folder first on the path)

def heavy_flux(double: int, single: int) -> FluxSpec:
    return FluxSpec(num_layers=double, num_single_layers=single, attention_head_dim=128, num_attention_heads=8,
                    joint_attention_dim=512, pooled_projection_dim=128, guidance_embeds=True)


PIPEFUSION = ParallelConfig(pipefusion_degree=2, num_patches=4, warmup_steps=1)
CONFIGS = {
    "serial": ParallelConfig(),
    "ulysses 2": ParallelConfig(ulysses_degree=2),
    "ring 2": ParallelConfig(ring_degree=2),
    "cfg 2": ParallelConfig(cfg_degree=2),
    "pipefusion 2 (M=4)": PIPEFUSION,
    "pipefusion 2 (M=2)": replace(PIPEFUSION, num_patches=2),  # M = stages: larger matmuls, no slack in the pipe
}


def timed_rank(rank: int, world_size: int, request: GenerationRequest) -> tuple[float, float]:
    """Rank body: warm up with one step, then time the request; (seconds per step, bytes per step)."""
    from comfyui_xdit.parallel import create_engine
    from comfyui_xdit.parallel.comm import CommCounter
    from comfyui_xdit.parallel.mesh import Mesh

    adapter = load_model(request.model)
    counter = CommCounter()
    engine = create_engine(adapter, request.parallel, rank, Mesh.build(request.parallel, rank), counter)
    engine.generate(replace(request, steps=max(request.parallel.warmup_steps + 1, 2)))
    counter = CommCounter()
    engine = create_engine(adapter, request.parallel, rank, Mesh.build(request.parallel, rank), counter)
    start = time.perf_counter()
    engine.generate(request)
    seconds = (time.perf_counter() - start) / request.steps
    per_step = counter.per_step()
    sent = sum(sum(axes.values()) for axes in per_step.values()) / max(len(per_step), 1)
    return seconds, sent


def random_conditioning(spec: FluxSpec, seed: int, tokens: int = 64) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, tokens, spec.joint_attention_dim, generator=g),
                        torch.randn(1, spec.pooled_projection_dim, generator=g))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="heavy-flux")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", nargs="+", default=None, help="run only these configs (and serial)")
    parser.add_argument("--blocks", type=int, nargs=2, default=(4, 8), metavar=("DOUBLE", "SINGLE"),
                        help="heavy-flux's double and single blocks")
    parser.add_argument("--json", default="parallel_speed.json")
    parser.add_argument("--plot", default="parallel_speed.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "heavy-flux":
            path = os.path.join(tmp, "heavy-flux.safetensors")
            spec = heavy_flux(*args.blocks)
            write_random_model(path, spec)
            ref = ModelRef(path)
            positive, negative = random_conditioning(spec, 1), random_conditioning(spec, 2)
        else:
            ref = ModelRef(args.model)
            positive, negative = tiny_conditioning(ref, seed=0)
        run(args, ref, positive, negative)


def run(args: argparse.Namespace, ref: ModelRef, positive: Conditioning, negative: Conditioning) -> None:
    base = GenerationRequest(model=ref, latent=torch.zeros(1, 16, args.size // 8, args.size // 8),
                             positive=positive, negative=negative, cfg=3.0, steps=args.steps)
    torch.set_num_threads(1)  # as one rank
    block_s = block_seconds(load_model(ref), base, patches=PIPEFUSION.patches)
    split = measured_split(block_s, PIPEFUSION.pipefusion_degree)
    configs = {**CONFIGS, "pipefusion 2 timed cut": replace(PIPEFUSION, stage_split=split)}
    flop_cut = spec_stages(model_spec(ref), PIPEFUSION.pipefusion_degree)
    rows = []
    try:
        for name, parallel in configs.items():
            if args.only and name != "serial" and not any(word in name for word in args.only):
                continue
            request = replace(base, parallel=parallel)
            seconds, sent = run_ranks(parallel.world_size, timed_rank, (request,))
            rows.append((name, parallel.world_size, seconds, sent))
    finally:
        stop_helper_processes()
    serial = rows[0][2]
    with open(args.json, "w") as f:
        json.dump([{"config": n, "ranks": w, "s_per_step": s, "speed_up": serial / s, "rank0_bytes_per_step": b}
                   for n, w, s, b in rows], f, indent=1)
    bar_plot(args.plot, f"{args.model}, {args.size} px, {args.steps} steps: speed-up over one CPU rank (MEASURED)",
             [n for n, *_ in rows], {"speed-up": [serial / s for _, _, s, _ in rows]}, "x serial")
    print(f"{args.model}, {args.size}x{args.size} px ({(args.size // 16) ** 2} tokens), {args.steps} steps, cfg 3.0, "
          f"CPU gloo ranks, one torch thread each")
    print(f"block ms (one thread, a patch of 1/{PIPEFUSION.patches} of the latent): " + " ".join(f"{1000 * s:.0f}" for s in block_s))
    for name, bounds in (("FLOP cut", flop_cut), ("timed cut", tuple(zip((0,) + split, split + (len(block_s),))))):
        stage_s = [sum(block_s[a:b]) for a, b in bounds]
        print(f"{name}: stages {bounds}, slowest stage {max(stage_s) / sum(block_s):.0%} of the block time "
              f"(bound {sum(block_s) / max(stage_s):.2f}x)")
    print(f"{'config':<26}{'ranks':>6}{'s/step':>10}{'speed-up':>10}{'rank0 KiB/step':>16}")
    for name, world, seconds_per_step, sent in rows:
        print(f"{name:<26}{world:>6}{seconds_per_step:>10.3f}{serial / seconds_per_step:>10.2f}{sent / 1024:>16.1f}")


if __name__ == "__main__":
    main()
