"""ComfyUI values <-> the engine's plain data (pure functions; no ComfyUI import, testable anywhere)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from comfyui_xdit.conditioning import DEFAULT_FLUX_GUIDANCE, Conditioning

# Conditioning keys that only change what ComfyUI's sampler does in ways the engine does not do yet.
UNSUPPORTED_COND_KEYS = ("area", "strength", "mask", "control", "gligen", "reference_latents",
                         "start_percent", "end_percent", "hooks", "concat_mask_index", "time_dim_concat")
UNSUPPORTED_COND_KEYS += ("ref_latent",)  # HunyuanImageToVideo's custom guidance type


def to_conditioning(value: Any, name: str, default_guidance: Optional[float] = None) -> Conditioning:
    """ComfyUI's CONDITIONING ``[[context, {"pooled_output", "guidance", ...}]]`` -> ``Conditioning``.

    Only the single-entry Flux text conditioning is supported; anything else raises ``ValueError``
    naming the node to remove, instead of silently giving a different picture than KSampler.
    """
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise ValueError(f"{name}: expected a CONDITIONING (from CLIPTextEncode), got {type(value).__name__}")
    if len(value) != 1:
        raise ValueError(f"{name}: xDiT Sampler takes one conditioning entry, got {len(value)} (from "
                         "ConditioningCombine/ConditioningSetArea?); use a single CLIPTextEncode/FluxGuidance chain")
    context, extras = value[0][0], dict(value[0][1])
    used = [key for key in UNSUPPORTED_COND_KEYS if extras.get(key) is not None]
    if used:
        raise ValueError(f"{name}: conditioning carries {', '.join(used)}, which xDiT Sampler does not support yet; "
                         "use the stock KSampler for area/mask/ControlNet/reference conditioning")
    pooled = extras.get("pooled_output")  # None from text encoders without one (Qwen-Image's, PixArt's T5):
    # the family's input check then says whether the model needs one, naming its text encoder
    # what the model uses where the conditioning carries no guidance: Flux's 3.5 unless the family says (HunyuanVideo 6)
    guidance = extras.get("guidance", DEFAULT_FLUX_GUIDANCE if default_guidance is None else default_guidance)
    width, height = extras.get("width"), extras.get("height")  # CLIPTextEncodePixArtAlpha's micro-conditions
    resolution = (float(height), float(width)) if width is not None and height is not None else None
    ratio = extras.get("aspect_ratio")
    target_width, target_height = extras.get("target_width"), extras.get("target_height")  # HunyuanDiT v1.0's sizes
    target = (float(target_height), float(target_width)) if target_width is not None and target_height is not None \
        else None
    # HunyuanDiT's CLIP: the BERT tokens' mask and the mT5 tokens with theirs (comfy/text_encoders/hydit.py)
    return Conditioning(context=context.detach().float().cpu(),
                        pooled=None if pooled is None else pooled.detach().float().cpu(),
                        guidance=None if guidance is None else float(guidance), resolution=resolution,
                        aspect_ratio=None if ratio is None or resolution is None else float(ratio),
                        context_mask=_cpu_float(extras.get("attention_mask")),
                        second_context=_cpu_float(extras.get("conditioning_mt5xl")),
                        second_context_mask=_cpu_float(extras.get("attention_mask_mt5xl")),
                        target_resolution=target,
                        # WanImageToVideo's start frames and CLIP vision output (image-to-video models only)
                        concat_latent=_cpu_float(extras.get("concat_latent_image")),
                        concat_mask=_cpu_float(extras.get("concat_mask")),
                        clip_vision=_clip_vision_tokens(extras.get("clip_vision_output")),
                        # HunyuanImageToVideo's v2 (replace): HunyuanVideo's token replace
                        guiding_frame_index=_float_or_none(extras.get("guiding_frame_index")))


def _float_or_none(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def _cpu_float(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.detach().float().cpu()


def _clip_vision_tokens(output: Any) -> Optional[torch.Tensor]:
    """A CLIP_VISION_OUTPUT's penultimate hidden states (what ComfyUI's WAN21 feeds its image embedder), or None."""
    return None if output is None else _cpu_float(output.penultimate_hidden_states)


def to_latent_tensor(latent: dict, video: bool = False) -> torch.Tensor:
    """The ``samples`` of a LATENT dict as a CPU float32 (B, C, H, W) tensor; for a video family (``video``:
    Wan) the (B, C, T, H, W) video latent as it is."""
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ValueError("latent_image: expected a LATENT (from EmptySD3LatentImage or VAEEncode)")
    samples = latent["samples"]
    if video:
        if samples.ndim != 5:
            raise ValueError(f"latent_image must be a video latent (B, C, frames, H, W) for this video model, got "
                             f"shape {tuple(samples.shape)}; use EmptyHunyuanLatentVideo or VAEEncode with its VAE")
        return samples.detach().float().cpu()
    if samples.ndim == 5 and samples.shape[2] == 1:  # (B, C, 1, H, W): an image in a video VAE's latent (Qwen-Image)
        samples = samples[:, :, 0]
    if samples.ndim != 4:
        raise ValueError(f"latent_image must be an image latent (B, C, H, W) or (B, C, 1, H, W), got shape "
                         f"{tuple(samples.shape)}; video latents are not sampled by the xDiT nodes yet")
    return samples.detach().float().cpu()


def latent_noise_mask(latent: dict) -> Optional[torch.Tensor]:
    """The LATENT's ``noise_mask`` (SetLatentNoiseMask, InpaintModelConditioning) on the CPU, or None."""
    mask = latent.get("noise_mask")
    return None if mask is None else mask.detach().float().cpu()


def latent_batch_index(latent: dict) -> Optional[tuple[int, ...]]:
    """The LATENT's ``batch_index`` (LatentFromBatch, RepeatLatentBatch), or None."""
    index = latent.get("batch_index")
    return None if index is None else tuple(int(i) for i in index)


def to_latent_output(latent_in: dict, samples: torch.Tensor, latent_dimensions: int = 2) -> dict:
    """Like KSampler: a copy of the input LATENT dict with new ``samples`` (the input is not mutated). A
    family whose latent format has a time axis (``latent_dimensions`` 3: Qwen-Image's Wan VAE) gets
    (B, C, 1, H, W), as KSampler returns for it."""
    out = latent_in.copy()
    out["samples"] = samples.unsqueeze(2) if latent_dimensions == 3 and samples.ndim == 4 else samples
    return out


def image_tokens(latent: torch.Tensor) -> int:
    """Packed tokens of a (B, C, H, W) latent (2x2 latent pixels per token), or of a (B, C, T, H, W) video
    latent (T frames of them)."""
    frames = latent.shape[2] if latent.ndim == 5 else 1
    return frames * (latent.shape[-2] // 2) * (latent.shape[-1] // 2)


def optional_int(value: Optional[int]) -> Optional[int]:
    """Widgets use 0 for 'unset'."""
    return None if value in (None, 0) else int(value)
