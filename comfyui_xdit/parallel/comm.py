"""Collectives the parallel engine uses, each counting the bytes this rank sends.

A ``CommCounter`` is passed explicitly to whatever communicates; it files bytes under an axis name
(``"ulysses"``, ``"ring"``, ``"sequence"``, ``"cfg"``, ``"pipefusion"``, ``"control"``) and the current
step, so that tests can compare the traffic with closed-form formulas. A group of ``None`` means the
axis has one rank: the collective is the identity and sends nothing.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
import torch.distributed as dist
from yunchang.comm.all_to_all import all_to_all_4D


class CommCounter:
    """Bytes sent by this rank, per step and axis. ``step`` -1 collects traffic outside the loop."""

    def __init__(self) -> None:
        self.step = -1
        self._bytes: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def begin_step(self, step: int) -> None:
        self.step = step

    def add(self, axis: str, nbytes: int) -> None:
        self._bytes[self.step][axis] += int(nbytes)

    def per_step(self) -> dict[int, dict[str, int]]:
        """{step: {axis: bytes}} as plain dicts (picklable)."""
        return {step: dict(axes) for step, axes in self._bytes.items()}

    def total(self, axis: str) -> int:
        return sum(axes.get(axis, 0) for axes in self._bytes.values())


def _count(counter: Optional[CommCounter], axis: str, nbytes: int) -> None:
    if counter is not None:
        counter.add(axis, nbytes)


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_gather_cat(tensor: torch.Tensor, dim: int, group: Optional[dist.ProcessGroup],
                   counter: Optional[CommCounter], axis: str) -> torch.Tensor:
    """Concatenate every group member's ``tensor`` along ``dim`` in group-rank order."""
    size = group_size(group)
    if size == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor, group=group)
    _count(counter, axis, (size - 1) * nbytes(tensor))  # our piece goes to every other member
    return torch.cat(parts, dim=dim)


def seq_to_heads(tensor: torch.Tensor, group: Optional[dist.ProcessGroup], counter: Optional[CommCounter],
                 axis: str = "ulysses") -> torch.Tensor:
    """Ulysses all-to-all: (B, S/P, H, D) -> (B, S, H/P, D), sequence gathered in group-rank order."""
    size = group_size(group)
    if size == 1:
        return tensor
    _count(counter, axis, nbytes(tensor) * (size - 1) // size)  # the 1/P kept locally is not sent
    return all_to_all_4D(tensor.contiguous(), scatter_idx=2, gather_idx=1, group=group)


def heads_to_seq(tensor: torch.Tensor, group: Optional[dist.ProcessGroup], counter: Optional[CommCounter],
                 axis: str = "ulysses") -> torch.Tensor:
    """Inverse Ulysses all-to-all: (B, S, H/P, D) -> (B, S/P, H, D)."""
    size = group_size(group)
    if size == 1:
        return tensor
    _count(counter, axis, nbytes(tensor) * (size - 1) // size)
    return all_to_all_4D(tensor.contiguous(), scatter_idx=1, gather_idx=2, group=group)


def agree_any(flag: bool, device: torch.device, group: Optional[dist.ProcessGroup],
              counter: Optional[CommCounter], world_size: int) -> bool:
    """True on every rank when ``flag`` is true on any rank (a MAX all-reduce over ``group``)."""
    if world_size == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    _count(counter, "control", nbytes(value))
    return bool(value.item())
