"""Wan 2.1 / 2.2 (14B-architecture) weights in ComfyUI's single-file layout (what UNETLoader reads, e.g.
``wan2.1_t2v_1.3B_fp16.safetensors``, ``wan2.1_i2v_480p_14B_fp16.safetensors``,
``wan2.2_i2v_high_noise_14B_fp16.safetensors``): architecture from tensor shapes, the renaming onto diffusers'
``WanTransformer3DModel``, and deterministic random-weight files for ``tiny:wan21`` / ``wan21-i2v`` / ``wan22-i2v``.

ComfyUI detects Wan 2.1 by ``head.modulation`` (``comfy/model_detection.py``) and infers the width, the
feed-forward width, the input/output channels and the block count from shapes; it fixes the head width
at 128 (heads = width / 128), the timestep embedding at 256 and, in its model, the text width at 4096
(umT5-XXL). So every file it loads has heads of 128: ``wan21`` is 4 heads (width 512) and 4 blocks, small
enough for the in-process tests and stock-loadable. Text-to-video (16 input channels) and image-to-video
(36: the 16 noisy channels, then ComfyUI's 4 mask + 16 start-frame channels) run here: Wan 2.1 I2V with its CLIP
vision embedder ``img_emb`` and image cross-attention (``k_img``, ``v_img``, ``norm_k_img``; ComfyUI's WAN21_I2V
config), Wan 2.2 I2V A14B without them (ComfyUI reads it as a WAN21_T2V config of 36 channels). Wan 2.2's 5B,
Wan 2.2 TI2V 5B (48 input and output channels: the Wan 2.2 VAE's latent, no ``c_concat``; ComfyUI's WAN22_T2V)
runs too: ``wan22-5b`` is its tiny layout. First-last-frame and the VACE / camera / audio / Fun variants are refused.
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
MARKER_KEY = "head.modulation"  # ComfyUI's own Wan 2.1 detection key
HEAD_DIM = 128  # ComfyUI: num_heads = dim // 128
FREQ_DIM = 256  # sinusoidal timestep embedding width
TEXT_DIM = 4096  # umT5-XXL
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")
# keys of the Wan variants ComfyUI runs that we do not yet: for the refusal message
_VARIANTS = {"img_emb.emb_pos": "Wan first-last-frame-to-video (FLF2V)",
             "vace_patch_embedding.weight": "Wan VACE", "control_adapter.conv.weight": "Wan camera control",
             "casual_audio_encoder.encoder.final_linear.weight": "Wan speech-to-video",
             "audio_proj.audio_proj_glob_1.layer.bias": "HuMo", "face_adapter.fuser_blocks.0.k_norm.weight":
             "Wan Animate", "ref_conv.weight": "Wan with a reference-image convolution"}


IMAGE_EMBEDDER_KEY = "img_emb.proj.0.bias"  # ComfyUI's Wan 2.1 I2V detection key (model_type "i2v")
CLIP_VISION_DIM = 1280  # ComfyUI's MLPProj input: CLIP ViT-H's penultimate width
I2V_CHANNELS = 36  # 16 noisy + 4 mask + 16 start-frame channels
TI2V_CHANNELS = 48  # Wan 2.2 TI2V 5B: the Wan 2.2 VAE's latent, in and out
TI2V_FAMILY = "wan22-5b"  # its own family: its own latent format (ComfyUI's WAN22_T2V, Wan22)


def is_ti2v(state: Mapping[str, object]) -> bool:
    """Whether Wan tensors (or shapes) are Wan 2.2 TI2V 5B's: 48 channels into the patch embedding and out of the
    head (ComfyUI's ``out_dim`` 48), no CLIP vision embedder. Its keys are Wan 2.1's: only shapes tell."""
    embed, head = state.get("patch_embedding.weight"), state.get("head.head.weight")
    if embed is None or head is None or IMAGE_EMBEDDER_KEY in state:
        return False
    return int(embed.shape[1]) == TI2V_CHANNELS and int(head.shape[0]) == TI2V_CHANNELS * 4


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary widths per position axis (frame, row, column), as ComfyUI and diffusers split a head:
    (44, 42, 42) for 128."""
    side = 2 * (head_dim // 6)
    return head_dim - 2 * side, side, side


@dataclass(frozen=True)
class WanSpec:
    """The architecture of one Wan file (1.3B: width 1536, 30 blocks; 14B: 5120, 40): text-to-video with 16 input
    channels; image-to-video with 36, and ``image_dim`` 1280 where it embeds CLIP vision tokens (Wan 2.1 I2V)."""

    num_layers: int
    hidden_size: int = 1536
    ffn_dim: int = 8960
    text_dim: int = TEXT_DIM
    in_channels: int = 16
    out_channels: int = 16
    family: str = "wan21"
    video: bool = True  # the LATENT carries frames: (B, C, T, H, W)
    image_dim: Optional[int] = None  # CLIP vision token width of the image embedder (Wan 2.1 I2V); None: none

    @property
    def extra_channels(self) -> int:
        """Input channels after the noisy latent's: ComfyUI's ``c_concat`` (20 for image-to-video; 0 for T2V)."""
        return self.in_channels - self.out_channels

    @property
    def image_conditioning(self) -> bool:
        """Whether the model takes a start-frame latent (``c_concat``) or CLIP vision tokens."""
        return self.extra_channels > 0 or self.image_dim is not None

    @property
    def ti2v(self) -> bool:
        """Wan 2.2 TI2V 5B (ComfyUI's WAN22_T2V, ``out_dim`` 48): the Wan22 latent format, a start image kept in
        the latent by its noise mask, and a per-token timestep derived from that mask."""
        return self.out_channels == TI2V_CHANNELS

    @property
    def vae_scale(self) -> int:
        """Video pixels per latent pixel a side: the Wan 2.2 VAE's 16 for the 5B, the Wan 2.1 VAE's 8 otherwise."""
        return 16 if self.ti2v else 8

    @property
    def image_to_video(self) -> bool:
        """ComfyUI's ``WAN21(image_to_video=...)``: True for the WAN21_I2V config (an image embedder)."""
        return self.image_dim is not None

    @property
    def attention_head_dim(self) -> int:
        return HEAD_DIM

    @property
    def num_attention_heads(self) -> int:
        return self.hidden_size // HEAD_DIM

    @property
    def num_blocks(self) -> int:
        return self.num_layers

    @property
    def context_dim(self) -> int:
        return self.text_dim

    @property
    def pooled_dim(self) -> int:
        """Wan takes no pooled vector: width 0."""
        return 0

    @property
    def latent_channels(self) -> int:
        """The LATENT's channels (the noisy latent's; an I2V model's other input channels are ``c_concat``)."""
        return self.out_channels

    @property
    def axes_dims_rope(self) -> tuple[int, int, int]:
        return rope_axes(HEAD_DIM)

    def diffusers_config(self) -> dict:
        return dict(patch_size=PATCH, num_attention_heads=self.num_attention_heads, attention_head_dim=HEAD_DIM,
                    in_channels=self.in_channels, out_channels=self.out_channels, text_dim=self.text_dim,
                    freq_dim=FREQ_DIM, ffn_dim=self.ffn_dim, num_layers=self.num_layers, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=self.image_dim,
                    added_kv_proj_dim=self.hidden_size if self.image_dim is not None else None)


# 4 heads of 128 (Ulysses up to 4), 4 blocks (PipeFusion up to 4 stages), a narrow feed-forward: stock-loadable.
TINY_WAN21 = WanSpec(num_layers=4, hidden_size=512, ffn_dim=512)
# The released models' shapes (benchmarks / memory tables; never built with real weights here).
WAN21_T2V_1_3B = WanSpec(num_layers=30, hidden_size=1536, ffn_dim=8960)
WAN21_T2V_14B = WanSpec(num_layers=40, hidden_size=5120, ffn_dim=13824)
# image-to-video: Wan 2.1 I2V's layout (CLIP vision embedder, image cross-attention) and Wan 2.2 I2V A14B's (none)
TINY_WAN21_I2V = WanSpec(num_layers=4, hidden_size=512, ffn_dim=512, in_channels=I2V_CHANNELS,
                         image_dim=CLIP_VISION_DIM)
TINY_WAN22_I2V = WanSpec(num_layers=4, hidden_size=512, ffn_dim=512, in_channels=I2V_CHANNELS)
WAN21_I2V_14B = WanSpec(num_layers=40, hidden_size=5120, ffn_dim=13824, in_channels=I2V_CHANNELS,
                        image_dim=CLIP_VISION_DIM)
WAN22_I2V_A14B = WanSpec(num_layers=40, hidden_size=5120, ffn_dim=13824, in_channels=I2V_CHANNELS)
# Wan 2.2 TI2V 5B: 24 heads of 128, 30 blocks; tiny: 4 heads, 4 blocks, the same 48 channels (stock-loadable)
WAN22_TI2V_5B = WanSpec(num_layers=30, hidden_size=3072, ffn_dim=14336, in_channels=TI2V_CHANNELS,
                        out_channels=TI2V_CHANNELS, family=TI2V_FAMILY)
TINY_WAN22_5B = WanSpec(num_layers=4, hidden_size=512, ffn_dim=512, in_channels=TI2V_CHANNELS,
                        out_channels=TI2V_CHANNELS, family=TI2V_FAMILY)
NAMED_WAN_SPECS: Mapping[str, WanSpec] = {"wan21": TINY_WAN21, "wan21-i2v": TINY_WAN21_I2V,
                                          "wan22-i2v": TINY_WAN22_I2V, "wan22-5b": TINY_WAN22_5B}


def block_index(key: str, spec: WanSpec) -> Optional[int]:
    """The block a key belongs to; ``None`` for the tensors every stage needs."""
    match = _BLOCK_KEY.match(key)
    return int(match.group(1)) if match else None


def infer_wan_spec(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> WanSpec:
    """Architecture from tensor shapes (``state`` may hold shapes only); ``ValueError`` naming what is off."""
    variant = next((name for key, name in _VARIANTS.items() if key in state), None)
    if variant is not None:
        raise ValueError(f"{source} is {variant}, which the xDiT nodes do not run yet; use a Wan 2.1 text-to-video "
                         f"or image-to-video file (e.g. wan2.1_t2v_1.3B_fp16.safetensors) or the stock KSampler")
    required = ("patch_embedding.weight", "text_embedding.0.weight", MARKER_KEY, "head.head.weight",
                "blocks.0.ffn.0.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{source} is not a Wan 2.1 transformer in ComfyUI's single-file layout: missing "
                         f"{', '.join(missing)}; pick a Wan 2.1 file from models/diffusion_models "
                         f"(e.g. wan2.1_t2v_1.3B_fp16.safetensors)")
    hidden, in_channels = (int(n) for n in state["patch_embedding.weight"].shape[:2])
    image = IMAGE_EMBEDDER_KEY in state
    out_features = int(state["head.head.weight"].shape[0])
    ti2v = is_ti2v(state)  # Wan 2.2 TI2V 5B
    if not ti2v and (in_channels not in (16, I2V_CHANNELS) or (image and in_channels != I2V_CHANNELS)):
        what = ("Wan Fun control: not Wan 2.2 TI2V 5B, whose output has 48 channels too" if in_channels == 48
                else "a Wan variant")
        embedder = " with a CLIP vision embedder" if image else ""
        raise ValueError(f"{source} takes {in_channels} latent channels ({what}{embedder}); the xDiT nodes run Wan "
                         f"text-to-video (16 channels), image-to-video (36) and Wan 2.2 TI2V 5B (48 in and out) only")
    if hidden % HEAD_DIM:
        raise ValueError(f"{source}: Wan width {hidden} is not a multiple of the head width {HEAD_DIM} that ComfyUI "
                         f"assumes")
    spec = WanSpec(num_layers=count_blocks(state, _BLOCK_KEY), hidden_size=hidden,
                   ffn_dim=int(state["blocks.0.ffn.0.weight"].shape[0]),
                   text_dim=int(state["text_embedding.0.weight"].shape[1]), in_channels=in_channels,
                   out_channels=out_features // 4,
                   image_dim=int(state["img_emb.proj.1.weight"].shape[1]) if image else None,
                   family=TI2V_FAMILY if ti2v else "wan21")
    check_shapes(state, wan_shapes(spec), source,
                 f"Wan 2.1 ({spec.num_attention_heads} heads of {HEAD_DIM}, {spec.num_layers} blocks"
                 f"{', image-to-video' if spec.extra_channels else ''})")
    return spec


def wan_shapes(spec: WanSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Wan file of ``spec`` with its shape, in ComfyUI's layout."""
    h, f = spec.hidden_size, spec.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_f: int, in_f: int) -> None:
        shapes[f"{name}.weight"] = (out_f, in_f)
        shapes[f"{name}.bias"] = (out_f,)

    shapes["patch_embedding.weight"] = (h, spec.in_channels, *PATCH)
    shapes["patch_embedding.bias"] = (h,)
    linear("text_embedding.0", h, spec.text_dim)
    linear("text_embedding.2", h, h)
    linear("time_embedding.0", h, FREQ_DIM)
    linear("time_embedding.2", h, h)
    linear("time_projection.1", 6 * h, h)
    for i in range(spec.num_layers):
        p = f"blocks.{i}"
        for attn in ("self_attn", "cross_attn"):
            for name in ("q", "k", "v", "o"):
                linear(f"{p}.{attn}.{name}", h, h)
            shapes[f"{p}.{attn}.norm_q.weight"] = (h,)
            shapes[f"{p}.{attn}.norm_k.weight"] = (h,)
        if spec.image_dim is not None:  # the image cross-attention's keys and values (WanI2VCrossAttention)
            linear(f"{p}.cross_attn.k_img", h, h)
            linear(f"{p}.cross_attn.v_img", h, h)
            shapes[f"{p}.cross_attn.norm_k_img.weight"] = (h,)
        shapes[f"{p}.norm3.weight"] = (h,)  # the cross-attention's input norm (cross_attn_norm)
        shapes[f"{p}.norm3.bias"] = (h,)
        linear(f"{p}.ffn.0", f, h)
        linear(f"{p}.ffn.2", h, f)
        shapes[f"{p}.modulation"] = (1, 6, h)
    linear("head.head", spec.out_channels * 4, h)
    shapes["head.modulation"] = (1, 2, h)
    if spec.image_dim is not None:  # MLPProj: LayerNorm, Linear, GELU, Linear, LayerNorm
        d = spec.image_dim
        shapes["img_emb.proj.0.weight"], shapes["img_emb.proj.0.bias"] = (d,), (d,)
        linear("img_emb.proj.1", d, d)
        linear("img_emb.proj.3", h, d)
        shapes["img_emb.proj.4.weight"], shapes["img_emb.proj.4.bias"] = (h,), (h,)
    return shapes


# ComfyUI's name -> diffusers' (the rest of a key is kept); block names after "blocks.N."
_SHARED_NAMES = {"text_embedding.0": "condition_embedder.text_embedder.linear_1",
                 "text_embedding.2": "condition_embedder.text_embedder.linear_2",
                 "time_embedding.0": "condition_embedder.time_embedder.linear_1",
                 "time_embedding.2": "condition_embedder.time_embedder.linear_2",
                 "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out",
                 "head.modulation": "scale_shift_table", "patch_embedding": "patch_embedding",
                 "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
                 "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
                 "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
                 "img_emb.proj.4": "condition_embedder.image_embedder.norm2"}
_BLOCK_NAMES = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
                "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
                "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q",
                "cross_attn.norm_k": "attn2.norm_k", "cross_attn.k_img": "attn2.add_k_proj",
                "cross_attn.v_img": "attn2.add_v_proj", "cross_attn.norm_k_img": "attn2.norm_added_k",
                "norm3": "norm2", "ffn.0": "ffn.net.0.proj",
                "ffn.2": "ffn.net.2", "modulation": "scale_shift_table"}


def diffusers_name(key: str) -> str:
    """A ComfyUI Wan key under ``WanTransformer3DModel``'s name (``KeyError`` for one it does not have)."""
    match = _BLOCK_KEY.match(key)
    if match:
        rest = key[match.end():]
        module, _, leaf = rest.rpartition(".") if rest != "modulation" else ("modulation", "", "")
        return f"blocks.{match.group(1)}.{_BLOCK_NAMES[module]}" + (f".{leaf}" if leaf else "")
    if key == "head.modulation":
        return _SHARED_NAMES[key]
    module, _, leaf = key.rpartition(".")
    return f"{_SHARED_NAMES[module]}.{leaf}"


def wan_to_diffusers(state: Mapping[str, torch.Tensor], spec: WanSpec) -> dict[str, torch.Tensor]:
    """ComfyUI's Wan tensors under diffusers' names; tensors the transformer does not have are dropped with
    a warning (blocks absent from ``state`` are another PipeFusion stage's and are simply not there)."""
    known = wan_shapes(spec)
    out = {diffusers_name(k): v for k, v in state.items() if k in known}
    extra = sorted(set(state) - set(known))
    if extra:
        logger.warning("ignoring %d tensors that this Wan model does not use: %s", len(extra), ", ".join(extra[:5]))
    return out


def random_wan_state(spec: WanSpec, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Deterministic random weights in ComfyUI's Wan layout, scaled so activations stay O(1)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(wan_shapes(spec).items()):
        if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight", "norm_k_img.weight", "proj.0.weight",
                          "proj.4.weight")):  # norm gains
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith("modulation"):
            tensor = torch.randn(shape, generator=generator) / spec.hidden_size ** 0.5
        elif name.endswith(".bias"):
            tensor = 0.02 * torch.randn(shape, generator=generator)
        else:  # (out, in, ...) weights: 1 / sqrt(fan-in)
            fan_in = 1
            for n in shape[1:]:
                fan_in *= n
            tensor = torch.randn(shape, generator=generator) / fan_in ** 0.5
        state[name] = tensor.to(dtype).contiguous()
    return state
