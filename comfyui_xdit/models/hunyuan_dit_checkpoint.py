"""HunyuanDiT (v1.0, v1.1, v1.2) weights in Tencent's original single-file layout (what ComfyUI's UNETLoader
reads, ``comfy/ldm/hydit``): architecture from tensor shapes as ComfyUI infers it, renaming onto diffusers'
``HunyuanDiT2DModel``, and deterministic random-weight files for ``tiny:hunyuan-dit*``.

What ComfyUI reads from a file (``model_detection``) and what it fixes:
- the family: ``mlp_t5.0.weight``; v1.0 (ComfyUI's ``hydit1``: image-size and style conditions, another
  beta schedule) when ``extra_embedder.0`` takes 3968 inputs (pooled 1024 + 6 sizes x 256 + width 1408);
- depth from the block count, width from ``x_embedder``; the MLP ratio 4.3637 only for DiT-g/2 (width 1408,
  40 blocks), 4 otherwise;
- fixed: 16 heads, head width a multiple of 8 (at most 128), CLIP tokens of width 1024 (77 of them),
  mT5 tokens of width 2048 (256), the pooled mT5 vector 1024, learned sigma (8 output channels, of which
  the sampler reads the first 4). So a stock-loadable tiny HunyuanDiT v1.1/1.2 is width 128 (16 heads of 8)
  with 4 blocks (the fewest with a long skip); a v1.0 one must be width 1408 (its detection is that width).

Long skips: block ``i`` with ``i > depth // 2`` concatenates the output of block ``depth - 2 - i`` (a
stack: the outputs of blocks ``< depth // 2 - 1`` are pushed, the skip blocks pop), so depth is even.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from .checkpoint_file import check_shapes, count_blocks

logger = logging.getLogger(__name__)

PATCH = 2
HEADS = 16  # ComfyUI builds every HunyuanDiT with 16 heads (not read from the file)
POOLER_HEADS = 8  # the mT5 attention pooler's heads (fixed in both ComfyUI and diffusers)
TIMESTEP_DIM = 256  # the sinusoidal timestep / image-size embedding width
META_SIZES = 6  # v1.0's image_meta_size: height, width, target height, target width, crop top, crop left
MARKER_KEY = "mlp_t5.0.weight"  # ComfyUI's own HunyuanDiT detection key
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


@dataclass(frozen=True)
class HunyuanDiTSpec:
    """The architecture of one HunyuanDiT file (DiT-g/2: v1.0, v1.1, v1.2)."""

    num_layers: int = 40
    size_cond: bool = False  # v1.0: image-size + style conditions (ComfyUI's hydit1)
    hidden_size: int = 1408
    mlp_hidden: int = 6144  # int(1408 * 4.3637) for DiT-g/2, 4 * width otherwise
    text_dim: int = 1024  # CLIP (bilingual BERT) token width; the cross-attention's key width
    t5_dim: int = 2048  # mT5-XL token width
    text_len: int = 77  # CLIP tokens the padding table covers
    t5_len: int = 256  # mT5 tokens the pooler and the padding table cover
    pooled_projection_dim: int = 1024  # the pooled mT5 vector
    in_channels: int = 4
    out_channels: int = 8  # learned sigma: eps/v and the variance, of which ComfyUI keeps the first half
    num_attention_heads: int = HEADS

    @property
    def family(self) -> str:
        return "hunyuan-dit"

    @property
    def version(self) -> str:
        return "v1.0" if self.size_cond else "v1.1/v1.2"

    @property
    def num_blocks(self) -> int:
        return self.num_layers

    @property
    def context_dim(self) -> int:
        return self.text_dim

    @property
    def second_context_dim(self) -> int:
        """Width of the second text stream (mT5), which ``Conditioning.second_context`` carries."""
        return self.t5_dim

    @property
    def pooled_dim(self) -> int:
        return 0  # HunyuanDiT pools its mT5 tokens itself: no pooled vector from the encoder

    @property
    def latent_channels(self) -> int:
        return self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def half(self) -> int:
        return self.num_layers // 2

    def skip_block(self, layer: int) -> bool:
        """Whether block ``layer`` takes a long skip (pops the stack)."""
        return layer > self.half

    def pushes(self, layer: int) -> bool:
        """Whether the output of block ``layer`` is pushed onto the skip stack."""
        return layer < self.half - 1

    def pending_skips(self, block: int) -> int:
        """How many skips are on the stack when block ``block`` starts (what crosses a stage boundary there)."""
        return min(block, self.half - 1) - max(0, block - self.half - 1)

    @property
    def extra_in_dim(self) -> int:
        """Inputs of ``extra_embedder``: the pooled mT5 vector (+ v1.0's sizes and style)."""
        extra = self.pooled_projection_dim
        return extra + META_SIZES * TIMESTEP_DIM + self.hidden_size if self.size_cond else extra

    def diffusers_config(self) -> dict:
        # (mlp_hidden + 0.5) / width: diffusers takes int(width * ratio), which must give mlp_hidden exactly
        return dict(num_attention_heads=self.num_attention_heads, attention_head_dim=self.head_dim,
                    in_channels=self.in_channels, patch_size=PATCH, activation_fn="gelu-approximate",
                    hidden_size=self.hidden_size, num_layers=self.num_layers,
                    mlp_ratio=(self.mlp_hidden + 0.5) / self.hidden_size,
                    learn_sigma=self.out_channels != self.in_channels,
                    cross_attention_dim=self.text_dim, cross_attention_dim_t5=self.t5_dim,
                    pooled_projection_dim=self.pooled_projection_dim, text_len=self.text_len, text_len_t5=self.t5_len,
                    use_style_cond_and_image_meta_size=self.size_cond)


# Stock-loadable tiny HunyuanDiTs (ComfyUI fixes 16 heads and the text widths): v1.1/1.2 at width 128 (16 heads
# of 8, the narrowest ComfyUI accepts) and v1.0 at width 1408 (its detection); 4 blocks, so block 3 takes the
# skip of block 0.
TINY_HUNYUAN_DIT = HunyuanDiTSpec(num_layers=4, hidden_size=128, mlp_hidden=512)
TINY_HUNYUAN_DIT_V10 = HunyuanDiTSpec(num_layers=4, size_cond=True, hidden_size=1408, mlp_hidden=5632)
# A narrow one for the in-process parallel tests: the text widths and lengths shrunk too (stock ComfyUI cannot
# load it, our engine can); 4 blocks, so a skip (block 0's, for block 3) is pending at every stage boundary.
NARROW_HUNYUAN_DIT = HunyuanDiTSpec(num_layers=4, hidden_size=128, mlp_hidden=256, text_dim=32, t5_dim=64,
                                    text_len=8, t5_len=8, pooled_projection_dim=32)
NAMED_HUNYUAN_DIT_SPECS: Mapping[str, HunyuanDiTSpec] = {"hunyuan-dit": TINY_HUNYUAN_DIT,
                                                         "hunyuan-dit-v1.0": TINY_HUNYUAN_DIT_V10,
                                                         "hunyuan-dit-narrow": NARROW_HUNYUAN_DIT}


def block_index(key: str, spec: HunyuanDiTSpec) -> Optional[int]:
    """The block a HunyuanDiT key belongs to; ``None`` for the tensors every stage needs."""
    match = _BLOCK_KEY.match(key)
    return int(match.group(1)) if match else None


def infer_hunyuan_dit_spec(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> HunyuanDiTSpec:
    """Architecture from tensor shapes (``state`` may hold shapes only); ``ValueError`` naming what is off."""
    required = ("x_embedder.proj.weight", MARKER_KEY, "mlp_t5.2.weight", "extra_embedder.0.weight",
                "pooler.c_proj.weight", "pooler.positional_embedding", "text_embedding_padding",
                "blocks.0.mlp.fc1.weight", "final_layer.linear.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{source} is not a HunyuanDiT in its single-file layout: missing {', '.join(missing)}")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    head_dim = hidden // HEADS
    if patch != PATCH or hidden % HEADS or head_dim % 8 or head_dim > 128:
        raise ValueError(f"{source}: HunyuanDiT patch {patch} / width {hidden} is not one we run (patch 2, width "
                         f"16 heads x a multiple of 8 up to 128, as ComfyUI builds it)")
    depth = count_blocks(state, _BLOCK_KEY)
    if depth % 2:
        raise ValueError(f"{source}: HunyuanDiT with {depth} blocks: its long skips pair the first half of the "
                         f"blocks with the second, so the depth must be even")
    t5_len = int(state["pooler.positional_embedding"].shape[0]) - 1
    pooled = int(state["pooler.c_proj.weight"].shape[0])
    extra_in = int(state["extra_embedder.0.weight"].shape[1])
    size_cond = extra_in != pooled  # v1.0: the sizes and the style join the pooled vector
    spec = HunyuanDiTSpec(num_layers=depth, size_cond=size_cond, hidden_size=int(hidden),
                          mlp_hidden=int(state["blocks.0.mlp.fc1.weight"].shape[0]),
                          text_dim=int(state["mlp_t5.2.weight"].shape[0]), t5_dim=int(state[MARKER_KEY].shape[1]),
                          text_len=int(state["text_embedding_padding"].shape[0]) - t5_len, t5_len=t5_len,
                          pooled_projection_dim=pooled, in_channels=int(in_channels),
                          out_channels=int(state["final_layer.linear.weight"].shape[0] // (PATCH * PATCH)))
    if size_cond and extra_in != spec.extra_in_dim:
        raise ValueError(f"{source}: HunyuanDiT's extra_embedder takes {extra_in} inputs; expected {pooled} "
                         f"(v1.1/v1.2) or {spec.extra_in_dim} (v1.0: pooled + sizes + style of width {hidden})")
    if spec.out_channels not in (spec.in_channels, 2 * spec.in_channels):
        raise ValueError(f"{source}: HunyuanDiT predicts {spec.out_channels} channels for {spec.in_channels} latent "
                         f"channels; expected {spec.in_channels} or {2 * spec.in_channels} (learned sigma)")
    check_shapes(state, hunyuan_dit_shapes(spec), source,
                 f"HunyuanDiT {spec.version} ({depth} blocks, width {hidden})")
    return spec


def hunyuan_dit_shapes(spec: HunyuanDiTSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of a HunyuanDiT file with its shape, as ComfyUI's ``HunYuanDiT`` holds them."""
    h, d = spec.hidden_size, spec.head_dim
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_f: int, in_f: int) -> None:
        shapes[f"{name}.weight"] = (out_f, in_f)
        shapes[f"{name}.bias"] = (out_f,)

    def norm(name: str, width: int) -> None:
        shapes[f"{name}.weight"] = (width,)
        shapes[f"{name}.bias"] = (width,)

    linear("mlp_t5.0", 4 * spec.t5_dim, spec.t5_dim)
    linear("mlp_t5.2", spec.text_dim, 4 * spec.t5_dim)
    shapes["text_embedding_padding"] = (spec.text_len + spec.t5_len, spec.text_dim)
    shapes["pooler.positional_embedding"] = (spec.t5_len + 1, spec.t5_dim)
    for name in ("k_proj", "q_proj", "v_proj"):
        linear(f"pooler.{name}", spec.t5_dim, spec.t5_dim)
    linear("pooler.c_proj", spec.pooled_projection_dim, spec.t5_dim)
    if spec.size_cond:
        shapes["style_embedder.weight"] = (1, h)
    shapes["x_embedder.proj.weight"] = (h, spec.in_channels, PATCH, PATCH)
    shapes["x_embedder.proj.bias"] = (h,)
    linear("t_embedder.mlp.0", h, TIMESTEP_DIM)
    linear("t_embedder.mlp.2", h, h)
    linear("extra_embedder.0", 4 * h, spec.extra_in_dim)
    linear("extra_embedder.2", h, 4 * h)
    for i in range(spec.num_layers):
        p = f"blocks.{i}"
        for name in ("norm1", "norm2", "norm3"):
            norm(f"{p}.{name}", h)
        linear(f"{p}.attn1.Wqkv", 3 * h, h)
        linear(f"{p}.attn1.out_proj", h, h)
        linear(f"{p}.attn2.q_proj", h, h)
        linear(f"{p}.attn2.kv_proj", 2 * h, spec.text_dim)
        linear(f"{p}.attn2.out_proj", h, h)
        for attn in ("attn1", "attn2"):
            norm(f"{p}.{attn}.q_norm", d)
            norm(f"{p}.{attn}.k_norm", d)
        linear(f"{p}.mlp.fc1", spec.mlp_hidden, h)
        linear(f"{p}.mlp.fc2", h, spec.mlp_hidden)
        linear(f"{p}.default_modulation.1", h, h)
        if spec.skip_block(i):
            norm(f"{p}.skip_norm", 2 * h)
            linear(f"{p}.skip_linear", h, 2 * h)
    linear("final_layer.linear", PATCH * PATCH * spec.out_channels, h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


# HunyuanDiT name -> diffusers name of the tensors that move as they are (weight and bias)
_SHARED = {
    "mlp_t5.0": "text_embedder.linear_1",
    "mlp_t5.2": "text_embedder.linear_2",
    "pooler.k_proj": "time_extra_emb.pooler.k_proj",
    "pooler.q_proj": "time_extra_emb.pooler.q_proj",
    "pooler.v_proj": "time_extra_emb.pooler.v_proj",
    "pooler.c_proj": "time_extra_emb.pooler.c_proj",
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_extra_emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_extra_emb.timestep_embedder.linear_2",
    "extra_embedder.0": "time_extra_emb.extra_embedder.linear_1",
    "extra_embedder.2": "time_extra_emb.extra_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_SHARED_TENSORS = {"text_embedding_padding": "text_embedding_padding",
                   "pooler.positional_embedding": "time_extra_emb.pooler.positional_embedding",
                   "style_embedder.weight": "time_extra_emb.style_embedder.weight"}
# ComfyUI's norm3 is before the cross-attention and norm2 before the MLP; diffusers names them the other way
_BLOCK = {"norm1": "norm1.norm", "default_modulation.1": "norm1.linear", "norm3": "norm2", "norm2": "norm3",
          "attn1.out_proj": "attn1.to_out.0", "attn1.q_norm": "attn1.norm_q", "attn1.k_norm": "attn1.norm_k",
          "attn2.q_proj": "attn2.to_q", "attn2.out_proj": "attn2.to_out.0", "attn2.q_norm": "attn2.norm_q",
          "attn2.k_norm": "attn2.norm_k", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
          "skip_norm": "skip_norm", "skip_linear": "skip_linear"}


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(shift, scale) -> (scale, shift): ComfyUI's final modulation order -> diffusers' AdaLayerNormContinuous."""
    shift, scale = tensor.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def hunyuan_dit_to_diffusers(state: Mapping[str, torch.Tensor], spec: HunyuanDiTSpec) -> dict[str, torch.Tensor]:
    """Rename HunyuanDiT tensors onto ``HunyuanDiT2DModel``; blocks absent from ``state`` are skipped (one
    PipeFusion stage's file read)."""
    src = dict(state)
    out: dict[str, torch.Tensor] = {}
    for s, d in _SHARED.items():
        out[f"{d}.weight"], out[f"{d}.bias"] = src.pop(f"{s}.weight"), src.pop(f"{s}.bias")
    for s, d in _SHARED_TENSORS.items():
        if s in src:
            out[d] = src.pop(s)
    for suffix in ("weight", "bias"):
        out[f"norm_out.linear.{suffix}"] = _swap_halves(src.pop(f"final_layer.adaLN_modulation.1.{suffix}"))
    for i in range(spec.num_layers):
        s, d = f"blocks.{i}", f"blocks.{i}"
        if f"{s}.attn1.Wqkv.weight" not in src:
            continue  # another stage's block
        for suffix in ("weight", "bias"):
            # (3h, ...) -> q, k, v; (2h, ...) -> k, v
            for name, part in zip(("to_q", "to_k", "to_v"), src.pop(f"{s}.attn1.Wqkv.{suffix}").chunk(3)):
                out[f"{d}.attn1.{name}.{suffix}"] = part
            for name, part in zip(("to_k", "to_v"), src.pop(f"{s}.attn2.kv_proj.{suffix}").chunk(2)):
                out[f"{d}.attn2.{name}.{suffix}"] = part
            for sb, db in _BLOCK.items():
                if f"{s}.{sb}.{suffix}" in src:
                    out[f"{d}.{db}.{suffix}"] = src.pop(f"{s}.{sb}.{suffix}")
    if src:
        logger.warning("ignoring %d tensors that HunyuanDiT does not use: %s", len(src), ", ".join(sorted(src)[:5]))
    return out


def random_hunyuan_dit_state(spec: HunyuanDiTSpec, seed: int,
                             dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Deterministic random weights in HunyuanDiT's layout, scaled so activations stay O(1)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(hunyuan_dit_shapes(spec).items()):
        if len(shape) == 1 and "norm" in name and name.endswith(".weight"):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)  # layer-norm gains near 1
        elif name.endswith(".bias") or name in ("text_embedding_padding", "pooler.positional_embedding",
                                                "style_embedder.weight"):
            tensor = 0.02 * torch.randn(shape, generator=generator)
        else:
            fan_in = math.prod(shape[1:])
            tensor = torch.randn(shape, generator=generator) / fan_in ** 0.5
        state[name] = tensor.to(dtype).contiguous()
    return state
