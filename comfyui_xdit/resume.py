"""Where a run stands after some model calls, so a rebuilt world can continue it exactly (issue 14.1).

A ``Checkpoint`` holds the sampler's tokens and history after ``calls`` model calls and the state of the
noise generator that ancestral samplers draw from in order (Brownian-tree noise is a function of the
interval, so it needs none). The loop that honours ``checkpoints`` emits one with every step event; a
request that carries ``resume`` starts from it and gives the latent of the uninterrupted run. A few MB:
the tokens and at most a few tensors like them, on the CPU.

PipeFusion's state is spread over its ranks: the last stage holds the tokens, the sampler's history and
the noise, and every rank holds the stale K/V of its layers, which the next patch steps read. Each rank
hands its ``CheckpointPart`` to the driver after each step, and ``CheckpointParts`` puts a step's parts
together. With every rank's K/V in it, a resumed run equals the uninterrupted one exactly; without
(``kv=False``: the K/V of a big model would not fit the driver), the resumed run re-warms: its first step
runs over the whole latent, which refills every buffer (exact when the cut falls in warm-up, else within
PipeFusion's usual stale-K/V bound).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from .sampler_types import SamplerState


@dataclass(frozen=True)
class Checkpoint:
    """The loop's state after ``calls`` model calls."""

    calls: int
    x: torch.Tensor  # (B, N, C) tokens after those calls, float32 on the CPU
    sampler_state: SamplerState  # the sampler's history (each like x), on the CPU
    noise_state: Optional[torch.Tensor] = None  # the ancestral noise generator's state (a uint8 tensor)
    # PipeFusion: rank -> its K/V buffers after those calls (``KVState``); None: re-warm the buffers
    kv: Optional[Mapping[int, "KVState"]] = None

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


# one PipeFusion rank's stale K/V, per forward (a CFG branch, or both stacked), per layer: (layer, key, value)
KVState = tuple[tuple[tuple[int, torch.Tensor, torch.Tensor], ...], ...]


@dataclass(frozen=True)
class CheckpointPart:
    """What one PipeFusion rank holds of the state after ``calls`` model calls: its K/V (when asked for) and,
    from the one rank that reports it, the tokens / history / noise (``core``). ``needed``: how many parts
    make the step's checkpoint (the world size with K/V, else 1: the core alone)."""

    calls: int
    rank: int
    needed: int
    kv: Optional[KVState] = None
    core: Optional[Checkpoint] = None


class CheckpointParts:
    """The driver's side: parts in, the newest whole ``Checkpoint`` out (older incomplete steps dropped)."""

    def __init__(self) -> None:
        self._parts: dict[int, dict[int, CheckpointPart]] = {}

    def add(self, part: CheckpointPart) -> Optional[Checkpoint]:
        """The step's checkpoint once its last part arrived, else None."""
        parts = self._parts.setdefault(part.calls, {})
        parts[part.rank] = part
        if len(parts) < part.needed:
            return None
        core = next((p.core for p in parts.values() if p.core is not None), None)
        if core is None:
            return None
        kv = {rank: p.kv for rank, p in parts.items() if p.kv is not None} if part.needed > 1 else None
        for calls in [c for c in self._parts if c <= part.calls]:
            del self._parts[calls]
        return dataclasses.replace(core, kv=kv)


def pipefusion_kv_bytes(spec: Any, latent_shape: tuple[int, ...], cfg_forwards: int, element_size: int) -> int:
    """Bytes of stale K/V a PipeFusion checkpoint carries over all its ranks: K and V of every image token
    (a 2x2-patch token per 2x2 latent pixels, per frame of a video) for every block, per CFG forward."""
    batch, frames = latent_shape[0], (latent_shape[2] if len(latent_shape) == 5 else 1)
    tokens = frames * (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
    width = spec.hidden_size  # heads x head width: K and V are as wide as the hidden state in every family
    return 2 * spec.num_blocks * batch * tokens * width * element_size * cfg_forwards
