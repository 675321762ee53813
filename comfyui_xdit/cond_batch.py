"""The two CFG branches as one model forward, where ComfyUI's sampler batches them.

ComfyUI v0.3.64 (``calc_cond_batch``) runs the positive and the negative prompt as one forward of batch
2B, the rows ``[uncond; cond]``, when ``can_concat_cond`` allows it (the same latent shape, no ControlNet
or patches that differ, every cond key present in both with concatenable values) and 1.5 times the
model's memory estimate fits in free memory (on the CPU it does). We do not model that estimate: with
``batch_cfg`` we batch whatever concatenates, which differs from ComfyUI's split only by float rounding.
Every family we run (Flux, SD3, PixArt, HunyuanDiT, Qwen-Image, Wan) wraps its text tokens in
``CONDRegular``, which concatenates equal shapes only; ``CONDCrossAttn``'s repeat of a shorter prompt to
a common length (harmless for unmasked cross-attention, but in joint attention the repeated text keys
would weigh more against the image keys) is not used for them, so prompts of different token counts run
as two forwards, as in ComfyUI.

A ``Conditioning`` holds a few per-prompt scalars (Flux's guidance, PixArt's and HunyuanDiT's sizes) that
ComfyUI holds as per-row tensors; where they differ between the branches one ``Conditioning`` cannot
carry both, so we run two forwards, which give ComfyUI's batched numbers to float rounding all the same.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .conditioning import Conditioning

logger = logging.getLogger(__name__)

# tokens (B, N, C), sigma (B,), cond -> the model's output (B, N, C) for those rows
Forward = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


def stack(first: Conditioning, second: Conditioning, batch: int) -> Optional[Conditioning]:
    """One conditioning of batch ``2 * batch``: ``first``'s rows then ``second``'s, each repeated to the latent's
    ``batch`` first (as ComfyUI's ``process_cond``); None where ComfyUI would not concatenate them (a tensor in
    one and not the other, different shapes or devices) or a per-prompt scalar differs."""
    stacked = {}
    for field in dataclasses.fields(Conditioning):
        a, b = getattr(first, field.name), getattr(second, field.name)
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            if a != b:  # a scalar one Conditioning holds for all rows
                return _apart(field.name, f"{a!r} and {b!r}")
            continue
        if a is None or b is None:  # a cond key in one branch only
            return _apart(field.name, "given in one branch only")
        a, b = first.batched(field.name, batch), second.batched(field.name, batch)
        if a.shape != b.shape or a.device != b.device:
            return _apart(field.name, f"{tuple(a.shape)} on {a.device} and {tuple(b.shape)} on {b.device}")
        stacked[field.name] = torch.cat([a, b])  # (B, ...) twice -> (2B, ...)
    return dataclasses.replace(first, **stacked)


def _apart(name: str, why: str) -> None:
    logger.debug("CFG branches run as two forwards: their %s differ (%s)", name, why)
    return None


@dataclass(frozen=True)
class BranchForwards:
    """The model forwards that compute one call's CFG branches: ``conds`` holds either the two branches stacked
    into one conditioning of batch 2B (rows [negative; positive]) or one conditioning per branch."""

    conds: tuple[Conditioning, ...]
    stacked: bool

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """A forward's input from the latent's (B, ...) ``tensor`` (tokens, sigmas): (2B, ...) when stacked."""
        return torch.cat([tensor, tensor]) if self.stacked else tensor  # (B, ...) -> (2B, ...)

    def branches(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The forwards' outputs (one per ``conds``) as one (B, ...) tensor per branch, positive first."""
        if not self.stacked:
            return outputs
        uncond, cond = outputs[0].chunk(2)  # (2B, ...) -> (B, ...) each
        return [cond, uncond]


def branch_forwards(branches: list[Conditioning], batch: int, batched: bool = True) -> BranchForwards:
    """How to run ``branches`` ([positive] or [positive, negative]) for a latent batch of ``batch``: one forward of
    both where ``batched`` and ComfyUI would concatenate them (``stack``), else one forward each."""
    if batched and len(branches) == 2:
        both = stack(branches[1], branches[0], batch)  # negative rows first, as ComfyUI's batch
        if both is not None:
            return BranchForwards((both,), stacked=True)
    return BranchForwards(tuple(branches), stacked=False)


def branch_outputs(forward: Forward, x: torch.Tensor, sigma: torch.Tensor, positive: Conditioning,
                   negative: Optional[Conditioning],
                   batched: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(the positive branch's output, the negative's or None) of ``forward`` on tokens ``x`` (B, N, C) at
    ``sigma`` (B,): with ``batched``, one forward over the rows [negative; positive] (2B, N, C) where ComfyUI
    would concatenate the two conds (``branch_forwards``); else one forward per branch, positive first."""
    plan = branch_forwards([positive] + ([negative] if negative is not None else []), x.shape[0], batched)
    cond, *uncond = plan.branches([forward(plan.rows(x), plan.rows(sigma), c) for c in plan.conds])
    return cond, (uncond[0] if uncond else None)
