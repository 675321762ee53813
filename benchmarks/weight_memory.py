"""Weight bytes per rank for Flux-dev, Wan 2.1 14B and Qwen-Image, with and without weight sharding, and
which common cards each setting fits (issue 16). COMPUTED from the full-size shapes, not measured.

    python benchmarks/weight_memory.py [--ranks 1 2 4 8] [--json out.json] [--plot out.png] [--measure-cpu]

Parameter counts come from ``planning/full_size.py``'s specs through ``models/block_sizes.py`` (each family's
tensors built on the meta device: nothing allocated, no file read). Per rank, N ranks running the same
blocks (sequence, CFG or data parallel; with PipeFusion, N is the ranks of one stage and the blocks its own):

- unsharded: every rank holds every parameter;
- sharded at rest: 1/N of the blocks plus the shared tensors (embedders, final layer), which stay whole;
- sharded peak: at rest plus two whole blocks (the largest): the one running and the next one, whose
  all-gather is prefetched while the first computes (``parallel/weight_sharding.py``).

bf16 is 2 bytes a parameter; fp8 storage is counted as 1 byte a parameter (``models/fp8_weights.py`` keeps
Linear weights in fp8; biases and norms, well under 1 % of the parameters, stay in the compute dtype).

A setting fits a card when its peak weight bytes plus a headroom fit: HEADROOM_GIB (CUDA context, the
activations of one forward at 1024 px for an image model, allocator slack) plus HEADROOM_SHARE of the card;
Wan's 480p x 81-frame video (about 32k tokens) gets VIDEO_HEADROOM_GIB instead. These are assumptions, stated
in the table; text encoders and the VAE run in ComfyUI's process, not on the ranks.

``--measure-cpu`` adds one MEASURED line: a mid-size Flux-shaped model (random weights, fp32) sampled on two
local gloo CPU ranks (Ulysses 2) with and without sharding: each rank's resident weight bytes (the local
shards' bytes, from the DTensors) and the seconds of one 2-step, cfg 2.5 sample after a warm-up one.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from comfyui_xdit.models.block_sizes import block_sizes
from comfyui_xdit.models.flux_checkpoint import FluxSpec
from comfyui_xdit.planning.full_size import FULL_SIZE

from plots import pyplot  # beside this script (python puts a script's folder first on the path)

GIB = 1024 ** 3
MODELS = {"flux-dev": "Flux-dev", "wan2.1-t2v-14b": "Wan 2.1 14B", "qwen-image": "Qwen-Image"}
BYTES_PER_PARAM = {"bf16": 2, "fp8": 1}
CARDS_GIB = (16, 24, 48, 80)
HEADROOM_GIB, VIDEO_HEADROOM_GIB, HEADROOM_SHARE = 4.0, 8.0, 0.10
VIDEO = {"wan2.1-t2v-14b"}
# --measure-cpu's model: 4 double + 8 single blocks at width 768 (610 MiB in fp32)
MID_FLUX = FluxSpec(num_layers=4, num_single_layers=8, attention_head_dim=64, num_attention_heads=12,
                    joint_attention_dim=512, pooled_projection_dim=256, guidance_embeds=True)


@dataclass(frozen=True)
class Row:
    """One model x rank count x storage: GiB per rank, and the cards it fits (computed)."""

    model: str
    ranks: int
    storage: str
    unsharded_gib: float
    sharded_rest_gib: float  # == unsharded at one rank (nothing to shard with)
    sharded_peak_gib: float
    fits_unsharded: tuple[int, ...]
    fits_sharded: tuple[int, ...]


def usable_gib(card: int, model: str) -> float:
    """What a card leaves for weights under the headroom assumption."""
    return card * (1 - HEADROOM_SHARE) - (VIDEO_HEADROOM_GIB if model in VIDEO else HEADROOM_GIB)


def rows_for(model: str, ranks: list[int]) -> list[Row]:
    spec, _ = FULL_SIZE[model]
    sizes = block_sizes(spec)
    blocks, largest, shared = sum(sizes.total), max(sizes.total), sizes.shared
    out = []
    for storage, size in BYTES_PER_PARAM.items():
        whole = (blocks + shared) * size / GIB
        for n in ranks:
            rest = (blocks / n + shared) * size / GIB if n > 1 else whole
            peak = rest + 2 * largest * size / GIB if n > 1 else whole
            out.append(Row(MODELS[model], n, storage, round(whole, 2), round(rest, 2), round(peak, 2),
                           tuple(c for c in CARDS_GIB if whole <= usable_gib(c, model)),
                           tuple(c for c in CARDS_GIB if peak <= usable_gib(c, model))))
    return out


def table(rows: list[Row]) -> str:
    """One line per model and storage: GiB per rank (the smallest card that fits), unsharded, then sharded."""
    def cell(gib: float, fits: tuple[int, ...]) -> str:
        return f"{gib:.1f} ({fits[0]} GB)" if fits else f"{gib:.1f} (none)"

    ranks = sorted({r.ranks for r in rows if r.ranks > 1})
    lines = [f"Weight GiB per rank, COMPUTED from full-size shapes (in brackets: the smallest of {CARDS_GIB} GB cards "
             f"it fits with {HEADROOM_GIB:g} GiB + {HEADROOM_SHARE:.0%} of the card left over, {VIDEO_HEADROOM_GIB:g} "
             f"GiB + {HEADROOM_SHARE:.0%} for Wan video); sharded = at rest + 2 whole blocks (running + prefetched)",
             "",
             "| model | storage | unsharded, any N | " + " | ".join(f"sharded, N = {n}" for n in ranks) + " |",
             "|---|---|---:|" + "---:|" * len(ranks)]
    for model in dict.fromkeys(r.model for r in rows):
        for storage in BYTES_PER_PARAM:
            mine = {r.ranks: r for r in rows if r.model == model and r.storage == storage}
            first = next(iter(mine.values()))
            lines.append(f"| {model} | {storage} | {cell(first.unsharded_gib, first.fits_unsharded)} | "
                         + " | ".join(cell(mine[n].sharded_peak_gib, mine[n].fits_sharded) for n in ranks) + " |")
    return "\n".join(lines)


def measure_rank(rank: int, world_size: int, shard: bool) -> dict:
    """Rank body of ``--measure-cpu``: build MID_FLUX, shard it or not, sample twice, time the second."""
    import time

    import torch
    import torch.distributed as dist

    from comfyui_xdit.conditioning import Conditioning
    from comfyui_xdit.models.families import build_adapter, random_state
    from comfyui_xdit.parallel import create_engine
    from comfyui_xdit.parallel.weight_sharding import full_bytes, resident_bytes, shard_weights
    from comfyui_xdit.parallel_config import ParallelConfig
    from comfyui_xdit.request import GenerationRequest, ModelRef

    parallel = ParallelConfig(ulysses_degree=world_size, shard_weights=shard)
    adapter = build_adapter(random_state(MID_FLUX, 0), MID_FLUX, torch.float32, "cpu", "mid-size Flux", None)
    whole = full_bytes(adapter.transformer)
    if shard:
        shard_weights(adapter, parallel, rank)
    generator = torch.Generator().manual_seed(1)

    def cond() -> Conditioning:
        return Conditioning(context=torch.randn(1, 32, 512, generator=generator),
                            pooled=torch.randn(1, 256, generator=generator), guidance=3.5)

    request = GenerationRequest(model=ModelRef("tiny:flux"), latent=torch.zeros(1, 16, 32, 32), positive=cond(),
                                negative=cond(), seed=7, steps=2, cfg=2.5, sampler="euler", parallel=parallel)
    engine = create_engine(adapter, parallel, rank)
    engine.generate(request)  # warm-up
    dist.barrier()
    start = time.perf_counter()
    latent = engine.generate(request)
    return {"whole_bytes": whole, "resident_bytes": resident_bytes(adapter.transformer),
            "seconds": time.perf_counter() - start, "latent": latent}


def measure_cpu() -> dict:
    from comfyui_xdit.parallel.launch import run_ranks, stop_helper_processes

    try:
        plain, sharded = (run_ranks(2, measure_rank, (shard,), timeout=600) for shard in (False, True))
        plain, sharded = dict(plain), dict(sharded)
    finally:
        stop_helper_processes()
    same = bool((plain.pop("latent") == sharded.pop("latent")).all())
    return {"measured": True, "model": "Flux-shaped, 4 double + 8 single blocks, width 768, fp32", "ranks": 2,
            "layout": "ulysses 2", "unsharded": plain, "sharded": sharded, "same_latent": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--json", default="weight_memory.json")
    parser.add_argument("--plot", default="weight_memory.png")
    parser.add_argument("--measure-cpu", action="store_true", help="also measure a mid-size model on 2 CPU ranks")
    args = parser.parse_args()
    rows = [row for model in MODELS for row in rows_for(model, args.ranks)]
    measured = measure_cpu() if args.measure_cpu else None
    with open(args.json, "w") as f:
        json.dump({"computed": True, "cards_gib": CARDS_GIB,
                   "headroom": {"gib": HEADROOM_GIB, "video_gib": VIDEO_HEADROOM_GIB, "share": HEADROOM_SHARE},
                   "rows": [asdict(r) for r in rows], "measured_cpu": measured}, f, indent=1)
    _plot(rows, args.plot)
    print(table(rows))  # noqa: T201 - a benchmark prints its table
    if measured is not None:
        plain, sharded = measured["unsharded"], measured["sharded"]
        print(f"\nMEASURED ({measured['model']}, {measured['layout']} on 2 local gloo CPU ranks): resident weights "
              f"per rank {plain['resident_bytes'] / 2**20:.1f} MiB unsharded, {sharded['resident_bytes'] / 2**20:.1f} "
              f"MiB sharded; one 2-step cfg sample {plain['seconds']:.2f} s unsharded, {sharded['seconds']:.2f} s "
              f"sharded; same latent: {measured['same_latent']}")  # noqa: T201


def _plot(rows: list[Row], path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.6), sharey=True)
    for ax, model in zip(axes, models):
        for storage, style in (("bf16", "-"), ("fp8", "--")):
            mine = [r for r in rows if r.model == model and r.storage == storage]
            ranks = [r.ranks for r in mine]
            ax.plot(ranks, [r.unsharded_gib for r in mine], style, marker="o", label=f"{storage} unsharded")
            ax.plot(ranks, [r.sharded_peak_gib for r in mine], style, marker="s", label=f"{storage} sharded (peak)")
        for card in CARDS_GIB:
            ax.axhline(card, color="grey", linewidth=0.5)
            ax.text(ranks[-1], card, f"{card} GB", fontsize=6, va="bottom", ha="right", color="grey")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(n) for n in ranks])
        ax.set_xlabel("ranks sharing the blocks (N)")
        ax.set_title(f"{model} (computed)", fontsize=9)
    axes[0].set_ylabel("weight GiB per rank")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
