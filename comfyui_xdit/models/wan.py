"""Wan 2.1 text-to-video adapter over diffusers' ``WanTransformer3DModel``: ComfyUI video latents
(B, 16, T, H, W) and umT5 tokens in, the model's velocity out, video self-attention through our one seam.

Same piecewise forward as the other adapters (``embed`` -> ``run_blocks`` -> ``head``), so every
parallel mode runs it unchanged. What is Wan's, all kept inside here:
- a video latent: tokens are 1x2x2 patches, frame-major then row-major (``packing.pack`` of a 5-D
  latent), so sequence shards and PipeFusion patches cut the flattened T x H/2 x W/2 token sequence;
- 3-D rotary positions (frame, row, column from 0, as ComfyUI's ``rope_encode``) computed per token from
  ``image_ids``, so a shard or a patch embeds only its own tokens; axes (44, 42, 42) of a 128 head;
- the text enters by cross-attention: only the video self-attention goes through the seam (no text
  tokens in it), the cross-attention runs locally on this rank's tokens against the whole text;
- flow prediction with ComfyUI's ModelSamplingDiscreteFlow, shift 8 (WAN21_T2V), timestep = sigma * 1000,
  and ComfyUI's sinusoidal timestep embedding (cos first), in float32 until the model's dtype;
- the output projection orders a token (row, column, channel); reordered here into our channel-major packing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from ..attention import AttentionSeam, sdpa
from ..conditioning import Conditioning
from ..latent_format import WAN21_LATENT_FORMAT, PerChannelLatentFormat
from ..sigmas import DiscreteFlowShift, ModelSampling
from .absent_block import AbsentBlock
from .adapter_base import AdapterBase, build_stage_module, log_loaded
from .packing import PATCH
from .qwen_image_rope import apply_rotary, rotary
from .wan_checkpoint import FREQ_DIM, HEAD_DIM, WanSpec, block_index, infer_wan_spec, wan_to_diffusers

logger = logging.getLogger(__name__)

DEFAULT_SHIFT = 8.0  # ComfyUI's WAN21_T2V sampling settings
TIMESTEP_MULTIPLIER = 1000.0  # ModelSamplingDiscreteFlow's default multiplier


def timestep_embedding(timestep: torch.Tensor, dim: int = FREQ_DIM) -> torch.Tensor:
    """ComfyUI's Wan ``sinusoidal_embedding_1d``: (B,) float32 timesteps -> (B, dim), cos half first."""
    half = dim // 2
    position = timestep.to(torch.float32)
    frequencies = torch.pow(10000, -torch.arange(half).to(position).div(half))  # (dim / 2,)
    angles = torch.outer(position, frequencies)  # (B, dim / 2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def video_positions(frames: int, rows: int, cols: int) -> torch.Tensor:
    """(frames * rows * cols, 3) float32 (frame, row, column) per token, frame-major then row-major like the
    packing, each axis counted from 0 as ComfyUI's ``rope_encode``."""
    grid = torch.stack(torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij"),
                       dim=-1)  # (T, rows, cols, 3)
    return grid.reshape(frames * rows * cols, 3).float()


