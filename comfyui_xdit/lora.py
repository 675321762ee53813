"""LoRA patches merged on the ranks, as ComfyUI's ``comfy.lora.calculate_weight`` merges a plain LoRA.

The ComfyUI side (``nodes/model_patches.py``) turns a MODEL's patches into ``LoraPatch`` records: the
two low-rank matrices, alpha, the strengths and the slice of the fused weight a patch targets (a
diffusers-style q/k/v LoRA lands on a slice of BFL's fused ``qkv``). A rank merges them into the base
weights in float32, patch after patch in ComfyUI's order, and rounds to the weight's stored dtype, as
ComfyUI's ``patch_weight_to_device`` does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch


@dataclass(frozen=True)
class LoraPatch:
    """One LoRA's change to one BFL weight: ``weight[offset] += strength * alpha/rank * up @ down``."""

    key: str  # BFL tensor name, e.g. "double_blocks.0.img_attn.qkv.weight"
    up: torch.Tensor  # (out, rank)
    down: torch.Tensor  # (rank, in)
    alpha: Optional[float]  # None: scale 1
    strength: float
    strength_model: float = 1.0
    offset: Optional[tuple[int, int, int]] = None  # (dim, start, length) of the fused weight


def merge_lora(state: Mapping[str, torch.Tensor], patches: Sequence[LoraPatch]) -> dict[str, torch.Tensor]:
    """``state`` with every patched tensor replaced by its merged copy (the others shared, not copied)."""
    by_key: dict[str, list[LoraPatch]] = {}
    for patch in patches:
        by_key.setdefault(patch.key, []).append(patch)
    missing = sorted(set(by_key) - set(state))
    if missing:
        raise ValueError(f"LoRA patches name {len(missing)} tensors the model does not have (e.g. {missing[0]!r}); "
                         f"the LoRA was made for another model")
    out = dict(state)
    for key, key_patches in by_key.items():
        stored = state[key]
        weight = stored.to(torch.float32, copy=True)
        for patch in key_patches:
            target = weight if patch.offset is None else weight.narrow(*patch.offset)
            if patch.strength_model != 1.0:
                target *= patch.strength_model
            up, down = patch.up.to(torch.float32), patch.down.to(torch.float32)
            alpha = patch.alpha / down.shape[0] if patch.alpha is not None else 1.0
            # (out, rank) x (rank, in) -> the weight's (out, in)
            diff = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(target.shape)
            target += ((patch.strength * alpha) * diff).type(target.dtype)
        out[key] = weight.to(stored.dtype)
    return out


def patches_digest(patches: Sequence[LoraPatch]) -> str:
    """A short name for a set of patches (which tensors, which values, which strengths): equal digests
    mean the merged weights are equal, so a rank that has them loads nothing."""
    digest = hashlib.sha256()
    for patch in patches:
        digest.update(f"{patch.key}|{patch.alpha}|{patch.strength}|{patch.strength_model}|{patch.offset}".encode())
        for tensor in (patch.up, patch.down):
            digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16] if patches else ""
