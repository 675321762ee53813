"""SD3 / SD3.5 adapter over diffusers' ``SD3Transformer2DModel``: ComfyUI latents and conditioning in,
the model's velocity out, attention through our one seam.

Same piecewise forward as the Flux adapter (``embed`` -> ``run_blocks`` -> ``head``), so every
parallel mode runs it unchanged. Differences that matter for parallelism, all kept inside here:
- positions are a learned table, centre-cropped to the image (``image_ids`` are indices into it), so a
  sequence shard or a PipeFusion patch embeds only its own tokens;
- the patch embedding is a 2x2 convolution, applied as a linear map on our packed tokens;
- the output token is ordered (row, col, channel) in diffusers and is reordered to our channel-major
  packing;
- SD3.5 medium's second, image-only attention (``attn2``) goes through the seam as its own layer with
  no text tokens;
- the last block's text stream is ``context_pre_only``: it feeds attention but is not carried on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import SD3Transformer2DModel

from ..attention import AttentionSeam
from ..conditioning import Conditioning
from ..latent_format import SD3_LATENT_FORMAT, LatentFormat
from ..prediction import FLOW, Prediction
from ..sigmas import DiscreteFlowShift, ModelSampling
from .absent_block import AbsentBlock
from .adapter_base import AdapterBase, build_stage_module, log_loaded, patch_conv_as_linear
from .sd3_checkpoint import PATCH, SD3Spec, block_index, infer_sd3_spec, mmdit_to_diffusers

logger = logging.getLogger(__name__)

TIMESTEP_MULTIPLIER = 1000.0  # ComfyUI's SD3 model sampling: timestep = sigma * 1000


class SeamJointAttnProcessor:
    """diffusers' SD3 joint attention with ``softmax(QK^T)V`` through the seam (text first, as the seam
    wants; attention does not depend on token order, so this equals diffusers' image-first order)."""

    def __init__(self, seam: AttentionSeam, layer: int) -> None:
        self.seam = seam
        self.layer = layer

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, **kwargs: object):
        # (B, N, H*D) -> (B, N, H, D)
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        text_len = 0
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            e_query = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
            e_key = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
            e_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
            if attn.norm_added_q is not None:
                e_query, e_key = attn.norm_added_q(e_query), attn.norm_added_k(e_key)
            # text first: (B, L + N, H, D)
            query = torch.cat([e_query, query], dim=1)
            key = torch.cat([e_key, key], dim=1)
            value = torch.cat([e_value, value], dim=1)
        out = self.seam(query, key, value, text_len=text_len, layer=self.layer)
        out = out.flatten(2, 3).to(query.dtype)  # (B, S, H, D) -> (B, S, H*D)
        image_out = attn.to_out[1](attn.to_out[0](out[:, text_len:].contiguous()))
        if encoder_hidden_states is None:
            return image_out
        text_out = out[:, :text_len]
        if attn.context_pre_only:
            return image_out, None
        return image_out, attn.to_add_out(text_out.contiguous())


@dataclass(frozen=True)
class SD3BlockContext:
    """The per-forward inputs every block takes besides the hidden states."""

    temb: torch.Tensor  # (B, hidden) timestep + pooled embedding

    def state(self, hidden: torch.Tensor, encoder_hidden: torch.Tensor) -> "SD3BlockState":
        return SD3BlockState(hidden=hidden, encoder_hidden=encoder_hidden, temb=self.temb)


@dataclass
class SD3BlockState:
    """What flows between joint blocks for one set of image tokens (all, a shard, or a patch)."""

    hidden: torch.Tensor  # (B, N_local, hidden) image tokens
    encoder_hidden: Optional[torch.Tensor]  # (B, L, hidden) text tokens, whole on every rank; None after the last
    temb: torch.Tensor  # (B, hidden)


