"""CogVideoX 1.0 text-to-video adapter over diffusers' ``CogVideoXTransformer3DModel``: video latents
(B, 16, T, H, W) and T5 tokens in, the model's v-prediction out, joint text + video attention through our one seam.

Same piecewise forward as the other adapters (``embed`` -> ``run_blocks`` -> ``head``), so every parallel mode
runs it unchanged. What is CogVideoX's, all kept inside here:
- a video latent in ComfyUI's layout (B, C, T, H, W) (diffusers' pipeline holds (B, T, C, H, W)); tokens are
  one frame's 2x2 patches, frame-major then row-major (``packing.pack`` of a 5-D latent), the order diffusers'
  patch embedding makes, so sequence shards and PipeFusion patches cut the T x H/2 x W/2 token sequence;
- the T5 tokens are projected inside the patch embedding and go through every block as a second stream that
  attends jointly with the video (text first, as the seam wants), whole on every rank, as SD3's;
- positions per token from ``image_ids``, computed on the whole grid and cut with the tokens: the 5B's 3-D rotary
  (the grid fitted into the 45 x 30 training grid, as the pipeline's ``_prepare_rotary_positional_embeddings``),
  applied to the video q/k only; the 2B's fixed 3-D sin-cos table, added to the video tokens;
- v-prediction on the DDPM schedule of CogVideoX's schedulers (scaled-linear betas 0.00085 .. 0.012, the SNR
  shifted by ``snr_shift_scale`` (2B: 3, 5B: 1), rescaled to zero terminal SNR): ComfyUI's ModelSamplingDiscrete
  with ``zsnr``, so ComfyUI's samplers and schedulers run it; the timestep is the nearest table entry of sigma;
- the output token is ordered (channel, row, column) like our packing: no reordering.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import CogVideoXTransformer3DModel

from ..attention import AttentionSeam
from ..conditioning import Conditioning
from ..latent_format import LatentFormat
from ..prediction import V, Prediction
from ..sigmas import DiscreteSchedule, ModelSampling
from .absent_block import AbsentBlock
from .adapter_base import AdapterBase, build_stage_module, log_loaded, patch_conv_as_linear
from .cogvideox_checkpoint import (PATCH, SAMPLE_HEIGHT, SAMPLE_WIDTH, CogVideoXSpec, block_index,
                                   cogvideox_to_diffusers, infer_cogvideox_spec, sincos_positions, token_grid)
from .qwen_image_rope import apply_rotary

logger = logging.getLogger(__name__)

ROPE_THETA = 10000.0
# The VAE's scaling factor (diffusers' CogVideoX pipelines: latent * factor into the transformer)
LATENT_FORMAT_2B = LatentFormat(channels=16, scale_factor=1.15258426, shift_factor=0.0)
LATENT_FORMAT_5B = LatentFormat(channels=16, scale_factor=0.7, shift_factor=0.0)
# CogVideoXDDIMScheduler / CogVideoXDPMScheduler as the released configs set them: v-prediction, zero terminal SNR
SAMPLING_2B = DiscreteSchedule(beta_schedule="linear", linear_start=0.00085, linear_end=0.012, zsnr=True,
                               snr_shift=3.0)
SAMPLING_5B = DiscreteSchedule(beta_schedule="linear", linear_start=0.00085, linear_end=0.012, zsnr=True,
                               snr_shift=1.0)


# ---- positions --------------------------------------------------------------------------------------

def fit_in_base_grid(rows: int, cols: int, base_rows: int = SAMPLE_HEIGHT // PATCH,
                     base_cols: int = SAMPLE_WIDTH // PATCH) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a rows x cols token grid lies in the base grid: resized to touch it on one side, keeping its aspect
    ratio, and centred, with Python's rounding (the pipeline's ``get_resize_crop_region_for_grid``):
    ``(top, left), (bottom, right)``."""
    if rows / cols > base_rows / base_cols:
        height, width = base_rows, int(round(base_rows / rows * cols))
    else:
        height, width = int(round(base_cols / cols * rows)), base_cols
    top, left = int(round((base_rows - height) / 2.0)), int(round((base_cols - width) / 2.0))
    return (top, left), (top + height, left + width)


def rotary_positions(frames: int, rows: int, cols: int) -> torch.Tensor:
    """(frames * rows * cols, 3) float32 rotary coordinates (frame, row, column) per token, frame-major then
    row-major: rows and columns spread over the grid's place in the base grid (``torch.linspace`` as diffusers'
    ``get_3d_rotary_pos_embed``), frames 0 .. T-1."""
    (top, left), (bottom, right) = fit_in_base_grid(rows, cols)
    axis_t = torch.linspace(0, frames * (frames - 1) / frames, frames, dtype=torch.float32)
    axis_h = torch.linspace(top, bottom * (rows - 1) / rows, rows, dtype=torch.float32)
    axis_w = torch.linspace(left, right * (cols - 1) / cols, cols, dtype=torch.float32)
    grid = token_grid(frames, rows, cols)  # (N, 3) indices
    return torch.stack([axis_t[grid[:, 0]], axis_h[grid[:, 1]], axis_w[grid[:, 2]]], dim=1)


