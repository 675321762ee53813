"""CFG parallel: the two guidance branches on the two halves of the cfg axis, one exchange per step."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..cond_batch import Forward, branch_outputs
from ..conditioning import Conditioning
from .comm import CommCounter, all_gather_cat


def branch_velocities(velocity: Forward, x: torch.Tensor, sigma: torch.Tensor, positive: Conditioning,
                      negative: Optional[Conditioning], cfg_group: Optional[dist.ProcessGroup], cfg_index: int,
                      counter: Optional[CommCounter] = None,
                      batched: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(cond velocity, uncond velocity or None) of ``velocity(x, sigma, cond)`` on the whole latent's tokens
    ``x`` (B, N, C) for this step.

    Without a cfg group both branches run here, as ComfyUI runs them: one forward of batch 2B where
    ``batched`` and the conds concatenate (``cond_batch.py``), else one after the other. With one, cfg rank 0
    runs the positive branch, rank 1 the negative, and one all-gather swaps the results.
    """
    if cfg_group is None:
        return branch_outputs(velocity, x, sigma, positive, negative, batched)
    if negative is None:
        raise ValueError("cfg_degree 2 needs a negative conditioning and cfg != 1.0; drop CFG parallel otherwise")
    mine = velocity(x, sigma, positive if cfg_index == 0 else negative)
    # (B, N, C) from each branch -> (2, B, N, C), positive first
    both = all_gather_cat(mine.unsqueeze(0), 0, cfg_group, counter, "cfg")
    return both[0], both[1]
