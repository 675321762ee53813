"""What every family's adapter shares: where its weights live, its sizes, the shared token packing and
the whole forward as ``embed -> run_blocks -> head`` (each family writes only those three pieces)."""

from __future__ import annotations

import logging
from typing import Any, Callable, ClassVar, Optional

import torch

from . import fp8_weights, packing
from .absent_block import AbsentBlock
from ..conditioning import Conditioning

logger = logging.getLogger(__name__)


class AdapterBase:
    """Mixed into each adapter; the adapter sets ``transformer``, ``spec`` and ``blocks`` and names in
    ``ANCHOR`` one weight that every stage builds (its dtype and device are the adapter's)."""

    ANCHOR: ClassVar[str]
    transformer: torch.nn.Module
    spec: Any
    blocks: list[torch.nn.Module]

    pack = staticmethod(packing.pack)
    unpack = staticmethod(packing.unpack)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (an fp8 anchor weight computes in its ``UpcastLinear``'s)."""
        return fp8_weights.compute_dtype_of(self.transformer, self.ANCHOR)

    @property
    def device(self) -> torch.device:
        return self.transformer.get_parameter(self.ANCHOR).device

    @property
    def num_heads(self) -> int:
        return self.spec.num_attention_heads

    @property
    def hidden_size(self) -> int:
        """Width of the hidden states that flow between blocks."""
        return self.spec.hidden_size

    def parameter_bytes(self) -> int:
        """Bytes of this adapter's weights (what a rank holds on its device)."""
        return sum(t.numel() * t.element_size() for t in self.transformer.state_dict().values())

    # ---- what crosses a PipeFusion stage boundary ------------------------------------------------------
    def carried(self, state: Any) -> list[torch.Tensor]:
        """The tensors of a block state that the next pipeline stage needs: image and text hidden states
        (a family with more, e.g. HunyuanDiT's pending long skips, adds them)."""
        return [state.hidden, state.encoder_hidden]

    def carried_like(self, block: int, batch: int, tokens: int, cond: Conditioning) -> list[torch.Tensor]:
        """Empty tensors shaped as ``carried`` of the state that enters ``block`` for ``tokens`` image tokens:
        (B, n, width) image and (B, L, width) text, what a later stage receives into."""
        width, dtype, device = self.hidden_size, self.dtype, self.device
        return [torch.empty(batch, tokens, width, dtype=dtype, device=device),
                torch.empty(batch, self.text_len(cond), width, dtype=dtype, device=device)]  # type: ignore[attr-defined]

    def resume(self, context: Any, carried: list[torch.Tensor]) -> Any:
        """The block state a later stage continues from: ``embed_context``'s result and received ``carried``."""
        hidden, text = carried
        return context.state(hidden, text)

    @torch.no_grad()
    def velocity(self, tokens: torch.Tensor, image_ids: torch.Tensor, cond: Conditioning,
                 sigma: torch.Tensor) -> torch.Tensor:
        """The whole forward on whatever tokens this process holds: the model's raw output (velocity for
        flow models, the noise for EPS ones), float32, in the shared packing."""
        state = self.embed(tokens, image_ids, cond, sigma)  # type: ignore[attr-defined]
        return self.head(self.run_blocks(state, 0, len(self.blocks)))  # type: ignore[attr-defined]


def log_loaded(title: str, source: str, blocks_total: int, blocks: Optional[tuple[int, int]], width: int,
               dtype: torch.dtype) -> None:
    logger.info("loaded %s from %s: %d blocks%s, width %d, dtype %s", title, source, blocks_total,
                f" (blocks {blocks[0]}..{blocks[1] - 1} on this rank)" if blocks is not None else "", width, dtype)


def build_stage_module(module_class: type, config: dict, state: dict[str, torch.Tensor], spec: Any,
                       block_index: Callable[[str, Any], Optional[int]],
                       to_diffusers: Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]],
                       dtype: torch.dtype, blocks: Optional[tuple[int, int]],
                       blocks_attr: str = "transformer_blocks") -> torch.nn.Module:
    """The diffusers module of a family whose blocks are the module list ``blocks_attr`` (``transformer_blocks``;
    Wan: ``blocks``), built on meta and loaded with the file-layout ``state`` renamed by ``to_diffusers``; with
    ``blocks`` (one PipeFusion stage) only those blocks and the shared tensors, every other block an
    ``AbsentBlock`` without weights."""
    if blocks is not None:
        state = {k: v for k, v in state.items() if (i := block_index(k, spec)) is None or blocks[0] <= i < blocks[1]}
    with torch.device("meta"):
        module = module_class(**config)
    if blocks is not None:
        module_list = getattr(module, blocks_attr)
        for layer in range(len(module_list)):
            if not blocks[0] <= layer < blocks[1]:
                module_list[layer] = AbsentBlock(layer, blocks)
    converted = fp8_weights.cast_state(to_diffusers(state, spec), module, dtype)  # fp8 Linear weights stay fp8
    result = module.load_state_dict(converted, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    return fp8_weights.finish(module, dtype, module_class.__name__)


def patch_conv_as_linear(proj: torch.nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """A 2x2 stride-2 patch convolution applied to tokens already in the shared packing, as a linear map:
    weight (hidden, C, 2, 2) -> (hidden, C*2*2), channel-major like a token; (B, N, C*2*2) -> (B, N, hidden)."""
    return torch.nn.functional.linear(tokens.to(device=proj.weight.device, dtype=proj.weight.dtype),
                                      proj.weight.flatten(1), proj.bias)
