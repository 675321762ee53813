"""Wan image-to-video's ``c_concat``: the channels an I2V model takes after the noisy latent's 16, built from the
conditioning's start-frame latent and mask by the rules of ComfyUI's ``WAN21.concat_cond`` (comfy/model_base.py),
so the numbers are stock's:

- no start latent: zeros of the extra width (20 for Wan 2.1 I2V 14B and Wan 2.2 I2V A14B);
- the latent is resized bilinearly (centre-cropped to the aspect first) to the noise's height and width, each
  16-channel group put through the latent format's ``process_in``, and brought to the noise batch;
- where the extra width is the latent's plus 4 (or the model is Wan 2.1 I2V, which cuts a wider latent), the
  4-channel mask goes first: ``1 - mean(mask)`` over its channels unless it has 4, resized like the latent,
  zero-padded in time to the noise's frames, repeated to 4 channels; none given: zeros.

Then the model's input is ``cat(noisy latent, c_concat)`` along channels before the patch embedding; we pack
``c_concat`` like the latent and hand each shard or PipeFusion patch the rows of its own tokens
(``concat_tokens``), so every parallel layout sees exactly the slice serial sees.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..conditioning import Conditioning, resize_to_batch
from ..latent_format import PerChannelLatentFormat
from . import packing

MASK_CHANNELS = 4  # Wan's mask: one per latent frame's 4 video frames


def center_resize(samples: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """ComfyUI's ``common_upscale(samples, width, height, "bilinear", "center")`` of a (B, C, T, h, w) video:
    every frame centre-cropped to the new aspect, then bilinear -> (B, C, T, height, width)."""
    b, c, t, h, w = samples.shape
    # (B, C, T, h, w) -> (B, T, C, h, w) -> (B*T, C, h, w): one image per frame
    frames = samples.movedim(2, 1).reshape(b * t, c, h, w)
    old_aspect, new_aspect = w / h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((w - w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((h - h * (old_aspect / new_aspect)) / 2)
    frames = frames.narrow(-2, y, h - 2 * y).narrow(-1, x, w - 2 * x)
    out = torch.nn.functional.interpolate(frames, size=(height, width), mode="bilinear")
    # (B*T, C, height, width) -> (B, T, C, height, width) -> (B, C, T, height, width)
    return out.reshape(b, t, c, height, width).movedim(1, 2)


def _mask(mask: Optional[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The (B, 4, T, H, W) mask channels for a noise of ``shape`` (B, C, T, H, W)."""
    batch, _, frames, height, width = shape
    if mask is None:
        return torch.zeros(batch, MASK_CHANNELS, frames, height, width)
    mask = mask.float()
    if mask.shape[1] != MASK_CHANNELS:
        mask = mask.mean(dim=1, keepdim=True)  # (B, 1, t, h, w)
    mask = center_resize(1.0 - mask, height, width)
    if mask.shape[2] < frames:  # frames past the mask's: 0 (after the inversion)
        mask = torch.nn.functional.pad(mask, (0, 0, 0, 0, 0, frames - mask.shape[2]))
    if mask.shape[1] == 1:
        mask = mask.repeat(1, MASK_CHANNELS, 1, 1, 1)
    return resize_to_batch(mask, batch)


def concat_condition(cond: Conditioning, shape: tuple[int, ...], extra_channels: int, image_to_video: bool,
                     latent_format: PerChannelLatentFormat) -> torch.Tensor:
    """ComfyUI's ``c_concat`` (B, extra_channels, T, H, W) float32 for a noise of ``shape`` (B, C, T, H, W)."""
    batch, _, frames, height, width = shape
    image = cond.concat_latent
    if image is None:
        return torch.zeros(batch, extra_channels, frames, height, width)
    image = center_resize(image.float(), height, width)
    group = latent_format.channels
    image = torch.cat([latent_format.process_in(image[:, i:i + group]) for i in range(0, image.shape[1], group)],
                      dim=1)
    image = resize_to_batch(image, batch)
    if extra_channels != image.shape[1] + MASK_CHANNELS and (not image_to_video or extra_channels == image.shape[1]):
        return _checked(image, shape, extra_channels)
    image = image[:, :extra_channels - MASK_CHANNELS]
    return _checked(torch.cat([_mask(cond.concat_mask, shape), image], dim=1), shape, extra_channels)


def _checked(concat: torch.Tensor, shape: tuple[int, ...], extra_channels: int) -> torch.Tensor:
    if concat.shape[1] != extra_channels or concat.shape[2] != shape[2]:
        raise ValueError(f"the image-to-video conditioning makes {concat.shape[1]} channels of {concat.shape[2]} "
                         f"frames, but the model takes {extra_channels} extra channels for a latent of {shape[2]} "
                         f"frames; build the conditioning with WanImageToVideo for this latent's length")
    return concat


def token_index(image_ids: torch.Tensor) -> torch.Tensor:
    """(N_local,) int64 the packed index of each token from Wan's ``image_ids`` (frame, row, column, frames, rows,
    columns): frame-major, then row-major, as ``packing.pack``."""
    ids = image_ids.to(torch.int64)
    return (ids[:, 0] * ids[:, 4] + ids[:, 1]) * ids[:, 5] + ids[:, 2]


def concat_tokens(cond: Conditioning, batch: int, image_ids: torch.Tensor, extra_channels: int, image_to_video: bool,
                  latent_format: PerChannelLatentFormat) -> torch.Tensor:
    """(batch, N_local, extra_channels*2*2) float32: the rows of the packed ``c_concat`` for the tokens at
    ``image_ids`` (N_local, 6), channel-major inside a token like the latent's."""
    frames, rows, cols = (int(n) for n in image_ids[0, 3:6])
    shape = (batch, latent_format.channels, frames, rows * packing.PATCH, cols * packing.PATCH)
    concat = concat_condition(cond, shape, extra_channels, image_to_video, latent_format)
    return packing.pack(concat)[:, token_index(image_ids)]  # (B, N, extra*4) -> (B, N_local, extra*4)
