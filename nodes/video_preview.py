"""A video's live preview: a strip of frames spread over the clip, side by side, so that motion shows while
sampling (ComfyUI's own previewers decode the first frame of a video latent only)."""

from __future__ import annotations

import torch

STRIP_FRAMES = 4  # frames a preview shows, first to last, evenly spaced


def frame_strip(x0: torch.Tensor, frames: int = STRIP_FRAMES) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C, 1, H, k * W): up to ``frames`` frames from the first to the last, left to right,
    as one frame that ComfyUI's previewers decode whole; an image latent (4-D) as it is."""
    if x0.ndim != 5 or x0.shape[2] == 1:
        return x0
    count = min(frames, x0.shape[2])
    picked = torch.linspace(0, x0.shape[2] - 1, count).round().long()  # (k,) frame indices
    # (B, C, k, H, W) -> (B, C, H, k, W) -> (B, C, 1, H, k * W)
    chosen = x0.index_select(2, picked).permute(0, 1, 3, 2, 4)
    return chosen.reshape(x0.shape[0], x0.shape[1], 1, x0.shape[3], count * x0.shape[4])
