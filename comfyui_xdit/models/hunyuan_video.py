"""HunyuanVideo text-to-video adapter over diffusers' ``HunyuanVideoTransformer3DModel``: ComfyUI video latents
(B, 16, T, H, W), llama tokens and a CLIP-L pooled vector in, the model's velocity out, joint attention through
our one seam.

Same piecewise forward as the other adapters (``embed`` -> ``run_blocks`` -> ``head``). What is HunyuanVideo's,
all kept inside here:
- Flux-like blocks: double-stream blocks, then single-stream blocks, each attending jointly over the text and
  the video tokens (text whole on every rank, first in the seam); a single block's text rides along as the
  state's ``encoder_hidden`` so every block takes and gives the same state;
- the token refiner: the text tokens go through two refiner blocks (timestep + mean text vector modulated),
  locally on every rank; ComfyUI's mean counts every token, padding included. A text mask (ComfyUI's
  ``attention_mask``) hides the padding as keys everywhere, which is the same as dropping those tokens after
  the mean, so that is what we do;
- a video latent in 1x2x2 patches, frame-major (``packing.pack``), 3-D rotary positions (frame, row, column
  from 0, axes (16, 56, 56), theta 256) per token from ``image_ids`` (the text is not rotated);
- timestep = sigma * 1000 (ComfyUI's ModelSamplingDiscreteFlow, shift 7), distilled guidance embedded as
  guidance * 1000 (``Conditioning.guidance``, FluxGuidance's), the pooled CLIP-L vector added to the timestep's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import HunyuanVideoTransformer3DModel

from ..attention import AttentionSeam
from ..conditioning import Conditioning
from ..latent_format import LatentFormat
from ..sigmas import DiscreteFlowShift, ModelSampling
from . import fp8_weights
from .absent_block import AbsentBlock
from .adapter_base import AdapterBase, log_loaded
from .hunyuan_video_checkpoint import (ROPE_AXES, ROPE_THETA, HunyuanVideoSpec, block_index,
                                       hunyuan_video_to_diffusers, infer_hunyuan_video_spec)
from .packing import PATCH
from .qwen_image_rope import apply_rotary, rotary
from .wan import video_positions

logger = logging.getLogger(__name__)

DEFAULT_SHIFT = 7.0  # ComfyUI's HunyuanVideo sampling settings
TIMESTEP_MULTIPLIER = 1000.0  # ModelSamplingDiscreteFlow's default multiplier
GUIDANCE_MULTIPLIER = 1000.0  # ComfyUI embeds the guidance with the timestep embedding's default time factor
HUNYUAN_VIDEO_LATENT_FORMAT = LatentFormat(channels=16, scale_factor=0.476986, shift_factor=0.0)  # ComfyUI's


class SeamHunyuanVideoAttnProcessor:
    """diffusers' HunyuanVideo joint attention (double and single blocks) with ``softmax(QK^T)V`` through the
    seam: q/k RMS-normed per head, the video tokens rotated by their 3-D positions (float32, as ComfyUI), text
    first in the seam."""

    def __init__(self, seam: AttentionSeam, layer: int) -> None:
        self.seam = seam
        self.layer = layer

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, ...]:
        if image_rotary_emb is None or encoder_hidden_states is None:
            raise ValueError("HunyuanVideo's attention needs the text and the rotary positions; run it through "
                             "HunyuanVideoAdapter.run_blocks")
        cos, sin = image_rotary_emb  # (N_local, head_dim / 2) each
        double = attn.add_q_proj is not None  # a double block: the text has its own projections

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (attn.heads, -1))  # (B, S, H*D) -> (B, S, H, D)

        value = heads(attn.to_v(hidden_states))
        query = apply_rotary(attn.norm_q(heads(attn.to_q(hidden_states))).float(), cos, sin).type_as(value)
        key = apply_rotary(attn.norm_k(heads(attn.to_k(hidden_states))).float(), cos, sin).type_as(value)
        if double:
            t_query = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            t_key = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            t_value = heads(attn.add_v_proj(encoder_hidden_states))
        else:
            t_query = attn.norm_q(heads(attn.to_q(encoder_hidden_states)))
            t_key = attn.norm_k(heads(attn.to_k(encoder_hidden_states)))
            t_value = heads(attn.to_v(encoder_hidden_states))
        text_len = encoder_hidden_states.shape[1]
        # text first: (B, L + N_local, H, D)
        out = self.seam(torch.cat([t_query.type_as(value), query], dim=1),
                        torch.cat([t_key.type_as(value), key], dim=1), torch.cat([t_value, value], dim=1),
                        text_len=text_len, layer=self.layer)
        out = out.flatten(2, 3).to(value.dtype)  # (B, S, H, D) -> (B, S, H*D)
        text_out, image_out = out[:, :text_len], out[:, text_len:]
        if not double:  # a single block projects attention and MLP together, after this
            return image_out, text_out
        return attn.to_out[1](attn.to_out[0](image_out.contiguous())), attn.to_add_out(text_out.contiguous())


@dataclass(frozen=True)
class HunyuanVideoBlockContext:
    """The per-forward inputs every block takes besides the hidden states."""

    temb: torch.Tensor  # (B, hidden) timestep + pooled CLIP (+ guidance) embedding
    rotary: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (N_local, head_dim / 2), the video tokens'

    def state(self, hidden: torch.Tensor, encoder_hidden: torch.Tensor) -> "HunyuanVideoBlockState":
        return HunyuanVideoBlockState(hidden=hidden, encoder_hidden=encoder_hidden, context=self)


@dataclass
class HunyuanVideoBlockState:
    """What flows between blocks for one set of video tokens (all, a shard, or a patch)."""

    hidden: torch.Tensor  # (B, N_local, hidden) video tokens
    encoder_hidden: torch.Tensor  # (B, L, hidden) refined text tokens, whole on every rank
    context: HunyuanVideoBlockContext


def text_tokens(cond: Conditioning, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the llama tokens (B, L, C), the indices of those that are text) for ``batch`` rows: every token without
    a mask; with one, the tokens it marks 1, which must be the same for every row (ComfyUI's mask of a batch is
    one row too)."""
    context, _ = cond.for_batch(batch)
    mask = cond.batched("context_mask", batch)
    if mask is None:
        return context, torch.arange(context.shape[1])
    if not bool((mask == mask[:1]).all()):
        raise ValueError("HunyuanVideo's text mask differs between the rows of a batch (prompts padded to "
                         "different lengths in one batch); sample them one at a time")
    return context, torch.nonzero(mask[0] > 0.5).flatten()


