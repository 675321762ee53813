"""HunyuanVideo text-to-video weights in ComfyUI's single-file layout (what UNETLoader reads, e.g.
``hunyuan_video_t2v_720p_bf16.safetensors``): architecture from tensor shapes, the renaming onto diffusers'
``HunyuanVideoTransformer3DModel``, and deterministic random-weight files for ``tiny:hunyuan-video``.

ComfyUI detects HunyuanVideo by its token refiner (``txt_in.individual_token_refiner.blocks.0.norm1.weight``,
``comfy/model_detection.py``) and reads the width, the input/output channels, the patch, the text width and
the double/single block counts from shapes; it fixes the head width at 128 (heads = width / 128), the
rotary axes at (16, 56, 56) with theta 256, the feed-forward at 4x, two refiner blocks and a CLIP-L pooled
vector (768). Files come in ComfyUI's own names (``img_attn.qkv``, ``img_mod.lin``) or the original release's
(``img_attn_qkv``, ``img_mod.linear``); the latter are renamed to the former first, as ComfyUI does.
``hunyuan-video`` is 4 heads (width 512), 2 double + 2 single blocks: stock-loadable. Text-to-video (16 latent
channels, 1x2x2 patches; HunyuanImageToVideo's v2 (replace) runs on it too), HunyuanVideo image-to-video v1 (33
channels: the noisy latent, the start-frame latent and an inverted mask, ComfyUI's ``HunyuanVideoI2V``) and SkyReels
image-to-video (32 channels: no mask, ``HunyuanVideoSkyreelsI2V``) run; both image-to-video kinds are their own family
``hunyuan-video-i2v`` (``tiny:hunyuan-video-i2v`` and ``tiny:hunyuan-video-skyreels-i2v``, the same tiny shape).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from .checkpoint_file import check_shapes, count_blocks

logger = logging.getLogger(__name__)

PATCH = (1, 2, 2)  # (frames, rows, columns) of latent per token
MARKER_KEY = "txt_in.individual_token_refiner.blocks.0.norm1.weight"  # ComfyUI's own detection key
HEAD_DIM = 128  # ComfyUI: num_heads = hidden_size // 128
ROPE_AXES = (16, 56, 56)  # rotary widths per (frame, row, column) axis of a 128 head
ROPE_THETA = 256.0
FREQ_DIM = 256  # sinusoidal timestep (and guidance) embedding width
TEXT_DIM = 4096  # the llava-llama-3 tokens
POOLED_DIM = 768  # CLIP-L's pooled vector (ComfyUI: vec_in_dim 768)
MLP_RATIO = 4  # ComfyUI fixes it
REFINER_BLOCKS = 2  # ComfyUI's TokenRefiner always has two
I2V_CHANNELS = 33  # HunyuanVideo I2V v1: 16 noisy + 16 start-frame latent + 1 mask (ComfyUI's HunyuanVideoI2V)
SKYREELS_CHANNELS = 32  # SkyReels I2V: 16 noisy + 16 start-frame latent, no mask (HunyuanVideoSkyreelsI2V)
I2V_FAMILY = "hunyuan-video-i2v"
DEFAULT_GUIDANCE = 6.0  # ComfyUI's HunyuanVideo model where the conditioning carries no guidance (no FluxGuidance)
_DOUBLE = re.compile(r"double_blocks\.(\d+)\.")
_SINGLE = re.compile(r"single_blocks\.(\d+)\.")
_REFINER = "txt_in.individual_token_refiner.blocks"
# The original release's names -> ComfyUI's (substring replacements, in this order)
_ORIGINAL_NAMES = (("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."),
                   ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
                   ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."),
                   ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
                   ("_mod.linear.", "_mod.lin."), ("_attn_qkv.", "_attn.qkv."), ("mlp.fc1.", "mlp.0."),
                   ("mlp.fc2.", "mlp.2."), ("_attn_q_norm.weight", "_attn.norm.query_norm.scale"),
                   ("_attn_k_norm.weight", "_attn.norm.key_norm.scale"), (".q_norm.weight", ".norm.query_norm.scale"),
                   (".k_norm.weight", ".norm.key_norm.scale"), ("_attn_proj.", "_attn.proj."),
                   (".modulation.linear.", ".modulation.lin."), ("_in.mlp.2.", "_in.out_layer."),
                   ("_in.mlp.0.", "_in.in_layer."))


@dataclass(frozen=True)
class HunyuanVideoSpec:
    """The architecture of one HunyuanVideo T2V or I2V file (the release: width 3072, 20 double + 40 single blocks)."""

    num_layers: int  # double-stream blocks
    num_single_layers: int
    hidden_size: int = 3072
    text_dim: int = TEXT_DIM
    guidance_embeds: bool = True
    in_channels: int = 16
    out_channels: int = 16
    family: str = "hunyuan-video"
    video: bool = True  # the LATENT carries frames: (B, C, T, H, W)

    @property
    def attention_head_dim(self) -> int:
        return HEAD_DIM

    @property
    def num_attention_heads(self) -> int:
        return self.hidden_size // HEAD_DIM

    @property
    def num_blocks(self) -> int:
        return self.num_layers + self.num_single_layers

    @property
    def context_dim(self) -> int:
        return self.text_dim

    @property
    def pooled_dim(self) -> int:
        return POOLED_DIM

    @property
    def latent_channels(self) -> int:
        """The LATENT's channels: the noisy latent's (an I2V model takes the start frames besides)."""
        return self.out_channels

    @property
    def extra_channels(self) -> int:
        """Channels after the noisy latent's (ComfyUI's ``c_concat``): 17 for I2V v1, 16 for SkyReels, 0 for
        text-to-video."""
        return self.in_channels - self.out_channels

    @property
    def image_conditioning(self) -> bool:
        """Whether the model takes a start-frame latent and mask (``Conditioning.concat_latent`` / ``concat_mask``)."""
        return self.extra_channels > 0

    @property
    def token_replace(self) -> bool:
        """Whether HunyuanImageToVideo's v2 (replace) runs on it (``guiding_frame_index``): the 16-channel model."""
        return not self.image_conditioning

    @property
    def pads_start_frames(self) -> bool:
        """A start latent shorter than the LATENT is zero-padded in time (ComfyUI's ``concat_cond``), not refused."""
        return True

    @property
    def image_dim(self) -> None:
        """No CLIP vision tokens (HunyuanVideo I2V's image reaches it through the llava tokens and c_concat)."""
        return None

    @property
    def mlp_hidden(self) -> int:
        return MLP_RATIO * self.hidden_size

    @property
    def default_guidance(self) -> float:
        """The distilled guidance a conditioning without one gets (ComfyUI's model_base.HunyuanVideo)."""
        return DEFAULT_GUIDANCE

    def diffusers_config(self) -> dict:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    num_attention_heads=self.num_attention_heads, attention_head_dim=HEAD_DIM,
                    num_layers=self.num_layers, num_single_layers=self.num_single_layers,
                    num_refiner_layers=REFINER_BLOCKS, mlp_ratio=float(MLP_RATIO), patch_size=PATCH[1],
                    patch_size_t=PATCH[0], qk_norm="rms_norm", guidance_embeds=self.guidance_embeds,
                    text_embed_dim=self.text_dim, pooled_projection_dim=POOLED_DIM, rope_theta=ROPE_THETA,
                    rope_axes_dim=ROPE_AXES,
                    image_condition_type="latent_concat" if self.image_conditioning else None)