class SeamSelfAttnProcessor:
    """diffusers' Wan self-attention (``attn1``): q/k RMS-normed across heads, rotated by the tokens' 3-D
    positions (in float32, as ComfyUI's ``apply_rope1``), ``softmax(QK^T)V`` through the seam, no text tokens."""

    def __init__(self, seam: AttentionSeam, layer: int) -> None:
        self.seam = seam
        self.layer = layer

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None, **kwargs: object) -> torch.Tensor:
        if rotary_emb is None:
            raise ValueError("Wan's self-attention needs the rotary positions; run it through WanAdapter.run_blocks")
        cos, sin = rotary_emb  # (N_local, head_dim / 2) each
        # (B, N, H*D) -> (B, N, H, D)
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(-1, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        query = apply_rotary(query.float(), cos, sin).type_as(value)
        key = apply_rotary(key.float(), cos, sin).type_as(value)
        out = self.seam(query, key, value, text_len=0, layer=self.layer)
        out = out.flatten(2, 3).to(value.dtype)  # (B, N, H, D) -> (B, N, H*D)
        return attn.to_out[1](attn.to_out[0](out))


class LocalCrossAttnProcessor:
    """diffusers' Wan text cross-attention (``attn2``): this rank's video tokens against the whole text, locally."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None, **kwargs: object) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("Wan's cross-attention needs the text tokens")
        # (B, N, H*D) -> (B, N, H, D); (B, L, H*D) -> (B, L, H, D)
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(-1, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
        out = sdpa(query, key, value).flatten(2, 3).to(value.dtype)  # (B, N, H, D) -> (B, N, H*D)
        return attn.to_out[1](attn.to_out[0](out))


@dataclass(frozen=True)
class WanBlockContext:
    """The per-forward inputs every block takes besides the hidden states."""

    temb: torch.Tensor  # (B, hidden) timestep embedding, for the head
    timestep_proj: torch.Tensor  # (B, 6, hidden) the blocks' modulation
    rotary: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (N_local, head_dim / 2)

    def state(self, hidden: torch.Tensor, encoder_hidden: torch.Tensor) -> "WanBlockState":
        return WanBlockState(hidden=hidden, encoder_hidden=encoder_hidden, context=self)


@dataclass
class WanBlockState:
    """What flows between blocks for one set of video tokens (all, a shard, or a patch)."""

    hidden: torch.Tensor  # (B, N_local, hidden) video tokens
    encoder_hidden: torch.Tensor  # (B, L, hidden) embedded text, whole on every rank, unchanged by blocks
    context: WanBlockContext


class WanAdapter(AdapterBase):
    """One loaded Wan 2.1 T2V transformer and the ComfyUI conventions around it."""

    family = "wan21"
    latent_format: PerChannelLatentFormat = WAN21_LATENT_FORMAT
    ANCHOR = "patch_embedding.weight"

    def __init__(self, transformer: WanTransformer3DModel, spec: WanSpec,
                 present: Optional[tuple[int, int]] = None) -> None:
        self.transformer = transformer.eval().requires_grad_(False)
        self.spec = spec
        self.seam = AttentionSeam()
        self.blocks: list[torch.nn.Module] = list(transformer.blocks)
        self.present = present if present is not None else (0, len(self.blocks))
        for layer, block in enumerate(self.blocks):
            if isinstance(block, AbsentBlock):
                continue
            block.attn1.set_processor(SeamSelfAttnProcessor(self.seam, layer))
            block.attn2.set_processor(LocalCrossAttnProcessor())

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", source: str = "checkpoint",
                        blocks: Optional[tuple[int, int]] = None, spec: Optional[WanSpec] = None) -> "WanAdapter":
        """Build from ComfyUI-layout tensors; with ``blocks`` ([start, stop): one PipeFusion stage) only those
        blocks and the shared tensors are built (``state`` may then hold just those; pass the file's ``spec``)."""
        if spec is None:
            spec = infer_wan_spec(state, source)
        transformer = build_stage_module(WanTransformer3DModel, spec.diffusers_config(), state, spec, block_index,
                                         wan_to_diffusers, dtype, blocks, blocks_attr="blocks")
        # diffusers' own rotary tables (non-persistent buffers) were built on meta; rebuild them for its forward
        transformer.rope = WanRotaryPosEmbed(HEAD_DIM, transformer.config.patch_size, 1024)
        assert not any(t.is_meta for t in transformer.state_dict().values()), "unloaded tensors on meta"
        log_loaded("Wan 2.1", source, spec.num_layers, blocks, spec.hidden_size, dtype)
        return cls(transformer.to(device), spec, blocks)

    def default_sampling(self) -> ModelSampling:
        """ComfyUI's WAN21_T2V model sampling: discrete flow, shift 8.0, timestep multiplier 1000."""
        return DiscreteFlowShift(shift=DEFAULT_SHIFT, multiplier=TIMESTEP_MULTIPLIER)

    # ---- latent <-> tokens ----------------------------------------------------------------------
    def check_latent(self, latent: torch.Tensor) -> None:
        channels = self.latent_format.channels
        if latent.ndim != 5 or latent.shape[1] != channels:
            raise ValueError(f"Wan 2.1 needs a video LATENT of shape (batch, {channels}, frames, h, w); got "
                             f"{tuple(latent.shape)}. Use EmptyHunyuanLatentVideo (or VAEEncode with the Wan VAE).")
        h, w = latent.shape[3], latent.shape[4]
        if h % PATCH or w % PATCH:
            raise ValueError(f"Wan 2.1 needs video height and width divisible by 16; got latent {h}x{w} "
                             f"(video {h * 8}x{w * 8})")

    @staticmethod
    def image_ids(height: int, width: int, frames: int = 1) -> torch.Tensor:
        """(T * H/2 * W/2, 3) per-token (frame, row, column), frame-major then row-major like the packing."""
        return video_positions(frames, height // PATCH, width // PATCH)

    # ---- forward in pieces ----------------------------------------------------------------------
    def embed_context(self, image_ids: torch.Tensor, cond: Conditioning, sigma: torch.Tensor) -> WanBlockContext:
        """temb (B, hidden) and the blocks' modulation (B, 6, hidden) for ``sigma`` (B,), and the rotary
        cos/sin of ``image_ids`` (N_local, 3). A PipeFusion stage after the first calls only this."""
        embedder = self.transformer.condition_embedder
        timestep = sigma.to(device=self.device, dtype=torch.float32) * TIMESTEP_MULTIPLIER
        temb = embedder.time_embedder(timestep_embedding(timestep).to(self.dtype))  # (B, hidden)
        # (B, 6 * hidden) -> (B, 6, hidden): shift, scale, gate of the self-attention, then of the feed-forward
        timestep_proj = embedder.time_proj(embedder.act_fn(temb)).unflatten(1, (6, -1))
        return WanBlockContext(temb=temb, timestep_proj=timestep_proj,
                               rotary=rotary(image_ids.to(self.device), self.spec.axes_dims_rope))

    def embed(self, tokens: torch.Tensor, image_ids: torch.Tensor, cond: Conditioning,
              sigma: torch.Tensor) -> WanBlockState:
        """Embeddings for ``tokens`` (B, N_local, C*1*2*2) at positions ``image_ids`` (N_local, 3); sigma (B,)."""
        t = self.transformer
        dtype, device = self.dtype, self.device
        context, _ = cond.for_batch(tokens.shape[0])  # no pooled vector in Wan
        ctx = self.embed_context(image_ids, cond, sigma)
        # Conv3d weight (hidden, C, 1, 2, 2) -> (hidden, C*1*2*2), channel-major like a token; in float32 as ComfyUI
        proj = t.patch_embedding
        hidden = torch.nn.functional.linear(tokens.to(device=device, dtype=torch.float32), proj.weight.flatten(1).float(),
                                            proj.bias.float()).to(dtype)  # (B, N_local, hidden)
        # (B, L, 4096) -> (B, L, hidden)
        text = t.condition_embedder.text_embedder(context.to(device=device, dtype=dtype))
        return ctx.state(hidden, text)

    def text_len(self, cond: Conditioning) -> int:
        """Text tokens carried between PipeFusion stages (none of them enter the seam)."""
        return cond.context.shape[1]

    def run_blocks(self, state: WanBlockState, start: int, stop: int) -> WanBlockState:
        hidden, ctx = state.hidden, state.context
        for block in self.blocks[start:stop]:
            hidden = block(hidden, state.encoder_hidden, ctx.timestep_proj, ctx.rotary)
        return WanBlockState(hidden=hidden, encoder_hidden=state.encoder_hidden, context=ctx)

    def head(self, state: WanBlockState) -> torch.Tensor:
        """Final norm + projection: (B, N_local, hidden) -> (B, N_local, C*2*2) velocity in our packing, float32."""
        t = self.transformer
        # (1, 2, hidden) + (B, 1, hidden) -> shift, scale (B, 1, hidden) each
        shift, scale = (t.scale_shift_table + state.context.temb[:, None]).chunk(2, dim=1)
        out = t.proj_out((t.norm_out(state.hidden.float()) * (1 + scale) + shift).type_as(state.hidden)).float()
        b, n, _ = out.shape
        # (B, N, 1*2*2*C) (row, column, channel inside a token) -> (B, N, C*2*2) channel-major
        return out.view(b, n, PATCH, PATCH, -1).permute(0, 1, 4, 2, 3).reshape(b, n, -1)
