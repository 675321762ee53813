"""Qwen-Image's rotary positions per token, as ComfyUI computes them (``comfy/ldm/qwen_image/model.py``).

Every token has a (frame, row, col) position. Image tokens sit at (0, row - rows // 2, col - cols // 2),
centred on the image; text token ``i`` sits at ``text_start + i`` on all three axes, with
``text_start = max(rows // 2, cols // 2)`` just past the image's largest position. Rows of ``image_ids``
carry ``text_start`` as a fourth column, so any subset of image tokens (a sequence shard, a PipeFusion
patch) still places the text where the whole image would.

diffusers' ``QwenEmbedRope`` centres an odd side one position lower (``row - ceil(rows / 2)``); on
even token grids the two agree. We follow ComfyUI.
"""

from __future__ import annotations

import torch

THETA = 10000
FRAME, ROW, COL, TEXT_START = range(4)  # the columns of ``image_ids``


def image_positions(rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, 4) float32: (frame, row, col, text_start) per token, row-major like the packing."""
    ids = torch.zeros(rows, cols, 4)
    ids[..., ROW] = torch.arange(rows, dtype=torch.float32)[:, None] - rows // 2
    ids[..., COL] = torch.arange(cols, dtype=torch.float32)[None, :] - cols // 2
    ids[..., TEXT_START] = max(rows // 2, cols // 2)
    return ids.reshape(rows * cols, 4)


def joint_positions(image_ids: torch.Tensor, text_len: int) -> torch.Tensor:
    """(L + N_local, 3) positions: the text's, then those of ``image_ids`` (N_local, 4)."""
    if image_ids.shape[0] == 0:
        raise ValueError("Qwen-Image places the text after the image's positions, which needs at least one "
                         "image token per rank; use fewer sequence shards or PipeFusion patches")
    start = image_ids[0, TEXT_START]
    # (L,) -> (L, 3): the same position on every axis
    text = (start + torch.arange(text_len, dtype=torch.float32, device=image_ids.device))[:, None].expand(text_len, 3)
    return torch.cat([text, image_ids[:, :TEXT_START].float()], dim=0)


def rotary(positions: torch.Tensor, axes_dims: tuple[int, ...],
           theta: float = THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (S, head_dim / 2) float32 of ``positions`` (S, 3), with ComfyUI's float64 frequencies
    (``theta``: 10000 unless the family says otherwise, HunyuanVideo 256)."""
    angles = []
    for axis, dim in enumerate(axes_dims):
        scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=positions.device)
        omega = 1.0 / (theta ** scale)  # (dim / 2,)
        # (S,) x (dim / 2,) -> (S, dim / 2)
        angles.append(positions[:, axis].to(torch.float32).to(torch.float64)[:, None] * omega[None, :])
    joint = torch.cat(angles, dim=1)  # (S, head_dim / 2)
    return torch.cos(joint).float(), torch.sin(joint).float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, S, H, D) by (S, D / 2) angles, pairs interleaved, in ``x``'s dtype as ComfyUI does."""
    cos = cos.to(x.dtype)[:, None, :]  # (S, 1, D/2): broadcast over heads
    sin = sin.to(x.dtype)[:, None, :]
    # (B, S, H, D) -> (B, S, H, D/2) x2
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    # (B, S, H, D/2, 2) -> (B, S, H, D)
    return torch.stack([cos * x0 + (-sin) * x1, sin * x0 + cos * x1], dim=-1).flatten(-2)
