"""Plain-tensor conditioning that crosses from ComfyUI (or the CLI) into the engine."""

from __future__ import annotations

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
    """

    context: torch.Tensor
    pooled: Optional[torch.Tensor]
    guidance: Optional[float] = DEFAULT_FLUX_GUIDANCE
    resolution: Optional[tuple[float, float]] = None  # (height, width) in image pixels
    aspect_ratio: Optional[float] = None  # height / width by default

    def __post_init__(self) -> None:
        if self.pooled is None:
            object.__setattr__(self, "pooled", torch.zeros(1, 0))
        if self.context.ndim != 3:
            raise ValueError(f"conditioning context must be (batch, tokens, dim), got shape {tuple(self.context.shape)}")
        if self.pooled.ndim != 2:
            raise ValueError(f"pooled conditioning must be (batch, dim), got shape {tuple(self.pooled.shape)}")

    def for_batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Context and pooled repeated to the latent batch, as ComfyUI repeats conds."""
        return _repeat_to(self.context, batch), _repeat_to(self.pooled, batch)

    def rows(self, batch: int, start: int, stop: int) -> "Conditioning":
        """The conditioning of images ``[start, stop)`` of a ``batch``-image latent: a batch-1 conditioning is
        shared as is, a bigger one is repeated to the latent batch (as ``for_batch``) and cut to those rows."""
        if self.context.shape[0] == 1 and self.pooled.shape[0] == 1:
            return self
        context, pooled = self.for_batch(batch)
        return replace(self, context=context[start:stop], pooled=pooled[start:stop])


def _repeat_to(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    if tensor.shape[0] == batch:
        return tensor
    if batch % tensor.shape[0]:
        raise ValueError(f"conditioning batch {tensor.shape[0]} does not divide the latent batch {batch}")
    return tensor.repeat(batch // tensor.shape[0], *([1] * (tensor.ndim - 1)))
