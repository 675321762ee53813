"""Checks that a request's inputs fit the model, run before any rank starts.

Without them a wrong input fails deep inside a rank: an SDXL or SD1.5 CLIP's tokens (width 2048 or
768) reach Flux's ``context_embedder`` (width 4096) as "mat1 and mat2 shapes cannot be multiplied".
Each message names the input, what the model needs, and where to change it: ``InputNames`` says
how the caller's user knows each input (a node's socket, or a CLI flag).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .conditioning import Conditioning
from .models.families import ModelSpec, family_of

FLUX_PATCH = 2  # latent pixels per token side (image pixels: 16), every 2-D family we run
TOKEN_WIDTHS = {4096: "T5-XXL", 3584: "Qwen2.5-VL-7B"}  # the token encoders of the families we run
CLIP_WIDTHS = {768: "CLIP-L (SD1.5)", 1024: "OpenCLIP-H (SD2)", 1280: "CLIP-G", 2048: "CLIP-L + CLIP-G (SDXL)"}


@dataclass(frozen=True)
class InputNames:
    """Where the user sets each input, and what to do about a wrong text encoder or latent."""

    positive: str
    negative: str
    latent: str
    text_encoder_fix: str  # with {encoders}: the family's text encoder nodes or tensors
    latent_fix: str  # with {vae}: the family's VAE
    from_nodes: bool = True  # the user wires nodes (False: CLI flags and files)

    def encoder_fix(self, family: str) -> str:
        inputs = FAMILY_INPUTS[family]
        return self.text_encoder_fix.format(encoders=inputs.encoders if self.from_nodes else inputs.tensors,
                                            title=inputs.title)

    def vae_fix(self, family: str) -> str:
        return self.latent_fix.format(vae=FAMILY_INPUTS[family].vae, title=FAMILY_INPUTS[family].title)


@dataclass(frozen=True)
class FamilyInputs:
    """How a ComfyUI user makes a family's inputs, for the messages."""

    title: str
    encoders: str  # the text encoder nodes
    tensors: str  # what a --cond file holds
    vae: str


FAMILY_INPUTS = {
    "flux": FamilyInputs("Flux", "DualCLIPLoader (type flux, clip_l + t5xxl) -> CLIPTextEncode (or CLIPTextEncodeFlux)",
                         "T5-XXL tokens, CLIP-L pooled vector", "the Flux VAE (ae.safetensors)"),
    "sd3": FamilyInputs("SD3", "TripleCLIPLoader (clip_l + clip_g + t5xxl) -> CLIPTextEncode (or CLIPTextEncodeSD3), "
                               "or the CLIP of an SD3/SD3.5 checkpoint",
                        "CLIP-L/G + T5-XXL tokens (width 4096), CLIP-L + CLIP-G pooled vector (width 2048)",
                        "the SD3 VAE (the checkpoint's)"),
    "qwen-image": FamilyInputs("Qwen-Image", "CLIPLoader (type qwen_image, qwen_2.5_vl_7b) -> CLIPTextEncode",
                               "Qwen2.5-VL-7B tokens (width 3584); no pooled vector",
                               "the Qwen-Image VAE (qwen_image_vae.safetensors)"),
    "pixart-alpha": FamilyInputs("PixArt-alpha", "CLIPLoader (type pixart, t5xxl) -> CLIPTextEncodePixArtAlpha (or "
                                                 "CLIPTextEncode)", "T5-XXL tokens (width 4096); no pooled vector",
                                 "the SD1.5 VAE (4 channels)"),
    "pixart-sigma": FamilyInputs("PixArt-sigma", "CLIPLoader (type pixart, t5xxl) -> CLIPTextEncode",
                                 "T5-XXL tokens (width 4096); no pooled vector", "the SDXL VAE (4 channels)"),
    "wan21": FamilyInputs("Wan 2.1", "CLIPLoader (type wan, umt5_xxl) -> CLIPTextEncode",
                          "umT5-XXL tokens (width 4096); no pooled vector",
                          "the Wan 2.1 VAE (wan_2.1_vae.safetensors; EmptyHunyuanLatentVideo for text-to-video)"),
    "hunyuan-dit": FamilyInputs("HunyuanDiT", "a HunyuanDiT checkpoint's CLIP (CheckpointLoaderSimple) -> CLIPTextEncode "
                                              "(or CLIPTextEncodeHunyuanDiT)",
                                "CLIP tokens (width 1024, >= 77) + 'positive_second_context' mT5-XL tokens (width "
                                "2048, >= 256), their masks; no pooled vector", "the SDXL VAE (4 channels)"),
}
# CogVideoX: T5-XXL tokens, 226 of them as its pipeline pads a prompt (ComfyUI has no CogVideoX VAE: decode outside it)
FAMILY_INPUTS["cogvideox"] = FamilyInputs(
    "CogVideoX", "CLIPLoader (type sd3 or pixart, t5xxl) -> CLIPTextEncode", "T5-XXL tokens (width 4096, 226 as "
    "CogVideoX's pipeline pads them); no pooled vector",
    "the CogVideoX VAE (diffusers' vae/ folder; EmptyHunyuanLatentVideo for text-to-video)")