# 4 heads of 128 (Ulysses up to 4), 2 double + 2 single blocks (PipeFusion up to 4 stages): stock-loadable.
TINY_HUNYUAN_VIDEO = HunyuanVideoSpec(num_layers=2, num_single_layers=2, hidden_size=512)
# The release's shapes (benchmarks / memory tables; never built with real weights here).
HUNYUAN_VIDEO_T2V = HunyuanVideoSpec(num_layers=20, num_single_layers=40)
# I2V v1: the same tiny shape, 33 channels in, no guidance embedder (as the release: it takes true CFG)
TINY_HUNYUAN_VIDEO_I2V = HunyuanVideoSpec(num_layers=2, num_single_layers=2, hidden_size=512, guidance_embeds=False,
                                          in_channels=I2V_CHANNELS, family=I2V_FAMILY)
HUNYUAN_VIDEO_I2V = HunyuanVideoSpec(num_layers=20, num_single_layers=40, guidance_embeds=False,
                                     in_channels=I2V_CHANNELS, family=I2V_FAMILY)
# SkyReels I2V: 32 channels in (no mask), with the guidance embedder of the T2V model it is tuned from
TINY_HUNYUAN_VIDEO_SKYREELS = HunyuanVideoSpec(num_layers=2, num_single_layers=2, hidden_size=512,
                                               in_channels=SKYREELS_CHANNELS, family=I2V_FAMILY)
