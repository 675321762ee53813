"""Wan 2.1 / 2.2 (14B architecture, and the TI2V 5B) adapter over diffusers' ``WanTransformer3DModel``: ComfyUI
video latents (B, 16, T, H, W) (the 5B's (B, 48, T, H, W)) and umT5 tokens in, the model's velocity out, video self-attention through our one seam.

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
- the output projection orders a token (row, column, channel); reordered here into our channel-major packing;
- image-to-video (36 input channels): ComfyUI's ``c_concat`` (mask + start-frame latent, ``wan_concat.py``) is
  packed like the latent and each token gets its own row of it before the patch embedding, so a shard or a
  patch needs nothing from the others; Wan 2.1 I2V also embeds CLIP vision tokens (``img_emb``) ahead of the
  text and its cross-attention adds an attention over them (``k_img``, ``v_img``) to the text's, as ComfyUI's
  ``WanI2VCrossAttention``;
- Wan 2.2 TI2V 5B (48 channels, the Wan22 latent format): its image-to-video keeps the start image in the first
  latent frame by the LATENT's noise mask (Wan22ImageToVideoLatent), which the model also reads as a per-frame
  timestep (ComfyUI's ``WAN22.process_timestep``: the frame's mean mask times the timestep). We carry that factor
  per token as a 7th ``image_ids`` column (``with_denoise_mask``), so a shard or a patch embeds the timestep and
  modulation of its own tokens only; the kept latent is shown to the model clean (``scale_latent_inpaint``).
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
from ..latent_format import WAN21_LATENT_FORMAT, WAN22_LATENT_FORMAT, PerChannelLatentFormat
from ..sigmas import DiscreteFlowShift, ModelSampling
from .absent_block import AbsentBlock
from .adapter_base import AdapterBase, build_stage_module, log_loaded
from .packing import PATCH
from .qwen_image_rope import apply_rotary, rotary
from .wan_checkpoint import FREQ_DIM, HEAD_DIM, WanSpec, block_index, infer_wan_spec, wan_to_diffusers
from .wan_concat import concat_tokens

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


POSITION_AXES = 3  # (frame, row, column); Wan's image_ids add (frames, rows, columns) of the whole latent


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


@dataclass
class ImageContextSplit:
    """How many of the cross-attention's context tokens lead as CLIP image tokens in the forward now running
    (None: no split, ComfyUI's ``context_img_len`` of None). diffusers' block hands its attention processor
    the tokens only, so the adapter sets this before running its blocks."""

    tokens: Optional[int] = None


class LocalCrossAttnProcessor:
    """diffusers' Wan text cross-attention (``attn2``): this rank's video tokens against the whole text, locally.
    With ``image`` (Wan 2.1 I2V) the context's leading CLIP image tokens get their own attention (``add_k_proj``,
    ``add_v_proj``, ``norm_added_k``: ComfyUI's ``k_img``, ``v_img``, ``norm_k_img``), added to the text's before
    the output projection; without a split both attentions see the whole context, as ComfyUI's."""

    def __init__(self, image: Optional[ImageContextSplit] = None) -> None:
        self.image = image

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None, **kwargs: object) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("Wan's cross-attention needs the text tokens")
        text = image = encoder_hidden_states
        if self.image is not None and self.image.tokens is not None:
            image, text = encoder_hidden_states[:, :self.image.tokens], encoder_hidden_states[:, self.image.tokens:]
        # (B, N, H*D) -> (B, N, H, D); (B, L, H*D) -> (B, L, H, D)
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(-1, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(text)).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(text).unflatten(-1, (attn.heads, -1))
        out = sdpa(query, key, value)  # (B, N, H, D)
        if self.image is not None:
            # (B, L_img, H*D) -> (B, L_img, H, D)
            key_img = attn.norm_added_k(attn.add_k_proj(image)).unflatten(-1, (attn.heads, -1))
            value_img = attn.add_v_proj(image).unflatten(-1, (attn.heads, -1))
            out = out + sdpa(query, key_img, value_img)
        out = out.flatten(2, 3).to(value.dtype)  # (B, N, H, D) -> (B, N, H*D)
        return attn.to_out[1](attn.to_out[0](out))


