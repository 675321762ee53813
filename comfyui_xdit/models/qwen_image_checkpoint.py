"""Qwen-Image weights in ComfyUI's single-file layout (what UNETLoader reads, e.g.
``qwen_image_bf16.safetensors``): architecture from tensor shapes, the (identity) renaming onto diffusers'
``QwenImageTransformer2DModel``, and deterministic random-weight files for ``tiny:qwen-image``.

ComfyUI's layout already is diffusers' (same module names, same shapes; the final norm's (scale, shift)
order agrees too), so loading only checks the names. ComfyUI infers just the input channels and the
block count from a file (``comfy/model_detection.py``) and fixes the rest: width 3072 = 24 heads of 128,
text width 3584 (Qwen2.5-VL-7B), rotary axes (16, 56, 56); a narrower file fails its load with size
mismatches. It even loads a file with no blocks; the smallest that runs one (and the fewest we take) is
one full-width block: ``qwen-image-comfy-min``, ~0.76 GB in bf16. ``qwen-image`` is a narrow 4-head,
4-block model for every parallel layout (Ulysses up to 4, PipeFusion up to 4 stages), which stock
ComfyUI cannot load.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from .checkpoint_file import check_shapes, count_blocks

logger = logging.getLogger(__name__)

PATCH = 2
MARKER_KEY = "txt_norm.weight"  # ComfyUI's own Qwen-Image detection key
TIMESTEP_CHANNELS = 256  # width of the sinusoidal timestep embedding
MLP_RATIO = 4
_BLOCK_KEY = re.compile(r"transformer_blocks\.(\d+)\.")
_QK_NORM = re.compile(r"\.attn\.norm_(q|k|added_q|added_k)\.weight$")


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary widths per position axis (frame, row, col): ComfyUI's (16, 56, 56) for head width 128, the
    same proportions (1/8, 7/16, 7/16) for the narrower test models."""
    if head_dim % 32:
        raise ValueError(f"a Qwen-Image head width of {head_dim} does not split into rotary axes in the "
                         f"proportions 1/8, 7/16, 7/16; use a multiple of 32 (released models: 128)")
    return head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16


@dataclass(frozen=True)
class QwenImageSpec:
    """The architecture of one Qwen-Image file (Qwen-Image, Qwen-Image-Edit: the same transformer)."""

    num_layers: int  # dual-stream blocks (60 in the release)
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584  # Qwen2.5-VL-7B hidden width
    in_channels: int = 64  # 16 latent channels x 2 x 2
    out_channels: int = 16
    family: str = "qwen-image"

    @property
    def hidden_size(self) -> int:
        return self.attention_head_dim * self.num_attention_heads

    @property
    def num_blocks(self) -> int:
        return self.num_layers

    @property
    def context_dim(self) -> int:
        return self.joint_attention_dim

    @property
    def pooled_dim(self) -> int:
        """Qwen-Image takes no pooled vector (ComfyUI ignores the conditioning's, if any): width 0."""
        return 0

    @property
    def latent_channels(self) -> int:
        return self.in_channels // (PATCH * PATCH)

    @property
    def axes_dims_rope(self) -> tuple[int, int, int]:
        return rope_axes(self.attention_head_dim)

    def diffusers_config(self) -> dict:
        return dict(patch_size=PATCH, in_channels=self.in_channels, out_channels=self.out_channels,
                    num_layers=self.num_layers, attention_head_dim=self.attention_head_dim,
                    num_attention_heads=self.num_attention_heads, joint_attention_dim=self.joint_attention_dim,
                    guidance_embeds=False, axes_dims_rope=self.axes_dims_rope)


# A narrow Qwen-Image for the parallel tests: 4 heads (Ulysses up to 4), 4 blocks (PipeFusion up to 4 stages).
TINY_QWEN_IMAGE = QwenImageSpec(num_layers=4, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64)
# The smallest Qwen-Image stock ComfyUI loads and detects: it fixes every width, so one full-width block.
COMFY_MIN_QWEN_IMAGE = QwenImageSpec(num_layers=1)
# The released model's shapes (benchmarks / memory tables; never built with real weights here).
QWEN_IMAGE = QwenImageSpec(num_layers=60)
NAMED_QWEN_IMAGE_SPECS: Mapping[str, QwenImageSpec] = {"qwen-image": TINY_QWEN_IMAGE,
                                                        "qwen-image-comfy-min": COMFY_MIN_QWEN_IMAGE}


def block_index(key: str, spec: QwenImageSpec) -> Optional[int]:
    """The dual-stream block a key belongs to; ``None`` for the tensors every stage needs."""
    match = _BLOCK_KEY.match(key)
    return int(match.group(1)) if match else None


