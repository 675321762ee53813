"""Plain-tensor conditioning that crosses from ComfyUI (or the CLI) into the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

DEFAULT_FLUX_GUIDANCE = 3.5  # what ComfyUI's Flux model uses when the conditioning carries none


@dataclass(frozen=True)
class Conditioning:
    """One prompt's conditioning: ComfyUI's ``[[context, {"pooled_output", "guidance"}]]`` as plain data.

    ``context``: (1 or B, L, joint_attention_dim) text-encoder (T5) tokens.
    ``pooled``: (1 or B, pooled_projection_dim) pooled CLIP vector; families without one (PixArt, Qwen-Image)
    take (1, 0), and None (a T5-only encoder's ``pooled_output``) becomes that.
    ``guidance``: Flux-dev's distilled guidance (the FluxGuidance node); ignored by schnell.
    ``resolution`` / ``aspect_ratio``: the conditioning's ``height, width`` (pixels) and ``aspect_ratio``
    (CLIPTextEncodePixArtAlpha sets the first), PixArt-alpha's micro-conditions; None: the latent's own.
    ``context_mask``: (1 or B, L) 1 for the tokens of ``context`` that are text, 0 for padding (ComfyUI's
    ``attention_mask``; HunyuanDiT replaces the padding with learned rows); None: all text.
    ``second_context`` / ``second_context_mask``: a second text encoder's (1 or B, L2, width2) tokens and
    (1 or B, L2) mask, for families that cross-attend to two (HunyuanDiT's mT5: ``conditioning_mt5xl``,
    ``attention_mask_mt5xl``); None where the family takes one.
    ``target_resolution``: the conditioning's ``target_height, target_width`` (pixels; CLIPTextEncodeSDXL's),
    HunyuanDiT v1.0's image-size condition with ``resolution``; None: ``resolution``.
    ``concat_latent`` / ``concat_mask``: image-to-video's start frames as ComfyUI's ``concat_latent_image``
    (1 or B, C, T, H, W; the VAE's latent, before the latent format's ``process_in``) and ``concat_mask``
    (1 or B, 1 or 4, T, H, W; 0 where a frame is given), as WanImageToVideo sets them; the model builds its
    ``c_concat`` from them (``models/wan_concat.py``). None: not given (the model's zeros).
    ``clip_vision``: (1 or B, N, 1280) the CLIP vision encoder's penultimate hidden states (ComfyUI's
    ``clip_vision_output.penultimate_hidden_states``: Wan 2.1 I2V's image tokens); None: not given.
    ``guiding_frame_index``: HunyuanImageToVideo's "v2 (replace)" (ComfyUI's ``guiding_frame_index``, 0 from the
    node): HunyuanVideo modulates latent frame 0's tokens by this value's timestep embedding; None: not given.
    """

    context: torch.Tensor
    pooled: Optional[torch.Tensor]
    guidance: Optional[float] = DEFAULT_FLUX_GUIDANCE
    resolution: Optional[tuple[float, float]] = None  # (height, width) in image pixels
    aspect_ratio: Optional[float] = None  # height / width by default
    context_mask: Optional[torch.Tensor] = None  # (1 or B, L)
    second_context: Optional[torch.Tensor] = None  # (1 or B, L2, width2)
    second_context_mask: Optional[torch.Tensor] = None  # (1 or B, L2)
    target_resolution: Optional[tuple[float, float]] = None  # (target height, target width) in image pixels
    concat_latent: Optional[torch.Tensor] = None  # (1 or B, C, T, H, W)
    concat_mask: Optional[torch.Tensor] = None  # (1 or B, 1 or 4, T, H, W)
    clip_vision: Optional[torch.Tensor] = None  # (1 or B, N, 1280)
    guiding_frame_index: Optional[float] = None  # HunyuanVideo's token replace

    def __post_init__(self) -> None:
        if self.pooled is None:
            object.__setattr__(self, "pooled", torch.zeros(1, 0))
        if self.context.ndim != 3:
            raise ValueError(f"conditioning context must be (batch, tokens, dim), got shape {tuple(self.context.shape)}")
        if self.pooled.ndim != 2:
            raise ValueError(f"pooled conditioning must be (batch, dim), got shape {tuple(self.pooled.shape)}")
        if self.second_context is not None and self.second_context.ndim != 3:
            raise ValueError(f"the second text encoder's tokens must be (batch, tokens, dim), got shape "
                             f"{tuple(self.second_context.shape)}")
        for mask, tokens, what in ((self.context_mask, self.context, "text"),
                                   (self.second_context_mask, self.second_context, "second text")):
            if mask is not None and (tokens is None or mask.ndim != 2 or mask.shape[1] != tokens.shape[1]):
                raise ValueError(f"the {what} mask must be (batch, tokens) for the {what} tokens, got shape "
                                 f"{tuple(mask.shape)}" + ("" if tokens is None else f" for {tuple(tokens.shape)}"))
        for tensor, dims, what in ((self.concat_latent, 5, "concat latent (batch, channels, frames, h, w)"),
                                   (self.concat_mask, 5, "concat mask (batch, 1 or 4, frames, h, w)"),
                                   (self.clip_vision, 3, "CLIP vision tokens (batch, tokens, width)")):
            if tensor is not None and tensor.ndim != dims:
                raise ValueError(f"the {what} must have {dims} dimensions, got shape {tuple(tensor.shape)}")

    def for_batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Context and pooled repeated to the latent batch, as ComfyUI repeats conds."""
        return _repeat_to(self.context, batch), _repeat_to(self.pooled, batch)

    def batched(self, name: str, batch: int) -> Optional[torch.Tensor]:
        """The tensor field ``name`` (a mask, the second tokens) repeated to the latent batch; None if absent."""
        tensor = getattr(self, name)
        return None if tensor is None else _to_batch(name, tensor, batch)

    def rows(self, batch: int, start: int, stop: int) -> "Conditioning":
        """The conditioning of images ``[start, stop)`` of a ``batch``-image latent: a batch-1 conditioning is
        shared as is, a bigger one is repeated to the latent batch (as ``for_batch``) and cut to those rows."""
        tensors = {name: getattr(self, name) for name in _BATCHED if getattr(self, name) is not None}
        if all(tensor.shape[0] == 1 for tensor in tensors.values()):
            return self
        return replace(self, **{name: _to_batch(name, tensor, batch)[start:stop] for name, tensor in tensors.items()})


