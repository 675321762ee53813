"""How big and how costly each adapter block of a spec is, from the spec alone: the family's random state is
built on the meta device (no memory, no file read) and its tensors grouped by the family's block index.

PipeFusion's stages are cut by these costs, not by block count, where blocks differ (SD3's last block has a
pre-only text stream, HunyuanDiT's second half carries the long-skip projections). A weight costs what
passes through it: image (and joint text) tokens, text tokens only (a text stream's projections and MLP,
cross-attention's K/V from the prompt), or the sample once (modulation). Flux's double and single blocks
cost about the same by this count (each 12 x width^2 per token: the double block's text weights see only
the prompt). Costs are a function of the spec only, so every rank (and the pool that ships a stage's
weights) cuts the same stages before any request is seen.
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
# Weights only the prompt's tokens pass through: Flux's txt_attn / txt_mlp, SD3's context_block, Qwen-Image's
# txt_mlp and add_*_proj / to_add_out / norm_added_*, cross-attention K/V (PixArt's kv_linear, HunyuanDiT's
# kv_proj, Wan's cross_attn.k / .v and their norm).
TEXT_KEY = re.compile(r"(^|[._])(txt_attn|txt_mlp|context_block|add_[qkv]_proj|to_add_out|norm_added_[qk]|kv_linear"
                      r"|kv_proj)(\.|$)|cross_attn\.(k|v|norm_k)\.")

# The tokens a stage split is costed at: a 1024 px Flux/SD3 image (64 x 64 packed tokens) and a 256-token
# prompt. Attention is the only part that is not linear in tokens; it is equal in every block of a model,
# so the split moves little with resolution.
REFERENCE_TOKENS = 4096
REFERENCE_TEXT_TOKENS = 256


@dataclass(frozen=True)
class BlockSizes:
    """Parameters of each adapter block, split by what they multiply, and the shared ones."""

    per_token: tuple[int, ...]  # projections and MLPs every image token (and a joint prompt's) passes through
    per_text_token: tuple[int, ...]  # a text stream's weights, cross-attention's K/V: the prompt's tokens only
    per_sample: tuple[int, ...]  # modulation: once per sample
    shared: int  # embedders, final layer: outside every block
    hidden: int
    joint_text: bool  # the prompt attends with the image (Flux, SD3, Qwen-Image), else by cross-attention

    @property
    def total(self) -> tuple[int, ...]:
        return tuple(t + x + s for t, x, s in zip(self.per_token, self.per_text_token, self.per_sample))

    def costs(self, tokens: int = REFERENCE_TOKENS, text_tokens: int = REFERENCE_TEXT_TOKENS) -> tuple[float, ...]:
        """FLOPs of each block on ``tokens`` image tokens and a ``text_tokens`` prompt: 2 per weight per
        token through it, plus QK^T and PV (joint, or self-attention and cross-attention)."""
        attended = tokens + (text_tokens if self.joint_text else 0)
        attention = 4.0 * attended * attended * self.hidden
        if not self.joint_text:
            attention += 4.0 * tokens * text_tokens * self.hidden
        return tuple(2.0 * (weights * attended + text * text_tokens) + attention
                     for weights, text in zip(self.per_token, self.per_text_token))


def block_sizes(spec: Any) -> BlockSizes:
    """The sizes of ``spec``'s blocks (any family's spec)."""
    from .families import family_of

    fam = family_of(spec)
    with torch.device("meta"):
        state = fam.random_state(spec, 0)
    per_token, per_text, per_sample, shared = [0] * spec.num_blocks, [0] * spec.num_blocks, [0] * spec.num_blocks, 0
    for key, tensor in state.items():
        index = fam.block_index(key, spec)
        if index is None:
            shared += tensor.numel()
        elif PER_SAMPLE_KEY.search(key):
            per_sample[index] += tensor.numel()
        elif TEXT_KEY.search(key):
            per_text[index] += tensor.numel()
        else:
            per_token[index] += tensor.numel()
    return BlockSizes(per_token=tuple(per_token), per_text_token=tuple(per_text), per_sample=tuple(per_sample),
                      shared=shared, hidden=spec.hidden_size, joint_text=fam.joint_text)


def block_costs(spec: Any) -> tuple[float, ...]:
    """Each block's cost at ``REFERENCE_TOKENS`` and ``REFERENCE_TEXT_TOKENS``: what PipeFusion balances its
    stages by."""
    return block_sizes(spec).costs()
