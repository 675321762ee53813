"""PipeFusion's stale K/V: each attention layer keeps the image keys and values of the whole latent, and
each patch overwrites only its own slice, so a patch attends to the other patches as they were when
they last passed through this layer (this step for earlier patches, the previous step for later ones).

``StaleKVAttention`` is an ``AttentionBackend``: the loop points it at the image-token range it is
about to run (``at(start, stop)``), and every layer's call refreshes that slice and attends over
text + the full buffered image K/V. Over the whole latent it is exactly serial attention.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..attention import sdpa


class PatchKVBuffer:
    """One layer's image K/V over all ``num_tokens`` image tokens: (B, N, H, D) each."""

    def __init__(self, num_tokens: int, layer: int) -> None:
        self.num_tokens = num_tokens
        self.layer = layer
        self.key: Optional[torch.Tensor] = None
        self.value: Optional[torch.Tensor] = None

    @property
    def is_filled(self) -> bool:
        return self.key is not None

    def refresh(self, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Overwrite image tokens ``[start, start + key.shape[1])`` with fresh (B, n, H, D) K/V."""
        stop = start + key.shape[1]
        if not 0 <= start < stop <= self.num_tokens:
            raise RuntimeError(f"layer {self.layer}: patch [{start}, {stop}) outside the {self.num_tokens} image "
                               f"tokens of the K/V buffer")
        if self.key is None or self.value is None:
            if (start, stop) != (0, self.num_tokens):
                raise RuntimeError(f"layer {self.layer}: K/V buffer read before a whole-latent step filled it; "
                                   f"PipeFusion needs warmup_steps >= 1")
            self.key, self.value = key.clone(), value.clone()
            return
        self.key[:, start:stop] = key
        self.value[:, start:stop] = value


class StaleKVAttention:
    """Attention backend for one CFG branch of one pipeline stage: fresh text + patch, stale elsewhere."""

    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens
        self.buffers: dict[int, PatchKVBuffer] = {}
        self.start, self.stop = 0, num_tokens

    def at(self, start: int, stop: int) -> "StaleKVAttention":
        """Point the backend at image tokens ``[start, stop)`` for the blocks run next."""
        self.start, self.stop = start, stop
        return self

    def buffer(self, layer: int) -> PatchKVBuffer:
        if layer not in self.buffers:
            self.buffers[layer] = PatchKVBuffer(self.num_tokens, layer)
        return self.buffers[layer]

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, text_len: int,
                 layer: int) -> torch.Tensor:
        """q, k, v: (B, L + n, H, D), text first, n = the patch's tokens -> (B, L + n, H, D)."""
        if key.shape[1] - text_len != self.stop - self.start:
            raise RuntimeError(f"layer {layer}: got {key.shape[1] - text_len} image tokens for patch "
                               f"[{self.start}, {self.stop})")
        buffer = self.buffer(layer)
        buffer.refresh(self.start, key[:, text_len:], value[:, text_len:])
        assert buffer.key is not None and buffer.value is not None
        # (B, L, H, D) ++ (B, N, H, D) -> (B, L + N, H, D)
        full_key = torch.cat([key[:, :text_len], buffer.key], dim=1)
        full_value = torch.cat([value[:, :text_len], buffer.value], dim=1)
        return sdpa(query, full_key, full_value)

    def nbytes(self) -> int:
        """Memory the buffers hold (both K and V, all layers)."""
        return sum(b.key.numel() * b.key.element_size() * 2 for b in self.buffers.values() if b.key is not None)