FAMILY_INPUTS["hunyuan-video"] = FamilyInputs(
    "HunyuanVideo", "DualCLIPLoader (type hunyuan_video, clip_l + llava_llama3) -> CLIPTextEncode (FluxGuidance for the "
                    "distilled guidance)", "llava-llama-3 tokens (width 4096), CLIP-L pooled vector (width 768)",
    "the HunyuanVideo VAE (hunyuan_video_vae_bf16.safetensors; EmptyHunyuanLatentVideo for text-to-video)")
FAMILY_INPUTS["hunyuan-video-i2v"] = FamilyInputs(
    "HunyuanVideo I2V", "DualCLIPLoader (type hunyuan_video, clip_l + llava_llama3) -> "
                        "TextEncodeHunyuanVideo_ImageToVideo (or CLIPTextEncode) -> HunyuanImageToVideo (guidance_type "
                        "v1 (concat))",
    "llava-llama-3 tokens (width 4096), CLIP-L pooled vector (width 768), 'positive_concat_latent' start frames",
    "the HunyuanVideo VAE (hunyuan_video_vae_bf16.safetensors; HunyuanImageToVideo's latent)")
FAMILY_INPUTS["wan22-5b"] = FamilyInputs(
    "Wan 2.2 TI2V 5B", "CLIPLoader (type wan, umt5_xxl) -> CLIPTextEncode", "umT5-XXL tokens (width 4096); no pooled "
    "vector", "the Wan 2.2 VAE (wan2.2_vae.safetensors, 48 channels; Wan22ImageToVideoLatent, with or without a start "
    "image)")


NODE_INPUTS = InputNames(
    positive="xDiT Sampler's positive input",
    negative="xDiT Sampler's negative input",
    latent="xDiT Sampler's latent_image input",
    text_encoder_fix="encode the prompt with {title}'s text encoders: {encoders}",
    latent_fix="use EmptySD3LatentImage (16 channels) or VAEEncode with {vae}",
)

CLI_INPUTS = InputNames(
    positive="--cond's positive_context/positive_pooled",
    negative="--cond's negative_context/negative_pooled",
    latent="--init-latent's samples",
    text_encoder_fix="write the --cond file from {title}'s text encoders ({encoders})",
    latent_fix="pass a latent saved from a {title} graph (16 channels), or drop --init-latent",
    from_nodes=False,
)


def _encoder_name(width: int, known: dict[int, str]) -> str:
    return f" (looks like {known[width]})" if width in known else ""


def check_conditioning(cond: Conditioning, spec: ModelSpec, where: str, names: InputNames, latent_batch: int) -> None:
    """``ValueError`` unless ``cond`` has the token and pooled widths of ``spec`` and a batch that divides the latent's."""
    title = family_of(spec).title
    width = cond.context.shape[-1]
    if width != spec.context_dim:
        known = {**CLIP_WIDTHS, **TOKEN_WIDTHS}
        raise ValueError(f"{where}: text tokens have width {width}{_encoder_name(width, known)}, "
                         f"but this {title} model takes tokens of width {spec.context_dim}"
                         f"{_encoder_name(spec.context_dim, TOKEN_WIDTHS)}; {names.encoder_fix(spec.family)}")
    pooled = cond.pooled.shape[-1]
    if spec.pooled_dim and pooled != spec.pooled_dim:  # pooled_dim 0: the model takes none and ignores any given
        raise ValueError(f"{where}: the pooled vector has width {pooled}{_encoder_name(pooled, CLIP_WIDTHS)}, but this "
                         f"{title} model takes a pooled vector of width {spec.pooled_dim}; "
                         f"{names.encoder_fix(spec.family)}")
    second = getattr(spec, "second_context_dim", None)  # HunyuanDiT: mT5 tokens besides the CLIP ones
    if second is not None:
        tokens = cond.second_context
        if tokens is None or tokens.shape[-1] != second:
            found = "none" if tokens is None else f"width {tokens.shape[-1]}"
            raise ValueError(f"{where}: this {title} model takes a second stream of text tokens (mT5-XL, width "
                             f"{second}) besides the CLIP tokens; found {found}; {names.encoder_fix(spec.family)}")
    image = [what for what, tensor in (("a start-frame latent (concat_latent_image)", cond.concat_latent),
                                       ("its mask (concat_mask)", cond.concat_mask),
                                       ("CLIP vision tokens (clip_vision_output)", cond.clip_vision))
             if tensor is not None]
    if cond.guiding_frame_index is not None and not getattr(spec, "token_replace", False):
        raise ValueError(f"{where}: the conditioning carries guiding_frame_index (HunyuanImageToVideo's v2 (replace)), "
                         f"which only the 16-channel HunyuanVideo model takes (its v2 replace image-to-video file); "
                         f"this is {title}: use guidance_type v1 (concat) for a 33-channel I2V file, or the stock "
                         f"KSampler")
    if image and not getattr(spec, "image_conditioning", False):
        raise ValueError(f"{where}: the conditioning carries {', '.join(image)} for an image-to-video model, but this "
                         f"{title} model takes no image inputs; connect the conditioning from before WanImageToVideo, "
                         f"or load an image-to-video model")
    for tensor, what in ((cond.context, "text tokens"), (cond.pooled, "pooled vector")):
        if latent_batch % tensor.shape[0]:
            raise ValueError(f"{where}: the {what} have batch {tensor.shape[0]}, which does not divide the latent "
                             f"batch {latent_batch}; encode one prompt (batch 1) or match the latent batch")


