"""HunyuanDiT (v1.0, v1.1, v1.2) adapter over diffusers' ``HunyuanDiT2DModel``: ComfyUI latents and
conditioning (bilingual CLIP + mT5 tokens, their masks, the image-size condition) in, the model's
v-prediction out, image self-attention through our one seam.

Same piecewise forward as the other adapters (``embed`` -> ``run_blocks`` -> ``head``), so every parallel
mode runs it unchanged. What is HunyuanDiT's, all kept inside here:
- a v-prediction model on ComfyUI's discrete schedule (linear betas 0.00085 .. 0.018; v1.0: .. 0.03);
- the text enters by cross-attention to CLIP tokens + the mT5 tokens projected to CLIP's width, each
  padded (where its mask is 0) with the file's learned padding rows, as ComfyUI does for the last 77 /
  256 tokens; only the image self-attention goes through the seam, the cross-attention runs locally on
  this rank's image tokens against the whole text (as PixArt);
- positions are 2-D rotary, ComfyUI's ``calc_rope`` (the token grid resized into a 32x32 base grid, centred)
  computed per token from ``image_ids`` (row, column, rows, columns), so a shard or patch rotates right;
  the cross-attention's query is rotated too;
- the modulation vector is the timestep embedding plus an MLP of the attention-pooled mT5 tokens (v1.0:
  with the image-size condition and the style embedding);
- long skips: blocks after the middle concatenate the output of their mirror block in the first half
  (a stack in the block state), so a PipeFusion stage boundary carries the pending skips with the patch
  (``carried`` / ``carried_like`` / ``resume``); sequence shards hold their own tokens' skips;
- learned sigma: of the 8 predicted channels the first 4 are the output, reordered into our packing.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from diffusers import HunyuanDiT2DModel

from ..attention import AttentionSeam, sdpa
from ..conditioning import Conditioning
from ..latent_format import SDXL_LATENT_FORMAT, LatentFormat
from ..prediction import V, Prediction
from ..sigmas import DiscreteSchedule, ModelSampling
from .absent_block import AbsentBlock
from .adapter_base import AdapterBase, build_stage_module, log_loaded, patch_conv_as_linear
from .hunyuan_dit_checkpoint import (PATCH, POOLER_HEADS, TIMESTEP_DIM, HunyuanDiTSpec, block_index,
                                     hunyuan_dit_to_diffusers, infer_hunyuan_dit_spec)

logger = logging.getLogger(__name__)

# ComfyUI's HunyuanDiT / HunyuanDiT1 sampling settings (comfy/supported_models.py; linear betas by default)
HUNYUAN_DIT_SAMPLING = DiscreteSchedule(beta_schedule="linear", linear_start=0.00085, linear_end=0.018)
HUNYUAN_DIT_V10_SAMPLING = DiscreteSchedule(beta_schedule="linear", linear_start=0.00085, linear_end=0.03)
ROPE_BASE = 512 // 8 // PATCH  # ComfyUI's calc_rope base grid side, in tokens
ROPE_THETA = 10000.0


# ---- positions --------------------------------------------------------------------------------------

def rope_window(rows: int, cols: int, base: int = ROPE_BASE) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a rows x cols token grid lies in the base x base grid (``(top, left), (bottom, right)``): resized to
    fit, keeping its aspect ratio, and centred, with Python's rounding as ComfyUI's ``get_fill_resize_and_crop``."""
    if rows / cols > 1.0:
        height, width = base, int(round(base / rows * cols))
    else:
        height, width = int(round(base / cols * rows)), base
    top, left = int(round((base - height) / 2.0)), int(round((base - width) / 2.0))
    return (top, left), (top + height, left + width)


def token_ids(height: int, width: int) -> torch.Tensor:
    """(H/2 * W/2, 4) int64 per token of a latent, row-major like the packing: (row, column, rows, columns)."""
    rows, cols = height // PATCH, width // PATCH
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1)
    grid = grid.reshape(rows * cols, 2)  # (rows, cols, 2) -> (N, 2)
    return torch.cat([grid, torch.tensor([rows, cols]).expand(rows * cols, 2)], dim=1)


