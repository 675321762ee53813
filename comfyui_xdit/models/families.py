"""The seam for model families: a family is an adapter plus data (ARCHITECTURE.md 2a).

Everything outside ``models/`` asks this module, never a family by name: which family a file holds
(from its keys), its architecture (a spec with ``family``, ``num_attention_heads``, ``num_blocks``,
``context_dim``, ``pooled_dim``, ``latent_channels``), which tensors one PipeFusion stage needs, how to
build the adapter, and the built-in tiny models. The sampling loop, CFG, samplers and PipeFusion see
only the adapter's piecewise forward.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from safetensors.torch import save_file

from . import (cogvideox_checkpoint, flux_checkpoint, hunyuan_dit_checkpoint, hunyuan_video_checkpoint,
               pixart_checkpoint, qwen_image_checkpoint, sd3_checkpoint, wan_checkpoint)
from .checkpoint_file import read_shapes
from .fp8_weights import refuse_scaled_fp8, stored_state

ModelSpec = Any  # FluxSpec | SD3Spec | ...: frozen dataclasses with the properties listed above


@dataclass(frozen=True)
class Family:
    """One model family as data: how to recognise, describe, split and build it."""

    id: str  # the ``tiny:<id>`` / ``make-tiny <id>`` name and ``spec.family``
    title: str  # for messages
    marker_key: str  # a (prefix-stripped) key only this family's files have
    infer_spec: Callable[[Mapping[str, Any], str], ModelSpec]
    block_index: Callable[[str, ModelSpec], Optional[int]]  # file key -> adapter block (None: shared tensor)
    random_state: Callable[[ModelSpec, int, torch.dtype], dict[str, torch.Tensor]]
    adapter: Callable[[], type]  # the adapter class (imported lazily: diffusers loads slowly)
    latent_dimensions: int = 2  # 3: ComfyUI's LATENT has a time axis (B, C, T, H, W) for this family
    joint_text: bool = True  # prompt tokens attend jointly with the image tokens (False: by cross-attention)
    # PipeFusion runs the prompt tokens once a step, not once a patch: the adapter's blocks run on an empty text
    # stream ((B, 0, width) context, rotary for the image alone); see parallel/pipefusion_text.py
    text_once: bool = False
    unless_key: Optional[str] = None  # a key whose presence means another family's file despite the marker key
    # where two families' files have the same keys (Wan 2.1 / Wan 2.2 TI2V 5B), a check of the shapes: True = ours
    accepts: Optional[Callable[[Mapping[str, Any]], bool]] = None


def _flux_adapter() -> type:
    from .flux import FluxAdapter
    return FluxAdapter


def _sd3_adapter() -> type:
    from .sd3 import SD3Adapter
    return SD3Adapter


def _pixart_adapter() -> type:
    from .pixart import PixArtAdapter
    return PixArtAdapter


def _qwen_image_adapter() -> type:
    from .qwen_image import QwenImageAdapter
    return QwenImageAdapter


def _hunyuan_dit_adapter() -> type:
    from .hunyuan_dit import HunyuanDiTAdapter
    return HunyuanDiTAdapter


def _wan_adapter() -> type:
    from .wan import WanAdapter
    return WanAdapter


def _hunyuan_video_i2v_adapter() -> type:
    from .hunyuan_video import HunyuanVideoI2VAdapter
    return HunyuanVideoI2VAdapter


def _cogvideox_adapter() -> type:
    from .cogvideox import CogVideoXAdapter
    return CogVideoXAdapter


def _hunyuan_video_adapter() -> type:
    from .hunyuan_video import HunyuanVideoAdapter
    return HunyuanVideoAdapter


FLUX = Family(id="flux", title="Flux", marker_key="double_blocks.0.img_attn.qkv.weight",
              infer_spec=flux_checkpoint.infer_flux_spec,
              block_index=lambda key, spec: flux_checkpoint.block_index(key, spec.num_layers),
              random_state=flux_checkpoint.random_bfl_state, adapter=_flux_adapter,
              unless_key=hunyuan_video_checkpoint.MARKER_KEY,  # HunyuanVideo's double blocks are named as Flux's
              text_once=True)
SD3 = Family(id="sd3", title="SD3/SD3.5", marker_key=sd3_checkpoint.MARKER_KEY,
             infer_spec=sd3_checkpoint.infer_sd3_spec, block_index=sd3_checkpoint.block_index,
             random_state=sd3_checkpoint.random_mmdit_state, adapter=_sd3_adapter, text_once=True)
QWEN_IMAGE = Family(id="qwen-image", title="Qwen-Image", marker_key=qwen_image_checkpoint.MARKER_KEY,
                    infer_spec=qwen_image_checkpoint.infer_qwen_image_spec,
                    block_index=qwen_image_checkpoint.block_index,
                    random_state=qwen_image_checkpoint.random_qwen_image_state, adapter=_qwen_image_adapter,
                    latent_dimensions=3, text_once=True)  # ComfyUI's Wan21 latent format
# PixArt: both have t_block; alpha's files also the micro-condition embedders (as ComfyUI tells them apart),
# so alpha is asked first
PIXART_ALPHA = Family(id="pixart-alpha", title="PixArt-alpha", marker_key=pixart_checkpoint.ALPHA_MARKER_KEY,
                      infer_spec=pixart_checkpoint.infer_pixart_spec, block_index=pixart_checkpoint.block_index,
                      random_state=pixart_checkpoint.random_pixart_state, adapter=_pixart_adapter,
                      joint_text=False)
PIXART_SIGMA = Family(id="pixart-sigma", title="PixArt-sigma", marker_key=pixart_checkpoint.MARKER_KEY,
                      infer_spec=pixart_checkpoint.infer_pixart_spec, block_index=pixart_checkpoint.block_index,
                      random_state=pixart_checkpoint.random_pixart_state, adapter=_pixart_adapter,
                      joint_text=False)
# Wan 2.1 / 2.2 text- and image-to-video (the spec says which): a video LATENT (B, 16, T, H, W); the other variants
# (VACE, camera, Fun, ...) are refused by infer_spec
WAN21 = Family(id="wan21", title="Wan 2.1", marker_key=wan_checkpoint.MARKER_KEY,
               infer_spec=wan_checkpoint.infer_wan_spec, block_index=wan_checkpoint.block_index,
               random_state=wan_checkpoint.random_wan_state, adapter=_wan_adapter, latent_dimensions=3,
               joint_text=False, accepts=lambda keys: not wan_checkpoint.is_ti2v(keys))
# Wan 2.2 TI2V 5B: Wan 2.1's keys and blocks, 48 channels in and out (shapes tell it apart), its own latent format
WAN22_5B = Family(id=wan_checkpoint.TI2V_FAMILY, title="Wan 2.2 TI2V 5B", marker_key=wan_checkpoint.MARKER_KEY,
                  infer_spec=wan_checkpoint.infer_wan_spec, block_index=wan_checkpoint.block_index,
                  random_state=wan_checkpoint.random_wan_state, adapter=_wan_adapter, latent_dimensions=3,
                  joint_text=False, accepts=wan_checkpoint.is_ti2v)
# HunyuanDiT v1.0 / v1.1 / v1.2 (one spec type; v1.0's size + style conditions read from the file)
HUNYUAN_DIT = Family(id="hunyuan-dit", title="HunyuanDiT", marker_key=hunyuan_dit_checkpoint.MARKER_KEY,
                     infer_spec=hunyuan_dit_checkpoint.infer_hunyuan_dit_spec,
                     block_index=hunyuan_dit_checkpoint.block_index,
                     random_state=hunyuan_dit_checkpoint.random_hunyuan_dit_state, adapter=_hunyuan_dit_adapter,
                     joint_text=False)
# HunyuanVideo T2V: a video LATENT, Flux-like blocks (its files have Flux's marker key too: Flux's unless_key)
HUNYUAN_VIDEO = Family(id="hunyuan-video", title="HunyuanVideo", marker_key=hunyuan_video_checkpoint.MARKER_KEY,
                       infer_spec=hunyuan_video_checkpoint.infer_hunyuan_video_spec,
                       block_index=hunyuan_video_checkpoint.block_index,
                       random_state=hunyuan_video_checkpoint.random_hunyuan_video_state,
                       adapter=_hunyuan_video_adapter, latent_dimensions=3,
                       accepts=lambda keys: not hunyuan_video_checkpoint.is_image_to_video(keys))
# HunyuanVideo I2V v1 (33 channels in: ComfyUI's HunyuanVideoI2V): T2V's keys and blocks, the shape tells it apart
HUNYUAN_VIDEO_I2V = Family(id=hunyuan_video_checkpoint.I2V_FAMILY, title="HunyuanVideo I2V",
                           marker_key=hunyuan_video_checkpoint.MARKER_KEY,
                           infer_spec=hunyuan_video_checkpoint.infer_hunyuan_video_spec,
                           block_index=hunyuan_video_checkpoint.block_index,
                           random_state=hunyuan_video_checkpoint.random_hunyuan_video_state,
                           adapter=_hunyuan_video_i2v_adapter, latent_dimensions=3,
                           accepts=hunyuan_video_checkpoint.is_image_to_video)
# CogVideoX in diffusers' layout (ComfyUI has no CogVideoX loader): a video LATENT, T5 tokens joint with the
# video in every block, v-prediction; 2B (sin-cos positions) and 5B (rotary) told apart by cogvideox_checkpoint, and
# 1.5 (2-frame tokens) and the I2V models (cogvideox15, cogvideox15-i2v, cogvideox-i2v in its NAMED_COGVIDEOX_SPECS)
COGVIDEOX = Family(id="cogvideox", title="CogVideoX", marker_key=cogvideox_checkpoint.MARKER_KEY,
                   infer_spec=cogvideox_checkpoint.infer_cogvideox_spec, block_index=cogvideox_checkpoint.block_index,
                   random_state=cogvideox_checkpoint.random_cogvideox_state, adapter=_cogvideox_adapter,
                   latent_dimensions=3)
FAMILIES: tuple[Family, ...] = (FLUX, SD3, QWEN_IMAGE, PIXART_ALPHA, PIXART_SIGMA, HUNYUAN_DIT, WAN21, HUNYUAN_VIDEO,
                                COGVIDEOX, WAN22_5B, HUNYUAN_VIDEO_I2V)

# Built-in random-weight models: name -> spec (``spec.family`` says whose).
TINY_SPECS: Mapping[str, ModelSpec] = {**flux_checkpoint.NAMED_SPECS, **sd3_checkpoint.NAMED_SD3_SPECS,
                                       **qwen_image_checkpoint.NAMED_QWEN_IMAGE_SPECS,
                                       **pixart_checkpoint.NAMED_PIXART_SPECS,
                                       **hunyuan_dit_checkpoint.NAMED_HUNYUAN_DIT_SPECS,
                                       **wan_checkpoint.NAMED_WAN_SPECS,
                                       **hunyuan_video_checkpoint.NAMED_HUNYUAN_VIDEO_SPECS,
                                       **cogvideox_checkpoint.NAMED_COGVIDEOX_SPECS}

# Families ComfyUI runs that we do not yet, by a key their files have: for the refusal message.
_NOT_YET = {"adaln_single.linear.weight": "PixArt (diffusers layout)", "t_block.1.weight": "PixArt",
            "time_extra_emb.pooler.q_proj.weight": "HunyuanDiT (diffusers layout)",
            "img_in.weight": "another DiT (Chroma, HiDream, ...)",
            "patch_embedding.weight": "a Wan variant", "input_blocks.0.0.weight": "an SD1.5/SDXL UNet"}


def family(family_id: str) -> Family:
    for fam in FAMILIES:
        if fam.id == family_id:
            return fam
    raise ValueError(f"unknown model family {family_id!r}; we run {', '.join(f.id for f in FAMILIES)}")


def family_of(spec: ModelSpec) -> Family:
    return family(spec.family)


def detect_family(keys: Mapping[str, Any], source: str = "checkpoint") -> Family:
    """The family whose marker key ``keys`` holds; ``ValueError`` naming what the file looks like otherwise."""
    for fam in FAMILIES:
        if (fam.marker_key in keys and (fam.unless_key is None or fam.unless_key not in keys)
                and (fam.accepts is None or fam.accepts(keys))):
            return fam
    looks = next((name for key, name in _NOT_YET.items() if key in keys), None)
    shown = ", ".join(sorted(keys)[:5])
    what = f"it looks like {looks}, which the xDiT nodes do not run yet" if looks else f"found {len(keys)} tensors ({shown}, ...)"
    raise ValueError(f"{source} is not a diffusion transformer we run ({', '.join(f.title for f in FAMILIES)}): "
                     f"{what}; pick a file of one of those families from models/diffusion_models (or a checkpoint "
                     f"holding one)")


def infer_spec(state: Mapping[str, Any], source: str = "checkpoint") -> ModelSpec:
    """The architecture of tensors (or shapes) in a family's single-file layout, prefix stripped."""
    refuse_scaled_fp8(state, source)
    return detect_family(state, source).infer_spec(state, source)