def rotary(positions: torch.Tensor, axes: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (N, head_dim / 2) float32 of ``positions`` (N, 3): per axis of width ``d`` the angles
    position x theta^(-2i/d), float32 as diffusers' ``get_1d_rotary_pos_embed``; pairs interleaved."""
    angles = []
    for axis, dim in enumerate(axes):
        freqs = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
        # (N,) x (d / 2,) -> (N, d / 2)
        angles.append(positions[:, axis].float()[:, None] * freqs[None, :])
    joint = torch.cat(angles, dim=1)  # (N, head_dim / 2)
    return joint.cos(), joint.sin()


# ---- attention ----------------------------------------------------------------------------------------

class SeamJointAttnProcessor:
    """diffusers' CogVideoX attention: text and video tokens projected by the same weights, q/k LayerNormed per
    head, the video q/k rotated (5B), ``softmax(QK^T)V`` through the seam with the text first."""

    def __init__(self, seam: AttentionSeam, layer: int) -> None:
        self.seam = seam
        self.layer = layer

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError("CogVideoX's attention needs the text tokens; run it through CogVideoXAdapter.run_blocks")
        text_len = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (B, L + N_local, width)
        # (B, S, H*D) -> (B, S, H, D)
        query = attn.norm_q(attn.to_q(joint).unflatten(-1, (attn.heads, -1)))
        key = attn.norm_k(attn.to_k(joint).unflatten(-1, (attn.heads, -1)))
        value = attn.to_v(joint).unflatten(-1, (attn.heads, -1))
        if image_rotary_emb is not None:  # the video tokens only, in float32 as diffusers
            cos, sin = image_rotary_emb  # (N_local, D / 2)
            query = torch.cat([query[:, :text_len], apply_rotary(query[:, text_len:].float(), cos, sin).type_as(query)],
                              dim=1)
            key = torch.cat([key[:, :text_len], apply_rotary(key[:, text_len:].float(), cos, sin).type_as(key)], dim=1)
        out = self.seam(query, key, value, text_len=text_len, layer=self.layer)
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(value.dtype)))  # (B, S, H, D) -> (B, S, width)
        return out[:, text_len:], out[:, :text_len]


# ---- the forward in pieces ----------------------------------------------------------------------------

@dataclass(frozen=True)
class CogVideoXBlockContext:
    """The per-forward inputs every block takes besides the hidden states."""

    temb: torch.Tensor  # (B, time_embed_dim) timestep embedding
    rotary: Optional[tuple[torch.Tensor, torch.Tensor]]  # cos, sin (N_local, head_dim / 2); None for sin-cos (2B)

    def state(self, hidden: torch.Tensor, encoder_hidden: torch.Tensor) -> "CogVideoXBlockState":
        return CogVideoXBlockState(hidden=hidden, encoder_hidden=encoder_hidden, context=self)


@dataclass
class CogVideoXBlockState:
    """What flows between blocks for one set of video tokens (all, a shard, or a patch)."""

    hidden: torch.Tensor  # (B, N_local, width) video tokens
    encoder_hidden: torch.Tensor  # (B, L, width) text tokens, whole on every rank, changed by every block
    context: CogVideoXBlockContext


