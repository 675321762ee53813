"""CFG parallel: the two guidance branches on the two halves of the cfg axis, one exchange per step."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..conditioning import Conditioning
from .comm import CommCounter, all_gather_cat

BranchVelocity = Callable[[Conditioning], torch.Tensor]  # cond -> whole-latent velocity (B, N, C)


def branch_velocities(velocity: BranchVelocity, positive: Conditioning, negative: Optional[Conditioning],
                      cfg_group: Optional[dist.ProcessGroup], cfg_index: int,
                      counter: Optional[CommCounter] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(cond velocity, uncond velocity or None) for this step.

    Without a cfg group both branches run here, one after the other, as ComfyUI runs them. With one,
    cfg rank 0 runs the positive branch, rank 1 the negative, and one all-gather swaps the results.
    """
    if cfg_group is None:
        return velocity(positive), (velocity(negative) if negative is not None else None)
    if negative is None:
        raise ValueError("cfg_degree 2 needs a negative conditioning and cfg != 1.0; drop CFG parallel otherwise")
    mine = velocity(positive if cfg_index == 0 else negative)
    # (B, N, C) from each branch -> (2, B, N, C), positive first
    both = all_gather_cat(mine.unsqueeze(0), 0, cfg_group, counter, "cfg")
    return both[0], both[1]