def read_spec(path: str | os.PathLike) -> ModelSpec:
    """The architecture of a file from its header alone (no weights read), e.g. to check a parallel
    config before any rank starts."""
    return infer_spec(read_shapes(path), repr(os.fspath(path)))


def in_blocks(key: str, spec: ModelSpec, blocks: Optional[tuple[int, int]]) -> bool:
    """Whether a rank that runs ``blocks`` ([start, stop), ``None`` = all) needs file tensor ``key``."""
    if blocks is None:
        return True
    index = family_of(spec).block_index(key, spec)
    return index is None or blocks[0] <= index < blocks[1]


def stage_state(state: Mapping[str, torch.Tensor], spec: ModelSpec, blocks: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The shared tensors plus the blocks in ``[start, stop)``."""
    return {k: v for k, v in state.items() if in_blocks(k, spec, blocks)}


def build_adapter(state: dict[str, torch.Tensor], spec: ModelSpec, dtype: torch.dtype, device: torch.device | str,
                  source: str, blocks: Optional[tuple[int, int]] = None, weight_dtype: str = "default"):
    """The family's adapter from file-layout tensors (all of them, or one stage's with ``blocks``), computing in
    ``dtype``; fp8 Linear weights (the file's, or all of them with an fp8 ``weight_dtype``) stay fp8
    (``fp8_weights``)."""
    return family_of(spec).adapter().from_state_dict(stored_state(state, weight_dtype), dtype, device, source=source,
                                                     blocks=blocks, spec=spec)


def adapter_from_file(path: str | os.PathLike, dtype: torch.dtype, device: torch.device | str,
                      blocks: Optional[tuple[int, int]] = None, weight_dtype: str = "default"):
    """Load a file's adapter; with ``blocks`` only the shared tensors and those blocks are read from disk."""
    from .checkpoint_file import read_checkpoint
    spec = read_spec(path)
    state = read_checkpoint(path, keep=None if blocks is None else (lambda key: in_blocks(key, spec, blocks)))
    return build_adapter(state, spec, dtype, device, repr(os.fspath(path)), blocks, weight_dtype)


def random_state(spec: ModelSpec, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return family_of(spec).random_state(spec, seed, dtype)


def write_random_model(path: str | os.PathLike, spec: ModelSpec, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> None:
    """Write a random-weight file in the family's single-file layout (what ``make-tiny`` does)."""
    save_file(random_state(spec, seed, dtype), os.fspath(path), metadata={"comfyui_xdit_family": spec.family})
