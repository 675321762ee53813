"""The one attention seam: every transformer block's attention runs through an ``AttentionBackend``.

Tensors cross the seam as ``(batch, seq, heads, head_dim)`` with the text tokens first
(``seq = text_len + image tokens held by this rank``). The serial backend is plain SDPA; the parallel
engine swaps in USP (Ulysses x Ring) or PipeFusion's stale-K/V attention without touching the model.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, text_len: int,
                 layer: int) -> torch.Tensor:
        """(B, S, H, D) x3 -> (B, S, H, D)."""
        ...


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Full softmax attention on (B, S, H, D) tensors."""
    # (B, S, H, D) -> (B, H, S, D) for SDPA and back.
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2)


class SerialAttention:
    """Single-process attention over the whole (text + image) sequence."""

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, text_len: int,
                 layer: int) -> torch.Tensor:
        return sdpa(query, key, value)


class AttentionSeam:
    """Holds the backend that a model's attention processors call; the engine swaps it."""

    def __init__(self, backend: AttentionBackend | None = None) -> None:
        self.backend: AttentionBackend = backend or SerialAttention()

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, text_len: int,
                 layer: int) -> torch.Tensor:
        return self.backend(query, key, value, text_len=text_len, layer=layer)
