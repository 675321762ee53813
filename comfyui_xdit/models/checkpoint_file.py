"""Reading the single ``.safetensors`` files ComfyUI users keep, for any family: ComfyUI's
``model.diffusion_model.`` prefix stripped, shapes from the header alone, one stage's tensors only."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

COMFY_PREFIX = "model.diffusion_model."  # a full checkpoint's (CheckpointLoaderSimple) diffusion model


def strip_prefix(key: str) -> str:
    return key[len(COMFY_PREFIX):] if key.startswith(COMFY_PREFIX) else key


def check_format(path: str) -> None:
    """Refuse what we cannot load, naming what to use instead (ValueError)."""
    if path.lower().endswith(".gguf"):
        raise ValueError(f"{path!r} is a GGUF file: its quantized blocks need ComfyUI-GGUF's dequantizing loader, "
                         f"which the xDiT ranks do not have; use the .safetensors release of the model (bf16, fp16 "
                         f"or fp8, e.g. flux1-dev-fp8.safetensors)")


def _check_exists(path: str) -> None:
    check_format(path)
    if not os.path.isfile(path):
        raise ValueError(f"model file not found: {path!r}")


_SHARD = re.compile(r"^(.*)-(\d+)-of-(\d+)\.safetensors$")  # diffusers' name-00001-of-00002.safetensors


def shard_paths(path: str) -> list[str]:
    """Every shard of a sharded diffusers file (``...-00001-of-00002.safetensors``, any one of them named), in
    order, all beside it; any other file: itself alone. ``ValueError`` naming the shards that are not there."""
    match = _SHARD.match(path)
    if not match:
        return [path]
    stem, total = match.group(1), match.group(3)
    paths = [f"{stem}-{i:0{len(total)}d}-of-{total}.safetensors" for i in range(1, int(total) + 1)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{path!r} is one shard of a model in {int(total)} files, but {', '.join(map(repr, missing[:3]))} "
                         f"is not beside it; keep every shard of the model in the same folder")
    return paths


def read_checkpoint(path: str | os.PathLike, keep: Optional[Callable[[str], bool]] = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file, with ComfyUI's ``model.diffusion_model.`` prefix stripped; with ``keep``
    only the tensors whose (stripped) name it accepts are read (one PipeFusion stage's blocks). A full
    checkpoint's text encoders and VAE (other prefixes) are not read. A sharded diffusers file is read
    whole, from all its shards."""
    path = os.fspath(path)
    _check_exists(path)
    shards = shard_paths(path)
    if len(shards) > 1:
        return {k: v for shard in shards for k, v in _read_one(shard, keep).items()}
    return _read_one(path, keep)


def _read_one(path: str, keep: Optional[Callable[[str], bool]]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
            prefixed = any(k.startswith(COMFY_PREFIX) for k in keys)
            wanted = [k for k in keys if (k.startswith(COMFY_PREFIX) or not prefixed)
                      and (keep is None or keep(strip_prefix(k)))]
            if keep is None and not prefixed:
                state = load_file(path, device="cpu")
            else:
                state = {k: handle.get_tensor(k) for k in wanted}
    except (SafetensorError, OSError, RuntimeError) as exc:
        size = os.path.getsize(path)
        raise ValueError(f"{path!r} ({size} bytes) is not a readable safetensors file "
                         f"(truncated or corrupt download?): {exc}") from exc
    return {strip_prefix(k): _aligned(v) for k, v in state.items()}


ALIGNMENT = 64  # bytes: what CPU vector kernels assume of a fresh allocation


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in its own 64-byte-aligned memory. safetensors hands out views into the file's buffer at
    whatever offset its header length leaves, and CPU matmul kernels round differently on unaligned data:
    the same weights would give a different latent depending on the file's metadata."""
    return tensor.clone() if tensor.data_ptr() % ALIGNMENT else tensor


@dataclass(frozen=True)
class TensorShape:
    """A tensor's shape without its data (what the spec inference of every family reads)."""

    shape: tuple[int, ...]


def read_shapes(path: str | os.PathLike) -> dict[str, TensorShape]:
    """Every diffusion-model tensor's (prefix-stripped) name and shape, from the header alone."""
    path = os.fspath(path)
    _check_exists(path)
    return {k: v for shard in shard_paths(path) for k, v in _shapes_one(shard).items()}


def _shapes_one(path: str) -> dict[str, TensorShape]:
    try:
        with safe_open(path, framework="pt") as handle:
            keys = list(handle.keys())
            prefixed = any(k.startswith(COMFY_PREFIX) for k in keys)
            return {strip_prefix(k): TensorShape(tuple(handle.get_slice(k).get_shape())) for k in keys
                    if k.startswith(COMFY_PREFIX) or not prefixed}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path!r} is not a readable safetensors file (truncated or corrupt download?): "
                         f"{exc}") from exc


def count_blocks(keys: Iterable[str], pattern: re.Pattern) -> int:
    """Blocks in a file: one more than the largest index ``pattern`` (one group: the index) matches."""
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def check_shapes(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], source: str, looks: str) -> None:
    """``ValueError`` naming the first tensors whose shape is not what the inferred architecture needs
    (``looks``: what the file was taken for, e.g. "SD3 (depth 24, 24 blocks)")."""
    wrong = [f"{k}: expected {tuple(s)}, found {tuple(state[k].shape) if k in state else 'nothing'}"
             for k, s in expected.items() if k not in state or tuple(state[k].shape) != tuple(s)]
    if wrong:
        raise ValueError(f"{source} looks like {looks} but {len(wrong)} tensors do not fit: {'; '.join(wrong[:3])}")