# the tensor fields with a batch axis, repeated and cut together
_BATCHED = ("context", "pooled", "context_mask", "second_context", "second_context_mask", "concat_latent",
            "concat_mask", "clip_vision")
# the fields ComfyUI brings to the latent batch with ``resize_to_batch_size`` (nearest rows: [a, a, b, b]) rather
# than by repeating ([a, b, a, b]): its ``concat_cond`` does so for the concat latent and mask
_RESIZED = ("concat_latent", "concat_mask")


def _to_batch(name: str, tensor: torch.Tensor, batch: int) -> torch.Tensor:
    return resize_to_batch(tensor, batch) if name in _RESIZED else _repeat_to(tensor, batch)


def resize_to_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """ComfyUI's ``resize_to_batch_size``: ``batch`` rows picked nearest-first from ``tensor``'s (fewer: spread
    evenly from the first to the last; more: each row repeated in turn)."""
    have = tensor.shape[0]
    if have == batch:
        return tensor
    if batch <= 1:
        return tensor[:batch]
    if batch < have:
        scale = (have - 1) / (batch - 1)
        index = [min(round(i * scale), have - 1) for i in range(batch)]
    else:
        scale = have / batch
        index = [min(math.floor((i + 0.5) * scale), have - 1) for i in range(batch)]
    return tensor[index]


def _repeat_to(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    if tensor.shape[0] == batch:
        return tensor
    if batch % tensor.shape[0]:
        raise ValueError(f"conditioning batch {tensor.shape[0]} does not divide the latent batch {batch}")
    return tensor.repeat(batch // tensor.shape[0], *([1] * (tensor.ndim - 1)))