class CogVideoXAdapter(AdapterBase):
    """One loaded CogVideoX 1.0 transformer and the sampling conventions around it."""

    family = "cogvideox"
    ANCHOR = "patch_embed.proj.weight"
    prediction: Prediction = V

    def __init__(self, transformer: CogVideoXTransformer3DModel, spec: CogVideoXSpec,
                 present: Optional[tuple[int, int]] = None) -> None:
        self.transformer = transformer.eval().requires_grad_(False)
        self.spec = spec
        self.latent_format = LATENT_FORMAT_5B if spec.rotary else LATENT_FORMAT_2B
        self.seam = AttentionSeam()
        self.blocks: list[torch.nn.Module] = list(transformer.transformer_blocks)
        self.present = present if present is not None else (0, len(self.blocks))
        for layer, block in enumerate(self.blocks):
            if not isinstance(block, AbsentBlock):
                block.attn1.set_processor(SeamJointAttnProcessor(self.seam, layer))

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", source: str = "checkpoint",
                        blocks: Optional[tuple[int, int]] = None,
                        spec: Optional[CogVideoXSpec] = None) -> "CogVideoXAdapter":
        """Build from diffusers-layout tensors; with ``blocks`` ([start, stop): one PipeFusion stage) only those
        blocks and the shared tensors are built (``state`` may then hold just those; pass the file's ``spec``)."""
        if spec is None:
            spec = infer_cogvideox_spec(state, source)
        transformer = build_stage_module(CogVideoXTransformer3DModel, spec.diffusers_config(), state, spec,
                                         block_index, cogvideox_to_diffusers, dtype, blocks)
        if hasattr(transformer.patch_embed, "pos_embedding"):
            # diffusers' unsaved sin-cos table (2B) was built on meta; we compute positions per token instead, and
            # diffusers' own forward rebuilds it for any grid but the training one
            transformer.patch_embed.pos_embedding = torch.zeros(0)
        assert not any(t.is_meta for t in transformer.state_dict().values()), "unloaded tensors on meta"
        log_loaded("CogVideoX", source, spec.num_layers, blocks, spec.hidden_size, dtype)
        return cls(transformer.to(device), spec, blocks)

    def default_sampling(self) -> ModelSampling:
        """CogVideoX's schedulers as ComfyUI's ModelSamplingDiscrete: scaled-linear betas, SNR shift (2B: 3.0,
        5B: 1.0), zero terminal SNR."""
        return SAMPLING_5B if self.spec.rotary else SAMPLING_2B

    # ---- latent <-> tokens ----------------------------------------------------------------------
    def check_latent(self, latent: torch.Tensor) -> None:
        channels = self.latent_format.channels
        if latent.ndim != 5 or latent.shape[1] != channels:
            raise ValueError(f"CogVideoX needs a video LATENT of shape (batch, {channels}, frames, h, w); got "
                             f"{tuple(latent.shape)}. Use EmptyHunyuanLatentVideo (or the CLI's --frames).")
        h, w = latent.shape[3], latent.shape[4]
        if h % PATCH or w % PATCH:
            raise ValueError(f"CogVideoX needs video height and width divisible by 16; got latent {h}x{w} "
                             f"(video {h * 8}x{w * 8})")

    def image_ids(self, height: int, width: int, frames: int = 1) -> torch.Tensor:
        """(T * H/2 * W/2, 3) float32 per-token positions, frame-major then row-major like the packing: rotary
        coordinates (5B) or the (frame, row, column) of the sin-cos table (2B)."""
        rows, cols = height // PATCH, width // PATCH
        if self.spec.rotary:
            return rotary_positions(frames, rows, cols)
        return token_grid(frames, rows, cols).float()

    def embed_context(self, image_ids: torch.Tensor, cond: Conditioning, sigma: torch.Tensor) -> CogVideoXBlockContext:
        """temb (B, time_embed_dim) for ``sigma`` (B,) at its nearest table timestep, and the rotary cos/sin of
        ``image_ids`` (N_local, 3) (5B). A PipeFusion stage after the first calls only this."""
        t = self.transformer
        timestep = self.default_sampling().timestep(sigma.detach().to("cpu", torch.float32)).float().to(self.device)
        temb = t.time_embedding(t.time_proj(timestep).to(self.dtype))  # (B,) -> (B, width) -> (B, time_embed_dim)
        rope = rotary(image_ids.to(self.device), self.spec.rotary_axes) if self.spec.rotary else None
        return CogVideoXBlockContext(temb=temb, rotary=rope)

    def embed(self, tokens: torch.Tensor, image_ids: torch.Tensor, cond: Conditioning,
              sigma: torch.Tensor) -> CogVideoXBlockState:
        """Embeddings for ``tokens`` (B, N_local, C*2*2) at positions ``image_ids`` (N_local, 3); sigma (B,)."""
        t = self.transformer
        dtype, device = self.dtype, self.device
        context, _ = cond.for_batch(tokens.shape[0])  # no pooled vector in CogVideoX
        hidden = patch_conv_as_linear(t.patch_embed.proj, tokens)  # (B, N_local, width)
        if not self.spec.rotary:  # the 2B's fixed table, computed for these tokens only
            hidden = hidden + sincos_positions(image_ids.to(device), self.spec.hidden_size, dtype)
        text = t.patch_embed.text_proj(context.to(device=device, dtype=dtype))  # (B, L, 4096) -> (B, L, width)
        return self.embed_context(image_ids, cond, sigma).state(hidden, text)

    def text_len(self, cond: Conditioning) -> int:
        return cond.context.shape[1]

    def run_blocks(self, state: CogVideoXBlockState, start: int, stop: int) -> CogVideoXBlockState:
        hidden, text, ctx = state.hidden, state.encoder_hidden, state.context
        for block in self.blocks[start:stop]:
            hidden, text = block(hidden_states=hidden, encoder_hidden_states=text, temb=ctx.temb,
                                 image_rotary_emb=ctx.rotary)
        return CogVideoXBlockState(hidden=hidden, encoder_hidden=text, context=ctx)

    def head(self, state: CogVideoXBlockState) -> torch.Tensor:
        """Final norms + projection: (B, N_local, width) -> (B, N_local, C*2*2) v-prediction in our packing
        (diffusers' token is already channel-major), float32."""
        t = self.transformer
        hidden = t.norm_out(t.norm_final(state.hidden), temb=state.context.temb)
        return t.proj_out(hidden).float()