NAMED_HUNYUAN_VIDEO_SPECS: Mapping[str, HunyuanVideoSpec] = {"hunyuan-video": TINY_HUNYUAN_VIDEO,
                                                             I2V_FAMILY: TINY_HUNYUAN_VIDEO_I2V,
                                                             "hunyuan-video-skyreels-i2v": TINY_HUNYUAN_VIDEO_SKYREELS}


def is_image_to_video(state: Mapping[str, object]) -> bool:
    """Whether HunyuanVideo tensors (or shapes) are image-to-video's: 33 (or SkyReels' 32) channels into the patch
    embedding (its keys are text-to-video's: only the shape tells, as ComfyUI's ``in_channels`` detection)."""
    embed = state.get("img_in.proj.weight")
    return embed is not None and int(embed.shape[1]) in (I2V_CHANNELS, SKYREELS_CHANNELS)


def comfy_name(key: str) -> str:
    """A key of either layout under ComfyUI's own name (the original release's renamed as ComfyUI does)."""
    for old, new in _ORIGINAL_NAMES:
        key = key.replace(old, new)
    return key


def comfy_layout(state: Mapping[str, object]) -> dict[str, object]:
    return {comfy_name(k): v for k, v in state.items()}


def block_index(key: str, spec: HunyuanVideoSpec) -> Optional[int]:
    """The adapter block a key belongs to (double blocks first, then single); ``None`` for shared tensors."""
    if match := _DOUBLE.match(key):
        return int(match.group(1))
    if match := _SINGLE.match(key):
        return spec.num_layers + int(match.group(1))
    return None


def infer_hunyuan_video_spec(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> HunyuanVideoSpec:
    """Architecture from tensor shapes (``state`` may hold shapes only); ``ValueError`` naming what is off."""
    state = comfy_layout(state)
    required = ("img_in.proj.weight", "final_layer.linear.weight", "txt_in.input_embedder.weight", MARKER_KEY)
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{source} is not a HunyuanVideo transformer in ComfyUI's single-file layout: missing "
                         f"{', '.join(missing)}; pick a HunyuanVideo file from models/diffusion_models "
                         f"(e.g. hunyuan_video_t2v_720p_bf16.safetensors)")
    patch_weight = tuple(int(n) for n in state["img_in.proj.weight"].shape)  # (hidden, C, 1, 2, 2)
    hidden, in_channels, patch = patch_weight[0], patch_weight[1], patch_weight[2:]
    if in_channels not in (16, I2V_CHANNELS, SKYREELS_CHANNELS):
        raise ValueError(f"{source} takes {in_channels} latent channels (a HunyuanVideo variant), which the xDiT nodes "
                         f"do not run yet; only HunyuanVideo text-to-video (16 channels) and image-to-video (33, or "
                         f"SkyReels' 32) run on them: use the stock KSampler for it")
    extras = [name for key, name in (("byt5_in.fc1.weight", "a ByT5 glyph encoder"),
                                     ("time_r_in.in_layer.weight", "a mean-flow time embedder"))
              if key in state]
    if patch != PATCH or extras:
        what = f"patches {patch}" if patch != PATCH else ", ".join(extras)
        raise ValueError(f"{source} is a HunyuanVideo-style model with {what} (HunyuanImage / HunyuanVideo 1.5?), "
                         f"which the xDiT nodes do not run yet; only HunyuanVideo text-to-video (1x2x2 patches) "
                         f"runs on them: use the stock KSampler for it")
    if "vector_in.in_layer.weight" not in state:
        raise ValueError(f"{source}: this HunyuanVideo file has no CLIP pooled-vector embedder (vector_in), which the "
                         f"xDiT nodes need; use the stock KSampler for it")
    if hidden % HEAD_DIM:
        raise ValueError(f"{source}: HunyuanVideo width {hidden} is not a multiple of the head width {HEAD_DIM} that "
                         f"ComfyUI assumes")
    out_features = int(state["final_layer.linear.weight"].shape[0])
    spec = HunyuanVideoSpec(num_layers=count_blocks(state, _DOUBLE), num_single_layers=count_blocks(state, _SINGLE),
                            hidden_size=hidden, text_dim=int(state["txt_in.input_embedder.weight"].shape[1]),
                            guidance_embeds="guidance_in.in_layer.weight" in state, in_channels=in_channels,
                            out_channels=out_features // (PATCH[1] * PATCH[2]),
                            family=I2V_FAMILY if in_channels in (I2V_CHANNELS, SKYREELS_CHANNELS) else "hunyuan-video")
    if spec.image_conditioning and spec.out_channels != 16:
        raise ValueError(f"{source}: a HunyuanVideo image-to-video file should give 16 latent channels, this one gives "
                         f"{spec.out_channels}; use the stock KSampler for it")
    check_shapes(state, hunyuan_video_shapes(spec), source,
                 f"HunyuanVideo ({spec.num_attention_heads} heads of {HEAD_DIM}, {spec.num_layers} double + "
                 f"{spec.num_single_layers} single blocks)")
    return spec


