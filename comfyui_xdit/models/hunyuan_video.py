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
  guidance * 1000 (``Conditioning.guidance``, FluxGuidance's), the pooled CLIP-L vector added to the timestep's;
- image-to-video v1 (33 input channels) and SkyReels (32), ``HunyuanVideoI2VAdapter``: ComfyUI's ``c_concat``
  (start-frame latent + inverted mask, ``hunyuan_video_concat.py``) is packed like the latent and each token gets its
  own row of it before the patch embedding, so a shard or a patch needs nothing from the others; its ``image_ids``
  carry the whole latent's (frames, rows, columns) after each token's position for that;
- HunyuanImageToVideo's v2 (replace) on the 16-channel model (``Conditioning.guiding_frame_index``): latent frame 0's
  tokens (a prefix of any shard or patch) take a second modulation vector (``hunyuan_video_token_replace.py``), and
  the start frame is kept by the LATENT's noise mask, shown to the model clean (ComfyUI's HunyuanVideo).
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
from .hunyuan_video_checkpoint import (I2V_FAMILY, ROPE_AXES, ROPE_THETA, HunyuanVideoSpec, block_index,
                                       hunyuan_video_to_diffusers, infer_hunyuan_video_spec)
from .hunyuan_video_concat import concat_tokens
from .hunyuan_video_token_replace import double_block, final_norm, single_block
from .packing import PATCH
from .qwen_image_rope import apply_rotary, rotary
from .wan import video_positions

logger = logging.getLogger(__name__)

DEFAULT_SHIFT = 7.0  # ComfyUI's HunyuanVideo sampling settings
TIMESTEP_MULTIPLIER = 1000.0  # ModelSamplingDiscreteFlow's default multiplier
GUIDANCE_MULTIPLIER = 1000.0  # ComfyUI embeds the guidance with the timestep embedding's default time factor
HUNYUAN_VIDEO_LATENT_FORMAT = LatentFormat(channels=16, scale_factor=0.476986, shift_factor=0.0)  # ComfyUI's
POSITION_AXES = 3  # (frame, row, column) columns of ``image_ids``


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
    replace: Optional[torch.Tensor] = None  # (B, hidden) token replace's embedding for latent frame 0, or None
    first: int = 0  # how many of these tokens (a prefix) are latent frame 0's: token replace's

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


