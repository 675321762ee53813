"""A stand-in for a transformer block of another PipeFusion stage (shared by every family)."""

from __future__ import annotations

import torch


class AbsentBlock(torch.nn.Module):
    """Stands where a block of another PipeFusion stage would be: no weights, and running it is an error."""

    def __init__(self, layer: int, present: tuple[int, int]) -> None:
        super().__init__()
        self.layer, self.present = layer, present

    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"block {self.layer} belongs to another PipeFusion stage: this rank loaded blocks "
                           f"{self.present[0]}..{self.present[1] - 1} only; load it with blocks=None to run all")