def infer_qwen_image_spec(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> QwenImageSpec:
    """Architecture from tensor shapes (``state`` may hold shapes only); ``ValueError`` naming what is off."""
    if MARKER_KEY in state and count_blocks(state, _BLOCK_KEY) == 0:
        raise ValueError(f"{source} is a Qwen-Image file without transformer blocks (which ComfyUI loads but which "
                         f"has no blocks to run); use a complete file, e.g. qwen_image_bf16.safetensors")
    required = ("img_in.weight", "txt_in.weight", MARKER_KEY, "transformer_blocks.0.attn.norm_q.weight",
                "proj_out.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{source} is not a Qwen-Image transformer in ComfyUI's single-file layout: missing "
                         f"{', '.join(missing)}; pick a Qwen-Image file from models/diffusion_models "
                         f"(e.g. qwen_image_bf16.safetensors)")
    hidden, in_channels = state["img_in.weight"].shape
    head_dim = int(state["transformer_blocks.0.attn.norm_q.weight"].shape[0])
    if hidden % head_dim:
        raise ValueError(f"{source}: Qwen-Image width {hidden} is not a multiple of its head width {head_dim}")
    out_features = int(state["proj_out.weight"].shape[0])
    if out_features % (PATCH * PATCH) or in_channels % (PATCH * PATCH):
        raise ValueError(f"{source}: Qwen-Image input/output widths {in_channels}/{out_features} are not 2x2 "
                         f"patches of latent channels")
    rope_axes(head_dim)  # ValueError for a head width the rotary axes cannot split
    spec = QwenImageSpec(num_layers=count_blocks(state, _BLOCK_KEY), attention_head_dim=head_dim,
                         num_attention_heads=int(hidden // head_dim),
                         joint_attention_dim=int(state[MARKER_KEY].shape[0]), in_channels=int(in_channels),
                         out_channels=out_features // (PATCH * PATCH))
    expected = qwen_image_shapes(spec)
    check_shapes(state, expected, source,
                 f"Qwen-Image ({spec.num_attention_heads} heads of {head_dim}, {spec.num_layers} blocks)")
    return spec


def qwen_image_shapes(spec: QwenImageSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Qwen-Image file with its shape, as ComfyUI's (and diffusers') model holds them."""
    h, d = spec.hidden_size, spec.attention_head_dim
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_f: int, in_f: int) -> None:
        shapes[f"{name}.weight"] = (out_f, in_f)
        shapes[f"{name}.bias"] = (out_f,)

    linear("img_in", h, spec.in_channels)
    shapes["txt_norm.weight"] = (spec.joint_attention_dim,)
    linear("txt_in", h, spec.joint_attention_dim)
    linear("time_text_embed.timestep_embedder.linear_1", h, TIMESTEP_CHANNELS)
    linear("time_text_embed.timestep_embedder.linear_2", h, h)
    for i in range(spec.num_layers):
        p = f"transformer_blocks.{i}"
        for stream in ("img", "txt"):
            linear(f"{p}.{stream}_mod.1", 6 * h, h)  # (shift, scale, gate) x (attention, MLP)
            linear(f"{p}.{stream}_mlp.net.0.proj", MLP_RATIO * h, h)
            linear(f"{p}.{stream}_mlp.net.2", h, MLP_RATIO * h)
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            linear(f"{p}.attn.{name}", h, h)
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            shapes[f"{p}.attn.{name}.weight"] = (d,)
    linear("norm_out.linear", 2 * h, h)  # (scale, shift), in ComfyUI and diffusers alike
    linear("proj_out", PATCH * PATCH * spec.out_channels, h)
    return shapes


def comfy_to_diffusers(state: Mapping[str, torch.Tensor], spec: QwenImageSpec) -> dict[str, torch.Tensor]:
    """ComfyUI's Qwen-Image tensors under ``QwenImageTransformer2DModel``'s names, which are the same; tensors
    the transformer does not have are dropped with a warning (blocks absent from ``state`` are another
    PipeFusion stage's and are simply not there)."""
    known = qwen_image_shapes(spec)
    out = {k: v for k, v in state.items() if k in known}
    extra = sorted(set(state) - set(out))
    if extra:
        logger.warning("ignoring %d tensors that Qwen-Image does not use: %s", len(extra), ", ".join(extra[:5]))
    return out


def random_qwen_image_state(spec: QwenImageSpec, seed: int,
                            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Deterministic random weights in ComfyUI's Qwen-Image layout, scaled so activations stay O(1)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(qwen_image_shapes(spec).items()):
        if name == MARKER_KEY or _QK_NORM.search(name):  # RMS norm gains
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith(".bias"):
            tensor = 0.02 * torch.randn(shape, generator=generator)
        else:
            tensor = torch.randn(shape, generator=generator) / shape[1] ** 0.5
        state[name] = tensor.to(dtype).contiguous()
    return state
