"""What the speed model needs of a model, from its spec alone (no weights are read or made): parameters
per block and shared, widths, heads, and whether the text attends jointly with the image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..models.block_sizes import block_sizes
from ..models.families import family_of
from ..parallel.pipefusion_schedule import split_stages


@dataclass(frozen=True)
class ModelShape:
    """One model's sizes, as the latency model uses them (batch 1, one CFG branch per forward)."""

    name: str
    family: str
    heads: int
    hidden: int
    block_parameters: tuple[int, ...]  # weights of each adapter block, in order
    block_token_parameters: tuple[int, ...]  # of those, the ones every image (and joint text) token passes through
    block_text_parameters: tuple[int, ...]  # the ones only the prompt's tokens pass through (text stream, K/V)
    shared_parameters: int  # embedders, final layer: every stage holds them
    text_tokens: int  # prompt tokens carried with the image stream
    joint_text: bool  # prompt tokens attend with the image tokens (Flux, SD3, Qwen-Image)
    token_channels: int  # latent channels of one packed token (C * 2 * 2)
    stage_costs: tuple[float, ...]  # what PipeFusion balances its stages by (``models.block_sizes``)
    text_once: bool = False  # PipeFusion carries the prompt with a step's first patch only (``Family.text_once``)

    @property
    def blocks(self) -> int:
        return len(self.block_parameters)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def parameters(self) -> int:
        return sum(self.block_parameters) + self.shared_parameters

    def attended_tokens(self, image_tokens: int) -> int:
        """Tokens in one self-attention: image tokens, plus the prompt's where it attends jointly."""
        return image_tokens + (self.text_tokens if self.joint_text else 0)

    def block_flops(self, image_tokens: int, block: int) -> float:
        """Multiply-add FLOPs (x2) of one block on the whole latent: every weight touches every token it
        sees (image and joint text tokens; a text stream's weights and cross-attention's K/V only the
        prompt's; modulation the sample once, so it is left out), plus QK^T and PV."""
        tokens = self.attended_tokens(image_tokens)
        attention = 4.0 * tokens * tokens * self.hidden
        if not self.joint_text:
            attention += 4.0 * image_tokens * self.text_tokens * self.hidden  # cross-attention
        return 2.0 * (self.block_token_parameters[block] * tokens
                      + self.block_text_parameters[block] * self.text_tokens) + attention

    def stages(self, degree: int) -> tuple[tuple[int, int], ...]:
        """PipeFusion's stages over ``degree`` ranks: the blocks ``[start, stop)`` each runs, as the ranks cut them."""
        return split_stages(self.blocks, degree, self.stage_costs)

    def attention_flops(self, image_tokens: int) -> float:
        """The QK^T and PV FLOPs of one whole forward (the part Ring attention overlaps with its sends)."""
        tokens = self.attended_tokens(image_tokens)
        return 4.0 * tokens * tokens * self.hidden * self.blocks

    def forward_flops(self, image_tokens: int) -> float:
        """FLOPs of one forward of one CFG branch on ``image_tokens`` packed tokens."""
        return sum(self.block_flops(image_tokens, b) for b in range(self.blocks))


def shape_of(spec: Any, name: str = "", text_tokens: int = 256) -> ModelShape:
    """A spec's shape, from its blocks' sizes (``models.block_sizes``: no memory, no file read)."""
    fam = family_of(spec)
    sizes = block_sizes(spec)
    return ModelShape(name=name or fam.id, family=fam.id, heads=spec.num_attention_heads, hidden=spec.hidden_size,
                      block_parameters=sizes.total, block_token_parameters=sizes.per_token,
                      block_text_parameters=sizes.per_text_token,
                      shared_parameters=sizes.shared, stage_costs=sizes.costs(), text_tokens=text_tokens,
                      joint_text=fam.joint_text, token_channels=spec.latent_channels * 4, text_once=fam.text_once)
