"""Sequence parallel: each ring x ulysses rank runs the model on a contiguous shard of image tokens.

The shard's positions (``image_ids``) travel with it, so rotary embeddings are those of the whole
image; attention sees every token through the USP backend in the seam; the velocity shards are
all-gathered back into the whole (B, N, C) velocity on every rank of the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..conditioning import Conditioning
from ..models.adapter import Adapter
from .comm import CommCounter, all_gather_cat


@dataclass(frozen=True)
class SequenceShard:
    """Shard ``index`` of ``count`` equal contiguous pieces of the image-token sequence."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} is outside 0..{self.count - 1}")

    def bounds(self, tokens: int) -> tuple[int, int]:
        if tokens % self.count:
            raise ValueError(f"{tokens} image tokens do not split into {self.count} equal shards; choose a "
                             f"resolution whose token count is a multiple of {self.count}")
        size = tokens // self.count
        return self.index * size, (self.index + 1) * size

    def take(self, tokens: torch.Tensor, dim: int) -> torch.Tensor:
        lo, hi = self.bounds(tokens.shape[dim])
        return tokens.narrow(dim, lo, hi - lo)


class SequenceParallelVelocity:
    """``velocity(x, image_ids, cond, sigma)`` on the whole latent, computed shard-wise over ``group``."""

    def __init__(self, adapter: Adapter, shard: SequenceShard, group: Optional[dist.ProcessGroup],
                 counter: Optional[CommCounter] = None) -> None:
        self.adapter = adapter
        self.shard = shard
        self.group = group
        self.counter = counter

    def __call__(self, x: torch.Tensor, image_ids: torch.Tensor, cond: Conditioning,
                 sigma: torch.Tensor) -> torch.Tensor:
        # x (B, N, C) -> shard (B, N / P, C); ids (N, 3) -> (N / P, 3)
        local = self.adapter.velocity(self.shard.take(x, 1), self.shard.take(image_ids, 0), cond, sigma)
        # (B, N / P, C) from each of P ranks -> (B, N, C)
        return all_gather_cat(local, 1, self.group, self.counter, "sequence")
