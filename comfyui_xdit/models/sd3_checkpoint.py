"""SD3 / SD3.5 weights in Stability's single-file MMDiT layout (what ComfyUI's UNETLoader and
CheckpointLoaderSimple read): architecture from tensor shapes, renaming onto diffusers'
``SD3Transformer2DModel``, and deterministic random-weight files for ``tiny:sd3``.

MMDiT ties its widths to the depth: hidden = 64 * depth, heads = depth (ComfyUI builds it so), so a
stock-loadable tiny SD3 is simply a shallow one: depth 4 -> width 256, 4 heads of 64.
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

HEAD_DIM = 64  # MMDiT's head width, fixed
PATCH = 2
MARKER_KEY = "joint_blocks.0.context_block.attn.qkv.weight"  # ComfyUI's own SD3 detection key
_BLOCK_KEY = re.compile(r"joint_blocks\.(\d+)\.")


@dataclass(frozen=True)
class SD3Spec:
    """The architecture of one SD3-family file (SD3 medium, SD3.5 medium/large/turbo)."""

    depth: int  # hidden = 64 * depth, heads = depth
    num_layers: int  # joint blocks (= depth in every released model)
    joint_attention_dim: int  # T5 / padded CLIP token width (4096)
    pooled_projection_dim: int  # CLIP-L + CLIP-G pooled (2048)
    pos_embed_max_size: int  # side of the learned position grid, in patches (192 for SD3/3.5)
    qk_norm: bool = False  # SD3.5: RMS norm on q and k
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5 medium (MMDiT-X): a second image-only attention
    in_channels: int = 16
    out_channels: int = 16
    family: str = "sd3"

    @property
    def hidden_size(self) -> int:
        return HEAD_DIM * self.depth

    @property
    def num_attention_heads(self) -> int:
        return self.depth

    @property
    def num_blocks(self) -> int:
        return self.num_layers

    @property
    def context_dim(self) -> int:
        return self.joint_attention_dim

    @property
    def pooled_dim(self) -> int:
        return self.pooled_projection_dim

    @property
    def latent_channels(self) -> int:
        return self.in_channels

    def diffusers_config(self) -> dict:
        return dict(sample_size=self.pos_embed_max_size, patch_size=PATCH, in_channels=self.in_channels,
                    num_layers=self.num_layers, attention_head_dim=HEAD_DIM, num_attention_heads=self.depth,
                    joint_attention_dim=self.joint_attention_dim, caption_projection_dim=self.hidden_size,
                    pooled_projection_dim=self.pooled_projection_dim, out_channels=self.out_channels,
                    pos_embed_max_size=self.pos_embed_max_size, dual_attention_layers=self.dual_attention_layers,
                    qk_norm="rms_norm" if self.qk_norm else None)


# Stock-loadable tiny SD3: depth 4 (width 256, 4 heads: Ulysses up to 4, PipeFusion up to 4 stages), a
# 32-patch position grid (latents up to 64x64).
TINY_SD3 = SD3Spec(depth=4, num_layers=4, joint_attention_dim=64, pooled_projection_dim=32, pos_embed_max_size=32)
# Full SD3.5-large shapes (benchmarks / memory tables; never built with real weights here).
SD35_LARGE = SD3Spec(depth=38, num_layers=38, joint_attention_dim=4096, pooled_projection_dim=2048,
                     pos_embed_max_size=192, qk_norm=True)
NAMED_SD3_SPECS: Mapping[str, SD3Spec] = {"sd3": TINY_SD3}


def block_index(key: str, spec: SD3Spec) -> Optional[int]:
    """The joint block an MMDiT key belongs to; ``None`` for the tensors every stage needs."""
    match = _BLOCK_KEY.match(key)
    return int(match.group(1)) if match else None


def infer_sd3_spec(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> SD3Spec:
    """Architecture from tensor shapes (``state`` may hold shapes only); ``ValueError`` naming what is off."""
    required = ("x_embedder.proj.weight", "context_embedder.weight", "y_embedder.mlp.0.weight", "pos_embed",
                MARKER_KEY, "final_layer.linear.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{source} is not an SD3 MMDiT in Stability's single-file layout: missing "
                         f"{', '.join(missing)}")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    if patch != PATCH or hidden % HEAD_DIM:
        raise ValueError(f"{source}: SD3 patch {patch} / width {hidden} is not an MMDiT we run (patch 2, width 64*depth)")
    grid = state["pos_embed"].shape[1]
    side = round(grid ** 0.5)
    if side * side != grid:
        raise ValueError(f"{source}: SD3 position table of {grid} entries is not a square grid")
    dual = tuple(sorted(int(m.group(1)) for k in state
                        if (m := re.match(r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight$", k))))
    spec = SD3Spec(depth=int(hidden // HEAD_DIM), num_layers=count_blocks(state, _BLOCK_KEY),
                   joint_attention_dim=int(state["context_embedder.weight"].shape[1]),
                   pooled_projection_dim=int(state["y_embedder.mlp.0.weight"].shape[1]), pos_embed_max_size=side,
                   qk_norm="joint_blocks.0.x_block.attn.ln_q.weight" in state, dual_attention_layers=dual,
                   in_channels=int(in_channels),
                   out_channels=int(state["final_layer.linear.weight"].shape[0] // (PATCH * PATCH)))
    expected = mmdit_shapes(spec)
    check_shapes(state, expected, source, f"SD3 (depth {spec.depth}, {spec.num_layers} blocks)")
    return spec


def mmdit_shapes(spec: SD3Spec) -> dict[str, tuple[int, ...]]:
    """Every tensor of an MMDiT file with its shape, as ComfyUI's ``MMDiT`` holds them."""
    h, d = spec.hidden_size, HEAD_DIM
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_f: int, in_f: int) -> None:
        shapes[f"{name}.weight"] = (out_f, in_f)
        shapes[f"{name}.bias"] = (out_f,)

    shapes["pos_embed"] = (1, spec.pos_embed_max_size ** 2, h)
    shapes["x_embedder.proj.weight"] = (h, spec.in_channels, PATCH, PATCH)
    shapes["x_embedder.proj.bias"] = (h,)
    linear("t_embedder.mlp.0", h, 256)
    linear("t_embedder.mlp.2", h, h)
    linear("y_embedder.mlp.0", h, spec.pooled_projection_dim)
    linear("y_embedder.mlp.2", h, h)
    linear("context_embedder", h, spec.joint_attention_dim)
    for i in range(spec.num_layers):
        last = i == spec.num_layers - 1
        for stream in ("x_block", "context_block"):
            p = f"joint_blocks.{i}.{stream}"
            pre_only = last and stream == "context_block"
            attentions = ("attn", "attn2") if stream == "x_block" and i in spec.dual_attention_layers else ("attn",)
            for attn in attentions:
                linear(f"{p}.{attn}.qkv", 3 * h, h)
                if not pre_only:
                    linear(f"{p}.{attn}.proj", h, h)
                if spec.qk_norm:
                    shapes[f"{p}.{attn}.ln_q.weight"] = (d,)
                    shapes[f"{p}.{attn}.ln_k.weight"] = (d,)
            modulations = 2 if pre_only else (9 if len(attentions) == 2 else 6)
            linear(f"{p}.adaLN_modulation.1", modulations * h, h)
            if not pre_only:
                linear(f"{p}.mlp.fc1", 4 * h, h)
                linear(f"{p}.mlp.fc2", h, 4 * h)
    linear("final_layer.linear", PATCH * PATCH * spec.out_channels, h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """MMDiT's (shift, scale) modulation -> diffusers' AdaLayerNormContinuous (scale, shift)."""
    shift, scale = tensor.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def mmdit_to_diffusers(state: Mapping[str, torch.Tensor], spec: SD3Spec) -> dict[str, torch.Tensor]:
    """Rename MMDiT tensors onto ``SD3Transformer2DModel``; blocks absent from ``state`` are skipped (one
    PipeFusion stage's file read)."""
    src = dict(state)
    out: dict[str, torch.Tensor] = {}

    def move(s: str, d: str, both: bool = True) -> None:
        for suffix in ("weight", "bias") if both else ("",):
            key = f"{s}.{suffix}" if suffix else s
            out[f"{d}.{suffix}" if suffix else d] = src.pop(key)

    move("pos_embed", "pos_embed.pos_embed", both=False)
    move("x_embedder.proj", "pos_embed.proj")
    move("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    move("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    move("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    move("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    move("context_embedder", "context_embedder")
    for i in range(spec.num_layers):
        s, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        if f"{s}.x_block.attn.qkv.weight" not in src:
            continue  # another stage's block
        last = i == spec.num_layers - 1
        attentions = ("attn", "attn2") if i in spec.dual_attention_layers else ("attn",)
        for attn in attentions:
            for suffix in ("weight", "bias"):
                for name, part in zip(("to_q", "to_k", "to_v"), src.pop(f"{s}.x_block.{attn}.qkv.{suffix}").chunk(3)):
                    out[f"{d}.{attn}.{name}.{suffix}"] = part
            move(f"{s}.x_block.{attn}.proj", f"{d}.{attn}.to_out.0")
            if spec.qk_norm:
                out[f"{d}.{attn}.norm_q.weight"] = src.pop(f"{s}.x_block.{attn}.ln_q.weight")
                out[f"{d}.{attn}.norm_k.weight"] = src.pop(f"{s}.x_block.{attn}.ln_k.weight")
        for suffix in ("weight", "bias"):
            for name, part in zip(("add_q_proj", "add_k_proj", "add_v_proj"),
                                  src.pop(f"{s}.context_block.attn.qkv.{suffix}").chunk(3)):
                out[f"{d}.attn.{name}.{suffix}"] = part
        if spec.qk_norm:
            out[f"{d}.attn.norm_added_q.weight"] = src.pop(f"{s}.context_block.attn.ln_q.weight")
            out[f"{d}.attn.norm_added_k.weight"] = src.pop(f"{s}.context_block.attn.ln_k.weight")
        move(f"{s}.x_block.adaLN_modulation.1", f"{d}.norm1.linear")
        move(f"{s}.x_block.mlp.fc1", f"{d}.ff.net.0.proj")
        move(f"{s}.x_block.mlp.fc2", f"{d}.ff.net.2")
        if last:  # context_pre_only: continuous norm, (shift, scale) swapped, no output projection or MLP
            for suffix in ("weight", "bias"):
                out[f"{d}.norm1_context.linear.{suffix}"] = _swap_halves(
                    src.pop(f"{s}.context_block.adaLN_modulation.1.{suffix}"))
        else:
            move(f"{s}.context_block.attn.proj", f"{d}.attn.to_add_out")
            move(f"{s}.context_block.adaLN_modulation.1", f"{d}.norm1_context.linear")
            move(f"{s}.context_block.mlp.fc1", f"{d}.ff_context.net.0.proj")
            move(f"{s}.context_block.mlp.fc2", f"{d}.ff_context.net.2")
    move("final_layer.linear", "proj_out")
    for suffix in ("weight", "bias"):
        out[f"norm_out.linear.{suffix}"] = _swap_halves(src.pop(f"final_layer.adaLN_modulation.1.{suffix}"))
    if src:
        logger.warning("ignoring %d tensors that SD3 does not use: %s", len(src), ", ".join(sorted(src)[:5]))
    return out


def random_mmdit_state(spec: SD3Spec, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Deterministic random weights in the MMDiT layout, scaled so activations stay O(1)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(mmdit_shapes(spec).items()):
        if name.endswith((".ln_q.weight", ".ln_k.weight")):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith(".bias") or name == "pos_embed":
            tensor = (0.02 if name != "pos_embed" else 0.5) * torch.randn(shape, generator=generator)
        else:
            fan_in = math.prod(shape[1:])
            tensor = torch.randn(shape, generator=generator) / fan_in ** 0.5
        state[name] = tensor.to(dtype).contiguous()
    return state
