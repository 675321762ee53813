"""Where a run stands after some model calls, so a rebuilt world can continue it exactly (issue 14.1).

A ``Checkpoint`` holds the sampler's tokens and history after ``calls`` model calls and the state of the
noise generator that ancestral samplers draw from in order (Brownian-tree noise is a function of the
interval, so it needs none). The loop that honours ``checkpoints`` emits one with every step event; a
request that carries ``resume`` starts from it and gives the latent of the uninterrupted run. A few MB:
the tokens and at most a few tensors like them, on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .sampler_types import SamplerState


@dataclass(frozen=True)
class Checkpoint:
    """The loop's state after ``calls`` model calls."""

    calls: int
    x: torch.Tensor  # (B, N, C) tokens after those calls, float32 on the CPU
    sampler_state: SamplerState  # the sampler's history (each like x), on the CPU
    noise_state: Optional[torch.Tensor] = None  # the ancestral noise generator's state (a uint8 tensor)

    def check_fits(self, x: torch.Tensor, total_calls: int) -> None:
        """``ValueError`` when this checkpoint is not of a run shaped like ``x`` with ``total_calls`` calls."""
        if tuple(self.x.shape) != tuple(x.shape) or not 0 < self.calls < total_calls:
            raise ValueError(f"a checkpoint after {self.calls} calls of tokens {tuple(self.x.shape)} does not fit this "
                             f"run ({total_calls} calls, tokens {tuple(x.shape)}); resume the request it came from")


def capture(calls: int, x: torch.Tensor, state: SamplerState, noise: Any) -> Checkpoint:
    """A CPU copy of the loop's state (``noise``: the plan's step noise, or None)."""
    history = None if state is None else tuple(t.detach().to("cpu", copy=True) for t in state)
    noise_state = noise.get_state() if noise is not None and hasattr(noise, "get_state") else None
    return Checkpoint(calls, x.detach().to("cpu", copy=True), history, noise_state)


def restore(checkpoint: Checkpoint, device: torch.device, noise: Any) -> tuple[torch.Tensor, SamplerState]:
    """The tokens and sampler history on ``device``; ``noise`` (the plan's step noise) continues its draws."""
    if checkpoint.noise_state is not None and noise is not None:
        noise.set_state(checkpoint.noise_state)
    state = None if checkpoint.sampler_state is None else tuple(t.to(device) for t in checkpoint.sampler_state)
    return checkpoint.x.to(device), state
