"""LoRA-family patches merged on the ranks, as ComfyUI v0.3.64's ``comfy.lora.calculate_weight`` merges them.

The ComfyUI side (``nodes/model_patches.py``) turns a MODEL's patches into records
(``comfyui_xdit.lora_adapters``: LoRA with LoCon mid weights, LoHa, LoKr, each optionally DoRA): the
factors, alpha, the strengths and the slice of the fused weight a patch targets (a diffusers-style q/k/v
LoRA lands on a slice of BFL's fused ``qkv``). A rank merges them into the base weights in float32, patch
after patch in ComfyUI's order, and rounds to the weight's stored dtype, as ComfyUI's
``patch_weight_to_device`` does. The ranks never import ComfyUI.
"""

from __future__ import annotations

import hashlib
from dataclasses import fields
from typing import Callable, Mapping, Sequence

import torch

from comfyui_xdit.lora_adapters import LohaPatch, LokrPatch, LoraPatch, WeightPatch
from comfyui_xdit.models.fp8_weights import FP8_DTYPES, stochastic_round

__all__ = ["LoraPatch", "LohaPatch", "LokrPatch", "WeightPatch", "merge_lora", "patches_digest"]


def merge_lora(state: Mapping[str, torch.Tensor], patches: Sequence[WeightPatch]) -> dict[str, torch.Tensor]:
    """``state`` with every patched tensor replaced by its merged copy (the others shared, not copied)."""
    by_key: dict[str, list[WeightPatch]] = {}
    for patch in patches:
        by_key.setdefault(patch.key, []).append(patch)
    missing = sorted(set(by_key) - set(state))
    if missing:
        raise ValueError(f"LoRA patches name {len(missing)} tensors the model does not have (e.g. {missing[0]!r}); "
                         f"the LoRA was made for another model")
    out = dict(state)
    for key, key_patches in by_key.items():
        stored = state[key]
        weight = stored.to(torch.float32, copy=True)  # everything below is float32, so ComfyUI's casts are no-ops
        for patch in key_patches:
            _apply(weight if patch.offset is None else weight.narrow(*patch.offset), patch)
        # an fp8 weight goes back as ComfyUI stores it: stochastic rounding seeded by the weight's name
        out[key] = (stochastic_round(weight, stored.dtype, key) if stored.dtype in FP8_DTYPES
                    else weight.to(stored.dtype))
    return out


def _apply(target: torch.Tensor, patch: WeightPatch) -> None:
    """One patch into ``target`` (the weight or a view of its slice), in place, as the adapter's
    ``calculate_weight`` does."""
    if patch.strength_model != 1.0:
        target *= patch.strength_model
    try:
        diff, alpha = patch.change(target.shape)
        function = _swap_scale_shift if patch.swap_scale_shift else _identity
        if patch.dora_scale is None:
            target += function((patch.strength * alpha) * diff)
        else:
            _weight_decompose(target, diff, alpha, patch.strength, patch.dora_scale, function)
    except RuntimeError as error:  # ComfyUI logs "ERROR ..." and leaves the weight unpatched; we stop
        raise ValueError(f"the {type(patch).__name__} on {patch.key} does not fit its weight of shape "
                         f"{tuple(target.shape)} ({error}); the LoRA was made for another model") from error


def _identity(change: torch.Tensor) -> torch.Tensor:
    return change


def _swap_scale_shift(change: torch.Tensor) -> torch.Tensor:
    """BFL's final modulation is (shift, scale) where diffusers' ``norm_out`` is (scale, shift): ComfyUI
    swaps the two halves of a diffusers LoRA's change along the output axis before adding it."""
    shift, scale = change.chunk(2, dim=0)  # (2 * C, ...) -> two (C, ...)
    return torch.cat([scale, shift], dim=0)


def _weight_decompose(weight: torch.Tensor, diff: torch.Tensor, alpha: float, strength: float,
                      dora_scale: torch.Tensor, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """DoRA, in place, as ComfyUI's ``weight_decompose``: the patched weight's directions rescaled to the
    stored magnitudes, then blended with the old weight by ``strength``."""
    scale = dora_scale.to(torch.float32)
    diff *= alpha
    patched = weight + function(diff)
    if scale.shape[0] == patched.shape[0]:  # a magnitude per output row
        # ComfyUI v0.3.64 takes this norm of the weight *before* the patch; we follow it
        # (out, in[, kh, kw]) -> (out, in*kh*kw) -> (out, 1) -> (out, 1[, 1, 1])
        norm = (weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
                .reshape(weight.shape[0], *[1] * (weight.dim() - 1)))
    else:  # a magnitude per input column, of the patched weight
        # (out, in[, ...]) -> (in, out[, ...]) -> (in, out*...) -> (in, 1) -> (in, 1[, ...]) -> (1, in[, ...])
        norm = (patched.transpose(0, 1).reshape(patched.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(patched.shape[1], *[1] * (patched.dim() - 1)).transpose(0, 1))
    norm = norm + torch.finfo(weight.dtype).eps
    patched *= scale / norm
    if strength != 1.0:
        patched -= weight
        weight += strength * patched
    else:
        weight[:] = patched


def patches_digest(patches: Sequence[WeightPatch]) -> str:
    """A short name for a set of patches (their kinds, tensors, numbers and strengths, field by field):
    equal digests mean the merged weights are equal, so a rank that has them loads nothing."""
    digest = hashlib.sha256()
    for patch in patches:
        digest.update(f"#{type(patch).__name__}".encode())
        for field in fields(patch):
            value = getattr(patch, field.name)
            if isinstance(value, torch.Tensor):
                digest.update(f"|{field.name}:{tuple(value.shape)}:{value.dtype}:".encode())
                digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                digest.update(f"|{field.name}={value!r}".encode())
    return digest.hexdigest()[:16] if patches else ""
