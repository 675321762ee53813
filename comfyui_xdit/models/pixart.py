"""PixArt-alpha / PixArt-sigma adapter over diffusers' ``PixArtTransformer2DModel``: ComfyUI latents and
T5 tokens in, the model's noise prediction out, image self-attention through our one seam.

Same piecewise forward as the other adapters (``embed`` -> ``run_blocks`` -> ``head``), so every
parallel mode runs it unchanged. What is PixArt's, all kept inside here:
- an EPS model on a discrete DDPM schedule (``prediction = EPS``, ``default_sampling``); the sampler
  hands the model ``x / sqrt(sigma^2 + 1)`` and a timestep that is the nearest table entry of sigma;
- the text enters by cross-attention: only the image self-attention goes through the seam (no text
  tokens in it), the cross-attention runs locally on this rank's image tokens against the whole caption,
  so sequence shards and PipeFusion patches attend to the same text as the whole latent, and no K/V of
  it is buffered;
- positions are PixArt's 2-D sin-cos embedding with ComfyUI's per-resolution base size and interpolation,
  computed per token from ``image_ids`` (row, column, rows, columns), so a shard or patch embeds right;
- PixArt-alpha's micro-conditions (resolution, aspect ratio) from the conditioning or, as ComfyUI does
  without them, from the latent;
- learned sigma: of the 8 predicted channels the first 4 (eps) are the output, reordered into our packing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import PixArtTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from ..attention import AttentionSeam, sdpa
from ..conditioning import Conditioning
from ..latent_format import SD15_LATENT_FORMAT, SDXL_LATENT_FORMAT, LatentFormat
from ..prediction import EPS, Prediction
from ..sigmas import DiscreteSchedule, ModelSampling
from .absent_block import AbsentBlock
from .adapter_base import AdapterBase, build_stage_module, log_loaded, patch_conv_as_linear
from .pixart_checkpoint import MIN_MEAN_SIDE, PATCH, PixArtSpec, block_index, infer_pixart_spec, pixart_to_diffusers

logger = logging.getLogger(__name__)

# ComfyUI's PixArtAlpha / PixArtSigma sampling settings (comfy/supported_models.py)
PIXART_SAMPLING = DiscreteSchedule(beta_schedule="sqrt_linear", linear_start=0.0001, linear_end=0.02, timesteps=1000)


class SeamSelfAttnProcessor:
    """diffusers' image self-attention (``attn1``) with ``softmax(QK^T)V`` through the seam, no text tokens."""

    def __init__(self, seam: AttentionSeam, layer: int) -> None:
        self.seam = seam
        self.layer = layer

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, **kwargs: object) -> torch.Tensor:
        # (B, N, H*D) -> (B, N, H, D)
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        out = self.seam(query, key, value, text_len=0, layer=self.layer)
        out = out.flatten(2, 3).to(query.dtype)  # (B, N, H, D) -> (B, N, H*D)
        return attn.to_out[1](attn.to_out[0](out))


