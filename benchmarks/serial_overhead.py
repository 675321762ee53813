"""Our engine at degree 1 against a bare diffusers denoising loop on the same model (issue 13.1).

One process, the same random mid-size Flux, the same inputs (noise, sigmas, conditioning) and the same
sampler (Euler); the bare loop is ``FluxTransformer2DModel`` with diffusers' own attention processors and
nothing else. Runs are interleaved (ours, bare, ours, ...) so drift in the machine hits both; the table
gives the median seconds of each and their ratio, and the two latents' relative difference (the same
numbers, or the comparison would mean nothing). Target: ratio within 1.02.

    python benchmarks/serial_overhead.py [--size 512] [--steps 8] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch
from diffusers import FluxTransformer2DModel

from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.engine import Engine
from comfyui_xdit.models.families import build_adapter, random_state
from comfyui_xdit.models.flux_checkpoint import FluxSpec
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sampling import finish, prepare_plan

MID_FLUX = FluxSpec(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=8,
                    joint_attention_dim=512, pooled_projection_dim=128, guidance_embeds=True)
TEXT = 64


def bare_loop(model: FluxTransformer2DModel, x: torch.Tensor, sigmas: torch.Tensor, image_ids: torch.Tensor,
              cond: Conditioning) -> torch.Tensor:
    """Euler on the flow: x <- x + (sigma_next - sigma) v, v from diffusers' forward on packed tokens."""
    text_ids = torch.zeros(cond.context.shape[1], 3)
    guidance = torch.full((x.shape[0],), float(cond.guidance))
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].expand(x.shape[0])
        v = model(hidden_states=x, encoder_hidden_states=cond.context, pooled_projections=cond.pooled,
                  timestep=sigma, img_ids=image_ids, txt_ids=text_ids, guidance=guidance, return_dict=False)[0]
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image px a side")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", default="serial_overhead.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    state = random_state(MID_FLUX, seed=0)
    adapter = build_adapter(state, MID_FLUX, torch.float32, "cpu", "mid-size random Flux")
    bare = FluxTransformer2DModel(**MID_FLUX.diffusers_config()).eval().requires_grad_(False)
    bare.load_state_dict(adapter.transformer.state_dict())  # the same weights, diffusers' own processors
    g = torch.Generator().manual_seed(1)
    cond = Conditioning(torch.randn(1, TEXT, MID_FLUX.joint_attention_dim, generator=g),
                        torch.randn(1, MID_FLUX.pooled_projection_dim, generator=g))
    latent = torch.zeros(1, 16, args.size // 8, args.size // 8)
    request = GenerationRequest(model=ModelRef("tiny:flux"), latent=latent, positive=cond, negative=None, cfg=1.0,
                                steps=args.steps, sampler="euler", seed=3)
    engine = Engine(adapter)
    plan = prepare_plan(adapter, request)  # the same noise, sigmas and positions for the bare loop
    ours_s, bare_s = [], []
    with torch.no_grad():
        engine.generate(request), bare_loop(bare, plan.x.clone(), plan.sigmas, plan.image_ids, cond)  # warm-up
        for _ in range(args.repeats):
            start = time.perf_counter()
            ours = engine.generate(request)
            ours_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            tokens = bare_loop(bare, plan.x.clone(), plan.sigmas, plan.image_ids, cond)
            bare_s.append(time.perf_counter() - start)
    theirs = finish(adapter, replace(plan), tokens)
    difference = float((ours - theirs).abs().max() / theirs.abs().max())
    ours_m, bare_m = statistics.median(ours_s), statistics.median(bare_s)
    result = {"size": args.size, "steps": args.steps, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "ours_s": ours_m, "bare_diffusers_s": bare_m, "ratio": ours_m / bare_m, "relative_difference": difference}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"mid-size random Flux ({sum(t.numel() for t in state.values()) / 1e6:.0f}M params), {args.size}x{args.size} px, "
          f"{args.steps} Euler steps, {torch.get_num_threads()} torch threads, CPU, median of {args.repeats} interleaved runs")
    print(f"{'ours (degree 1)':<20}{ours_m:>8.3f} s")
    print(f"{'bare diffusers':<20}{bare_m:>8.3f} s")
    print(f"{'ratio':<20}{ours_m / bare_m:>8.3f}   (latents differ by {difference:.1e} relative)")  # noqa: T201


if __name__ == "__main__":
    main()
