"""How big and how costly each adapter block of a spec is, from the spec alone: the family's random state is
built on the meta device (no memory, no file read) and its tensors grouped by the family's block index.

PipeFusion's stages are cut by these costs, not by block count: Flux's double blocks cost about twice its
single blocks, so an even count put 69% of the work on stage 0 of two. Costs are a function of the spec only,
so every rank (and the pool that ships a stage's weights) cuts the same stages before any request is seen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

# Weights applied once per sample to the timestep embedding (adaLN modulation), not to every token: Flux's
# img_mod / txt_mod / modulation, SD3's adaLN_modulation, Qwen-Image's img_mod / txt_mod, HunyuanDiT's
# default_modulation, Wan's modulation, PixArt's scale_shift_table.
PER_SAMPLE_KEY = re.compile(r"(^|[._])(mod|modulation|scale_shift_table)(\.|$)")

# The image tokens a stage split is costed at: a 1024 px Flux/SD3 image (64 x 64 packed tokens). Attention
# is the only part that is not linear in tokens; it is equal in every block of a model, so the split moves
# little with resolution.
REFERENCE_TOKENS = 4096


@dataclass(frozen=True)
class BlockSizes:
    """Parameters of each adapter block, split by what they multiply, and the shared ones."""

    per_token: tuple[int, ...]  # projections and MLPs: every token passes through them
    per_sample: tuple[int, ...]  # modulation: once per sample
    shared: int  # embedders, final layer: outside every block
    hidden: int

    @property
    def total(self) -> tuple[int, ...]:
        return tuple(t + s for t, s in zip(self.per_token, self.per_sample))

    def costs(self, tokens: int = REFERENCE_TOKENS) -> tuple[float, ...]:
        """FLOPs of each block on ``tokens`` tokens: 2 per weight per token, plus QK^T and PV."""
        attention = 4.0 * tokens * tokens * self.hidden
        return tuple(2.0 * weights * tokens + attention for weights in self.per_token)


def block_sizes(spec: Any) -> BlockSizes:
    """The sizes of ``spec``'s blocks (any family's spec)."""
    from .families import family_of

    fam = family_of(spec)
    with torch.device("meta"):
        state = fam.random_state(spec, 0)
    per_token, per_sample, shared = [0] * spec.num_blocks, [0] * spec.num_blocks, 0
    for key, tensor in state.items():
        index = fam.block_index(key, spec)
        if index is None:
            shared += tensor.numel()
        elif PER_SAMPLE_KEY.search(key):
            per_sample[index] += tensor.numel()
        else:
            per_token[index] += tensor.numel()
    return BlockSizes(per_token=tuple(per_token), per_sample=tuple(per_sample), shared=shared,
                      hidden=spec.hidden_size)


def block_costs(spec: Any) -> tuple[float, ...]:
    """Each block's cost at ``REFERENCE_TOKENS``: what PipeFusion balances its stages by."""
    return block_sizes(spec).costs()
