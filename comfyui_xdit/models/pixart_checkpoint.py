"""PixArt-alpha / PixArt-sigma weights in PixArt's original single-file layout (what ComfyUI's UNETLoader
reads, ``comfy/ldm/pixart``): architecture from tensor shapes as ComfyUI infers it, renaming onto
diffusers' ``PixArtTransformer2DModel``, and deterministic random-weight files for ``tiny:pixart-*``.

What ComfyUI reads from a file (``model_detection``) and what it fixes:
- the family: ``t_block.1.weight``; alpha when the file has the micro-condition embedders
  (``ar_embedder``), sigma otherwise;
- depth from the block count; ``model_max_length`` from ``y_embedder.y_embedding``; with a
  ``pos_embed`` table, the position interpolation ``input_size // 64`` (``input_size`` = 2 * its side),
  without one it is computed per resolution;
- fixed: 16 heads, width 1152, 4 latent channels, T5 captions of width 4096, learned sigma (8 output
  channels, of which the sampler reads the first 4). So a stock-loadable tiny PixArt is a shallow one:
  depth 4, width 1152, 16 heads of 72.
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
HEADS = 16  # ComfyUI builds every PixArt with 16 heads (not read from the file)
TIMESTEP_DIM = 256  # the sinusoidal timestep / size embedding width
MARKER_KEY = "t_block.1.weight"  # ComfyUI's own PixArt detection key (alpha and sigma)
ALPHA_MARKER_KEY = "ar_embedder.mlp.0.weight"  # the micro-conditions: ComfyUI's pixart_alpha
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")
MIN_MEAN_SIDE = 33  # latent (h + w) // 2 below this rounds ComfyUI's position base size to 0 (a division by zero)


@dataclass(frozen=True)
class PixArtSpec:
    """The architecture of one PixArt file (PixArt-alpha 512/1024, PixArt-sigma 512/1024/2K)."""

    num_layers: int
    micro_condition: bool  # PixArt-alpha's resolution / aspect-ratio embedders (ComfyUI: alpha iff present)
    hidden_size: int = 1152
    caption_channels: int = 4096  # T5-XXL
    model_max_length: int = 120  # rows of the (unused at inference) null-caption table
    input_size: Optional[int] = None  # latent side of the file's pos_embed table; None: the file has none
    in_channels: int = 4
    out_channels: int = 8  # learned sigma: eps and the variance, of which ComfyUI keeps eps
    num_attention_heads: int = HEADS

    @property
    def family(self) -> str:
        return "pixart-alpha" if self.micro_condition else "pixart-sigma"

    @property
    def num_blocks(self) -> int:
        return self.num_layers

    @property
    def context_dim(self) -> int:
        return self.caption_channels

    @property
    def pooled_dim(self) -> int:
        return 0  # PixArt takes no pooled vector

    @property
    def latent_channels(self) -> int:
        return self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def min_mean_side(self) -> int:
        """The smallest (latent height + width) // 2 ComfyUI runs PixArt at."""
        return MIN_MEAN_SIDE

    @property
    def pe_interpolation(self) -> Optional[int]:
        """ComfyUI's guess from the file's table (``input_size // 64``); None: computed per resolution."""
        return None if self.input_size is None else self.input_size // (512 // 8)

    def diffusers_config(self) -> dict:
        """``PixArtTransformer2DModel``'s config; its own position table (``sample_size``) is only used by
        diffusers' forward, and equals ours where the two agree (see ``PixArtAdapter``)."""
        sample_size = self.input_size or 64
        return dict(num_attention_heads=self.num_attention_heads, attention_head_dim=self.head_dim,
                    in_channels=self.in_channels, out_channels=self.out_channels, num_layers=self.num_layers,
                    cross_attention_dim=self.hidden_size, attention_bias=True, sample_size=sample_size,
                    patch_size=PATCH, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                    interpolation_scale=self.pe_interpolation or max(sample_size // 64, 1),
                    use_additional_conditions=self.micro_condition, caption_channels=self.caption_channels)


# Stock-loadable tiny PixArts (ComfyUI fixes width 1152 and 16 heads): depth 4 (PipeFusion up to 4 stages,
# Ulysses up to 16). Alpha has a 32x32 pos_embed table (fixed interpolation 1), sigma none (per resolution).
TINY_PIXART_ALPHA = PixArtSpec(num_layers=4, micro_condition=True, model_max_length=8, input_size=64)
TINY_PIXART_SIGMA = PixArtSpec(num_layers=4, micro_condition=False, model_max_length=8)
# A narrow PixArt-sigma for the in-process parallel tests (16 heads of 16: a twentieth of the stock tiny's
# compute; stock ComfyUI cannot load it, our engine can).
NARROW_PIXART_SIGMA = PixArtSpec(num_layers=4, micro_condition=False, hidden_size=256, caption_channels=64,
                                 model_max_length=8)
NAMED_PIXART_SPECS: Mapping[str, PixArtSpec] = {"pixart-alpha": TINY_PIXART_ALPHA, "pixart-sigma": TINY_PIXART_SIGMA,
                                                "pixart-sigma-narrow": NARROW_PIXART_SIGMA}


def block_index(key: str, spec: PixArtSpec) -> Optional[int]:
    """The block a PixArt key belongs to; ``None`` for the tensors every stage needs."""
    match = _BLOCK_KEY.match(key)
    return int(match.group(1)) if match else None


def infer_pixart_spec(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> PixArtSpec:
    """Architecture from tensor shapes (``state`` may hold shapes only); ``ValueError`` naming what is off."""
    required = ("x_embedder.proj.weight", MARKER_KEY, "y_embedder.y_proj.fc1.weight", "blocks.0.attn.qkv.weight",
                "final_layer.linear.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{source} is not a PixArt in PixArt's single-file layout: missing {', '.join(missing)}")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    if patch != PATCH or hidden % HEADS:
        raise ValueError(f"{source}: PixArt patch {patch} / width {hidden} is not one we run (patch 2, width a "
                         f"multiple of {HEADS})")
    input_size = None
    if "pos_embed" in state:
        input_size = int(math.sqrt(state["pos_embed"].shape[1])) * PATCH
    spec = PixArtSpec(num_layers=count_blocks(state, _BLOCK_KEY), micro_condition=ALPHA_MARKER_KEY in state, hidden_size=int(hidden),
                      caption_channels=int(state["y_embedder.y_proj.fc1.weight"].shape[1]),
                      model_max_length=int(state["y_embedder.y_embedding"].shape[0])
                      if "y_embedder.y_embedding" in state else 120,
                      input_size=input_size, in_channels=int(in_channels),
                      out_channels=int(state["final_layer.linear.weight"].shape[0] // (PATCH * PATCH)))
    if spec.micro_condition and hidden % 3:
        raise ValueError(f"{source}: PixArt-alpha's micro-conditions need a width divisible by 3, got {hidden}")
    if spec.out_channels not in (spec.in_channels, 2 * spec.in_channels):
        raise ValueError(f"{source}: PixArt predicts {spec.out_channels} channels for {spec.in_channels} latent "
                         f"channels; expected {spec.in_channels} or {2 * spec.in_channels} (learned sigma)")
    expected = pixart_shapes(spec)
    check_shapes(state, expected, source, f"{spec.family} ({spec.num_layers} blocks, width {hidden})")
    return spec


def pixart_shapes(spec: PixArtSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of a PixArt file with its shape, as ComfyUI's ``PixArtMS`` holds them (plus the
    position table a file may carry, which ComfyUI reads only for its interpolation)."""
    h = spec.hidden_size
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_f: int, in_f: int) -> None:
        shapes[f"{name}.weight"] = (out_f, in_f)
        shapes[f"{name}.bias"] = (out_f,)

    shapes["x_embedder.proj.weight"] = (h, spec.in_channels, PATCH, PATCH)
    shapes["x_embedder.proj.bias"] = (h,)
    linear("t_embedder.mlp.0", h, TIMESTEP_DIM)
    linear("t_embedder.mlp.2", h, h)
    linear("t_block.1", 6 * h, h)
    linear("y_embedder.y_proj.fc1", h, spec.caption_channels)
    linear("y_embedder.y_proj.fc2", h, h)
    shapes["y_embedder.y_embedding"] = (spec.model_max_length, spec.caption_channels)
    if spec.micro_condition:
        for name in ("csize_embedder", "ar_embedder"):
            linear(f"{name}.mlp.0", h // 3, TIMESTEP_DIM)
            linear(f"{name}.mlp.2", h // 3, h // 3)
    if spec.input_size is not None:
        shapes["pos_embed"] = (1, (spec.input_size // PATCH) ** 2, h)
    for i in range(spec.num_layers):
        p = f"blocks.{i}"
        shapes[f"{p}.scale_shift_table"] = (6, h)
        linear(f"{p}.attn.qkv", 3 * h, h)
        linear(f"{p}.attn.proj", h, h)
        linear(f"{p}.cross_attn.q_linear", h, h)
        linear(f"{p}.cross_attn.kv_linear", 2 * h, h)
        linear(f"{p}.cross_attn.proj", h, h)
        linear(f"{p}.mlp.fc1", 4 * h, h)
        linear(f"{p}.mlp.fc2", h, 4 * h)
    shapes["final_layer.scale_shift_table"] = (2, h)
    linear("final_layer.linear", PATCH * PATCH * spec.out_channels, h)
    return shapes


# PixArt name -> diffusers name of the tensors that move as they are (weight and bias for linears)
_SHARED_LINEARS = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_BLOCK_LINEARS = {"attn.proj": "attn1.to_out.0", "cross_attn.q_linear": "attn2.to_q",
                  "cross_attn.proj": "attn2.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2"}
_UNUSED = ("y_embedder.y_embedding", "pos_embed")  # training's null caption; ComfyUI's interpolation hint


def pixart_to_diffusers(state: Mapping[str, torch.Tensor], spec: PixArtSpec) -> dict[str, torch.Tensor]:
    """Rename PixArt tensors onto ``PixArtTransformer2DModel``; blocks absent from ``state`` are skipped
    (one PipeFusion stage's file read)."""
    src = dict(state)
    out: dict[str, torch.Tensor] = {}
    for name in _UNUSED:
        src.pop(name, None)
    for s, d in _SHARED_LINEARS.items():
        if f"{s}.weight" in src:
            out[f"{d}.weight"], out[f"{d}.bias"] = src.pop(f"{s}.weight"), src.pop(f"{s}.bias")
    out["scale_shift_table"] = src.pop("final_layer.scale_shift_table")
    for i in range(spec.num_layers):
        s, d = f"blocks.{i}", f"transformer_blocks.{i}"
        if f"{s}.attn.qkv.weight" not in src:
            continue  # another stage's block
        out[f"{d}.scale_shift_table"] = src.pop(f"{s}.scale_shift_table")
        for suffix in ("weight", "bias"):
            # (3h, ...) -> q, k, v; (2h, ...) -> k, v
            for name, part in zip(("to_q", "to_k", "to_v"), src.pop(f"{s}.attn.qkv.{suffix}").chunk(3)):
                out[f"{d}.attn1.{name}.{suffix}"] = part
            for name, part in zip(("to_k", "to_v"), src.pop(f"{s}.cross_attn.kv_linear.{suffix}").chunk(2)):
                out[f"{d}.attn2.{name}.{suffix}"] = part
            for sb, db in _BLOCK_LINEARS.items():
                out[f"{d}.{db}.{suffix}"] = src.pop(f"{s}.{sb}.{suffix}")
    if src:
        logger.warning("ignoring %d tensors that PixArt does not use: %s", len(src), ", ".join(sorted(src)[:5]))
    return out


def random_pixart_state(spec: PixArtSpec, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Deterministic random weights in PixArt's layout, scaled so activations stay O(1)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(pixart_shapes(spec).items()):
        if name.endswith("scale_shift_table"):
            tensor = torch.randn(shape, generator=generator) / spec.hidden_size ** 0.5  # as PixArt initialises it
        elif name.endswith(".bias") or name in _UNUSED:
            tensor = 0.02 * torch.randn(shape, generator=generator)
        else:
            fan_in = math.prod(shape[1:])
            tensor = torch.randn(shape, generator=generator) / fan_in ** 0.5
        state[name] = tensor.to(dtype).contiguous()
    return state