def check_latent(latent: torch.Tensor, names: InputNames, spec: ModelSpec) -> None:
    """``ValueError`` unless ``latent`` is an image LATENT of ``spec``'s channels with H and W even (image sides % 16).

    An all-zero latent of another channel count is accepted: ComfyUI widens an empty latent to the
    model's channels (``fix_empty_latent_channels``)."""
    title, fix = family_of(spec).title, names.vae_fix(spec.family)
    if getattr(spec, "video", False):  # a video family: (batch, channels, frames, height, width)
        if latent.ndim != 5:
            raise ValueError(f"{names.latent}: expected a video LATENT (batch, channels, frames, height, width), got "
                             f"shape {tuple(latent.shape)}; {fix}")
    elif latent.ndim != 4:
        raise ValueError(f"{names.latent}: expected an image LATENT (batch, channels, height, width), got shape "
                         f"{tuple(latent.shape)}; {fix}")
    channels = spec.latent_channels
    if latent.shape[1] != channels and torch.count_nonzero(latent) > 0:
        raise ValueError(f"{names.latent}: the latent has {latent.shape[1]} channels (an SD1.5/SDXL VAE?), {title} "
                         f"needs {channels}; {fix}")
    h, w = latent.shape[-2], latent.shape[-1]
    if h % FLUX_PATCH or w % FLUX_PATCH:
        raise ValueError(f"{names.latent}: image size {w * 8}x{h * 8} px (latent {w}x{h}) is not a multiple of 16 px "
                         f"on each side, which {title}'s 2x2 patches need; use a width and height divisible by 16, e.g. "
                         f"{(w // FLUX_PATCH) * FLUX_PATCH * 8 or 16}x{(h // FLUX_PATCH) * FLUX_PATCH * 8 or 16}")
    side = getattr(spec, "pos_embed_max_size", None)
    if side is not None and max(h, w) > side * FLUX_PATCH:
        raise ValueError(f"{names.latent}: image size {w * 8}x{h * 8} px is larger than this {title} model's position "
                         f"table ({side * FLUX_PATCH * 8} px a side); use a smaller width and height")
    least = getattr(spec, "min_mean_side", None)  # PixArt: ComfyUI's position base size is 0 below it
    if least is not None and (h + w) // 2 < least:
        raise ValueError(f"{names.latent}: image size {w * 8}x{h * 8} px is too small for this {title} model: "
                         f"(width + height) / 2 must be at least {least * 8} px; use a larger width and height")


def check_inputs(spec: ModelSpec, latent: torch.Tensor, positive: Conditioning, negative: Optional[Conditioning],
                 names: InputNames) -> None:
    """Every input of one request against ``spec``; ``ValueError`` naming the first that does not fit."""
    check_latent(latent, names, spec)
    for cond, where in ((positive, names.positive), (negative, names.negative)):
        start = None if cond is None else cond.concat_latent
        # HunyuanVideo I2V pads a shorter start latent with zero frames (ComfyUI's concat_cond): its spec says so
        if (start is not None and latent.ndim == 5 and start.shape[2] != latent.shape[2]
                and not getattr(spec, "pads_start_frames", False)):
            raise ValueError(f"{where}: the start-frame latent (concat_latent_image) has {start.shape[2]} frames but "
                             f"{names.latent} has {latent.shape[2]}; sample the latent WanImageToVideo gives with its "
                             f"conditioning (the same length)")
    if getattr(spec, "family", None) == "hunyuan-video-i2v" and torch.count_nonzero(latent) > 0:
        # ComfyUI's HunyuanVideoI2V concatenates the sampled latent itself where a side has no start latent
        for cond, where in ((positive, names.positive), (negative, names.negative)):
            if cond is not None and cond.concat_latent is None:
                raise ValueError(f"{where}: no start-frame latent (concat_latent_image) for a non-empty "
                                 f"{names.latent}, which HunyuanVideo I2V then takes as its start frames; the xDiT "
                                 f"sampler does not run that yet: sample HunyuanImageToVideo's empty latent, or use "
                                 f"the stock KSampler")
    check_conditioning(positive, spec, names.positive, names, latent.shape[0])
    if negative is not None:
        check_conditioning(negative, spec, names.negative, names, latent.shape[0])