def hunyuan_video_shapes(spec: HunyuanVideoSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of a HunyuanVideo T2V / I2V file with its shape, in ComfyUI's layout."""
    h, m = spec.hidden_size, spec.mlp_hidden
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_f: int, in_f: int) -> None:
        shapes[f"{name}.weight"] = (out_f, in_f)
        shapes[f"{name}.bias"] = (out_f,)

    def mlp_embedder(name: str, in_f: int) -> None:
        linear(f"{name}.in_layer", h, in_f)
        linear(f"{name}.out_layer", h, h)

    shapes["img_in.proj.weight"] = (h, spec.in_channels, *PATCH)
    shapes["img_in.proj.bias"] = (h,)
    mlp_embedder("time_in", FREQ_DIM)
    mlp_embedder("vector_in", POOLED_DIM)
    if spec.guidance_embeds:
        mlp_embedder("guidance_in", FREQ_DIM)
    linear("txt_in.input_embedder", h, spec.text_dim)
    mlp_embedder("txt_in.t_embedder", FREQ_DIM)
    mlp_embedder("txt_in.c_embedder", spec.text_dim)
    for i in range(REFINER_BLOCKS):
        p = f"{_REFINER}.{i}"
        for norm in ("norm1", "norm2"):
            shapes[f"{p}.{norm}.weight"] = (h,)
            shapes[f"{p}.{norm}.bias"] = (h,)
        linear(f"{p}.self_attn.qkv", 3 * h, h)
        linear(f"{p}.self_attn.proj", h, h)
        linear(f"{p}.mlp.0", 4 * h, h)
        linear(f"{p}.mlp.2", h, 4 * h)
        linear(f"{p}.adaLN_modulation.1", 2 * h, h)
    for i in range(spec.num_layers):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            linear(f"{p}_mod.lin", 6 * h, h)
            linear(f"{p}_attn.qkv", 3 * h, h)
            shapes[f"{p}_attn.norm.query_norm.scale"] = (HEAD_DIM,)
            shapes[f"{p}_attn.norm.key_norm.scale"] = (HEAD_DIM,)
            linear(f"{p}_attn.proj", h, h)
            linear(f"{p}_mlp.0", m, h)
            linear(f"{p}_mlp.2", h, m)
    for i in range(spec.num_single_layers):
        p = f"single_blocks.{i}"
        linear(f"{p}.linear1", 3 * h + m, h)
        linear(f"{p}.linear2", h, h + m)
        shapes[f"{p}.norm.query_norm.scale"] = (HEAD_DIM,)
        shapes[f"{p}.norm.key_norm.scale"] = (HEAD_DIM,)
        linear(f"{p}.modulation.lin", 3 * h, h)
    linear("final_layer.linear", spec.out_channels * PATCH[1] * PATCH[2], h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


# ComfyUI's module name -> diffusers' (the leaf, weight/bias, is kept)
_SHARED_NAMES = {"img_in.proj": "x_embedder.proj",
                 "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
                 "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
                 "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
                 "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
                 "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
                 "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
                 "txt_in.input_embedder": "context_embedder.proj_in",
                 "txt_in.t_embedder.in_layer": "context_embedder.time_text_embed.timestep_embedder.linear_1",
                 "txt_in.t_embedder.out_layer": "context_embedder.time_text_embed.timestep_embedder.linear_2",
                 "txt_in.c_embedder.in_layer": "context_embedder.time_text_embed.text_embedder.linear_1",
                 "txt_in.c_embedder.out_layer": "context_embedder.time_text_embed.text_embedder.linear_2",
                 "final_layer.linear": "proj_out"}
_REFINER_NAMES = {"norm1": "norm1", "norm2": "norm2", "self_attn.proj": "attn.to_out.0", "mlp.0": "ff.net.0.proj",
                  "mlp.2": "ff.net.2", "adaLN_modulation.1": "norm_out.linear"}
_DOUBLE_NAMES = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
                 "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                 "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
                 "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.net.0.proj",
                 "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
_SINGLE_NAMES = {"linear2": "proj_out", "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k",
                 "modulation.lin": "norm.linear"}
_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "self_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v")}