class LocalCrossAttnProcessor:
    """diffusers' cross-attention (``attn2``): this rank's image tokens against the whole caption, locally."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, **kwargs: object) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("PixArt's cross-attention needs the caption tokens")
        # (B, N, H*D) -> (B, N, H, D); (B, L, H*D) -> (B, L, H, D)
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
        out = sdpa(query, key, value).flatten(2, 3).to(query.dtype)  # (B, N, H, D) -> (B, N, H*D)
        return attn.to_out[1](attn.to_out[0](out))


@dataclass(frozen=True)
class PixArtBlockContext:
    """The per-forward inputs every block takes besides the hidden states."""

    temb: torch.Tensor  # (B, 6 * hidden) the blocks' modulation (adaln_single's linear of the embedding)
    embedded: torch.Tensor  # (B, hidden) the timestep (+ micro-condition) embedding, for the final layer

    def state(self, hidden: torch.Tensor, encoder_hidden: torch.Tensor) -> "PixArtBlockState":
        return PixArtBlockState(hidden=hidden, encoder_hidden=encoder_hidden, temb=self.temb, embedded=self.embedded)


@dataclass
class PixArtBlockState:
    """What flows between blocks for one set of image tokens (all, a shard, or a patch)."""

    hidden: torch.Tensor  # (B, N_local, hidden) image tokens
    encoder_hidden: torch.Tensor  # (B, L, hidden) projected caption, whole on every rank, unchanged by blocks
    temb: torch.Tensor  # (B, 6 * hidden)
    embedded: torch.Tensor  # (B, hidden)


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """ComfyUI's ``get_1d_sincos_pos_embed_from_grid_torch`` in ``positions``' dtype: (M,) -> (M, embed_dim)."""
    omega = torch.arange(embed_dim // 2, device=positions.device, dtype=positions.dtype)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega  # (D/2,)
    out = torch.einsum("m,d->md", positions.reshape(-1), omega)  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, D)


class PixArtAdapter(AdapterBase):
    """One loaded PixArt transformer and the ComfyUI conventions around it."""

    prediction: Prediction = EPS
    ANCHOR = "pos_embed.proj.weight"

    def __init__(self, transformer: PixArtTransformer2DModel, spec: PixArtSpec,
                 present: Optional[tuple[int, int]] = None) -> None:
        self.transformer = transformer.eval().requires_grad_(False)
        self.spec = spec
        self.family = spec.family
        self.latent_format: LatentFormat = SD15_LATENT_FORMAT if spec.micro_condition else SDXL_LATENT_FORMAT
        self.seam = AttentionSeam()
        self.blocks: list[torch.nn.Module] = list(transformer.transformer_blocks)
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
                        blocks: Optional[tuple[int, int]] = None, spec: Optional[PixArtSpec] = None) -> "PixArtAdapter":
        """Build from PixArt tensors; with ``blocks`` ([start, stop): one PipeFusion stage) only those blocks
        and the shared tensors are built (``state`` may then hold just those; pass the file's ``spec``)."""
        if spec is None:
            spec = infer_pixart_spec(state, source)
        config = spec.diffusers_config()
        transformer = build_stage_module(PixArtTransformer2DModel, config, state, spec, block_index,
                                         pixart_to_diffusers, dtype, blocks)
        # diffusers' own (non-persistent) position table, for its forward only: build it for real
        embed = transformer.pos_embed
        table = get_2d_sincos_pos_embed(embed.proj.weight.shape[0], config["sample_size"] // PATCH,
                                        base_size=embed.base_size, interpolation_scale=embed.interpolation_scale)
        embed.register_buffer("pos_embed", table.float().unsqueeze(0), persistent=False)
        log_loaded(spec.family, source, spec.num_layers, blocks, spec.hidden_size, dtype)
        return cls(transformer.to(device), spec, blocks)

    def default_sampling(self) -> ModelSampling:
        """ComfyUI's PixArt model sampling: discrete, sqrt_linear betas 0.0001 .. 0.02 over 1000 steps."""
        return PIXART_SAMPLING

    # ---- latent <-> tokens ----------------------------------------------------------------------
    def check_latent(self, latent: torch.Tensor) -> None:
        channels, title = self.latent_format.channels, self.spec.family
        if latent.ndim != 4 or latent.shape[1] != channels:
            vae = "SD1.5" if self.spec.micro_condition else "SDXL"
            raise ValueError(f"{title} needs a LATENT of shape (batch, {channels}, h, w); got {tuple(latent.shape)}. "
                             f"Use EmptyLatentImage (4 channels) or VAEEncode with the {vae} VAE.")
        h, w = latent.shape[2], latent.shape[3]
        if h % PATCH or w % PATCH:
            raise ValueError(f"{title} needs image height and width divisible by 16; got latent {h}x{w} "
                             f"(image {h * 8}x{w * 8})")
        if (h + w) // 2 < MIN_MEAN_SIDE:
            raise ValueError(f"{title} needs (width + height) / 2 of at least {MIN_MEAN_SIDE * 8} px (ComfyUI's "
                             f"position embedding divides by zero below it); got {w * 8}x{h * 8}: use a larger "
                             f"width and height")

    def image_ids(self, height: int, width: int) -> torch.Tensor:
        """(H/2 * W/2, 4) int64 per token, row-major like the packing: (row, column, rows, columns)."""
        rows, cols = height // PATCH, width // PATCH
        grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1)
        grid = grid.reshape(rows * cols, 2)  # (rows, cols, 2) -> (N, 2)
        return torch.cat([grid, torch.tensor([rows, cols]).expand(rows * cols, 2)], dim=1)

    def positions(self, image_ids: torch.Tensor) -> torch.Tensor:
        """(N_local, hidden) PixArt's 2-D sin-cos position of each token as ComfyUI computes it for the whole
        image (base size and interpolation from its mean side), in the model's dtype."""
        rows, cols = int(image_ids[0, 2]), int(image_ids[0, 3])
        mean_side = (rows * PATCH + cols * PATCH) // 2  # ComfyUI's c_res, in latent pixels
        interpolation = self.spec.pe_interpolation
        if interpolation is None:
            interpolation = round(mean_side / (512 / 8.0), 0)
        base_size = (round(mean_side / 64) * 64) // PATCH
        ids = image_ids.to(self.device)
        grid_h = ids[:, 0].to(self.dtype) / (rows / base_size) / interpolation  # (N_local,)
        grid_w = ids[:, 1].to(self.dtype) / (cols / base_size) / interpolation
        half = self.hidden_size // 2
        return torch.cat([sincos_1d(half, grid_w), sincos_1d(half, grid_h)], dim=1)  # (N_local, hidden)

    # ---- forward in pieces ----------------------------------------------------------------------
    def _micro_conditions(self, image_ids: torch.Tensor, cond: Conditioning, batch: int) -> dict[str, torch.Tensor]:
        """PixArt-alpha's (B, 2) resolution (height, width px) and (B, 1) aspect ratio: the conditioning's, else
        the latent's (ComfyUI's fallback); none for PixArt-sigma."""
        if not self.spec.micro_condition:
            return {"resolution": None, "aspect_ratio": None}
        height, width = int(image_ids[0, 2]) * PATCH, int(image_ids[0, 3]) * PATCH  # latent pixels
        if cond.resolution is not None:  # ComfyUI's extra_conds: FloatTensor, then the model's dtype
            size = torch.FloatTensor([list(cond.resolution)])
            ratio = torch.FloatTensor([[cond.aspect_ratio if cond.aspect_ratio is not None
                                        else cond.resolution[0] / cond.resolution[1]]])
        else:
            size = torch.tensor([height * 8, width * 8], dtype=self.dtype)[None]
            ratio = torch.tensor([height / width], dtype=self.dtype)[None]
        # (1, 2) / (1, 1) -> (B, 2) / (B, 1)
        return {"resolution": size.to(device=self.device, dtype=self.dtype).repeat(batch, 1),
                "aspect_ratio": ratio.to(device=self.device, dtype=self.dtype).repeat(batch, 1)}

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """(B,) ComfyUI's timestep of ``sigma``: the index of the nearest table entry, as float32."""
        return PIXART_SAMPLING.timestep(sigma.detach().to("cpu", torch.float32)).float().to(self.device)

    def embed_context(self, image_ids: torch.Tensor, cond: Conditioning, sigma: torch.Tensor) -> PixArtBlockContext:
        """The blocks' modulation (B, 6 * hidden) and the final layer's embedding (B, hidden) for ``sigma`` (B,)."""
        batch = sigma.shape[0]
        micro = self._micro_conditions(image_ids, cond, batch)
        temb, embedded = self.transformer.adaln_single(self.timestep(sigma), micro, batch_size=batch,
                                                       hidden_dtype=self.dtype)
        return PixArtBlockContext(temb=temb, embedded=embedded)

    def embed(self, tokens: torch.Tensor, image_ids: torch.Tensor, cond: Conditioning,
              sigma: torch.Tensor) -> PixArtBlockState:
        """Embeddings for ``tokens`` (B, N_local, C*2*2) (the model input) at positions ``image_ids`` (N_local, 4)."""
        t = self.transformer
        dtype, device = self.dtype, self.device
        context, _ = cond.for_batch(tokens.shape[0])
        hidden = patch_conv_as_linear(t.pos_embed.proj, tokens)  # (B, N_local, hidden)
        hidden = hidden + self.positions(image_ids)
        ctx = self.embed_context(image_ids, cond, sigma)
        caption = t.caption_projection(context.to(device=device, dtype=dtype))  # (B, L, 4096) -> (B, L, hidden)
        return ctx.state(hidden, caption)

    def text_len(self, cond: Conditioning) -> int:
        """Caption tokens carried between PipeFusion stages (none of them enter the seam)."""
        return cond.context.shape[1]

    def run_blocks(self, state: PixArtBlockState, start: int, stop: int) -> PixArtBlockState:
        hidden = state.hidden
        for block in self.blocks[start:stop]:
            hidden = block(hidden, encoder_hidden_states=state.encoder_hidden, timestep=state.temb)
        return PixArtBlockState(hidden=hidden, encoder_hidden=state.encoder_hidden, temb=state.temb,
                                embedded=state.embedded)

    def head(self, state: PixArtBlockState) -> torch.Tensor:
        """Final norm + projection: (B, N_local, hidden) -> (B, N_local, C*2*2) eps in our packing, float32."""
        t = self.transformer
        # (1, 2, hidden) + (B, 1, hidden) -> shift, scale (B, 1, hidden) each
        shift, scale = (t.scale_shift_table[None] + state.embedded[:, None]).chunk(2, dim=1)
        out = t.proj_out(t.norm_out(state.hidden) * (1 + scale) + shift).float()
        b, n, _ = out.shape
        # diffusers orders a token (p, q, c) over the 8 learned-sigma channels; keep eps (c < 4) in ours (c, p, q):
        # (B, N, 2, 2, 8) -> (B, N, 2, 2, 4) -> (B, N, 4, 2, 2)
        eps = out.view(b, n, PATCH, PATCH, -1)[..., :self.spec.in_channels]
        return eps.permute(0, 1, 4, 2, 3).reshape(b, n, -1)
