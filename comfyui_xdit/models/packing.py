"""The token layout every family shares: 2x2 latent pixels per token, channel-major inside a token,
tokens row-major (how ComfyUI packs Flux); a video latent's frames one after another (frame-major, then
row-major: Wan's 1x2x2 patches). Samplers, noise and PipeFusion patches see only this layout; an adapter
whose diffusers module orders a token otherwise converts at its own edges."""

from __future__ import annotations

from typing import Optional

import torch

PATCH = 2


def pack(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*2*2); a video (B, C, T, H, W) -> (B, T * H/2 * W/2, C*2*2)."""
    if latent.ndim == 5:
        b, c, t, h, w = latent.shape
        # (B, C, T, H, W) -> (B, T, H/2, W/2, C, 2, 2): frame-major, then row-major, channel-major inside a token
        x = latent.view(b, c, t, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(b, t * (h // PATCH) * (w // PATCH), c * PATCH * PATCH)
    b, c, h, w = latent.shape
    # (B, C, H, W) -> (B, H/2 * W/2, C*2*2), channel-major inside a token
    x = latent.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, height: int, width: int, frames: Optional[int] = None) -> torch.Tensor:
    """The inverse of ``pack``: (B, C, H, W), or (B, C, T, H, W) with ``frames`` (None: an image latent)."""
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    if frames is not None:
        # (B, T * H/2 * W/2, C*2*2) -> (B, T, H/2, W/2, C, 2, 2) -> (B, C, T, H, W)
        x = tokens.view(b, frames, height // PATCH, width // PATCH, c, PATCH, PATCH).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(b, c, frames, height, width)
    # (B, H/2 * W/2, C*2*2) -> (B, C, H, W)
    x = tokens.view(b, height // PATCH, width // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)
