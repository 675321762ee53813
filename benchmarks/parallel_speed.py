"""Seconds per step and bytes sent per step for serial and parallel configs, as a table.

Runs on local CPU ranks (gloo, one torch thread per rank) through ``comfyui_xdit.parallel.launch``;
on a 2-core machine the numbers show communication volume and overheads, not GPU speed-ups.

    python benchmarks/parallel_speed.py --model tiny:flux --size 256 --steps 4
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.parallel.launch import run_ranks, stop_helper_processes
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef

CONFIGS = {
    "serial": ParallelConfig(),
    "ulysses 2": ParallelConfig(ulysses_degree=2),
    "ring 2": ParallelConfig(ring_degree=2),
    "cfg 2": ParallelConfig(cfg_degree=2),
    "pipefusion 2 (M=4)": ParallelConfig(pipefusion_degree=2, num_patches=4, warmup_steps=1),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:flux")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    ref = ModelRef(args.model)
    positive, negative = tiny_conditioning(ref, seed=0)
    base = GenerationRequest(model=ref, latent=torch.zeros(1, 16, args.size // 8, args.size // 8),
                             positive=positive, negative=negative, cfg=3.0, steps=args.steps)
    rows = []
    try:
        for name, parallel in CONFIGS.items():
            request = replace(base, parallel=parallel)
            seconds, sent = run_ranks(parallel.world_size, timed_rank, (request,))
            rows.append((name, parallel.world_size, seconds, sent))
    finally:
        stop_helper_processes()
    serial = rows[0][2]
    print(f"{args.model}, {args.size}x{args.size} px, {args.steps} steps, cfg 3.0, CPU gloo ranks")
    print(f"{'config':<22}{'ranks':>6}{'s/step':>10}{'speed-up':>10}{'rank0 KiB/step':>16}")
    for name, world, seconds, sent in rows:
        print(f"{name:<22}{world:>6}{seconds:>10.3f}{serial / seconds:>10.2f}{sent / 1024:>16.1f}")


if __name__ == "__main__":
    main()
