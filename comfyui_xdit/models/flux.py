"""Flux adapter over diffusers' ``FluxTransformer2DModel``: ComfyUI latents and conditioning in,
the model's velocity out, with attention routed through our one seam.

The forward is split into ``embed`` -> ``blocks`` -> ``head`` so that the parallel engine can run a
subset of blocks (a PipeFusion stage) on a subset of image tokens (a sequence shard or a patch).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb

from ..attention import AttentionSeam
from ..conditioning import Conditioning
from ..latent_format import FLUX_LATENT_FORMAT, LatentFormat
from . import fp8_weights, packing
from .absent_block import AbsentBlock
from .adapter_base import AdapterBase
from ..prediction import FLOW, Prediction
from ..sigmas import DiscreteFlowShift, FluxShift, ModelSampling
from .flux_checkpoint import (FluxSpec, bfl_to_diffusers, in_blocks, infer_flux_spec, read_checkpoint, read_flux_spec,
                              stage_state, with_placeholders)

logger = logging.getLogger(__name__)

PATCH = packing.PATCH  # Flux packs 2x2 latent pixels into one token
_DIFFUSERS_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.")


def _diffusers_block(key: str, num_double: int) -> Optional[int]:
    match = _DIFFUSERS_BLOCK.match(key)
    if match is None:
        return None
    index = int(match.group(2))
    return index if match.group(1) == "transformer_blocks" else num_double + index


class SeamFluxAttnProcessor:
    """diffusers' Flux attention with the core ``softmax(QK^T)V`` replaced by a call to the seam."""

    def __init__(self, seam: AttentionSeam, layer: int) -> None:
        self.seam = seam
        self.layer = layer

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                 text_len: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # (B, S, H*D) -> (B, S, H, D)
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim)))
        value = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
        if encoder_hidden_states is not None:  # double block: text stream has its own projections
            text_len = encoder_hidden_states.shape[1]
            e_query = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            e_key = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            e_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            # text first: (B, L + N, H, D)
            query = torch.cat([e_query, query], dim=1)
            key = torch.cat([e_key, key], dim=1)
            value = torch.cat([e_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = self.seam(query, key, value, text_len=text_len, layer=self.layer)
        out = out.flatten(2, 3).to(query.dtype)  # (B, S, H, D) -> (B, S, H*D)
        if encoder_hidden_states is None:
            return out
        text_out, image_out = out[:, :text_len], out[:, text_len:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


@dataclass(frozen=True)
class BlockContext:
    """The per-forward inputs every block takes besides the hidden states."""

    temb: torch.Tensor  # (B, hidden) timestep + pooled (+ guidance) embedding
    rotary: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (L + N_local, head_dim)

    def state(self, hidden: torch.Tensor, encoder_hidden: torch.Tensor) -> "BlockState":
        return BlockState(hidden=hidden, encoder_hidden=encoder_hidden, temb=self.temb, rotary=self.rotary)


@dataclass
class BlockState:
    """What flows between transformer blocks for one set of image tokens (all, a shard, or a patch)."""

    hidden: torch.Tensor  # (B, N_local, hidden) image tokens
    encoder_hidden: torch.Tensor  # (B, L, hidden) text tokens, whole on every rank
    temb: torch.Tensor  # (B, hidden) timestep + pooled (+ guidance) embedding
    rotary: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (L + N_local, head_dim)


class FluxAdapter(AdapterBase):
    """One loaded Flux transformer and the ComfyUI conventions around it."""

    family = "flux"
    latent_format: LatentFormat = FLUX_LATENT_FORMAT
    ANCHOR = "x_embedder.weight"
    prediction: Prediction = FLOW

    def __init__(self, transformer: FluxTransformer2DModel, spec: FluxSpec,
                 present: Optional[tuple[int, int]] = None) -> None:
        self.transformer = transformer.eval().requires_grad_(False)
        self.spec = spec
        self.seam = AttentionSeam()
        self.blocks: list[torch.nn.Module] = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        self.present = present if present is not None else (0, len(self.blocks))  # blocks with weights here
        for layer, block in enumerate(self.blocks):
            if not isinstance(block, AbsentBlock):
                block.attn.set_processor(SeamFluxAttnProcessor(self.seam, layer))

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", source: str = "checkpoint",
                        blocks: Optional[tuple[int, int]] = None, spec: Optional[FluxSpec] = None) -> "FluxAdapter":
        """Build from BFL tensors. With ``blocks`` ([start, stop) of the adapter's block list: one PipeFusion
        stage) only those blocks and the shared tensors are built; ``state`` may then hold just those
        (pass the file's ``spec``), and every other block is an ``AbsentBlock`` without weights."""
        if blocks is not None:
            if spec is None:
                spec = infer_flux_spec(state, source)
            state = with_placeholders(stage_state(state, spec.num_layers, blocks), spec)
        spec = infer_flux_spec(state, source)
        with torch.device("meta"):
            transformer = FluxTransformer2DModel(**spec.diffusers_config())
        converted = bfl_to_diffusers(state, spec)
        if blocks is not None:
            for layer in range(spec.num_layers + spec.num_single_layers):
                if not blocks[0] <= layer < blocks[1]:
                    double = layer < spec.num_layers
                    container = transformer.transformer_blocks if double else transformer.single_transformer_blocks
                    container[layer if double else layer - spec.num_layers] = AbsentBlock(layer, blocks)
            converted = {k: v for k, v in converted.items()
                         if (i := _diffusers_block(k, spec.num_layers)) is None or blocks[0] <= i < blocks[1]}
        converted = fp8_weights.cast_state(converted, transformer, dtype)  # fp8 Linear weights stay fp8
        result = transformer.load_state_dict(converted, strict=True, assign=True)
        assert not result.missing_keys and not result.unexpected_keys, result
        fp8_weights.finish(transformer, dtype, f"Flux from {source}")
        # Buffers that are not in the file (none today) would still be on meta; fail loudly if so.
        on_meta = any(t.is_meta for t in converted.values())
        assert on_meta or not any(t.is_meta for t in transformer.state_dict().values()), "unloaded tensors on meta"
        logger.info("loaded Flux from %s: %d double + %d single blocks%s, width %d, dtype %s", source,
                    spec.num_layers, spec.num_single_layers,
                    f" (blocks {blocks[0]}..{blocks[1] - 1} on this rank)" if blocks is not None else "",
                    spec.hidden_size, dtype)
        return cls(transformer.to(device), spec, blocks)

    @classmethod
    def from_file(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu", blocks: Optional[tuple[int, int]] = None) -> "FluxAdapter":
        """Load a file; with ``blocks`` only the shared tensors and those blocks are read from disk."""
        if blocks is None:
            return cls.from_state_dict(read_checkpoint(path), dtype, device, source=repr(os.fspath(path)))
        spec = read_flux_spec(path)
        state = read_checkpoint(path, keep=lambda key: in_blocks(key, spec.num_layers, blocks))
        return cls.from_state_dict(state, dtype, device, source=repr(os.fspath(path)), blocks=blocks, spec=spec)

    # ---- properties -----------------------------------------------------------------------------
    def default_sampling(self) -> ModelSampling:
        """ComfyUI's choice for a file loaded by UNETLoader: dev -> shift 1.15, schnell -> discrete flow 1.0."""
        if self.spec.guidance_embeds:
            return FluxShift(shift=1.15)
        return DiscreteFlowShift(shift=1.0, multiplier=1.0)

    # ---- latent <-> tokens ----------------------------------------------------------------------
    def check_latent(self, latent: torch.Tensor) -> None:
        if latent.ndim != 4 or latent.shape[1] != self.latent_format.channels:
            raise ValueError(f"Flux needs a LATENT of shape (batch, {self.latent_format.channels}, h, w); got "
                             f"{tuple(latent.shape)}. Use EmptySD3LatentImage (16 channels) for Flux.")
        if latent.shape[2] % PATCH or latent.shape[3] % PATCH:
            raise ValueError(f"Flux needs image height and width divisible by 16; got latent "
                             f"{latent.shape[2]}x{latent.shape[3]} (image {latent.shape[2] * 8}x{latent.shape[3] * 8})")

    @staticmethod
    def image_ids(height: int, width: int) -> torch.Tensor:
        """(H/2 * W/2, 3) position ids: (0, row, col) per token, row-major like the packing."""
        rows, cols = height // PATCH, width // PATCH
        ids = torch.zeros(rows, cols, 3)
        ids[..., 1] = torch.arange(rows)[:, None]
        ids[..., 2] = torch.arange(cols)[None, :]
        return ids.reshape(rows * cols, 3)

    # ---- forward in pieces ----------------------------------------------------------------------
    def embed_context(self, image_ids: torch.Tensor, cond: Conditioning, sigma: torch.Tensor) -> BlockContext:
        """What every block needs besides the hidden states: temb (B, hidden) for ``sigma`` (B,) and the
        rotary cos/sin of the text positions followed by ``image_ids`` (N_local, 3).

        A PipeFusion stage after the first gets its hidden states from upstream and calls only this.
        """
        t = self.transformer
        dtype, device = self.dtype, self.device
        _, pooled = cond.for_batch(sigma.shape[0])
        # Timesteps stay float32 (x1000 included) up to the sinusoidal embedding, which is cast to the model
        # dtype only afterwards, as ComfyUI does; scaling a bf16 sigma would round the timestep itself.
        timestep = sigma.to(device=device, dtype=torch.float32) * 1000
        if self.spec.guidance_embeds:
            g = torch.full_like(timestep, cond.guidance if cond.guidance is not None else 0.0) * 1000
            temb = t.time_text_embed(timestep, g, pooled.to(device=device, dtype=dtype))
        else:
            temb = t.time_text_embed(timestep, pooled.to(device=device, dtype=dtype))
        text_ids = torch.zeros(cond.context.shape[1], 3)
        # (L, 3) ++ (N_local, 3) -> (L + N_local, 3) positions -> cos, sin (L + N_local, head_dim)
        rotary = t.pos_embed(torch.cat([text_ids, image_ids], dim=0).to(device))
        return BlockContext(temb=temb, rotary=rotary)

    def embed(self, tokens: torch.Tensor, image_ids: torch.Tensor, cond: Conditioning,
              sigma: torch.Tensor) -> BlockState:
        """Embeddings for ``tokens`` (B, N_local, 64) at positions ``image_ids`` (N_local, 3); sigma (B,)."""
        t = self.transformer
        dtype, device = self.dtype, self.device
        context, _ = cond.for_batch(tokens.shape[0])
        ctx = self.embed_context(image_ids, cond, sigma)
        return BlockState(hidden=t.x_embedder(tokens.to(device=device, dtype=dtype)),
                          encoder_hidden=t.context_embedder(context.to(device=device, dtype=dtype)),
                          temb=ctx.temb, rotary=ctx.rotary)

    def text_len(self, cond: Conditioning) -> int:
        """Text tokens the model sees for ``cond`` (the length of its encoder hidden states)."""
        return cond.context.shape[1]

    def run_blocks(self, state: BlockState, start: int, stop: int) -> BlockState:
        text_len = state.encoder_hidden.shape[1]
        enc, hidden = state.encoder_hidden, state.hidden
        for block in self.blocks[start:stop]:
            enc, hidden = block(hidden_states=hidden, encoder_hidden_states=enc, temb=state.temb,
                                image_rotary_emb=state.rotary, joint_attention_kwargs={"text_len": text_len})
        return BlockState(hidden=hidden, encoder_hidden=enc, temb=state.temb, rotary=state.rotary)

    def head(self, state: BlockState) -> torch.Tensor:
        """Final norm + projection: (B, N_local, hidden) -> (B, N_local, 64) velocity, float32."""
        t = self.transformer
        return t.proj_out(t.norm_out(state.hidden, state.temb)).float()
