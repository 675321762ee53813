"""Data parallelism over the batch: each data group samples a contiguous chunk of the batch's images.

Every rank builds the whole-batch plan (noise drawn for the whole batch, as ComfyUI does), takes its
group's rows with ``SamplingPlan.rows`` and, after sampling, ``gather_rows`` puts the chunks back in
order on every rank. Chunks are ``torch.tensor_split``'s: the first ``batch % degree`` get one image more.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .comm import CommCounter, all_gather_cat


def batch_rows(batch: int, degree: int, index: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of data group ``index`` of ``degree``: ``torch.tensor_split``'s chunk ``index``."""
    if not 1 <= degree <= batch:
        raise ValueError(f"data_degree {degree} needs a batch of at least {degree} images, the latent has {batch}; "
                         f"lower data_degree (--data-degree) or raise batch_size")
    base, extra = divmod(batch, degree)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def gather_rows(x: torch.Tensor, batch: int, group: Optional[dist.ProcessGroup], degree: int,
                counter: Optional[CommCounter]) -> torch.Tensor:
    """Every data group's chunk ``x`` (rows, N, C) -> the whole batch (batch, N, C), in group order, on every
    rank. Chunks may differ by one row: each is padded to the largest before the all-gather, then cut."""
    if degree == 1:
        return x
    sizes = [stop - start for start, stop in (batch_rows(batch, degree, i) for i in range(degree))]
    padded = torch.zeros(sizes[0], *x.shape[1:], dtype=x.dtype, device=x.device)  # chunk 0 is the largest
    padded[:x.shape[0]] = x
    # (degree * largest, N, C) -> the real rows of each chunk, in order -> (batch, N, C)
    whole = all_gather_cat(padded, 0, group, counter, "data")
    return torch.cat([whole[i * sizes[0]:i * sizes[0] + size] for i, size in enumerate(sizes)], dim=0)
