"""Print PipeFusion's error against serial sampling on tiny:flux, by patches and warm-up steps.

    python benchmarks/pipefusion_error.py [--steps 8 16] [--size 16]

Rows: sampler/cfg/steps and the number of patches M; columns: warm-up steps K. Each cell is the
relative L2 error of the final latent of PipeFusion (one-step-stale K/V for the other patches)
against serial sampling. ``disc`` is the sampler's own discretization error at that step count
(serial T steps against serial 2T steps), the yardstick the quality test compares with. The
multi-rank PipeFusion equals this single-process reference (tests/test_pipefusion.py).
"""

from __future__ import annotations

import argparse
import logging

import torch

from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.parallel.pipefusion_reference import error_table, relative_error, serial_tokens
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sampling import prepare_plan

logger = logging.getLogger("pipefusion_error")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--size", type=int, default=16, help="latent side (16 = 64 image tokens)")
    parser.add_argument("--patches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a tiny model runs best on one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = ModelRef("tiny:flux")
    adapter = load_model(model)
    positive, negative = tiny_conditioning(model, 0)
    for sampler, cfg in (("euler", 1.0), ("dpmpp_2m", 3.0)):
        for steps in args.steps:
            def plan_for(n: int):
                return prepare_plan(adapter, GenerationRequest(model, torch.zeros(1, 16, args.size, args.size),
                                                               positive, negative, seed=1, steps=n, cfg=cfg,
                                                               sampler=sampler))
            plan = plan_for(steps)
            disc = relative_error(serial_tokens(adapter, plan), serial_tokens(adapter, plan_for(2 * steps)))
            warmups = sorted({1, 2, steps // 4, steps // 2, steps - 2, steps - 1, steps} - {0})
            table = error_table(adapter, plan, args.patches, warmups)
            logger.info("%s cfg %.1f, %d steps, disc(T vs 2T) %.4f", sampler, cfg, steps, disc)
            logger.info("  %-6s %s", "M \\ K", " ".join(f"{k:>7d}" for k in warmups))
            for m in args.patches:
                logger.info("  %-6d %s", m, " ".join(f"{table[(m, k)]:7.4f}" for k in warmups))


if __name__ == "__main__":
    main()
