"""HunyuanVideo image-to-video's ``c_concat``: the 17 channels its 33-channel model takes after the noisy latent's
16 (SkyReels' 32-channel one: 16, the start latent alone), built from the conditioning's start-frame latent and mask by
the rules of ComfyUI's ``BaseModel.concat_cond`` with ``HunyuanVideoI2V``'s keys (``concat_image``, then
``mask_inverted``; ``HunyuanVideoSkyreelsI2V``: ``concat_image``; comfy/model_base.py), so the numbers are stock's:

- the start latent (``concat_latent_image``, as HunyuanImageToVideo's "v1 (concat)" sets it) through the latent
  format's ``process_in``; where its shape is not the noise's, resized bilinearly (centre-cropped to the aspect
  first) to the noise's height and width and zero-padded (or cut) in time to its frames; brought to the noise batch;
- its mask (``concat_mask``, 0 on the given frames): the first channel, resized like the latent where its size is
  not the noise's, rounded, brought to the noise batch and inverted (``1 - mask``); none given: zeros;
- no start latent: stock uses the sampled LATENT itself (``latent_image``); we take zeros, which is the same for an
  empty latent (HunyuanImageToVideo's), and the input checks refuse a non-empty latent without one.

The model's input is ``cat(noisy latent, c_concat)`` along channels before the patch embedding; we pack ``c_concat``
like the latent and hand each shard or PipeFusion patch the rows of its own tokens (``concat_tokens``), so every
parallel layout sees exactly the slice serial sees.
"""

from __future__ import annotations

import torch

from ..conditioning import Conditioning, resize_to_batch
from ..latent_format import LatentFormat
from . import packing
from .wan_concat import center_resize, token_index

MASK_CHANNELS = 1  # HunyuanVideoI2V's ``mask_inverted``: one channel


def _start_latent(cond: Conditioning, shape: tuple[int, ...], latent_format: LatentFormat) -> torch.Tensor:
    """The (B, 16, T, H, W) ``concat_image`` for a noise of ``shape`` (B, 16, T, H, W)."""
    batch, channels, frames, height, width = shape
    image = cond.concat_latent
    if image is None:
        return torch.zeros(batch, channels, frames, height, width)
    image = latent_format.process_in(image.float())
    if tuple(image.shape[1:]) != tuple(shape[1:]):
        image = center_resize(image, height, width)
        if image.shape[2] < frames:  # frames past the start latent's: zeros
            image = torch.nn.functional.pad(image, (0, 0, 0, 0, 0, frames - image.shape[2]))
        else:
            image = image[:, :, :frames]
    return resize_to_batch(image, batch)


def _inverted_mask(cond: Conditioning, shape: tuple[int, ...]) -> torch.Tensor:
    """The (B, 1, T, H, W) ``mask_inverted`` for a noise of ``shape`` (B, C, T, H, W)."""
    batch, _, frames, height, width = shape
    mask = cond.concat_mask
    if mask is None:
        return torch.zeros(batch, MASK_CHANNELS, frames, height, width)
    mask = mask.float()[:, :1]  # (B, 1, t, h, w): the first channel, as ComfyUI takes it
    if tuple(mask.shape[-2:]) != (height, width):
        mask = center_resize(mask, height, width)
    if mask.shape[2] != frames:
        raise ValueError(f"the image-to-video mask (concat_mask) has {mask.shape[2]} latent frames but the latent has "
                         f"{frames}; sample the latent HunyuanImageToVideo gives with its conditioning (the same "
                         f"length)")
    return 1.0 - resize_to_batch(mask.round(), batch)


def concat_condition(cond: Conditioning, shape: tuple[int, ...], extra_channels: int,
                     latent_format: LatentFormat) -> torch.Tensor:
    """ComfyUI's ``c_concat`` (B, extra_channels, T, H, W) float32 for a noise of ``shape`` (B, 16, T, H, W)."""
    image = _start_latent(cond, shape, latent_format)
    if extra_channels == shape[1]:  # SkyReels: concat_image alone (HunyuanVideoSkyreelsI2V.concat_keys)
        return image
    if extra_channels != shape[1] + MASK_CHANNELS:
        raise ValueError(f"a HunyuanVideo image-to-video model takes {shape[1] + MASK_CHANNELS} (or SkyReels' "
                         f"{shape[1]}) channels after the latent's {shape[1]}, this one {extra_channels}; use the "
                         f"stock KSampler for it")
    # concat_image first, then mask_inverted (HunyuanVideoI2V.concat_keys)
    return torch.cat([image, _inverted_mask(cond, shape)], dim=1)


def concat_tokens(cond: Conditioning, batch: int, image_ids: torch.Tensor, extra_channels: int,
                  latent_format: LatentFormat) -> torch.Tensor:
    """(batch, N_local, extra_channels*2*2) float32: the rows of the packed ``c_concat`` for the tokens at
    ``image_ids`` (N_local, 6: position, then the whole latent's frames, rows, columns), channel-major inside a
    token like the latent's."""
    frames, rows, cols = (int(n) for n in image_ids[0, 3:6])
    shape = (batch, latent_format.channels, frames, rows * packing.PATCH, cols * packing.PATCH)
    concat = concat_condition(cond, shape, extra_channels, latent_format)
    return packing.pack(concat)[:, token_index(image_ids)]  # (B, N, extra*4) -> (B, N_local, extra*4)
