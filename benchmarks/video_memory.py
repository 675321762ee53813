"""Peak activation memory per rank for Wan 2.1 14B at 720p (1280x720), 81 frames, under Ulysses 8 (issue 12.6).

MEASURED on CPU at reduced size, then SCALED, and labelled so. A Wan 14B-wide model (width 5120, 40 heads
of 128, feed-forward 13824, umT5 text 512 x 4096) with ``--layers`` blocks (default 1) and random bf16
weights runs one sampling step of a 720p latent (90x160, 3600 tokens a latent frame) with ``--frames``
latent frames (default 1 and 2), serially and on 8 local gloo ranks (Ulysses 8). A thread samples each
rank's heap bytes in use (glibc mallinfo2: live allocations, not cached pages) every 2 ms during the step;
the peak minus the bytes in use before the step is that rank's activation peak (weights were loaded before).

Scaling, stated: inference keeps no activations across blocks, so the peak does not grow with the layer
count; every activation (and the CPU's flash attention) is linear in the tokens, so the per-rank peak is
fitted linearly over the measured frame counts and extrapolated to 21 latent frames (81 video frames:
75,600 tokens). The weights are added by count: 14B parameters in bf16, whole on every rank, or sharded
over the 8 (``shard_weights``; ``benchmarks/weight_memory.py`` has that table).

    python benchmarks/video_memory.py [--frames 1 2] [--layers 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import tempfile
import threading
import time

import torch

from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.models.block_sizes import block_sizes
from comfyui_xdit.models.families import write_random_model
from comfyui_xdit.models.wan_checkpoint import WAN21_T2V_14B, WanSpec
from comfyui_xdit.parallel.launch import run_ranks, stop_helper_processes
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef

GIB = 1024 ** 3
ROWS, COLS = 90, 160  # 720p latent (1280x720 / 8): 45 x 80 tokens a frame
FULL_FRAMES = 21  # 81 video frames
ULYSSES = ParallelConfig(ulysses_degree=8)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def heap_in_use() -> int:
    """Bytes this process has allocated and not freed (glibc's mallinfo2 over every arena, mmapped blocks
    included): tensors, not pages the allocator keeps cached or file pages a weight's mmap touched."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakHeap:
    """Heap bytes in use, sampled every ``interval_s`` while the step runs; ``peak`` the highest."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.before = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, heap_in_use())
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakHeap":
        self.before = self.peak = heap_in_use()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def request(path: str, frames: int, parallel: ParallelConfig) -> GenerationRequest:
    g = torch.Generator().manual_seed(0)
    positive = Conditioning(torch.randn(1, 512, 4096, generator=g), None)
    return GenerationRequest(model=ModelRef(path, dtype="bf16"), latent=torch.zeros(1, 16, frames, ROWS, COLS),
                             positive=positive, seed=1, steps=1, cfg=1.0, parallel=parallel)


def measured_rank(rank: int, world_size: int, req: GenerationRequest) -> int:
    """One step of ``req`` on this rank; the activation peak in bytes, rank 0's (every rank holds the same share)."""
    from comfyui_xdit.model_loader import load_model
    from comfyui_xdit.parallel import create_engine
    from comfyui_xdit.parallel.mesh import Mesh

    adapter = load_model(req.model)
    engine = create_engine(adapter, req.parallel, rank, Mesh.build(req.parallel, rank)) if world_size > 1 else None
    if engine is None:
        from comfyui_xdit.engine import Engine
        engine = Engine(adapter)
    with PeakHeap() as heap:
        engine.generate(req)
    return heap.peak - heap.before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[1, 2], help="latent frames measured")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--json", default="video_memory.json")
    args = parser.parse_args()
    spec = WanSpec(num_layers=args.layers, hidden_size=5120, ffn_dim=13824)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "wan14b-narrow.safetensors")
        write_random_model(path, spec, dtype=torch.bfloat16)
        try:
            for frames in args.frames:
                for name, parallel in (("serial", ParallelConfig()), ("ulysses 8", ULYSSES)):
                    if name == "serial" and frames != args.frames[0]:
                        continue  # one serial point: the share it is compared against
                    peak = run_ranks(parallel.world_size, measured_rank, (request(path, frames, parallel),),
                                     timeout=3600)
                    rows.append({"layout": name, "latent_frames": frames, "tokens": frames * ROWS * COLS // 4,
                                 "peak_activation_bytes": peak})
                    print(f"measured: {name}, {frames} latent frames: {peak / GIB:.2f} GiB", flush=True)
        finally:
            stop_helper_processes()
    ulysses = [r for r in rows if r["layout"] == "ulysses 8"]
    (a, b) = (ulysses[0], ulysses[-1])
    slope = (b["peak_activation_bytes"] - a["peak_activation_bytes"]) / max(b["tokens"] - a["tokens"], 1)
    full_tokens = FULL_FRAMES * ROWS * COLS // 4
    scaled = a["peak_activation_bytes"] + slope * (full_tokens - a["tokens"])
    sizes = block_sizes(WAN21_T2V_14B)
    weights = sum(sizes.total) + sizes.shared  # parameters
    sharded = sum(sizes.total) / ULYSSES.world_size + sizes.shared + 2 * max(sizes.total)  # at rest + two whole blocks
    with open(args.json, "w") as f:
        json.dump({"measured": rows, "scaled_peak_activation_bytes": scaled, "full_tokens": full_tokens,
                   "weight_parameters": weights, "sharded_peak_parameters": sharded}, f, indent=1)
    print(f"\nWan 2.1 14B, 720p, 81 frames ({full_tokens} tokens), Ulysses 8, bf16 activations; CPU, "
          f"{args.layers}-block model, random weights")
    print(f"{'what':<58}{'GiB per rank':>14}")
    for r in rows:
        what = f"MEASURED {r['layout']}, {r['latent_frames']} latent frames ({r['tokens']} tokens)"
        print(f"{what:<58}{r['peak_activation_bytes'] / GIB:>14.2f}")
    print(f"{'SCALED ulysses 8, 21 latent frames (linear in tokens)':<58}{scaled / GIB:>14.2f}")
    print(f"{'COMPUTED weights, bf16, whole on every rank':<58}{2 * weights / GIB:>14.2f}")
    print(f"{'COMPUTED weights, bf16, sharded over 8 (peak: + 2 whole blocks)':<58}{2 * sharded / GIB:>14.2f}")
    print(f"{'peak per rank, whole weights':<58}{(scaled + 2 * weights) / GIB:>14.2f}")
    print(f"{'peak per rank, sharded weights':<58}{(scaled + 2 * sharded) / GIB:>14.2f}")


if __name__ == "__main__":
    main()