def first_frame_tokens(image_ids: torch.Tensor) -> int:
    """How many of the tokens at ``image_ids`` (N_local, 3 or 6) are latent frame 0's; they lead (frame-major)."""
    first = int((image_ids[:, 0] == 0).sum())
    assert bool((image_ids[:first, 0] == 0).all()), "frame 0's tokens must lead a shard (frame-major tokens)"
    return first


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

    # ---- a noise mask (v2 (replace)'s kept start frame) ---------------------------------------------
    @property
    def video_noise_mask(self) -> bool:
        """Whether a noise mask on a video LATENT is run: text-to-video's (HunyuanImageToVideo's v2 (replace) keeps
        the start frame so); the I2V v1 model's c_concat would read it where no concat_mask is given: refused."""
        return not self.spec.image_conditioning

    @property
    def inpaint_renoises(self) -> bool:
        """Whether the kept latent is shown to the model re-noised: no (ComfyUI's HunyuanVideo.scale_latent_inpaint
        returns it clean)."""
        return False

    # ---- forward in pieces ----------------------------------------------------------------------
    def _timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.to(device=self.device, dtype=torch.float32) * TIMESTEP_MULTIPLIER  # (B,) float32

    def embed_context(self, image_ids: torch.Tensor, cond: Conditioning,
                      sigma: torch.Tensor) -> HunyuanVideoBlockContext:
        """temb (B, hidden) for ``sigma`` (B,), token replace's vector and frame-0 token count where the conditioning
        carries ``guiding_frame_index``, and the rotary cos/sin of ``image_ids`` (N_local, 3 or 6). A PipeFusion
        stage after the first calls only this."""
        embed = self.transformer.time_text_embed
        dtype, device = self.dtype, self.device
        _, pooled = cond.for_batch(sigma.shape[0])
        timestep = self._timestep(sigma)
        # ComfyUI's order: (timestep + pooled CLIP) + guidance, each sinusoid cast to the model dtype after
        temb = embed.timestep_embedder(embed.time_proj(timestep).to(dtype))
        pooled_embedding = embed.text_embedder(pooled.to(device=device, dtype=dtype))
        temb = temb + pooled_embedding
        replace, first = None, 0
        if cond.guiding_frame_index is not None:  # v2 (replace): frame 0's vector, the index itself as the timestep
            index = torch.full_like(timestep, float(cond.guiding_frame_index))
            replace = embed.timestep_embedder(embed.time_proj(index).to(dtype)) + pooled_embedding
            first = first_frame_tokens(image_ids)
        if embed.guidance_embedder is not None:  # ComfyUI adds the guidance to both vectors
            guidance = torch.full_like(timestep, cond.guidance if cond.guidance is not None else 0.0)
            guidance_embedding = embed.guidance_embedder(embed.time_proj(guidance * GUIDANCE_MULTIPLIER).to(dtype))
            temb = temb + guidance_embedding
            replace = None if replace is None else replace + guidance_embedding
        positions = image_ids[:, :POSITION_AXES].to(device)  # (N_local, 3); an I2V model's grid columns after
        return HunyuanVideoBlockContext(temb=temb, rotary=rotary(positions, ROPE_AXES, ROPE_THETA), replace=replace,
                                        first=first)

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
        tokens = self.input_tokens(tokens.to(self.device), image_ids, cond)
        # Conv3d weight (hidden, C, 1, 2, 2) -> (hidden, C*1*2*2), channel-major like a token
        hidden = torch.nn.functional.linear(tokens.to(dtype=self.dtype), proj.weight.flatten(1),
                                            proj.bias)  # (B, N_local, hidden)
        return self.embed_context(image_ids, cond, sigma).state(hidden, self.refine_text(cond, sigma))

    def input_tokens(self, tokens: torch.Tensor, image_ids: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """What the patch embedding takes for ``tokens`` (B, N_local, 16*1*2*2): the tokens themselves."""
        return tokens

    def text_len(self, cond: Conditioning) -> int:
        """Text tokens the blocks see for ``cond``: the unmasked ones."""
        return int(text_tokens(cond, 1)[1].numel()) if cond.context_mask is not None else cond.context.shape[1]

    def run_blocks(self, state: HunyuanVideoBlockState, start: int, stop: int) -> HunyuanVideoBlockState:
        hidden, text, ctx = state.hidden, state.encoder_hidden, state.context
        for layer in range(start, stop):
            block = self.blocks[layer]
            if ctx.replace is not None and ctx.first > 0:  # v2 (replace): frame 0's tokens modulated apart
                run = double_block if layer < self.spec.num_layers else single_block
                hidden, text = run(block, hidden, text, ctx.temb, ctx.replace, ctx.first, ctx.rotary)
            else:
                hidden, text = block(hidden, text, ctx.temb, None, ctx.rotary)
        return HunyuanVideoBlockState(hidden=hidden, encoder_hidden=text, context=ctx)

    def head(self, state: HunyuanVideoBlockState) -> torch.Tensor:
        """Final norm + projection: (B, N_local, hidden) -> (B, N_local, C*1*2*2) velocity, channel-major like our
        packing already, float32."""
        t, ctx = self.transformer, state.context
        if ctx.replace is not None and ctx.first > 0:
            return t.proj_out(final_norm(t.norm_out, state.hidden, ctx.temb, ctx.replace, ctx.first)).float()
        return t.proj_out(t.norm_out(state.hidden, ctx.temb)).float()


class HunyuanVideoI2VAdapter(HunyuanVideoAdapter):
    """HunyuanVideo image-to-video (33 channels in: ComfyUI's ``HunyuanVideoI2V``; 32: ``HunyuanVideoSkyreelsI2V``):
    the T2V model with the start frames concatenated to every token before the patch embedding."""

    family = I2V_FAMILY

    @staticmethod
    def image_ids(height: int, width: int, frames: int = 1) -> torch.Tensor:
        """(T * H/2 * W/2, 6) per-token (frame, row, column), frame-major then row-major like the packing, then the
        whole latent's (frames, rows, columns): a shard cuts its own rows of the concat latent by them."""
        positions = video_positions(frames, height // PATCH, width // PATCH)  # (N, 3)
        grid = torch.tensor([frames, height // PATCH, width // PATCH], dtype=positions.dtype)
        return torch.cat([positions, grid.expand(positions.shape[0], POSITION_AXES)], dim=1)  # (N, 6)

    def input_tokens(self, tokens: torch.Tensor, image_ids: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``tokens`` (B, N_local, 16*2*2) with each token's own rows of ``c_concat`` after its latent channels:
        (B, N_local, 33*2*2), float32."""
        extra = concat_tokens(cond, tokens.shape[0], image_ids, self.spec.extra_channels,
                              self.latent_format)  # (B, N_local, 17*2*2)
        return torch.cat([tokens.float(), extra.to(tokens.device)], dim=-1)