class HunyuanVideoAdapter(AdapterBase):
    """One loaded HunyuanVideo T2V transformer and the ComfyUI conventions around it."""

    family = "hunyuan-video"
    latent_format: LatentFormat = HUNYUAN_VIDEO_LATENT_FORMAT
    ANCHOR = "x_embedder.proj.weight"

    def __init__(self, transformer: HunyuanVideoTransformer3DModel, spec: HunyuanVideoSpec,
                 present: Optional[tuple[int, int]] = None) -> None:
        self.transformer = transformer.eval().requires_grad_(False)
        self.spec = spec
        self.seam = AttentionSeam()
        self.blocks: list[torch.nn.Module] = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        self.present = present if present is not None else (0, len(self.blocks))
        for layer, block in enumerate(self.blocks):
            if not isinstance(block, AbsentBlock):
                block.attn.set_processor(SeamHunyuanVideoAttnProcessor(self.seam, layer))

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", source: str = "checkpoint",
                        blocks: Optional[tuple[int, int]] = None,
                        spec: Optional[HunyuanVideoSpec] = None) -> "HunyuanVideoAdapter":
        """Build from ComfyUI-layout tensors; with ``blocks`` ([start, stop) of the adapter's block list: one
        PipeFusion stage) only those blocks and the shared tensors (``state`` may hold just those; pass ``spec``)."""
        if spec is None:
            spec = infer_hunyuan_video_spec(state, source)
        if blocks is not None:
            state = {k: v for k, v in state.items() if (i := block_index(k, spec)) is None or blocks[0] <= i < blocks[1]}
        with torch.device("meta"):
            transformer = HunyuanVideoTransformer3DModel(**spec.diffusers_config())
        if blocks is not None:  # two module lists: the adapter's block index runs over both
            doubles, singles = transformer.transformer_blocks, transformer.single_transformer_blocks
            for layer in range(spec.num_blocks):
                if not blocks[0] <= layer < blocks[1]:
                    double = layer < spec.num_layers
                    container, index = (doubles, layer) if double else (singles, layer - spec.num_layers)
                    container[index] = AbsentBlock(layer, blocks)
        # fp8 Linear weights stay fp8
        converted = fp8_weights.cast_state(hunyuan_video_to_diffusers(state, spec), transformer, dtype)
        result = transformer.load_state_dict(converted, strict=True, assign=True)
        assert not result.missing_keys and not result.unexpected_keys, result
        fp8_weights.finish(transformer, dtype, f"HunyuanVideo from {source}")
        assert not any(t.is_meta for t in transformer.state_dict().values()), "unloaded tensors on meta"
        log_loaded("HunyuanVideo", source, spec.num_blocks, blocks, spec.hidden_size, dtype)
        return cls(transformer.to(device), spec, blocks)

    def default_sampling(self) -> ModelSampling:
        """ComfyUI's HunyuanVideo model sampling: discrete flow, shift 7.0, timestep multiplier 1000."""
        return DiscreteFlowShift(shift=DEFAULT_SHIFT, multiplier=TIMESTEP_MULTIPLIER)

    # ---- latent <-> tokens ----------------------------------------------------------------------
    def check_latent(self, latent: torch.Tensor) -> None:
        channels = self.latent_format.channels
        if latent.ndim != 5 or latent.shape[1] != channels:
            raise ValueError(f"HunyuanVideo needs a video LATENT of shape (batch, {channels}, frames, h, w); got "
                             f"{tuple(latent.shape)}. Use EmptyHunyuanLatentVideo (or VAEEncode with its VAE).")
        h, w = latent.shape[3], latent.shape[4]
        if h % PATCH or w % PATCH:
            raise ValueError(f"HunyuanVideo needs video height and width divisible by 16; got latent {h}x{w} "
                             f"(video {h * 8}x{w * 8})")

    @staticmethod
    def image_ids(height: int, width: int, frames: int = 1) -> torch.Tensor:
        """(T * H/2 * W/2, 3) per-token (frame, row, column) from 0, frame-major then row-major like the packing."""
        return video_positions(frames, height // PATCH, width // PATCH)

    # ---- forward in pieces ----------------------------------------------------------------------
    def _timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.to(device=self.device, dtype=torch.float32) * TIMESTEP_MULTIPLIER  # (B,) float32

    def embed_context(self, image_ids: torch.Tensor, cond: Conditioning,
                      sigma: torch.Tensor) -> HunyuanVideoBlockContext:
        """temb (B, hidden) for ``sigma`` (B,) and the rotary cos/sin of ``image_ids`` (N_local, 3). A PipeFusion
        stage after the first calls only this."""
        embed = self.transformer.time_text_embed
        dtype, device = self.dtype, self.device
        _, pooled = cond.for_batch(sigma.shape[0])
        timestep = self._timestep(sigma)
        # ComfyUI's order: (timestep + pooled CLIP) + guidance, each sinusoid cast to the model dtype after
        temb = embed.timestep_embedder(embed.time_proj(timestep).to(dtype))
        temb = temb + embed.text_embedder(pooled.to(device=device, dtype=dtype))
        if embed.guidance_embedder is not None:
            guidance = torch.full_like(timestep, cond.guidance if cond.guidance is not None else 0.0)
            temb = temb + embed.guidance_embedder(embed.time_proj(guidance * GUIDANCE_MULTIPLIER).to(dtype))
        return HunyuanVideoBlockContext(temb=temb, rotary=rotary(image_ids.to(device), ROPE_AXES, ROPE_THETA))

    def refine_text(self, cond: Conditioning, sigma: torch.Tensor) -> torch.Tensor:
        """The token refiner: (B, L, C) llama tokens -> (B, L_text, hidden), L_text the unmasked ones."""
        refiner = self.transformer.context_embedder
        dtype, device = self.dtype, self.device
        context, keep = text_tokens(cond, sigma.shape[0])
        context = context.to(device=device, dtype=dtype)
        mean = context.sum(dim=1) / context.shape[1]  # (B, C): every token, as ComfyUI
        temb = refiner.time_text_embed(self._timestep(sigma), mean)  # (B, hidden)
        tokens = refiner.proj_in(context[:, keep.to(device)])  # (B, L_text, hidden)
        return refiner.token_refiner(tokens, temb, None)

    def embed(self, tokens: torch.Tensor, image_ids: torch.Tensor, cond: Conditioning,
              sigma: torch.Tensor) -> HunyuanVideoBlockState:
        """Embeddings for ``tokens`` (B, N_local, C*1*2*2) at positions ``image_ids`` (N_local, 3); sigma (B,)."""
        proj = self.transformer.x_embedder.proj
        # Conv3d weight (hidden, C, 1, 2, 2) -> (hidden, C*1*2*2), channel-major like a token
        hidden = torch.nn.functional.linear(tokens.to(device=self.device, dtype=self.dtype), proj.weight.flatten(1),
                                            proj.bias)  # (B, N_local, hidden)
        return self.embed_context(image_ids, cond, sigma).state(hidden, self.refine_text(cond, sigma))

    def text_len(self, cond: Conditioning) -> int:
        """Text tokens the blocks see for ``cond``: the unmasked ones."""
        return int(text_tokens(cond, 1)[1].numel()) if cond.context_mask is not None else cond.context.shape[1]

    def run_blocks(self, state: HunyuanVideoBlockState, start: int, stop: int) -> HunyuanVideoBlockState:
        hidden, text, ctx = state.hidden, state.encoder_hidden, state.context
        for block in self.blocks[start:stop]:
            hidden, text = block(hidden, text, ctx.temb, None, ctx.rotary)
        return HunyuanVideoBlockState(hidden=hidden, encoder_hidden=text, context=ctx)

    def head(self, state: HunyuanVideoBlockState) -> torch.Tensor:
        """Final norm + projection: (B, N_local, hidden) -> (B, N_local, C*1*2*2) velocity, channel-major like our
        packing already, float32."""
        t = self.transformer
        return t.proj_out(t.norm_out(state.hidden, state.context.temb)).float()
