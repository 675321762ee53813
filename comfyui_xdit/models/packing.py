"""The token layout every 2-D image family shares: 2x2 latent pixels per token, channel-major inside a
token, tokens row-major (how ComfyUI packs Flux). Samplers, noise and PipeFusion patches see only this
layout; an adapter whose diffusers module orders a token otherwise converts at its own edges."""

from __future__ import annotations

import torch

PATCH = 2


def pack(latent: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latent.shape
    # (B, C, H, W) -> (B, H/2 * W/2, C*2*2), channel-major inside a token
    x = latent.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    # (B, H/2 * W/2, C*2*2) -> (B, C, H, W)
    x = tokens.view(b, height // PATCH, width // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)
