"""Flux weights in the single-file BFL layout that ComfyUI users keep in ``models/diffusion_models``.

Reads a ``.safetensors`` file offline, infers the architecture from tensor shapes, and renames the
tensors onto diffusers' ``FluxTransformer2DModel``. Also writes deterministic random-weight files in
the same layout (``tiny:flux`` and friends) for tests and benchmarks.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass
from typing import Mapping, Optional

import torch
from safetensors.torch import save_file

from .checkpoint_file import check_shapes, count_blocks, check_format, read_checkpoint, read_shapes  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

_REQUIRED_KEYS = ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight",
                  "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.norm.query_norm.scale")


@dataclass(frozen=True)
class FluxSpec:
    """The architecture of one Flux file, as diffusers' ``FluxTransformer2DModel`` config."""

    num_layers: int
    num_single_layers: int
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int
    pooled_projection_dim: int
    guidance_embeds: bool
    in_channels: int = 64
    mlp_ratio: float = 4.0

    @property
    def hidden_size(self) -> int:
        return self.attention_head_dim * self.num_attention_heads

    @property
    def family(self) -> str:
        return "flux"

    @property
    def num_blocks(self) -> int:
        return self.num_layers + self.num_single_layers

    @property
    def context_dim(self) -> int:
        return self.joint_attention_dim

    @property
    def pooled_dim(self) -> int:
        return self.pooled_projection_dim

    @property
    def latent_channels(self) -> int:
        return self.in_channels // 4

    @property
    def axes_dims_rope(self) -> tuple[int, int, int]:
        """(16, 56, 56) for Flux's 128-wide heads; the same proportions for smaller heads."""
        first = self.attention_head_dim // 8
        rest = (self.attention_head_dim - first) // 2
        axes = (first, rest, rest)
        if sum(axes) != self.attention_head_dim or any(a % 2 for a in axes):
            raise ValueError(f"attention head dim {self.attention_head_dim} cannot be split into even rotary axes; "
                             "use a multiple of 32")
        return axes

    def diffusers_config(self) -> dict:
        return dict(patch_size=1, in_channels=self.in_channels, num_layers=self.num_layers,
                    num_single_layers=self.num_single_layers, attention_head_dim=self.attention_head_dim,
                    num_attention_heads=self.num_attention_heads, joint_attention_dim=self.joint_attention_dim,
                    pooled_projection_dim=self.pooled_projection_dim, guidance_embeds=self.guidance_embeds,
                    axes_dims_rope=self.axes_dims_rope)


# A tiny Flux for tests: 8 heads so every Ulysses degree up to 8 divides them.
TINY_FLUX = FluxSpec(num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=8,
                     joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True)
# The smallest Flux that stock ComfyUI loads (it fixes width 3072, 24 heads, context 4096).
COMFY_MIN_FLUX = FluxSpec(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                          joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)
NAMED_SPECS: Mapping[str, FluxSpec] = {"flux": TINY_FLUX, "flux-comfy-min": COMFY_MIN_FLUX}


def read_flux_spec(path: str | os.PathLike) -> FluxSpec:
    """The architecture of a Flux file from its header alone (no weights read)."""
    return infer_flux_spec(read_shapes(path), repr(os.fspath(path)))  # type: ignore[arg-type]


_BLOCK_KEY = re.compile(r"(double_blocks|single_blocks)\.(\d+)\.")
_DOUBLE_KEY, _SINGLE_KEY = re.compile(r"double_blocks\.(\d+)\."), re.compile(r"single_blocks\.(\d+)\.")


def block_index(key: str, num_double: int) -> Optional[int]:
    """Position of a BFL key's block in the adapter's block list (double blocks, then single); ``None``
    for the tensors every stage needs (embedders, final layer)."""
    match = _BLOCK_KEY.match(key)
    if match is None:
        return None
    index = int(match.group(2))
    return index if match.group(1) == "double_blocks" else num_double + index


def in_blocks(key: str, num_double: int, blocks: Optional[tuple[int, int]]) -> bool:
    """Whether a rank that runs ``blocks`` ([start, stop), ``None`` = all) needs BFL tensor ``key``."""
    index = block_index(key, num_double)
    return blocks is None or index is None or blocks[0] <= index < blocks[1]


