"""What a ComfyUI MODEL carries, read for the ranks: its base Flux weights, its LoRA patches and its model
sampling. Only this module looks inside ComfyUI's ModelPatcher; the ranks get plain tensors."""

from __future__ import annotations

from typing import Any

import torch

from comfyui_xdit.lora import LoraPatch
from comfyui_xdit.request import SigmaShift

PREFIX = "diffusion_model."


def check_flux(model: Any) -> None:
    kind = type(getattr(model, "model", None)).__name__
    if kind != "Flux":
        raise ValueError(f"xDiT Parallelize Model takes a Flux MODEL (UNETLoader of a Flux file, optionally "
                         f"through LoRA loaders and ModelSamplingFlux); this MODEL is {kind}")
    options = getattr(model, "model_options", {}) or {}
    transformer = options.get("transformer_options", {}) or {}
    extras = [name for name in ("model_function_wrapper", "sampler_cfg_function", "sampler_post_cfg_function")
              if options.get(name)] + [name for name in ("patches", "patches_replace") if transformer.get(name)]
    if extras:
        raise ValueError(f"the MODEL carries {', '.join(extras)} from a node that changes how the model runs "
                         f"(attention or CFG patches), which the xDiT ranks cannot apply; connect the MODEL from "
                         f"before that node, or use the stock KSampler")


def base_weights(model: Any) -> dict[str, torch.Tensor]:
    """The MODEL's Flux weights without its patches, BFL-named, on the CPU. Where a sampler left patches
    merged in place, ComfyUI's backup holds the original and that is what we read."""
    backup = getattr(model, "backup", {}) or {}
    out = {}
    for name, tensor in model.model.diffusion_model.state_dict().items():
        saved = backup.get(PREFIX + name)
        out[name] = (saved.weight if saved is not None else tensor).detach().to("cpu")
    return out


def lora_patches(model: Any) -> tuple[LoraPatch, ...]:
    """The MODEL's weight patches as plain LoRA records, in ComfyUI's order; ValueError naming what is
    not a plain LoRA (LoHa, LoKr, DoRA, LoCon mid weights, full diffs)."""
    from comfy.weight_adapter import LoRAAdapter

    out = []
    for key, entries in model.patches.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"the MODEL has a patch on {key!r}, outside the diffusion model; use the stock KSampler")
        for strength, adapter, strength_model, offset, function in entries:
            kind = getattr(adapter, "name", type(adapter).__name__)
            if function is not None or not isinstance(adapter, LoRAAdapter):
                raise ValueError(f"the MODEL carries a {kind} patch on {key}; xDiT Parallelize Model merges plain "
                                 f"LoRAs (LoraLoader / LoraLoaderModelOnly with a LoRA file) but not LoHa, LoKr or "
                                 f"model merges yet: use the stock KSampler for this one")
            up, down, alpha, mid, dora_scale, reshape = adapter.weights
            if mid is not None or dora_scale is not None or reshape is not None:
                raise ValueError(f"the LoRA patch on {key} has LoCon mid weights or DoRA scales, which xDiT "
                                 f"Parallelize Model does not merge yet; use the stock KSampler for this LoRA")
            out.append(LoraPatch(key=key[len(PREFIX):], up=up.detach().to("cpu"), down=down.detach().to("cpu"),
                                 alpha=None if alpha is None else float(alpha), strength=float(strength),
                                 strength_model=float(strength_model),
                                 offset=None if offset is None else tuple(int(o) for o in offset)))
    return tuple(out)


def sigma_shift(model: Any) -> SigmaShift:
    """The MODEL's model sampling (UNETLoader's default or ModelSamplingFlux's patch) as our SigmaShift."""
    import comfy.model_sampling

    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.ModelSamplingFlux):
        return SigmaShift(mode="flux", shift=float(sampling.shift))
    if isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteFlow):
        return SigmaShift(mode="discrete_flow", shift=float(sampling.shift), multiplier=float(sampling.multiplier))
    raise ValueError(f"the MODEL's model sampling is {type(sampling).__name__}; xDiT runs Flux's flow sampling "
                     f"(ModelSamplingFlux / ModelSamplingDiscreteFlow) only")
