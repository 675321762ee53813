"""PipeFusion's stale K/V: each attention layer keeps the image keys and values of the whole latent, and
each patch overwrites only its own slice, so a patch attends to the other patches as they were when
they last passed through this layer (this step for earlier patches, the previous step for later ones).

``StaleKVAttention`` is an ``AttentionBackend``: the loop points it at the image-token range it is
about to run (``at(start, stop)``), and every layer's call refreshes that slice and attends over
text + the full buffered image K/V. Over the whole latent it is exactly serial attention.

With ``text_once`` (joint-text families whose blocks run on zero text tokens, see ``pipefusion_text.py``)
it also keeps each layer's text K/V from the last item that carried the prompt, and an item without
text attends over that cached text + the image buffer.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..attention import sdpa
from .comm import CommCounter, all_gather_cat
from .joint_ulysses import JointUlysses


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
    """Attention backend for one CFG branch of one pipeline stage: fresh text + patch, stale elsewhere.

    With sequence parallel inside the stage (``ulysses_group`` / ``ring_group``), each rank of the
    stage's ring x ulysses group holds a contiguous shard of the patch's image tokens, shard index
    ``ring * U + ulysses``. Per layer:

    1. Ulysses all-to-all (scatter heads, gather sequence): the image q, k, v of the U shards of this
       rank's ring position, for H/U heads; the text keeps this rank's H/U heads.
    2. Ring all-gather of the image k, v: the whole patch's K/V for these H/U heads on every ring rank,
       written into the buffer, which holds all image tokens for these heads on every rank of the ring.
    3. Local attention of this rank's queries [text; its image tokens] over [text; whole buffer]: every
       key is here, so no log-sum-exp merge is needed. Text outputs are equal on all ring ranks.
    4. Back: the image output by the inverse all-to-all, the text output all-gathered over heads.

    Without groups this is the single-process stale-K/V attention of ``pipefusion_reference``.
    """

    def __init__(self, num_tokens: int, ulysses_group: Optional[dist.ProcessGroup] = None,
                 ring_group: Optional[dist.ProcessGroup] = None, counter: Optional[CommCounter] = None,
                 text_once: bool = False) -> None:
        self.num_tokens = num_tokens
        self.buffers: dict[int, PatchKVBuffer] = {}
        self.text_once = text_once
        self.text_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (B, L, H/U, D) text k, v
        self.start, self.stop = 0, num_tokens
        self.ring_group, self.counter = ring_group, counter
        self.ulysses = JointUlysses(ulysses_group, counter)

    def at(self, start: int, stop: int) -> "StaleKVAttention":
        """Point the backend at the patch of image tokens ``[start, stop)`` (the whole patch, over all
        sequence-parallel ranks) for the blocks run next."""
        self.start, self.stop = start, stop
        return self

    def buffer(self, layer: int) -> PatchKVBuffer:
        if layer not in self.buffers:
            self.buffers[layer] = PatchKVBuffer(self.num_tokens, layer)
        return self.buffers[layer]

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, text_len: int,
                 layer: int) -> torch.Tensor:
        """q, k, v: (B, L + n_local, H, D), text first, n_local = this rank's shard of the patch ->
        (B, L + n_local, H, D)."""
        split = self.ulysses.scatter_heads
        (text_q, image_q), (text_k, image_k), (text_v, image_v) = (split(t, text_len) for t in (query, key, value))
        # (B, n_local * U, H/U, D) from each ring rank -> (B, n, H/U, D): the whole patch
        patch_k = all_gather_cat(image_k, 1, self.ring_group, self.counter, "ring")
        patch_v = all_gather_cat(image_v, 1, self.ring_group, self.counter, "ring")
        if patch_k.shape[1] != self.stop - self.start:
            raise RuntimeError(f"layer {layer}: got {patch_k.shape[1]} image tokens for patch "
                               f"[{self.start}, {self.stop})")
        text_k, text_v = self._text_kv(layer, text_len, text_k, text_v)
        buffer = self.buffer(layer)
        buffer.refresh(self.start, patch_k, patch_v)
        assert buffer.key is not None and buffer.value is not None
        # (B, L, H/U, D) ++ (B, N, H/U, D) -> (B, L + N, H/U, D)
        full_key = torch.cat([text_k, buffer.key], dim=1)
        full_value = torch.cat([text_v, buffer.value], dim=1)
        out = sdpa(torch.cat([text_q, image_q], dim=1), full_key, full_value)  # (B, L + n_local * U, H/U, D)
        if self.ulysses.size == 1:
            return out
        return self.ulysses.gather_heads(out, text_len)  # (B, L + n_local, H, D)

    def _text_kv(self, layer: int, text_len: int, text_k: torch.Tensor,
                 text_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The text K/V this layer attends to: the item's own (kept when ``text_once``), or, for an item
        without text, the cached ones of the last item that carried the prompt through this layer."""
        if not self.text_once:
            return text_k, text_v
        if text_len:
            self.text_kv[layer] = (text_k, text_v)
            return text_k, text_v
        if layer not in self.text_kv:
            raise RuntimeError(f"layer {layer}: an item without text tokens ran before one with the prompt; "
                               f"the first patch of every step must carry the text")
        return self.text_kv[layer]

    def snapshot(self) -> tuple[tuple[int, torch.Tensor, torch.Tensor], ...]:
        """CPU copies of every filled layer's (layer, key, value): (B, N, H/U, D) each, for a checkpoint."""
        return tuple((layer, b.key.detach().to("cpu", copy=True), b.value.detach().to("cpu", copy=True))
                     for layer, b in sorted(self.buffers.items()) if b.key is not None and b.value is not None)

    def load(self, saved: tuple[tuple[int, torch.Tensor, torch.Tensor], ...], device: torch.device) -> None:
        """Refill the buffers from ``snapshot``'s result (a resumed run reads them as the uninterrupted one did)."""
        for layer, key, value in saved:
            if key.shape[1] != self.num_tokens:
                raise ValueError(f"layer {layer}: saved K/V of {key.shape[1]} image tokens for a latent of "
                                 f"{self.num_tokens}; resume the request the checkpoint came from")
            buffer = self.buffer(layer)
            buffer.key, buffer.value = key.to(device), value.to(device)

    def nbytes(self) -> int:
        """Memory the buffers hold (both K and V, all layers)."""
        return sum(b.key.numel() * b.key.element_size() * 2 for b in self.buffers.values() if b.key is not None)