class SD3Adapter(AdapterBase):
    """One loaded SD3-family transformer and the ComfyUI conventions around it."""

    family = "sd3"
    latent_format: LatentFormat = SD3_LATENT_FORMAT
    ANCHOR = "pos_embed.proj.weight"
    prediction: Prediction = FLOW

    def __init__(self, transformer: SD3Transformer2DModel, spec: SD3Spec,
                 present: Optional[tuple[int, int]] = None) -> None:
        self.transformer = transformer.eval().requires_grad_(False)
        self.spec = spec
        self.seam = AttentionSeam()
        self.blocks: list[torch.nn.Module] = list(transformer.transformer_blocks)
        self.present = present if present is not None else (0, len(self.blocks))
        for layer, block in enumerate(self.blocks):
            if isinstance(block, AbsentBlock):
                continue
            block.attn.set_processor(SeamJointAttnProcessor(self.seam, layer))
            if block.attn2 is not None:  # image-only second attention: its own K/V layer id
                block.attn2.set_processor(SeamJointAttnProcessor(self.seam, len(self.blocks) + layer))

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", source: str = "checkpoint",
                        blocks: Optional[tuple[int, int]] = None, spec: Optional[SD3Spec] = None) -> "SD3Adapter":
        """Build from MMDiT tensors; with ``blocks`` ([start, stop): one PipeFusion stage) only those blocks
        and the shared tensors are built (``state`` may then hold just those; pass the file's ``spec``)."""
        if spec is None:
            spec = infer_sd3_spec(state, source)
        transformer = build_stage_module(SD3Transformer2DModel, spec.diffusers_config(), state, spec, block_index,
                                         mmdit_to_diffusers, dtype, blocks)
        log_loaded("SD3", source, spec.num_layers, blocks, spec.hidden_size, dtype)
        return cls(transformer.to(device), spec, blocks)

    def default_sampling(self) -> ModelSampling:
        """ComfyUI's SD3 model sampling: discrete flow, shift 3.0, timestep multiplier 1000."""
        return DiscreteFlowShift(shift=3.0, multiplier=TIMESTEP_MULTIPLIER)

    # ---- latent <-> tokens ----------------------------------------------------------------------
    def check_latent(self, latent: torch.Tensor) -> None:
        channels = self.latent_format.channels
        if latent.ndim != 4 or latent.shape[1] != channels:
            raise ValueError(f"SD3 needs a LATENT of shape (batch, {channels}, h, w); got {tuple(latent.shape)}. "
                             f"Use EmptySD3LatentImage (16 channels) for SD3.")
        if latent.shape[2] % PATCH or latent.shape[3] % PATCH:
            raise ValueError(f"SD3 needs image height and width divisible by 16; got latent "
                             f"{latent.shape[2]}x{latent.shape[3]} (image {latent.shape[2] * 8}x{latent.shape[3] * 8})")
        side = self.spec.pos_embed_max_size * PATCH
        if latent.shape[2] > side or latent.shape[3] > side:
            raise ValueError(f"this SD3 model's position table covers images up to {side * 8}x{side * 8} px; got "
                             f"{latent.shape[3] * 8}x{latent.shape[2] * 8}: use a smaller width and height")

    def image_ids(self, height: int, width: int) -> torch.Tensor:
        """(H/2 * W/2,) the index of each token's entry in the learned position table, centre-cropped to
        the image as ComfyUI and diffusers crop it; row-major like the packing."""
        rows, cols, side = height // PATCH, width // PATCH, self.spec.pos_embed_max_size
        top, left = (side - rows) // 2, (side - cols) // 2
        grid = (torch.arange(rows)[:, None] + top) * side + (torch.arange(cols)[None, :] + left)
        return grid.reshape(rows * cols)

    # ---- forward in pieces ----------------------------------------------------------------------
    def embed_context(self, image_ids: torch.Tensor, cond: Conditioning, sigma: torch.Tensor) -> SD3BlockContext:
        """temb (B, hidden) for ``sigma`` (B,) and the pooled vector; timesteps in float32 as ComfyUI."""
        t = self.transformer
        _, pooled = cond.for_batch(sigma.shape[0])
        timestep = sigma.to(device=self.device, dtype=torch.float32) * TIMESTEP_MULTIPLIER
        return SD3BlockContext(temb=t.time_text_embed(timestep, pooled.to(device=self.device, dtype=self.dtype)))

    def embed(self, tokens: torch.Tensor, image_ids: torch.Tensor, cond: Conditioning,
              sigma: torch.Tensor) -> SD3BlockState:
        """Embeddings for ``tokens`` (B, N_local, C*2*2) at table positions ``image_ids`` (N_local,)."""
        t = self.transformer
        dtype, device = self.dtype, self.device
        context, _ = cond.for_batch(tokens.shape[0])
        hidden = patch_conv_as_linear(t.pos_embed.proj, tokens)  # (B, N_local, hidden)
        positions = t.pos_embed.pos_embed[0, image_ids.to(device)]  # (N_local, hidden)
        hidden = hidden + positions.to(dtype)
        ctx = self.embed_context(image_ids, cond, sigma)
        return SD3BlockState(hidden=hidden, encoder_hidden=t.context_embedder(context.to(device=device, dtype=dtype)),
                             temb=ctx.temb)

    def text_len(self, cond: Conditioning) -> int:
        return cond.context.shape[1]

    def run_blocks(self, state: SD3BlockState, start: int, stop: int) -> SD3BlockState:
        enc, hidden = state.encoder_hidden, state.hidden
        for block in self.blocks[start:stop]:
            enc, hidden = block(hidden_states=hidden, encoder_hidden_states=enc, temb=state.temb)
        return SD3BlockState(hidden=hidden, encoder_hidden=enc, temb=state.temb)

    def head(self, state: SD3BlockState) -> torch.Tensor:
        """Final norm + projection: (B, N_local, hidden) -> (B, N_local, C*2*2) velocity in our packing, float32."""
        t = self.transformer
        out = t.proj_out(t.norm_out(state.hidden, state.temb)).float()
        b, n, _ = out.shape
        # diffusers orders a token (p, q, c); ours is (c, p, q): (B, N, 2, 2, C) -> (B, N, C, 2, 2)
        return out.view(b, n, PATCH, PATCH, -1).permute(0, 1, 4, 2, 3).reshape(b, n, -1)