def stage_state(state: Mapping[str, torch.Tensor], num_double: int,
                blocks: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The shared tensors plus the blocks in ``[start, stop)``."""
    return {k: v for k, v in state.items() if in_blocks(k, num_double, blocks)}


def with_placeholders(state: Mapping[str, torch.Tensor], spec: FluxSpec) -> dict[str, torch.Tensor]:
    """``state`` with every missing tensor of ``spec`` as a zero-stride view of one number (no memory): lets
    the name conversion run on one stage's tensors; the placeholders are dropped before loading."""
    zero = torch.zeros((), dtype=next(iter(state.values())).dtype, device=next(iter(state.values())).device)
    out = dict(state)
    for key, shape in bfl_shapes(spec).items():
        if key not in out:
            out[key] = zero.expand(shape)  # (shape) view of one number
    return out


def describe_keys(state: Mapping[str, torch.Tensor], limit: int = 5) -> str:
    keys = sorted(state)
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} tensors ({shown}{', ...' if len(keys) > limit else ''})"


def infer_flux_spec(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> FluxSpec:
    """Architecture from tensor shapes; ``ValueError`` naming what was found when it is not Flux."""
    missing = [k for k in _REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"{source} is not a Flux transformer in the BFL/ComfyUI layout: missing "
                         f"{', '.join(missing)}; found {describe_keys(state)}")
    hidden, in_channels = state["img_in.weight"].shape
    head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    if hidden % head_dim:
        raise ValueError(f"{source}: hidden size {hidden} is not a multiple of head dim {head_dim}")
    spec = FluxSpec(
        num_layers=count_blocks(state, _DOUBLE_KEY),
        num_single_layers=count_blocks(state, _SINGLE_KEY),
        attention_head_dim=int(head_dim),
        num_attention_heads=int(hidden // head_dim),
        joint_attention_dim=int(state["txt_in.weight"].shape[1]),
        pooled_projection_dim=int(state["vector_in.in_layer.weight"].shape[1]),
        guidance_embeds="guidance_in.in_layer.weight" in state,
        in_channels=int(in_channels),
    )
    expected = bfl_shapes(spec)
    check_shapes(state, expected, source,
                 f"Flux ({spec.num_layers} double + {spec.num_single_layers} single blocks)")
    return spec


def bfl_shapes(spec: FluxSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of a BFL-layout Flux file with its shape."""
    h, d, mlp = spec.hidden_size, spec.attention_head_dim, int(spec.hidden_size * spec.mlp_ratio)
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_f: int, in_f: int) -> None:
        shapes[f"{name}.weight"] = (out_f, in_f)
        shapes[f"{name}.bias"] = (out_f,)

    linear("img_in", h, spec.in_channels)
    linear("txt_in", h, spec.joint_attention_dim)
    linear("time_in.in_layer", h, 256)
    linear("time_in.out_layer", h, h)
    linear("vector_in.in_layer", h, spec.pooled_projection_dim)
    linear("vector_in.out_layer", h, h)
    if spec.guidance_embeds:
        linear("guidance_in.in_layer", h, 256)
        linear("guidance_in.out_layer", h, h)
    for i in range(spec.num_layers):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            linear(f"{p}_mod.lin", 6 * h, h)
            linear(f"{p}_attn.qkv", 3 * h, h)
            linear(f"{p}_attn.proj", h, h)
            shapes[f"{p}_attn.norm.query_norm.scale"] = (d,)
            shapes[f"{p}_attn.norm.key_norm.scale"] = (d,)
            linear(f"{p}_mlp.0", mlp, h)
            linear(f"{p}_mlp.2", h, mlp)
    for i in range(spec.num_single_layers):
        p = f"single_blocks.{i}"
        linear(f"{p}.linear1", 3 * h + mlp, h)
        linear(f"{p}.linear2", h, h + mlp)
        linear(f"{p}.modulation.lin", 3 * h, h)
        shapes[f"{p}.norm.query_norm.scale"] = (d,)
        shapes[f"{p}.norm.key_norm.scale"] = (d,)
    linear("final_layer.linear", spec.in_channels, h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


def _split_linear(state: dict, src: str, dst: list[str], sizes: list[int], out: dict) -> None:
    for suffix in ("weight", "bias"):
        for name, part in zip(dst, torch.split(state.pop(f"{src}.{suffix}"), sizes, dim=0)):
            out[f"{name}.{suffix}"] = part


def _move(state: dict, src: str, dst: str, out: dict) -> None:
    for suffix in ("weight", "bias"):
        out[f"{dst}.{suffix}"] = state.pop(f"{src}.{suffix}")


def bfl_to_diffusers(state: Mapping[str, torch.Tensor], spec: FluxSpec) -> dict[str, torch.Tensor]:
    """Rename BFL tensors onto ``FluxTransformer2DModel``; any width (diffusers' own converter fixes 3072)."""
    src = dict(state)
    out: dict[str, torch.Tensor] = {}
    h, mlp = spec.hidden_size, int(spec.hidden_size * spec.mlp_ratio)
    _move(src, "time_in.in_layer", "time_text_embed.timestep_embedder.linear_1", out)
    _move(src, "time_in.out_layer", "time_text_embed.timestep_embedder.linear_2", out)
    _move(src, "vector_in.in_layer", "time_text_embed.text_embedder.linear_1", out)
    _move(src, "vector_in.out_layer", "time_text_embed.text_embedder.linear_2", out)
    if spec.guidance_embeds:
        _move(src, "guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1", out)
        _move(src, "guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2", out)
    _move(src, "txt_in", "context_embedder", out)
    _move(src, "img_in", "x_embedder", out)
    for i in range(spec.num_layers):
        s, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        _move(src, f"{s}.img_mod.lin", f"{d}.norm1.linear", out)
        _move(src, f"{s}.txt_mod.lin", f"{d}.norm1_context.linear", out)
        _split_linear(src, f"{s}.img_attn.qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], [h] * 3, out)
        _split_linear(src, f"{s}.txt_attn.qkv",
                      [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], [h] * 3, out)
        out[f"{d}.attn.norm_q.weight"] = src.pop(f"{s}.img_attn.norm.query_norm.scale")
        out[f"{d}.attn.norm_k.weight"] = src.pop(f"{s}.img_attn.norm.key_norm.scale")
        out[f"{d}.attn.norm_added_q.weight"] = src.pop(f"{s}.txt_attn.norm.query_norm.scale")
        out[f"{d}.attn.norm_added_k.weight"] = src.pop(f"{s}.txt_attn.norm.key_norm.scale")
        _move(src, f"{s}.img_attn.proj", f"{d}.attn.to_out.0", out)
        _move(src, f"{s}.txt_attn.proj", f"{d}.attn.to_add_out", out)
        _move(src, f"{s}.img_mlp.0", f"{d}.ff.net.0.proj", out)
        _move(src, f"{s}.img_mlp.2", f"{d}.ff.net.2", out)
        _move(src, f"{s}.txt_mlp.0", f"{d}.ff_context.net.0.proj", out)
        _move(src, f"{s}.txt_mlp.2", f"{d}.ff_context.net.2", out)
    for i in range(spec.num_single_layers):
        s, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        _move(src, f"{s}.modulation.lin", f"{d}.norm.linear", out)
        _split_linear(src, f"{s}.linear1", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"],
                      [h, h, h, mlp], out)
        out[f"{d}.attn.norm_q.weight"] = src.pop(f"{s}.norm.query_norm.scale")
        out[f"{d}.attn.norm_k.weight"] = src.pop(f"{s}.norm.key_norm.scale")
        _move(src, f"{s}.linear2", f"{d}.proj_out", out)
    _move(src, "final_layer.linear", "proj_out", out)
    # BFL's final modulation is (shift, scale); diffusers' AdaLayerNormContinuous wants (scale, shift).
    for suffix in ("weight", "bias"):
        shift, scale = src.pop(f"final_layer.adaLN_modulation.1.{suffix}").chunk(2, dim=0)
        out[f"norm_out.linear.{suffix}"] = torch.cat([scale, shift], dim=0)
    if src:
        logger.warning("ignoring %d tensors that Flux does not use: %s", len(src), ", ".join(sorted(src)[:5]))
    return out


def random_bfl_state(spec: FluxSpec, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Deterministic random weights in the BFL layout, scaled so activations stay O(1)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(bfl_shapes(spec).items()):
        if name.endswith(".scale"):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith(".bias"):
            tensor = 0.02 * torch.randn(shape, generator=generator)
        else:
            tensor = torch.randn(shape, generator=generator) / shape[1] ** 0.5
        state[name] = tensor.to(dtype).contiguous()
    return state


def write_random_flux(path: str | os.PathLike, spec: FluxSpec, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> None:
    """Write a random-weight Flux file in the BFL layout (what ``make-tiny`` does)."""
    save_file(random_bfl_state(spec, seed, dtype), os.fspath(path), metadata={"comfyui_xdit_spec": str(asdict(spec))})