@dataclass(frozen=True)
class WanBlockContext:
    """The per-forward inputs every block takes besides the hidden states."""

    temb: torch.Tensor  # (B, hidden) timestep embedding, for the head; (B, N_local, hidden) per token (TI2V mask)
    timestep_proj: torch.Tensor  # (B, 6, hidden) the blocks' modulation; (B, N_local, 6, hidden) per token
    rotary: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (N_local, head_dim / 2)
    image_tokens: Optional[int] = None  # leading CLIP image tokens of the context (Wan 2.1 I2V); None: no split

    def state(self, hidden: torch.Tensor, encoder_hidden: torch.Tensor) -> "WanBlockState":
        return WanBlockState(hidden=hidden, encoder_hidden=encoder_hidden, context=self)


@dataclass
class WanBlockState:
    """What flows between blocks for one set of video tokens (all, a shard, or a patch)."""

    hidden: torch.Tensor  # (B, N_local, hidden) video tokens
    encoder_hidden: torch.Tensor  # (B, [L_img +] L, hidden) embedded [image and] text, whole on every rank
    context: WanBlockContext


class WanAdapter(AdapterBase):
    """One loaded Wan transformer (text- or image-to-video) and the ComfyUI conventions around it."""

    family = "wan21"
    latent_format: PerChannelLatentFormat = WAN21_LATENT_FORMAT
    ANCHOR = "patch_embedding.weight"

    def __init__(self, transformer: WanTransformer3DModel, spec: WanSpec,
                 present: Optional[tuple[int, int]] = None) -> None:
        self.transformer = transformer.eval().requires_grad_(False)
        self.spec = spec
        self.family = spec.family  # "wan21", or "wan22-5b"
        self.latent_format = WAN22_LATENT_FORMAT if spec.ti2v else WAN21_LATENT_FORMAT
        self.seam = AttentionSeam()
        self.blocks: list[torch.nn.Module] = list(transformer.blocks)
        self.present = present if present is not None else (0, len(self.blocks))
        self.image_split = ImageContextSplit() if spec.image_dim is not None else None
        for layer, block in enumerate(self.blocks):
            if isinstance(block, AbsentBlock):
                continue
            block.attn1.set_processor(SeamSelfAttnProcessor(self.seam, layer))
            block.attn2.set_processor(LocalCrossAttnProcessor(self.image_split))

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
        title = "Wan 2.2 TI2V 5B" if spec.ti2v else "Wan image-to-video" if spec.extra_channels else "Wan 2.1"
        log_loaded(title, source, spec.num_layers, blocks,
                   spec.hidden_size, dtype)
        return cls(transformer.to(device), spec, blocks)

    def default_sampling(self) -> ModelSampling:
        """ComfyUI's WAN21_T2V model sampling: discrete flow, shift 8.0, timestep multiplier 1000."""
        return DiscreteFlowShift(shift=DEFAULT_SHIFT, multiplier=TIMESTEP_MULTIPLIER)

    # ---- latent <-> tokens ----------------------------------------------------------------------
    def check_latent(self, latent: torch.Tensor) -> None:
        channels = self.latent_format.channels
        title, node, scale = (("Wan 2.2 TI2V 5B", "Wan22ImageToVideoLatent (or VAEEncode with the Wan 2.2 VAE)", 16)
                              if self.spec.ti2v else
                              ("Wan 2.1", "EmptyHunyuanLatentVideo (or VAEEncode with the Wan VAE)", 8))
        if latent.ndim != 5 or latent.shape[1] != channels:
            raise ValueError(f"{title} needs a video LATENT of shape (batch, {channels}, frames, h, w); got "
                             f"{tuple(latent.shape)}. Use {node}.")
        h, w = latent.shape[3], latent.shape[4]
        if h % PATCH or w % PATCH:
            raise ValueError(f"{title} needs video height and width divisible by {scale * PATCH}; got latent {h}x{w} "
                             f"(video {h * scale}x{w * scale})")

    @staticmethod
    def image_ids(height: int, width: int, frames: int = 1) -> torch.Tensor:
        """(T * H/2 * W/2, 6) per-token (frame, row, column), frame-major then row-major like the packing, then the
        whole latent's (frames, rows, columns): an I2V shard cuts its own rows of the concat latent by them."""
        positions = video_positions(frames, height // PATCH, width // PATCH)  # (N, 3)
        grid = torch.tensor([frames, height // PATCH, width // PATCH], dtype=positions.dtype)
        return torch.cat([positions, grid.expand(positions.shape[0], 3)], dim=1)

    # ---- the TI2V 5B's noise mask ----------------------------------------------------------------
    @property
    def video_noise_mask(self) -> bool:
        """Whether a noise mask on a video LATENT is run (the 5B's image-to-video: Wan22ImageToVideoLatent)."""
        return self.spec.ti2v

    @property
    def inpaint_renoises(self) -> bool:
        """Whether the kept latent is shown to the model re-noised (False: clean, ComfyUI's WAN22)."""
        return not self.spec.ti2v

    def with_denoise_mask(self, image_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``image_ids`` (N, 6) with a 7th column: each token's timestep factor, the mean of its frame's denoise
        mask over channels, rows and columns (ComfyUI's ``WAN22.process_timestep``) from ``mask`` (B, C, T, H, W)
        as the sampler applies it. One factor per frame for the whole batch: rows of different masks are refused."""
        if not self.spec.ti2v:
            return image_ids
        factors = mask.float().mean(dim=(1, 3, 4))  # (B, C, T, H, W) -> (B, T)
        if not torch.equal(factors, factors[:1].expand_as(factors)):
            raise ValueError("the LATENT's noise mask differs between the batch's videos, which the xDiT sampler "
                             "does not run for Wan 2.2 TI2V 5B; sample them one at a time or with one mask "
                             "(Wan22ImageToVideoLatent gives every video the same)")
        frame = image_ids[:, 0].to(torch.int64)  # (N,)
        return torch.cat([image_ids, factors[0][frame, None].to(image_ids.dtype)], dim=1)  # (N, 7)

    def _time_embedding(self, sigma: torch.Tensor, image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """temb and the blocks' modulation for ``sigma`` (B,): (B, hidden), (B, 6, hidden); with a timestep factor
        per token (column 6 of ``image_ids``) (B, N_local, hidden), (B, N_local, 6, hidden), embedded once per
        distinct factor of these tokens and gathered to them. Tokens that all share one factor (a shard or patch inside
        the frames to denoise) get the plain shapes: the same numbers, without a per-token copy."""
        embedder = self.transformer.condition_embedder
        timestep = sigma.to(device=self.device, dtype=torch.float32) * TIMESTEP_MULTIPLIER  # (B,)
        per_token = image_ids.shape[1] > POSITION_AXES + 3
        if per_token:
            values, inverse = torch.unique(image_ids[:, POSITION_AXES + 3].to(self.device, torch.float32),
                                           return_inverse=True)  # (U,), (N_local,)
            per_token = values.numel() > 1
            # (B, U) -> (B*U,); one factor: (B,)
            timestep = (timestep[:, None] * values[None]).flatten() if per_token else timestep * values[0]
        temb = embedder.time_embedder(timestep_embedding(timestep).to(self.dtype))  # (B[*U], hidden)
        # (B[*U], 6 * hidden) -> (B[*U], 6, hidden): shift, scale, gate of the self-attention, then of the feed-forward
        timestep_proj = embedder.time_proj(embedder.act_fn(temb)).unflatten(1, (6, -1))
        if per_token:
            batch = sigma.shape[0]
            temb = temb.unflatten(0, (batch, -1))[:, inverse]  # (B*U, hidden) -> (B, U, hidden) -> (B, N_local, hidden)
            timestep_proj = timestep_proj.unflatten(0, (batch, -1))[:, inverse]  # -> (B, N_local, 6, hidden)
        return temb, timestep_proj

    # ---- forward in pieces ----------------------------------------------------------------------
    def embed_context(self, image_ids: torch.Tensor, cond: Conditioning, sigma: torch.Tensor) -> WanBlockContext:
        """temb (B, hidden) and the blocks' modulation (B, 6, hidden) for ``sigma`` (B,) (per token with the TI2V
        mask's column), and the rotary cos/sin of ``image_ids`` (N_local, 6 or 7). A PipeFusion stage after the
        first calls only this."""
        temb, timestep_proj = self._time_embedding(sigma, image_ids)
        image_tokens = None  # ComfyUI's context_img_len: the CLIP tokens' count where the model embeds them
        if self.spec.image_dim is not None and cond.clip_vision is not None:
            image_tokens = cond.clip_vision.shape[1]
        positions = image_ids[:, :POSITION_AXES].to(self.device)
        return WanBlockContext(temb=temb, timestep_proj=timestep_proj,
                               rotary=rotary(positions, self.spec.axes_dims_rope), image_tokens=image_tokens)

    def embed(self, tokens: torch.Tensor, image_ids: torch.Tensor, cond: Conditioning,
              sigma: torch.Tensor) -> WanBlockState:
        """Embeddings for ``tokens`` (B, N_local, C*1*2*2) at positions ``image_ids`` (N_local, 6); sigma (B,)."""
        t = self.transformer
        dtype, device = self.dtype, self.device
        batch = tokens.shape[0]
        context, _ = cond.for_batch(batch)  # no pooled vector in Wan
        ctx = self.embed_context(image_ids, cond, sigma)
        tokens = tokens.to(device=device, dtype=torch.float32)
        if self.spec.extra_channels:  # image-to-video: each token's own rows of c_concat after its latent channels
            extra = concat_tokens(cond, batch, image_ids, self.spec.extra_channels, self.spec.image_to_video,
                                  self.latent_format)  # (B, N_local, extra*2*2)
            tokens = torch.cat([tokens, extra.to(device)], dim=-1)  # (B, N_local, (16 + extra)*2*2)
        # Conv3d weight (hidden, C, 1, 2, 2) -> (hidden, C*1*2*2), channel-major like a token; in float32 as ComfyUI
        proj = t.patch_embedding
        hidden = torch.nn.functional.linear(tokens, proj.weight.flatten(1).float(),
                                            proj.bias.float()).to(dtype)  # (B, N_local, hidden)
        # (B, L, 4096) -> (B, L, hidden)
        text = t.condition_embedder.text_embedder(context.to(device=device, dtype=dtype))
        if ctx.image_tokens is not None:  # Wan 2.1 I2V: the CLIP image tokens lead the context
            text = torch.cat([self.image_embedding(cond.batched("clip_vision", batch)), text], dim=1)
        return ctx.state(hidden, text)

    def image_embedding(self, clip_vision: torch.Tensor) -> torch.Tensor:
        """ComfyUI's ``MLPProj`` in the model's dtype: (B, L_img, 1280) CLIP vision tokens -> (B, L_img, hidden)."""
        embedder = self.transformer.condition_embedder.image_embedder
        x = clip_vision.to(device=self.device, dtype=self.dtype)
        norm1, norm2 = embedder.norm1, embedder.norm2
        x = torch.nn.functional.layer_norm(x, norm1.normalized_shape, norm1.weight.to(x.dtype),
                                           norm1.bias.to(x.dtype), norm1.eps)
        x = embedder.ff(x)  # Linear, GELU, Linear
        return torch.nn.functional.layer_norm(x, norm2.normalized_shape, norm2.weight.to(x.dtype),
                                              norm2.bias.to(x.dtype), norm2.eps)

    def text_len(self, cond: Conditioning) -> int:
        """Context tokens carried between PipeFusion stages (none of them enter the seam): the text's, after the
        CLIP image tokens where the model embeds them."""
        image = cond.clip_vision.shape[1] if self.spec.image_dim is not None and cond.clip_vision is not None else 0
        return image + cond.context.shape[1]

    def run_blocks(self, state: WanBlockState, start: int, stop: int) -> WanBlockState:
        hidden, ctx = state.hidden, state.context
        if self.image_split is not None:
            self.image_split.tokens = ctx.image_tokens
        for block in self.blocks[start:stop]:
            hidden = block(hidden, state.encoder_hidden, ctx.timestep_proj, ctx.rotary)
        return WanBlockState(hidden=hidden, encoder_hidden=state.encoder_hidden, context=ctx)

    def head(self, state: WanBlockState) -> torch.Tensor:
        """Final norm + projection: (B, N_local, hidden) -> (B, N_local, C*2*2) velocity in our packing, float32."""
        t = self.transformer
        temb = state.context.temb
        if temb.ndim == 3:  # per token: (1, 1, 2, hidden) + (B, N, 1, hidden) -> shift, scale (B, N, hidden) each
            shift, scale = (t.scale_shift_table[None] + temb[:, :, None]).unbind(2)
        else:  # (1, 2, hidden) + (B, 1, hidden) -> shift, scale (B, 1, hidden) each
            shift, scale = (t.scale_shift_table + temb[:, None]).chunk(2, dim=1)
        out = t.proj_out((t.norm_out(state.hidden.float()) * (1 + scale) + shift).type_as(state.hidden)).float()
        b, n, _ = out.shape
        # (B, N, 1*2*2*C) (row, column, channel inside a token) -> (B, N, C*2*2) channel-major
        return out.view(b, n, PATCH, PATCH, -1).permute(0, 1, 4, 2, 3).reshape(b, n, -1)
