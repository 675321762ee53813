"""The released models' shapes, for the speed model and memory tables: specs only, never built with
weights here. name -> (spec, prompt tokens the family's text encoder gives by default)."""

from __future__ import annotations

from typing import Any, Mapping

from ..models.flux_checkpoint import FluxSpec
from ..models.pixart_checkpoint import PixArtSpec
from ..models.qwen_image_checkpoint import QWEN_IMAGE
from ..models.sd3_checkpoint import SD3Spec
from ..models.wan_checkpoint import WAN21_T2V_1_3B, WAN21_T2V_14B

FLUX_DEV = FluxSpec(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)
FULL_SIZE: Mapping[str, tuple[Any, int]] = {
    "flux-dev": (FLUX_DEV, 512),  # T5 at 512 tokens
    "flux-schnell": (FluxSpec(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                              joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False), 256),
    "sd3.5-large": (SD3Spec(depth=38, num_layers=38, joint_attention_dim=4096, pooled_projection_dim=2048,
                            pos_embed_max_size=192, qk_norm=True), 333),  # 77 CLIP + 256 T5
    "pixart-sigma": (PixArtSpec(num_layers=28, micro_condition=False), 300),
    "qwen-image": (QWEN_IMAGE, 256),
}
FULL_SIZE = {**FULL_SIZE, "wan2.1-t2v-1.3b": (WAN21_T2V_1_3B, 512),  # umT5-XXL at 512 tokens (ComfyUI pads to it)
             "wan2.1-t2v-14b": (WAN21_T2V_14B, 512)}
# CogVideoX 1.0 (diffusers' transformer files): T5-XXL at the 226 tokens its pipeline pads to
from ..models.cogvideox_checkpoint import COGVIDEOX_2B, COGVIDEOX_5B  # noqa: E402

FULL_SIZE = {**FULL_SIZE, "cogvideox-2b": (COGVIDEOX_2B, 226), "cogvideox-5b": (COGVIDEOX_5B, 226)}
# HunyuanVideo T2V (20 double + 40 single blocks): ComfyUI keeps the prompt's llama tokens, 256 at most by default
from ..models.hunyuan_video_checkpoint import HUNYUAN_VIDEO_T2V  # noqa: E402

FULL_SIZE = {**FULL_SIZE, "hunyuan-video-t2v": (HUNYUAN_VIDEO_T2V, 256)}
# Wan 2.2 TI2V 5B (24 heads of 128, 30 blocks, 48 channels): umT5-XXL at 512 tokens, as Wan 2.1
from ..models.wan_checkpoint import WAN22_TI2V_5B  # noqa: E402

FULL_SIZE = {**FULL_SIZE, "wan2.2-ti2v-5b": (WAN22_TI2V_5B, 512)}
