"""Print the weight bytes a PipeFusion rank holds for Flux-dev at each PipeFusion degree.

    python benchmarks/stage_memory.py [--dtype bf16] [--degrees 1 2 4 8]

Each stage's adapter is built exactly as a rank builds it (``FluxAdapter.from_state_dict`` with the
stage's ``blocks``), with full-size Flux-dev shapes on the ``meta`` device: the bytes are those of the
real parameters, counted without allocating them. Columns: the largest and smallest stage's weights,
what every stage holds besides its blocks (embedders and head), and the stale K/V buffer PipeFusion
keeps per CFG branch for a 1024x1024 image with a 512-token prompt (2 x blocks x tokens x width).
Ring and Ulysses inside a stage shard activations, not weights, so they do not change these numbers.
"""

from __future__ import annotations

import argparse

import torch

from comfyui_xdit.models.flux import FluxAdapter
from comfyui_xdit.models.flux_checkpoint import FluxSpec, bfl_shapes
from comfyui_xdit.parallel.pipefusion_schedule import spec_stages

FLUX_DEV = FluxSpec(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMAGE_TOKENS, TEXT_TOKENS = (1024 // 16) ** 2, 512  # 1024x1024 px -> 128x128 latent -> 64x64 tokens
GIB = 1024 ** 3


def stage_bytes(spec: FluxSpec, dtype: torch.dtype, blocks: tuple[int, int]) -> int:
    state = {k: torch.empty(shape, dtype=dtype, device="meta") for k, shape in bfl_shapes(spec).items()}
    adapter = FluxAdapter.from_state_dict(state, dtype, "meta", source="Flux-dev shapes", blocks=blocks, spec=spec)
    return adapter.parameter_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    spec, size = FLUX_DEV, torch.empty((), dtype=dtype).element_size()
    shared = stage_bytes(spec, dtype, (0, 0))
    print(f"Flux-dev ({spec.num_layers} double + {spec.num_single_layers} single blocks), {args.dtype} weights")
    print(f"{'pipefusion':>10}{'largest stage GiB':>19}{'smallest GiB':>14}{'shared GiB':>12}{'K/V buffer GiB':>16}")
    for degree in args.degrees:
        stages = spec_stages(spec, degree)  # balanced by cost, as the ranks cut them
        per_stage = [stage_bytes(spec, dtype, bounds) for bounds in stages]
        most_blocks = max(stop - start for start, stop in stages)
        kv = 2 * most_blocks * (IMAGE_TOKENS + TEXT_TOKENS) * spec.hidden_size * size if degree > 1 else 0
        print(f"{degree:>10}{max(per_stage) / GIB:>19.2f}{min(per_stage) / GIB:>14.2f}{shared / GIB:>12.2f}"
              f"{kv / GIB:>16.2f}")


if __name__ == "__main__":
    main()
