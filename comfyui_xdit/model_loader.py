"""Load the model a ``ModelRef`` names: a user's safetensors file or a built-in tiny random model, of
any family we run (detected from the file's keys, ``models/families.py``)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .conditioning import Conditioning
from .models.families import TINY_SPECS, ModelSpec, adapter_from_file, build_adapter, random_state, read_spec
from .request import TINY_PREFIX, ModelRef

TINY_SEED = 0  # tiny models are always the same weights


def tiny_spec(name: str) -> ModelSpec:
    try:
        return TINY_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown tiny model {TINY_PREFIX}{name}; choose one of "
                         f"{', '.join(TINY_PREFIX + n for n in TINY_SPECS)}") from None


def tiny_state(name: str) -> dict[str, torch.Tensor]:
    return random_state(tiny_spec(name), TINY_SEED)


def model_spec(ref: ModelRef) -> ModelSpec:
    """The architecture ``ref`` names, without loading weights (a file's header only)."""
    return tiny_spec(ref.path[len(TINY_PREFIX):]) if ref.is_tiny else read_spec(ref.path)


def load_model(ref: ModelRef, device: torch.device | str = "cpu", blocks: Optional[tuple[int, int]] = None):
    """Build the adapter for ``ref`` on ``device``; with ``blocks`` (a PipeFusion stage's ``[start, stop)``)
    only those blocks and the shared tensors."""
    if ref.is_tiny:
        name = ref.path[len(TINY_PREFIX):]
        return build_adapter(tiny_state(name), tiny_spec(name), ref.torch_dtype, device, ref.path, blocks,
                             ref.weight_dtype)
    return adapter_from_file(ref.path, ref.torch_dtype, device, blocks=blocks, weight_dtype=ref.weight_dtype)


def tiny_conditioning(ref: ModelRef, seed: int, text_len: int = 8,
                      guidance: float = 3.5) -> tuple[Conditioning, Conditioning]:
    """Positive and negative conditioning drawn from ``seed`` for tiny models (no text encoder). A family with a
    second text stream (HunyuanDiT's mT5) gets those tokens too, each stream at least as long as the model's
    padding table and masked like an encoder's padded output (text first, then padding)."""
    spec = tiny_spec(ref.path[len(TINY_PREFIX):])
    generator = torch.Generator().manual_seed(seed + 1)
    second_dim = getattr(spec, "second_context_dim", None)

    def mask(tokens: int) -> torch.Tensor:
        return (torch.arange(tokens) < (tokens + 1) // 2).float()[None]  # (1, L): the first half text

    def draw() -> Conditioning:
        if second_dim is None:
            return Conditioning(context=torch.randn(1, text_len, spec.context_dim, generator=generator),
                                pooled=torch.randn(1, spec.pooled_dim, generator=generator),
                                guidance=guidance)
        clip_len, t5_len = max(text_len, spec.text_len), max(text_len, spec.t5_len)
        return Conditioning(context=torch.randn(1, clip_len, spec.context_dim, generator=generator), pooled=None,
                            guidance=guidance, context_mask=mask(clip_len),
                            second_context=torch.randn(1, t5_len, second_dim, generator=generator),
                            second_context_mask=mask(t5_len))

    return draw(), draw()


def tiny_image_conditioning(ref: ModelRef, cond: Conditioning, latent_shape: tuple[int, ...], seed: int,
                            clip_tokens: int = 5) -> Conditioning:
    """``cond`` with image-to-video inputs drawn from ``seed`` for a tiny I2V model (as WanImageToVideo sets them:
    a start-frame latent of ``latent_shape`` (B, C, T, H, W), its mask 0 on the first latent frame, and CLIP vision
    tokens where the model embeds them); ``cond`` as it is for a model without image inputs."""
    spec = tiny_spec(ref.path[len(TINY_PREFIX):])
    if not getattr(spec, "image_conditioning", False):
        return cond
    generator = torch.Generator().manual_seed(seed + 2)
    mask = torch.ones(1, 1, *latent_shape[2:])  # (1, 1, T, H, W)
    mask[:, :, :1] = 0.0
    clip = None if spec.image_dim is None else torch.randn(1, clip_tokens, spec.image_dim, generator=generator)
    return dataclasses.replace(cond, concat_latent=torch.randn(1, *latent_shape[1:], generator=generator),
                               concat_mask=mask, clip_vision=clip)
