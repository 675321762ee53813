"""CogVideoX adapter over diffusers' ``CogVideoXTransformer3DModel`` (1.0 2B / 5B / 5B-I2V, 1.5 5B / 5B-I2V): video
latents (B, 16, T, H, W) and T5 tokens in, the model's v-prediction out, joint text + video attention through our one
seam.

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
CogVideoX 1.5 (``spec.patch_t`` 2): a token is 2 latent frames x 2x2, ordered (channel, frame, row, column) in and out
(diffusers' own order, ``pack_frame_pairs``), so T must be even (the pipeline pads 81 frames' 21 latent frames to 22
and drops the first after; we refuse an odd T naming the frame counts that work); rotary positions are the plain
(frame pair, row, column) indices (the pipeline's ``grid_type="slice"``).
Image-to-video (``spec.image_conditioning``: 32 channels in): diffusers' pipelines put the start image's latent (times
the VAE's scaling factor, 1.5: divided by it, ``invert_scale_latents``) in frame 0 and zeros after, concatenated after
the noisy latent's 16 channels. Ours comes as ``Conditioning.concat_latent`` (WanImageToVideo's layout, T frames;
where ``concat_mask`` says a frame is not given, 0: zeros), packed like the latent, each shard or patch taking the
rows of its own tokens by the index columns of ``image_ids``. 1.5 I2V adds its ``ofs`` embedding of 2.0 (the
pipeline's constant) to the timestep's; 1.0 5B-I2V adds its learned table's rows: the text's first L and, for the
video, the rows of the token's place in the sample grid, which the latent must be (diffusers refuses another size).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import CogVideoXTransformer3DModel

from ..attention import AttentionSeam
from ..conditioning import Conditioning, resize_to_batch
from ..latent_format import LatentFormat
from ..prediction import V, Prediction
from ..sigmas import DiscreteSchedule, ModelSampling
from . import packing
from .absent_block import AbsentBlock
from .adapter_base import AdapterBase, build_stage_module, log_loaded, patch_conv_as_linear
from .cogvideox_checkpoint import (PATCH, SAMPLE_HEIGHT, SAMPLE_WIDTH, TEMPORAL_COMPRESSION, CogVideoXSpec,
                                   block_index, cogvideox_to_diffusers, infer_cogvideox_spec, sincos_positions,
                                   token_grid)
from .qwen_image_rope import apply_rotary
from .wan_concat import center_resize

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
OFS = 2.0  # the I2V pipeline's ofs for CogVideoX 1.5 I2V (``latents.new_full((1,), fill_value=2.0)``)


# ---- tokens of 2 latent frames (1.5) ------------------------------------------------------------------

def pack_frame_pairs(latent: torch.Tensor, patch_t: int = 2) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T/patch_t * H/2 * W/2, C*patch_t*2*2): tokens frame-pair-major then row-major, each
    token's values (channel, frame, row, column), as diffusers' 1.5 patch embedding orders them."""
    b, c, t, h, w = latent.shape
    # (B, C, T/pt, pt, H/2, 2, W/2, 2) -> (B, T/pt, H/2, W/2, C, pt, 2, 2)
    x = latent.reshape(b, c, t // patch_t, patch_t, h // PATCH, PATCH, w // PATCH, PATCH)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (t // patch_t) * (h // PATCH) * (w // PATCH), c * patch_t * PATCH * PATCH)


def unpack_frame_pairs(tokens: torch.Tensor, height: int, width: int, frames: int, patch_t: int = 2) -> torch.Tensor:
    """The inverse of ``pack_frame_pairs``: (B, N, C*patch_t*2*2) -> (B, C, frames, height, width)."""
    b, _, d = tokens.shape
    c = d // (patch_t * PATCH * PATCH)
    # (B, T/pt, H/2, W/2, C, pt, 2, 2) -> (B, C, T/pt, pt, H/2, 2, W/2, 2)
    x = tokens.reshape(b, frames // patch_t, height // PATCH, width // PATCH, c, patch_t, PATCH, PATCH)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, c, frames, height, width)


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


def rotary_positions(frames: int, rows: int, cols: int, base_rows: int = SAMPLE_HEIGHT // PATCH,
                     base_cols: int = SAMPLE_WIDTH // PATCH) -> torch.Tensor:
    """(frames * rows * cols, 3) float32 rotary coordinates (frame, row, column) per token, frame-major then
    row-major: rows and columns spread over the grid's place in the base grid (the model's sample grid in tokens;
    ``torch.linspace`` as diffusers' ``get_3d_rotary_pos_embed``), frames 0 .. T-1."""
    (top, left), (bottom, right) = fit_in_base_grid(rows, cols, base_rows, base_cols)
    axis_t = torch.linspace(0, frames * (frames - 1) / frames, frames, dtype=torch.float32)
    axis_h = torch.linspace(top, bottom * (rows - 1) / rows, rows, dtype=torch.float32)
    axis_w = torch.linspace(left, right * (cols - 1) / cols, cols, dtype=torch.float32)
    grid = token_grid(frames, rows, cols)  # (N, 3) indices
    return torch.stack([axis_t[grid[:, 0]], axis_h[grid[:, 1]], axis_w[grid[:, 2]]], dim=1)


def slice_positions(frames: int, rows: int, cols: int) -> torch.Tensor:
    """(frames * rows * cols, 3) float32 rotary coordinates of CogVideoX 1.5: the plain (frame pair, row, column)
    indices (diffusers' ``grid_type="slice"``)."""
    return token_grid(frames, rows, cols).float()


def token_index(image_ids: torch.Tensor) -> torch.Tensor:
    """(N_local,) int64 packed index of each token from the index columns of ``image_ids`` (positions (3), then
    (frame, row, column, frames, rows, columns) in tokens): frame-major, then row-major, as the packing."""
    ids = image_ids[:, 3:].to(torch.int64)
    return (ids[:, 0] * ids[:, 4] + ids[:, 1]) * ids[:, 5] + ids[:, 2]


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
    """One loaded CogVideoX transformer and the sampling conventions around it."""

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
        if hasattr(transformer.patch_embed, "pos_embedding") and not spec.learned_positions:
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
    def pack(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, N, C*patch_t*2*2) tokens (1.0: ``packing.pack``)."""
        if self.spec.patch_t == 1:
            return packing.pack(latent)
        return pack_frame_pairs(latent, self.spec.patch_t)

    def unpack(self, tokens: torch.Tensor, height: int, width: int, frames: Optional[int] = None) -> torch.Tensor:
        if self.spec.patch_t == 1:
            return packing.unpack(tokens, height, width, frames=frames)
        return unpack_frame_pairs(tokens, height, width, frames, self.spec.patch_t)

    def noise_pack(self):
        """What packs a LATENT-shaped noise draw like the tokens: a picklable function (ranks build plans)."""
        if self.spec.patch_t == 1:
            return packing.pack
        return functools.partial(pack_frame_pairs, patch_t=self.spec.patch_t)

    def check_latent(self, latent: torch.Tensor) -> None:
        channels = self.latent_format.channels
        if latent.ndim != 5 or latent.shape[1] != channels:
            raise ValueError(f"CogVideoX needs a video LATENT of shape (batch, {channels}, frames, h, w); got "
                             f"{tuple(latent.shape)}. Use EmptyHunyuanLatentVideo (or the CLI's --frames).")
        frames, h, w = latent.shape[2], latent.shape[3], latent.shape[4]
        if h % PATCH or w % PATCH:
            raise ValueError(f"CogVideoX needs video height and width divisible by 16; got latent {h}x{w} "
                             f"(video {h * 8}x{w * 8})")
        pt = self.spec.patch_t
        if frames % pt:
            lower, upper = (frames - frames % pt), frames + pt - frames % pt
            options = " or ".join(f"{(n - 1) * TEMPORAL_COMPRESSION + 1} ({n} latent frames)"
                                  for n in (lower, upper) if n > 0)
            raise ValueError(f"CogVideoX 1.5 packs {pt} latent frames per token, so the latent needs a multiple of "
                             f"{pt} frames; got {frames} (video {(frames - 1) * TEMPORAL_COMPRESSION + 1} frames). Use "
                             f"{options} video frames (EmptyHunyuanLatentVideo's length, the CLI's --frames); "
                             f"diffusers' pipeline pads 81 frames' 21 latent frames to 22 the same way")
        spec = self.spec
        sample_frames = (spec.sample_frames - 1) // TEMPORAL_COMPRESSION + 1
        if spec.learned_positions and (h, w, frames) != (spec.sample_height, spec.sample_width, sample_frames):
            raise ValueError(f"this CogVideoX image-to-video model's learned positions cover only its training size, "
                             f"{spec.sample_width * 8}x{spec.sample_height * 8} px x {spec.sample_frames} frames "
                             f"(latent {sample_frames} x {spec.sample_height} x {spec.sample_width}); got latent "
                             f"{frames} x {h} x {w}. Use that width, height and length (diffusers refuses others too)")

    @property
    def _indexed(self) -> bool:
        """Whether ``image_ids`` carries each token's index (a shard then cuts its rows of the start latent or the
        learned table)."""
        return self.spec.image_conditioning or self.spec.learned_positions

    def image_ids(self, height: int, width: int, frames: int = 1) -> torch.Tensor:
        """(N, 3) float32 per-token positions, frame-major then row-major like the packing: rotary coordinates
        (5B; 1.5: plain indices of frame pairs) or the (frame, row, column) of the sin-cos table (2B). An I2V or
        learned-table model's: (N, 9), the positions then the token's (frame, row, column) and the whole grid's
        (frames, rows, columns), in tokens."""
        frames, rows, cols = frames // self.spec.patch_t, height // PATCH, width // PATCH
        if self.spec.patch_t > 1:
            positions = slice_positions(frames, rows, cols)
        elif self.spec.rotary:
            positions = rotary_positions(frames, rows, cols, self.spec.sample_height // PATCH,
                                         self.spec.sample_width // PATCH)
        else:
            positions = token_grid(frames, rows, cols).float()
        if not self._indexed:
            return positions
        grid = torch.tensor([frames, rows, cols], dtype=torch.float32).expand(positions.shape[0], 3)
        return torch.cat([positions, token_grid(frames, rows, cols).float(), grid], dim=1)

    # ---- image-to-video --------------------------------------------------------------------------
    @property
    def image_scale(self) -> float:
        """What the pipeline multiplies the start image's VAE latent by: the VAE's scaling factor (1.0), its
        inverse for 1.5 (its VAE's ``invert_scale_latents``)."""
        factor = self.latent_format.scale_factor
        return 1.0 / factor if self.spec.patch_t > 1 else factor

    def concat_latent(self, cond: Conditioning, shape: tuple[int, ...]) -> torch.Tensor:
        """(B, extra, T, H, W) float32 channels after the noisy latent's for a noise of ``shape``: the start latent
        (resized to the noise's size as ComfyUI's ``common_upscale``, scaled as the pipeline), 0 where
        ``concat_mask`` is 1 (frames not given) and in frames past it; zeros without one."""
        batch, _, frames, height, width = shape
        extra = self.spec.extra_channels
        image = cond.concat_latent
        if image is None:
            return torch.zeros(batch, extra, frames, height, width)
        if image.shape[1] != extra:
            raise ValueError(f"the start-frame latent has {image.shape[1]} channels; this CogVideoX image-to-video "
                             f"model takes {extra} (its VAE's latent)")
        image = center_resize(image.float(), height, width) * self.image_scale
        if cond.concat_mask is not None:  # ComfyUI's mask: 1 where a frame is not given
            mask = center_resize(cond.concat_mask.float().mean(dim=1, keepdim=True), height, width)
            image = image * (1.0 - mask[:, :, :image.shape[2]])
        if image.shape[2] < frames:  # the pipeline's zeros after the given frames
            image = torch.nn.functional.pad(image, (0, 0, 0, 0, 0, frames - image.shape[2]))
        return resize_to_batch(image[:, :, :frames], batch)

    def concat_tokens(self, cond: Conditioning, batch: int, image_ids: torch.Tensor) -> torch.Tensor:
        """(batch, N_local, extra*patch_t*2*2): the packed ``concat_latent`` rows of the tokens at ``image_ids``."""
        frames, rows, cols = (int(n) for n in image_ids[0, 6:9])
        shape = (batch, self.spec.out_channels, frames * self.spec.patch_t, rows * PATCH, cols * PATCH)
        packed = self.pack(self.concat_latent(cond, shape))  # (B, N, extra*patch_t*2*2)
        return packed[:, token_index(image_ids).to(packed.device)]  # (B, N_local, extra*patch_t*2*2)

    def embed_context(self, image_ids: torch.Tensor, cond: Conditioning, sigma: torch.Tensor) -> CogVideoXBlockContext:
        """temb (B, time_embed_dim) for ``sigma`` (B,) at its nearest table timestep, and the rotary cos/sin of
        ``image_ids`` (N_local, 3) (5B). A PipeFusion stage after the first calls only this."""
        t = self.transformer
        timestep = self.default_sampling().timestep(sigma.detach().to("cpu", torch.float32)).float().to(self.device)
        temb = t.time_embedding(t.time_proj(timestep).to(self.dtype))  # (B,) -> (B, width) -> (B, time_embed_dim)
        if self.spec.ofs:  # 1.5 I2V: (1,) -> (1, ofs_dim) -> (1, time_embed_dim), added to every row
            ofs = torch.full((1,), OFS, device=self.device)
            temb = temb + t.ofs_embedding(t.ofs_proj(ofs).to(self.dtype))
        rope = rotary(image_ids[:, :3].to(self.device), self.spec.rotary_axes) if self.spec.rotary else None
        return CogVideoXBlockContext(temb=temb, rotary=rope)

    def embed(self, tokens: torch.Tensor, image_ids: torch.Tensor, cond: Conditioning,
              sigma: torch.Tensor) -> CogVideoXBlockState:
        """Embeddings for ``tokens`` (B, N_local, C*patch_t*2*2) at positions ``image_ids`` (N_local, 3 or 9);
        sigma (B,)."""
        t, spec = self.transformer, self.spec
        dtype, device = self.dtype, self.device
        batch = tokens.shape[0]
        context, _ = cond.for_batch(batch)  # no pooled vector in CogVideoX
        if spec.image_conditioning:  # the start latent's channels after the noise's, in each token
            extra = self.concat_tokens(cond, batch, image_ids).to(device=device, dtype=tokens.dtype)
            tokens = torch.cat([tokens, extra], dim=-1)  # (B, N_local, 2C*patch_t*2*2)
        if spec.patch_t == 1:
            hidden = patch_conv_as_linear(t.patch_embed.proj, tokens)  # (B, N_local, width)
        else:
            hidden = t.patch_embed.proj(tokens.to(device=device, dtype=dtype))  # (B, N_local, width)
        if not spec.rotary:  # the 2B's fixed table, computed for these tokens only
            hidden = hidden + sincos_positions(image_ids.to(device), spec.hidden_size, dtype)
        text = t.patch_embed.text_proj(context.to(device=device, dtype=dtype))  # (B, L, 4096) -> (B, L, width)
        if spec.learned_positions:  # the table's text rows, then the rows of these tokens' places
            table = t.patch_embed.pos_embedding[0].to(dtype)  # (max_text_len + sample tokens, width)
            if text.shape[1] > spec.max_text_len:
                raise ValueError(f"this CogVideoX model's learned positions cover {spec.max_text_len} text tokens; "
                                 f"got {text.shape[1]}: encode the prompt to at most {spec.max_text_len} T5 tokens")
            text = text + table[:text.shape[1]]
            hidden = hidden + table[spec.max_text_len + token_index(image_ids).to(device)]
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
        """Final norms + projection: (B, N_local, width) -> (B, N_local, C*patch_t*2*2) v-prediction in our packing
        (diffusers' token is already channel-major), float32."""
        t = self.transformer
        hidden = t.norm_out(t.norm_final(state.hidden), temb=state.context.temb)
        return t.proj_out(hidden).float()