def _leaf(leaf: str) -> str:
    return "weight" if leaf == "scale" else leaf  # ComfyUI's RMSNorm gain is ``scale``, diffusers' ``weight``


def _convert_one(key: str, tensor: torch.Tensor, spec: HunyuanVideoSpec) -> dict[str, torch.Tensor]:
    """One ComfyUI tensor as the diffusers tensors it becomes (a fused qkv splits into three)."""
    module, _, leaf = key.rpartition(".")
    if match := re.match(rf"{re.escape(_REFINER)}\.(\d+)\.(.+)", module):
        prefix, name = f"context_embedder.token_refiner.refiner_blocks.{match.group(1)}", match.group(2)
        if name in _QKV:
            return {f"{prefix}.{part}.{leaf}": chunk for part, chunk in zip(_QKV[name], tensor.chunk(3, dim=0))}
        return {f"{prefix}.{_REFINER_NAMES[name]}.{leaf}": tensor}
    if match := re.match(r"double_blocks\.(\d+)\.(.+)", module):
        prefix, name = f"transformer_blocks.{match.group(1)}", match.group(2)
        if name in _QKV:
            return {f"{prefix}.{part}.{leaf}": chunk for part, chunk in zip(_QKV[name], tensor.chunk(3, dim=0))}
        return {f"{prefix}.{_DOUBLE_NAMES[name]}.{_leaf(leaf)}": tensor}
    if match := re.match(r"single_blocks\.(\d+)\.(.+)", module):
        prefix, name = f"single_transformer_blocks.{match.group(1)}", match.group(2)
        if name == "linear1":  # (3h + mlp, h): q, k, v, then the MLP's input projection
            h = spec.hidden_size
            q, k, v, mlp = torch.split(tensor, [h, h, h, spec.mlp_hidden], dim=0)
            return {f"{prefix}.attn.to_q.{leaf}": q, f"{prefix}.attn.to_k.{leaf}": k, f"{prefix}.attn.to_v.{leaf}": v,
                    f"{prefix}.proj_mlp.{leaf}": mlp}
        return {f"{prefix}.{_SINGLE_NAMES[name]}.{_leaf(leaf)}": tensor}
    if module == "final_layer.adaLN_modulation.1":  # ComfyUI (shift, scale) -> diffusers' norm_out (scale, shift)
        shift, scale = tensor.chunk(2, dim=0)
        return {f"norm_out.linear.{leaf}": torch.cat([scale, shift], dim=0)}
    return {f"{_SHARED_NAMES[module]}.{leaf}": tensor}


def hunyuan_video_to_diffusers(state: Mapping[str, torch.Tensor], spec: HunyuanVideoSpec) -> dict[str, torch.Tensor]:
    """ComfyUI's HunyuanVideo tensors (either layout) under diffusers' names; tensors the transformer does not
    have are dropped with a warning (blocks absent from ``state`` are another PipeFusion stage's)."""
    state = comfy_layout(state)
    known = hunyuan_video_shapes(spec)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in known:
            out.update(_convert_one(key, tensor, spec))
    extra = sorted(set(state) - set(known))
    if extra:
        logger.warning("ignoring %d tensors that HunyuanVideo T2V does not use: %s", len(extra), ", ".join(extra[:5]))
    return out


def random_hunyuan_video_state(spec: HunyuanVideoSpec, seed: int,
                               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Deterministic random weights in ComfyUI's HunyuanVideo layout, scaled so activations stay O(1)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(hunyuan_video_shapes(spec).items()):
        if name.endswith(("norm.scale", "norm1.weight", "norm2.weight")):  # norm gains
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith(".bias"):
            tensor = 0.02 * torch.randn(shape, generator=generator)
        else:  # (out, in, ...) weights: 1 / sqrt(fan-in)
            fan_in = 1
            for n in shape[1:]:
                fan_in *= n
            tensor = torch.randn(shape, generator=generator) / fan_in ** 0.5
        state[name] = tensor.to(dtype).contiguous()
    return state
