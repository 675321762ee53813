"""Our engine at degree 1 against a bare diffusers denoising loop on the same model (issue 13.1).

One process, the same random mid-size Flux, the same inputs (noise, sigmas, positive and negative
conditioning, true CFG) and the same sampler (Euler); the bare loop is ``FluxTransformer2DModel`` with
diffusers' own attention processors and nothing else. Both batch the two CFG branches into one forward
per step by default (ours as ComfyUI does, the bare loop as diffusers pipelines do, ``torch.cat([x] * 2)``);
``--no-batch-cfg`` runs two forwards per step in both. Runs are interleaved (ours, bare, ours, ...) so
drift in the machine hits both; the table gives the median seconds of each and their ratio, and the two
latents' relative difference (the same numbers, or the comparison would mean nothing). Target: ratio
within 1.02.

    python benchmarks/serial_overhead.py [--size 512] [--steps 8] [--repeats 5] [--threads N] [--cfg 3.5]
                                         [--no-batch-cfg]
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
              positive: Conditioning, negative: Conditioning, cfg: float, batch_cfg: bool) -> torch.Tensor:
    """Euler on the flow with CFG: x <- x + (sigma_next - sigma) v, v = v_u + cfg (v_c - v_u) from diffusers'
    forward on packed tokens, both branches in one forward of batch 2B (``batch_cfg``) or one forward each."""
    text_ids = torch.zeros(positive.context.shape[1], 3)
    batch = x.shape[0]

    def forward(tokens: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                guidance: torch.Tensor) -> torch.Tensor:
        return model(hidden_states=tokens, encoder_hidden_states=context, pooled_projections=pooled, timestep=sigma,
                     img_ids=image_ids, txt_ids=text_ids, guidance=guidance, return_dict=False)[0]

    def inputs(cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        context, pooled = cond.for_batch(batch)  # (B, L, ctx), (B, pooled)
        return context, pooled, torch.full((batch,), float(cond.guidance))

    (c_ctx, c_pool, c_g), (u_ctx, u_pool, u_g) = inputs(positive), inputs(negative)
    if batch_cfg:  # (B, ...) twice -> (2B, ...): uncond rows first
        both = (torch.cat([u_ctx, c_ctx]), torch.cat([u_pool, c_pool]), torch.cat([u_g, c_g]))
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].expand(batch)
        if batch_cfg:
            v_uncond, v_cond = forward(torch.cat([x, x]), torch.cat([sigma, sigma]), *both).chunk(2)  # (2B, N, C)
        else:
            v_cond, v_uncond = forward(x, sigma, c_ctx, c_pool, c_g), forward(x, sigma, u_ctx, u_pool, u_g)
        x = x + (sigmas[i + 1] - sigmas[i]) * (v_uncond + cfg * (v_cond - v_uncond))
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image px a side")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cfg", type=float, default=3.5, help="CFG scale (a negative prompt is always given)")
    parser.add_argument("--no-batch-cfg", dest="batch_cfg", action="store_false",
                        help="two forwards per step (cond, uncond) in both loops instead of one of batch 2")
    parser.add_argument("--json", default="serial_overhead.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    state = random_state(MID_FLUX, seed=0)
    adapter = build_adapter(state, MID_FLUX, torch.float32, "cpu", "mid-size random Flux")
    bare = FluxTransformer2DModel(**MID_FLUX.diffusers_config()).eval().requires_grad_(False)
    bare.load_state_dict(adapter.transformer.state_dict())  # the same weights, diffusers' own processors
    g = torch.Generator().manual_seed(1)
    positive, negative = (Conditioning(torch.randn(1, TEXT, MID_FLUX.joint_attention_dim, generator=g),
                                       torch.randn(1, MID_FLUX.pooled_projection_dim, generator=g)) for _ in range(2))
    latent = torch.zeros(1, 16, args.size // 8, args.size // 8)
    request = GenerationRequest(model=ModelRef("tiny:flux"), latent=latent, positive=positive, negative=negative,
                                cfg=args.cfg, steps=args.steps, sampler="euler", seed=3)
    engine = Engine(adapter, batch_cfg=args.batch_cfg)
    plan = prepare_plan(adapter, request)  # the same noise, sigmas and positions for the bare loop

    def bare_run() -> torch.Tensor:
        return bare_loop(bare, plan.x.clone(), plan.sigmas, plan.image_ids, positive, negative, args.cfg,
                         args.batch_cfg)

    ours_s, bare_s = [], []
    with torch.no_grad():
        engine.generate(request), bare_run()  # warm-up
        for _ in range(args.repeats):
            start = time.perf_counter()
            ours = engine.generate(request)
            ours_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            tokens = bare_run()
            bare_s.append(time.perf_counter() - start)
    theirs = finish(adapter, replace(plan), tokens)
    difference = float((ours - theirs).abs().max() / theirs.abs().max())
    ours_m, bare_m = statistics.median(ours_s), statistics.median(bare_s)
    result = {"size": args.size, "steps": args.steps, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "cfg": args.cfg, "batch_cfg": args.batch_cfg,
              "ours_s": ours_m, "bare_diffusers_s": bare_m, "ratio": ours_m / bare_m, "relative_difference": difference}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"mid-size random Flux ({sum(t.numel() for t in state.values()) / 1e6:.0f}M params), {args.size}x{args.size} px, "
          f"{args.steps} Euler steps, cfg {args.cfg} ({'one batched forward' if args.batch_cfg else 'two forwards'} "
          f"per step in both), {torch.get_num_threads()} torch threads, CPU, median of {args.repeats} interleaved runs")
    print(f"{'ours (degree 1)':<20}{ours_m:>8.3f} s")
    print(f"{'bare diffusers':<20}{bare_m:>8.3f} s")
    print(f"{'ratio':<20}{ours_m / bare_m:>8.3f}   (latents differ by {difference:.1e} relative)")  # noqa: T201


if __name__ == "__main__":
    main()
