"""Qwen-Image adapter over diffusers' ``QwenImageTransformer2DModel``: ComfyUI latents and conditioning
in, the model's velocity out, attention through our one seam.

Same piecewise forward as the Flux and SD3 adapters (``embed`` -> ``run_blocks`` -> ``head``), so every
parallel mode runs it unchanged. What is particular to Qwen-Image, all kept inside here:
- rotary positions are computed per token from ``image_ids`` (``qwen_image_rope.py``), as ComfyUI
  computes them, so a sequence shard or a PipeFusion patch embeds only its own tokens and the text
  still sits where the whole image puts it;
- every block is dual-stream (no single blocks, no ``context_pre_only``); the text is RMS-normed
  before its projection, and there is no pooled vector: the timestep alone modulates;
- the timestep is sigma itself (ComfyUI's ModelSamplingFlux), scaled by 1000 inside the sinusoidal
  embedding, in float32;
- tokens are packed as ours (2x2, channel-major), so no reordering at the edges;
- the latent format is ComfyUI's Wan21 per-channel mean/std.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

from ..attention import AttentionSeam
from ..conditioning import Conditioning
from ..latent_format import QWEN_IMAGE_LATENT_FORMAT, PerChannelLatentFormat
from ..sigmas import FluxShift, ModelSampling
from .absent_block import AbsentBlock
from .adapter_base import AdapterBase, build_stage_module, log_loaded
from .qwen_image_checkpoint import PATCH, QwenImageSpec, block_index, comfy_to_diffusers, infer_qwen_image_spec
from .qwen_image_rope import THETA, apply_rotary, image_positions, joint_positions, rotary

logger = logging.getLogger(__name__)

DEFAULT_SHIFT = 1.15  # ComfyUI's QwenImage sampling settings (ModelSamplingFlux, multiplier 1.0)


class SeamQwenAttnProcessor:
    """diffusers' Qwen-Image joint attention with ``softmax(QK^T)V`` through the seam, text first as both
    the seam and Qwen-Image order it."""

    def __init__(self, seam: AttentionSeam, layer: int) -> None:
        self.seam = seam
        self.layer = layer

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 encoder_hidden_states_mask: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None or image_rotary_emb is None:
            raise ValueError("Qwen-Image attention needs the text stream and the rotary positions; run it "
                             "through QwenImageAdapter.run_blocks")
        if encoder_hidden_states_mask is not None or attention_mask is not None:
            raise ValueError("Qwen-Image through the xDiT seam takes no attention mask (ComfyUI passes none)")
        heads = attn.heads
        # (B, N, H*D) -> (B, N, H, D)
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (heads, -1)))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (heads, -1)))
        value = attn.to_v(hidden_states).unflatten(-1, (heads, -1))
        # (B, L, H*D) -> (B, L, H, D)
        e_query = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (heads, -1)))
        e_key = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (heads, -1)))
        e_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (heads, -1))
        text_len = encoder_hidden_states.shape[1]
        # text first: (B, L + N, H, D)
        query = torch.cat([e_query, query], dim=1)
        key = torch.cat([e_key, key], dim=1)
        value = torch.cat([e_value, value], dim=1)
        cos, sin = image_rotary_emb  # (L + N, D/2) each
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        out = self.seam(query, key, value, text_len=text_len, layer=self.layer)
        out = out.flatten(2, 3).to(query.dtype)  # (B, S, H, D) -> (B, S, H*D)
        text_out, image_out = out[:, :text_len], out[:, text_len:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


@dataclass(frozen=True)
class QwenImageBlockContext:
    """The per-forward inputs every block takes besides the hidden states."""

    temb: torch.Tensor  # (B, hidden) timestep embedding
    rotary: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (L + N_local, head_dim / 2)

    def state(self, hidden: torch.Tensor, encoder_hidden: torch.Tensor) -> "QwenImageBlockState":
        return QwenImageBlockState(hidden=hidden, encoder_hidden=encoder_hidden, temb=self.temb, rotary=self.rotary)


@dataclass
class QwenImageBlockState:
    """What flows between dual-stream blocks for one set of image tokens (all, a shard, or a patch)."""

    hidden: torch.Tensor  # (B, N_local, hidden) image tokens
    encoder_hidden: torch.Tensor  # (B, L, hidden) text tokens, whole on every rank
    temb: torch.Tensor  # (B, hidden)
    rotary: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (L + N_local, head_dim / 2)


class QwenImageAdapter(AdapterBase):
    """One loaded Qwen-Image transformer and the ComfyUI conventions around it."""

    family = "qwen-image"
    latent_format: PerChannelLatentFormat = QWEN_IMAGE_LATENT_FORMAT
    ANCHOR = "img_in.weight"

    def __init__(self, transformer: QwenImageTransformer2DModel, spec: QwenImageSpec,
                 present: Optional[tuple[int, int]] = None) -> None:
        self.transformer = transformer.eval().requires_grad_(False)
        self.spec = spec
        self.seam = AttentionSeam()
        self.blocks: list[torch.nn.Module] = list(transformer.transformer_blocks)
        self.present = present if present is not None else (0, len(self.blocks))
        for layer, block in enumerate(self.blocks):
            if not isinstance(block, AbsentBlock):
                block.attn.set_processor(SeamQwenAttnProcessor(self.seam, layer))

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", source: str = "checkpoint",
                        blocks: Optional[tuple[int, int]] = None,
                        spec: Optional[QwenImageSpec] = None) -> "QwenImageAdapter":
        """Build from ComfyUI-layout tensors; with ``blocks`` ([start, stop): one PipeFusion stage) only those
        blocks and the shared tensors are built (``state`` may then hold just those; pass the file's ``spec``)."""
        if spec is None:
            spec = infer_qwen_image_spec(state, source)
        transformer = build_stage_module(QwenImageTransformer2DModel, spec.diffusers_config(), state, spec,
                                         block_index, comfy_to_diffusers, dtype, blocks)
        # diffusers' own rotary table (not a buffer) was built on meta; rebuild it so the module's forward works
        transformer.pos_embed = QwenEmbedRope(theta=THETA, axes_dim=list(spec.axes_dims_rope), scale_rope=True)
        assert not any(t.is_meta for t in transformer.state_dict().values()), "unloaded tensors on meta"
        log_loaded("Qwen-Image", source, spec.num_layers, blocks, spec.hidden_size, dtype)
        return cls(transformer.to(device), spec, blocks)

    def default_sampling(self) -> ModelSampling:
        """ComfyUI's QwenImage model sampling: ModelSamplingFlux, shift 1.15 (timestep = sigma)."""
        return FluxShift(shift=DEFAULT_SHIFT)

    # ---- latent <-> tokens ----------------------------------------------------------------------
    def check_latent(self, latent: torch.Tensor) -> None:
        channels = self.latent_format.channels
        if latent.ndim == 5:
            raise ValueError(f"got a Qwen-Image LATENT with a frame axis {tuple(latent.shape)} (what VAEEncode "
                             f"with the Qwen-Image VAE gives); the xDiT sampler takes (batch, {channels}, h, w): "
                             f"start from EmptySD3LatentImage, or use the stock KSampler for image-to-image")
        if latent.ndim != 4 or latent.shape[1] != channels:
            raise ValueError(f"Qwen-Image needs a LATENT of shape (batch, {channels}, h, w); got "
                             f"{tuple(latent.shape)}. Use EmptySD3LatentImage (16 channels) for Qwen-Image.")
        if latent.shape[2] % PATCH or latent.shape[3] % PATCH:
            raise ValueError(f"Qwen-Image needs image height and width divisible by 16; got latent "
                             f"{latent.shape[2]}x{latent.shape[3]} (image {latent.shape[2] * 8}x{latent.shape[3] * 8})")

    @staticmethod
    def image_ids(height: int, width: int) -> torch.Tensor:
        """(H/2 * W/2, 4) per-token (frame, row, col, text_start), row-major like the packing."""
        return image_positions(height // PATCH, width // PATCH)

    # ---- forward in pieces ----------------------------------------------------------------------
    def embed_context(self, image_ids: torch.Tensor, cond: Conditioning, sigma: torch.Tensor) -> QwenImageBlockContext:
        """temb (B, hidden) for ``sigma`` (B,) and the rotary cos/sin of the text positions followed by
        ``image_ids`` (N_local, 4). A PipeFusion stage after the first calls only this."""
        t = self.transformer
        # The timestep (= sigma) stays float32 through the sinusoidal embedding (x1000 inside it), which is
        # cast to the model dtype only afterwards, as ComfyUI does.
        timestep = sigma.to(device=self.device, dtype=torch.float32)
        embedder = t.time_text_embed
        temb = embedder.timestep_embedder(embedder.time_proj(timestep).to(self.dtype))
        positions = joint_positions(image_ids.to(self.device), cond.context.shape[1])  # (L + N_local, 3)
        return QwenImageBlockContext(temb=temb, rotary=rotary(positions, self.spec.axes_dims_rope))

    def embed(self, tokens: torch.Tensor, image_ids: torch.Tensor, cond: Conditioning,
              sigma: torch.Tensor) -> QwenImageBlockState:
        """Embeddings for ``tokens`` (B, N_local, C*2*2) at positions ``image_ids`` (N_local, 4); sigma (B,)."""
        t = self.transformer
        dtype, device = self.dtype, self.device
        context, _ = cond.for_batch(tokens.shape[0])  # no pooled vector in Qwen-Image
        ctx = self.embed_context(image_ids, cond, sigma)
        encoder_hidden = t.txt_in(t.txt_norm(context.to(device=device, dtype=dtype)))
        return ctx.state(t.img_in(tokens.to(device=device, dtype=dtype)), encoder_hidden)

    def text_len(self, cond: Conditioning) -> int:
        return cond.context.shape[1]

    def run_blocks(self, state: QwenImageBlockState, start: int, stop: int) -> QwenImageBlockState:
        enc, hidden = state.encoder_hidden, state.hidden
        for block in self.blocks[start:stop]:
            enc, hidden = block(hidden_states=hidden, encoder_hidden_states=enc, encoder_hidden_states_mask=None,
                                temb=state.temb, image_rotary_emb=state.rotary)
        return QwenImageBlockState(hidden=hidden, encoder_hidden=enc, temb=state.temb, rotary=state.rotary)

    def head(self, state: QwenImageBlockState) -> torch.Tensor:
        """Final norm + projection: (B, N_local, hidden) -> (B, N_local, C*2*2) velocity in our packing, float32."""
        t = self.transformer
        return t.proj_out(t.norm_out(state.hidden, state.temb)).float()
