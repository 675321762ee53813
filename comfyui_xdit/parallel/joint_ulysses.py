"""Ulysses for joint text + image sequences: image tokens go through the all-to-all, text stays whole.

Every rank of a Ulysses group holds all ``L`` text tokens and its own shard of the image tokens. Before
attention the image part is exchanged (scatter heads, gather sequence) while the text part simply
keeps this rank's heads; after attention the image output goes back (scatter sequence, gather heads)
and the text output is all-gathered over heads, so every rank again holds all text tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .comm import CommCounter, all_gather_cat, group_rank, group_size, heads_to_seq, seq_to_heads


@dataclass(frozen=True)
class JointUlysses:
    group: Optional[dist.ProcessGroup]
    counter: Optional[CommCounter] = None

    @property
    def size(self) -> int:
        return group_size(self.group)

    def scatter_heads(self, tensor: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L + N_local, H, D) -> text (B, L, H/U, D), image (B, N_local * U, H/U, D)."""
        heads = tensor.shape[2]
        if heads % self.size:
            raise ValueError(f"{heads} heads do not split over ulysses degree {self.size}; "
                             f"choose a ulysses degree that divides {heads}")
        local_heads = heads // self.size
        lo = group_rank(self.group) * local_heads  # the all-to-all hands head group j to group rank j
        text = tensor[:, :text_len, lo:lo + local_heads]
        return text, seq_to_heads(tensor[:, text_len:], self.group, self.counter)

    def gather_heads(self, out: torch.Tensor, text_len: int) -> torch.Tensor:
        """(B, L + N_local * U, H/U, D) -> (B, L + N_local, H, D), text first."""
        image_out = heads_to_seq(out[:, text_len:], self.group, self.counter)  # (B, N_local, H, D)
        if text_len == 0:  # an item without text (PipeFusion's text once a step): every rank of the group agrees
            return image_out
        text_out = all_gather_cat(out[:, :text_len], 2, self.group, self.counter, "ulysses")  # (B, L, H, D)
        return torch.cat([text_out, image_out], dim=1)