def _grid_positions(index: torch.Tensor, start: int, stop: int, count: int) -> torch.Tensor:
    """numpy's ``linspace(start, stop, count, endpoint=False, dtype=float32)[index]``: float64, then float32."""
    return (index.to(torch.float64) * ((stop - start) / count) + start).float()


def _rope_1d(dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) float32 positions -> cos, sin (N, dim), each frequency repeated for its pair of channels."""
    freqs = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, device=positions.device)[: dim // 2].float() / dim))
    angles = torch.outer(positions, freqs).float()  # (N, dim/2)
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def rotary(image_ids: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N_local, head_dim) float32 cos and sin of each token, as ComfyUI's ``calc_rope`` gives them for the whole
    image: the first half of the channels rotate with the column, the second with the row."""
    rows, cols = int(image_ids[0, 2]), int(image_ids[0, 3])
    (top, left), (bottom, right) = rope_window(rows, cols)
    col = _grid_positions(image_ids[:, 1], left, right, cols)  # (N_local,)
    row = _grid_positions(image_ids[:, 0], top, bottom, rows)
    cos_w, sin_w = _rope_1d(head_dim // 2, col)
    cos_h, sin_h = _rope_1d(head_dim // 2, row)
    return torch.cat([cos_w, cos_h], dim=1), torch.cat([sin_w, sin_h], dim=1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, N, H, D) by (N, D) cos / sin, channel pairs (2i, 2i+1) as ComfyUI's ``rotate_half``."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)  # (B, N, H, D) -> (B, N, H, D/2, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # -> (B, N, H, D)
    return x * cos[:, None] + rotated * sin[:, None]


def sinusoid(values: torch.Tensor, dim: int = TIMESTEP_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """(M,) -> (M, dim) float32 (cos, sin) embedding, ComfyUI's ``timestep_embedding``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=values.device) / half)
    args = values[:, None].float() * freqs[None]  # (M, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ---- attention processors ---------------------------------------------------------------------------

class SeamSelfAttnProcessor:
    """diffusers' image self-attention (``attn1``): q/k layer norm and rotary positions, then ``softmax(QK^T)V``
    through the seam (no text tokens)."""

    def __init__(self, seam: AttentionSeam, layer: int) -> None:
        self.seam = seam
        self.layer = layer

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        if image_rotary_emb is None:
            raise ValueError("HunyuanDiT's self-attention needs the rotary positions; run it through "
                             "HunyuanDiTAdapter.run_blocks")
        # (B, N, H*D) -> (B, N, H, D)
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1)))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        cos, sin = image_rotary_emb
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        out = self.seam(query, key, value, text_len=0, layer=self.layer)
        out = out.flatten(2, 3).to(query.dtype)  # (B, N, H, D) -> (B, N, H*D)
        return attn.to_out[1](attn.to_out[0](out))


class LocalCrossAttnProcessor:
    """diffusers' cross-attention (``attn2``): this rank's image tokens (rotated) against the whole text, locally."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        if encoder_hidden_states is None or image_rotary_emb is None:
            raise ValueError("HunyuanDiT's cross-attention needs the text tokens and the rotary positions")
        # (B, N, H*D) -> (B, N, H, D); (B, L, H*D) -> (B, L, H, D)
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)))
        key = attn.norm_k(attn.to_k(encoder_hidden_states).unflatten(-1, (attn.heads, -1)))
        value = attn.to_v(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
        query = apply_rotary(query, *image_rotary_emb)  # the query only, as ComfyUI's CrossAttention
        out = sdpa(query, key, value).flatten(2, 3).to(query.dtype)  # (B, N, H, D) -> (B, N, H*D)
        return attn.to_out[1](attn.to_out[0](out))


# ---- block state ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HunyuanDiTBlockContext:
    """The per-forward inputs every block takes besides the hidden states."""

    temb: torch.Tensor  # (B, hidden) timestep + pooled-text (+ size, style) embedding
    rope: tuple[torch.Tensor, torch.Tensor]  # (N_local, head_dim) cos, sin in the model's dtype

    def state(self, hidden: torch.Tensor, encoder_hidden: torch.Tensor,
              skips: tuple[torch.Tensor, ...] = ()) -> "HunyuanDiTBlockState":
        return HunyuanDiTBlockState(hidden=hidden, encoder_hidden=encoder_hidden, temb=self.temb, rope=self.rope,
                                    skips=skips)


@dataclass(frozen=True)
class HunyuanDiTBlockState:
    """What flows between blocks for one set of image tokens (all, a shard, or a patch)."""

    hidden: torch.Tensor  # (B, N_local, hidden) image tokens
    encoder_hidden: torch.Tensor  # (B, L_clip + L_t5, text_dim) the padded text, whole on every rank
    temb: torch.Tensor  # (B, hidden)
    rope: tuple[torch.Tensor, torch.Tensor]
    skips: tuple[torch.Tensor, ...] = field(default=())  # pending long skips, (B, N_local, hidden) each, oldest first


class HunyuanDiTAdapter(AdapterBase):
    """One loaded HunyuanDiT transformer and the ComfyUI conventions around it."""

    prediction: Prediction = V
    ANCHOR = "pos_embed.proj.weight"

    def __init__(self, transformer: HunyuanDiT2DModel, spec: HunyuanDiTSpec,
                 present: Optional[tuple[int, int]] = None) -> None:
        self.transformer = transformer.eval().requires_grad_(False)
        self.spec = spec
        self.family = spec.family
        self.latent_format: LatentFormat = SDXL_LATENT_FORMAT
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
                        blocks: Optional[tuple[int, int]] = None,
                        spec: Optional[HunyuanDiTSpec] = None) -> "HunyuanDiTAdapter":
        """Build from HunyuanDiT tensors; with ``blocks`` ([start, stop): one PipeFusion stage) only those blocks
        and the shared tensors are built (``state`` may then hold just those; pass the file's ``spec``)."""
        if spec is None:
            spec = infer_hunyuan_dit_spec(state, source)
        transformer = build_stage_module(HunyuanDiT2DModel, spec.diffusers_config(), state, spec, block_index,
                                         hunyuan_dit_to_diffusers, dtype, blocks, blocks_attr="blocks")
        log_loaded(f"HunyuanDiT {spec.version}", source, spec.num_layers, blocks, spec.hidden_size, dtype)
        return cls(transformer.to(device), spec, blocks)

    def default_sampling(self) -> ModelSampling:
        """ComfyUI's HunyuanDiT model sampling: discrete, linear betas 0.00085 .. 0.018 (v1.0: .. 0.03)."""
        return HUNYUAN_DIT_V10_SAMPLING if self.spec.size_cond else HUNYUAN_DIT_SAMPLING

    # ---- latent <-> tokens ----------------------------------------------------------------------
    def check_latent(self, latent: torch.Tensor) -> None:
        channels = self.latent_format.channels
        if latent.ndim != 4 or latent.shape[1] != channels:
            raise ValueError(f"HunyuanDiT needs a LATENT of shape (batch, {channels}, h, w); got "
                             f"{tuple(latent.shape)}. Use EmptyLatentImage (4 channels) or VAEEncode with the "
                             f"SDXL VAE.")
        h, w = latent.shape[2], latent.shape[3]
        if h % PATCH or w % PATCH:
            raise ValueError(f"HunyuanDiT needs image height and width divisible by 16; got latent {h}x{w} "
                             f"(image {h * 8}x{w * 8})")

    def image_ids(self, height: int, width: int) -> torch.Tensor:
        return token_ids(height, width)

    # ---- forward in pieces ----------------------------------------------------------------------
    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """(B,) ComfyUI's timestep of ``sigma``: the index of the nearest table entry, as float32."""
        schedule = self.default_sampling()
        return schedule.timestep(sigma.detach().to("cpu", torch.float32)).float().to(self.device)

    def _batched(self, cond: Conditioning, name: str, batch: int) -> Optional[torch.Tensor]:
        tensor = cond.batched(name, batch)
        return None if tensor is None else tensor.to(self.device)

    def _t5_tokens(self, cond: Conditioning, batch: int) -> torch.Tensor:
        tokens = self._batched(cond, "second_context", batch)
        if tokens is None:
            raise ValueError("HunyuanDiT needs the mT5 tokens besides the CLIP tokens (ComfyUI's "
                             "conditioning_mt5xl: encode the prompt with HunyuanDiT's CLIP, CLIPTextEncode or "
                             "CLIPTextEncodeHunyuanDiT)")
        if tokens.shape[1] < self.spec.t5_len:
            raise ValueError(f"HunyuanDiT needs at least {self.spec.t5_len} mT5 tokens (ComfyUI's encoder pads to "
                             f"that), got {tokens.shape[1]}")
        return tokens.to(self.dtype)

    def _image_meta_size(self, image_ids: torch.Tensor, cond: Conditioning, batch: int) -> torch.Tensor:
        """v1.0's (B, 6 * 256) size embedding: the conditioning's height, width, target height, target width (without
        them the latent's size in pixels, as ComfyUI's sampler fills them in) and a zero crop, through the model's
        dtype as ComfyUI's extra conds."""
        latent_size = (float(image_ids[0, 2]) * PATCH * 8, float(image_ids[0, 3]) * PATCH * 8)
        height, width = cond.resolution if cond.resolution is not None else latent_size
        target = cond.target_resolution if cond.target_resolution is not None else (height, width)
        meta = torch.tensor([[height, width, target[0], target[1], 0.0, 0.0]], dtype=torch.float32)
        meta = meta.to(device=self.device, dtype=self.dtype).repeat(batch, 1)  # (1, 6) -> (B, 6)
        return sinusoid(meta.view(-1)).to(self.dtype).view(batch, -1)  # (B * 6, 256) -> (B, 1536)

    def _pooled_t5(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L_t5, t5_dim) -> (B, pooled) ComfyUI's AttentionPool: the mean token attending to the first
        ``t5_len`` tokens (and itself), each with its learned position."""
        pool = self.transformer.time_extra_emb.pooler
        x = tokens[:, :self.spec.t5_len]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, L + 1, C), the mean first
        x = x + pool.positional_embedding[None].to(x.dtype)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (POOLER_HEADS, -1))  # (B, S, C) -> (B, S, 8, C/8)

        out = sdpa(heads(pool.q_proj(x[:, :1])), heads(pool.k_proj(x)), heads(pool.v_proj(x)))  # (B, 1, 8, C/8)
        return pool.c_proj(out.flatten(2))[:, 0]  # (B, 1, C) -> (B, pooled)

    def embed_context(self, image_ids: torch.Tensor, cond: Conditioning, sigma: torch.Tensor) -> HunyuanDiTBlockContext:
        """The modulation vector (B, hidden) for ``sigma`` (B,) and the rotary positions of ``image_ids``."""
        emb = self.transformer.time_extra_emb
        batch, dtype = sigma.shape[0], self.dtype
        t_emb = emb.timestep_embedder(sinusoid(self.timestep(sigma)).to(dtype))  # (B, hidden)
        extra = [self._pooled_t5(self._t5_tokens(cond, batch))]
        if self.spec.size_cond:
            style = torch.zeros(batch, dtype=torch.long, device=self.device)  # ComfyUI's default style
            extra += [self._image_meta_size(image_ids, cond, batch), emb.style_embedder(style).to(dtype)]
        temb = t_emb + emb.extra_embedder(torch.cat(extra, dim=1))
        cos, sin = rotary(image_ids.to(self.device), self.spec.head_dim)
        return HunyuanDiTBlockContext(temb=temb, rope=(cos.to(dtype), sin.to(dtype)))

    def text_states(self, cond: Conditioning, batch: int) -> torch.Tensor:
        """(B, L_clip + L_t5, text_dim): CLIP tokens and projected mT5 tokens, the last ``text_len`` / ``t5_len`` of
        each replaced by the learned padding where their mask is 0 (no mask: all kept)."""
        t, spec, dtype = self.transformer, self.spec, self.dtype
        context, _ = cond.for_batch(batch)
        clip = context.to(device=self.device, dtype=dtype)
        t5 = t.text_embedder(self._t5_tokens(cond, batch))  # (B, L_t5, t5_dim) -> (B, L_t5, text_dim)
        if clip.shape[1] < spec.text_len:
            raise ValueError(f"HunyuanDiT needs at least {spec.text_len} CLIP tokens (ComfyUI's encoder pads to "
                             f"that), got {clip.shape[1]}")
        padding = t.text_embedding_padding.to(dtype)
        parts = []
        for tokens, name, rows in ((clip, "context_mask", padding[:spec.text_len]),
                                   (t5, "second_context_mask", padding[spec.text_len:])):
            mask = self._batched(cond, name, batch)
            if mask is not None:
                n = rows.shape[0]
                kept = torch.where(mask[:, -n:, None].bool(), tokens[:, -n:], rows)  # (B, n, text_dim)
                tokens = torch.cat([tokens[:, :-n], kept], dim=1)
            parts.append(tokens)
        return torch.cat(parts, dim=1)

    def embed(self, tokens: torch.Tensor, image_ids: torch.Tensor, cond: Conditioning,
              sigma: torch.Tensor) -> HunyuanDiTBlockState:
        """Embeddings for ``tokens`` (B, N_local, C*2*2) (the model input) at positions ``image_ids`` (N_local, 4)."""
        hidden = patch_conv_as_linear(self.transformer.pos_embed.proj, tokens)  # (B, N_local, hidden)
        ctx = self.embed_context(image_ids, cond, sigma)
        return ctx.state(hidden, self.text_states(cond, tokens.shape[0]))

    def text_len(self, cond: Conditioning) -> int:
        """Text tokens carried between PipeFusion stages (none of them enter the seam)."""
        second = cond.second_context.shape[1] if cond.second_context is not None else 0
        return cond.context.shape[1] + second

    def run_blocks(self, state: HunyuanDiTBlockState, start: int, stop: int) -> HunyuanDiTBlockState:
        spec = self.spec
        hidden, skips = state.hidden, list(state.skips)
        assert len(skips) == spec.pending_skips(start), (start, len(skips))
        for layer in range(start, stop):
            skip = skips.pop() if spec.skip_block(layer) else None
            hidden = self.blocks[layer](hidden, encoder_hidden_states=state.encoder_hidden, temb=state.temb,
                                        image_rotary_emb=state.rope, skip=skip)
            if spec.pushes(layer):
                skips.append(hidden)
        return HunyuanDiTBlockState(hidden=hidden, encoder_hidden=state.encoder_hidden, temb=state.temb,
                                    rope=state.rope, skips=tuple(skips))

    def head(self, state: HunyuanDiTBlockState) -> torch.Tensor:
        """Final norm + projection: (B, N_local, hidden) -> (B, N_local, C*2*2) v in our packing, float32."""
        t = self.transformer
        out = t.proj_out(t.norm_out(state.hidden, state.temb)).float()
        b, n, _ = out.shape
        # ComfyUI orders a token (p, q, c) over the 8 learned-sigma channels; keep the first 4 in ours (c, p, q):
        # (B, N, 2, 2, 8) -> (B, N, 2, 2, 4) -> (B, N, 4, 2, 2)
        v = out.view(b, n, PATCH, PATCH, -1)[..., :self.spec.in_channels]
        return v.permute(0, 1, 4, 2, 3).reshape(b, n, -1)

    # ---- what crosses a PipeFusion stage boundary: the pending long skips too -----------------------
    def carried(self, state: HunyuanDiTBlockState) -> list[torch.Tensor]:
        """Image and text hidden states, then the pending skips (oldest first)."""
        return [state.hidden, state.encoder_hidden, *state.skips]

    def carried_like(self, block: int, batch: int, tokens: int, cond: Conditioning) -> list[torch.Tensor]:
        """``carried`` of the state entering ``block``: (B, n, hidden), (B, L, text_dim), and one (B, n, hidden) per
        skip pending there."""
        dtype, device, width = self.dtype, self.device, self.hidden_size
        like = [torch.empty(batch, tokens, width, dtype=dtype, device=device),
                torch.empty(batch, self.text_len(cond), self.spec.text_dim, dtype=dtype, device=device)]
        return like + [torch.empty(batch, tokens, width, dtype=dtype, device=device)
                       for _ in range(self.spec.pending_skips(block))]

    def resume(self, context: Any, carried: list[torch.Tensor]) -> HunyuanDiTBlockState:
        hidden, text, *skips = carried
        return context.state(hidden, text, tuple(skips))
