"""Facts about a model file read from its safetensors header only (cheap enough for validation)."""

from __future__ import annotations

import json
import struct
from typing import Optional

FLUX_HEAD_DIM = 128  # every Flux variant ComfyUI loads: hidden 3072 = 24 heads x 128


def read_header(path: str) -> dict:
    """The JSON header of a .safetensors file (tensor names -> dtype, shape, offsets)."""
    with open(path, "rb") as handle:
        size_bytes = handle.read(8)
        if len(size_bytes) != 8:
            raise ValueError(f"{path!r} is not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", size_bytes)
        if size > 100 * 2**20:
            raise ValueError(f"{path!r} is not a safetensors file (header of {size} bytes)")
        return json.loads(handle.read(size))


def flux_heads(path: str) -> Optional[int]:
    """Attention heads of a Flux file (hidden size / 128), or None when it does not look like Flux."""
    header = read_header(path)
    for key in ("img_in.weight", "model.diffusion_model.img_in.weight", "x_embedder.weight"):
        if key in header:
            hidden = header[key]["shape"][0]
            return hidden // FLUX_HEAD_DIM if hidden % FLUX_HEAD_DIM == 0 else None
    return None
