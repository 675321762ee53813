"""What a ComfyUI MODEL carries, read for the ranks: its base weights (Flux or SD3), its LoRA patches and its model
sampling. Only this module looks inside ComfyUI's ModelPatcher; the ranks get plain tensors."""

from __future__ import annotations

from typing import Any, Optional

import torch

from comfyui_xdit.lora import LohaPatch, LokrPatch, LoraPatch, WeightPatch
from comfyui_xdit.request import SigmaShift

PREFIX = "diffusion_model."


# ComfyUI's model classes (comfy/model_base.py) whose weights we run, and our family for each.
# PixArt: one model class for both, told apart by the model config (supported_models.PixArtAlpha / PixArtSigma).
# HunyuanDiT: one model class for v1.0 (config HunyuanDiT1) and v1.1/v1.2 (config HunyuanDiT); the file says which.
# PixArt and Wan 2.1: one model class for several configs, so the config names the ones we run (WAN21_T2V and
# WAN21_I2V, not VACE, camera or Fun control)
COMFY_MODEL_FAMILIES = {"Flux": "flux", "SD3": "sd3", "QwenImage": "qwen-image", "PixArtAlpha": "pixart-alpha",
                        "PixArtSigma": "pixart-sigma", "HunyuanDiT": "hunyuan-dit", "HunyuanDiT1": "hunyuan-dit",
                        "WAN21_T2V": "wan21", "WAN21_I2V": "wan21"}  # WAN21_T2V: Wan 2.2 I2V A14B too (36 channels)
# Families ComfyUI has no model class for (only xDiT Load DiT loads their files): no stock MODEL is one of them.
LOADER_ONLY_FAMILIES = frozenset({"cogvideox"})
COMFY_MODEL_FAMILIES["HunyuanVideo"] = "hunyuan-video"  # T2V (and the v2 replace I2V file: 16 channels)
COMFY_MODEL_FAMILIES["HunyuanVideoI2V"] = "hunyuan-video-i2v"  # I2V v1 (33 channels)
COMFY_MODEL_FAMILIES["HunyuanVideoSkyreelsI2V"] = "hunyuan-video-i2v"  # SkyReels I2V (32 channels)
COMFY_MODEL_FAMILIES["WAN22_T2V"] = "wan22-5b"  # model class WAN22: Wan 2.2 TI2V 5B (text- and image-to-video)


def check_family(model: Any) -> str:
    """The family id of a MODEL we run; ValueError naming what it is otherwise."""
    kind = type(getattr(model, "model", None)).__name__
    if kind in ("PixArt", "WAN21", "WAN22"):  # one model class for several configs: the config says which
        kind = type(getattr(model.model, "model_config", None)).__name__
    if kind not in COMFY_MODEL_FAMILIES:
        raise ValueError(f"xDiT Parallelize Model takes a Flux, SD3/SD3.5, Qwen-Image, PixArt, HunyuanDiT or Wan 2.1 "
                         f"text- or image-to-video MODEL "
                         f"(UNETLoader or CheckpointLoaderSimple, optionally through LoRA loaders and the family's "
                         f"ModelSampling node); this MODEL is {kind}. (CogVideoX, which ComfyUI cannot load as a MODEL: "
                         f"use xDiT Load DiT on its diffusers transformer file instead)")
    options = getattr(model, "model_options", {}) or {}
    transformer = options.get("transformer_options", {}) or {}
    extras = [name for name in ("model_function_wrapper", "sampler_cfg_function", "sampler_post_cfg_function")
              if options.get(name)] + [name for name in ("patches", "patches_replace") if transformer.get(name)]
    if extras:
        raise ValueError(f"the MODEL carries {', '.join(extras)} from a node that changes how the model runs "
                         f"(attention or CFG patches), which the xDiT ranks cannot apply; connect the MODEL from "
                         f"before that node, or use the stock KSampler")
    return COMFY_MODEL_FAMILIES[kind]


def base_weights(model: Any) -> dict[str, torch.Tensor]:
    """The MODEL's weights without its patches, in the family's single-file names, on the CPU. Where a sampler left patches
    merged in place, ComfyUI's backup holds the original and that is what we read."""
    backup = getattr(model, "backup", {}) or {}
    out = {}
    for name, tensor in model.model.diffusion_model.state_dict().items():
        saved = backup.get(PREFIX + name)
        out[name] = (saved.weight if saved is not None else tensor).detach().to("cpu")
    return out


def lora_patches(model: Any) -> tuple[WeightPatch, ...]:
    """The MODEL's weight patches as records the ranks merge (LoRA, LoCon, DoRA, LoHa, LoKr), in ComfyUI's
    order; ValueError naming what the ranks do not merge (full-weight diffs, OFT/BOFT/GLoRA, custom
    functions, reshaped weights) and the fix."""
    from comfy.utils import swap_scale_shift  # a diffusers norm_out LoRA's function, which the ranks apply

    out = []
    for key, entries in model.patches.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"the MODEL has a patch on {key!r}, outside the diffusion model; use the stock KSampler")
        for strength, adapter, strength_model, offset, function in entries:
            if function is not None and function is not swap_scale_shift:
                raise ValueError(f"the {_kind(adapter)} patch on {key} goes through a function "
                                 f"({getattr(function, '__name__', function)}), which xDiT Parallelize Model does "
                                 f"not apply; use the stock KSampler for this LoRA")
            where = dict(key=key[len(PREFIX):], strength=float(strength), strength_model=float(strength_model),
                         offset=None if offset is None else tuple(int(o) for o in offset),
                         swap_scale_shift=function is not None)
            out.append(_record(adapter, key, where))
    return tuple(out)


def _record(adapter: Any, key: str, where: dict[str, Any]) -> WeightPatch:
    """One ComfyUI adapter as our record, its tensors on the CPU."""
    from comfy.weight_adapter import LoHaAdapter, LoKrAdapter, LoRAAdapter

    if isinstance(adapter, LoRAAdapter):
        up, down, alpha, mid, dora_scale, reshape = adapter.weights
        if reshape is not None:
            raise ValueError(f"the LoRA patch on {key} reshapes the weight to {tuple(reshape)} (a LoRA that "
                             f"widens a layer, e.g. a Flux depth/canny LoRA), which the xDiT ranks cannot "
                             f"build; use the stock KSampler for this LoRA")
        return LoraPatch(up=_cpu(up), down=_cpu(down), alpha=_number(alpha), mid=_cpu(mid),
                         dora_scale=_cpu(dora_scale), **where)
    if isinstance(adapter, LoHaAdapter):
        w1_a, w1_b, alpha, w2_a, w2_b, t1, t2, dora_scale = adapter.weights
        return LohaPatch(w1_a=_cpu(w1_a), w1_b=_cpu(w1_b), w2_a=_cpu(w2_a), w2_b=_cpu(w2_b), alpha=_number(alpha),
                         t1=_cpu(t1), t2=_cpu(t2), dora_scale=_cpu(dora_scale), **where)
    if isinstance(adapter, LoKrAdapter):
        w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora_scale = adapter.weights
        if t2 is not None and w2 is None:
            raise ValueError(f"the LoKr patch on {key} has a Tucker core (lokr_t2, a conv LoKr), which ComfyUI "
                             f"v0.3.64 itself fails to merge (its log shows 'ERROR lokr' and the weight stays "
                             f"unpatched) and xDiT Parallelize Model refuses; use the stock KSampler for this LoRA")
        return LokrPatch(w1=_cpu(w1), w2=_cpu(w2), w1_a=_cpu(w1_a), w1_b=_cpu(w1_b), w2_a=_cpu(w2_a),
                         w2_b=_cpu(w2_b), alpha=_number(alpha), dora_scale=_cpu(dora_scale), **where)
    raise ValueError(f"the MODEL carries a {_kind(adapter)} patch on {key}; xDiT Parallelize Model merges LoRA, "
                     f"LoCon, DoRA, LoHa and LoKr patches (LoraLoader / LoraLoaderModelOnly) but not OFT, BOFT, "
                     f"GLoRA or model merges: use the stock KSampler for this LoRA (or merge)")


def _kind(adapter: Any) -> str:
    """What a ComfyUI patch is, in words: an adapter's name, or the kind of a tuple patch."""
    if isinstance(adapter, list):
        return "nested (a patch of a patched weight)"
    if isinstance(adapter, tuple):
        kind = adapter[0] if len(adapter) == 2 and isinstance(adapter[0], str) else "diff"
        return f"{kind!r} (full-weight, e.g. from a model merge)"
    return getattr(adapter, "name", type(adapter).__name__)


def _cpu(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.detach().to("cpu")


def _number(value: Any) -> Optional[float]:
    return None if value is None else float(value)


# ModelSamplingDiscrete's samplings (comfy_extras/nodes_model_advanced.py) that the ranks reproduce
DISCRETE_SAMPLINGS = {"eps": "eps", "v_prediction": "v"}  # the node's option -> our prediction
OWN_PREDICTION = {"EPS": "eps", "V_PREDICTION": "v"}  # ComfyUI's ModelType of a discrete-schedule model -> ours


def _discrete_prediction(sampling: Any) -> str:
    """Our prediction name for a ModelSamplingDiscrete (ComfyUI's EPS or V_PREDICTION, on the plain DDPM
    table); ValueError naming what works for anything else (lcm, x0, img_to_img, EDM)."""
    import comfy.model_sampling as ms

    kind = type(sampling)
    overridden = [name for name in ("calculate_input", "noise_scaling", "inverse_noise_scaling")
                  if getattr(kind, name) is not getattr(ms.EPS, name)]
    overridden += [name for name in ("timestep", "sigma")
                   if getattr(kind, name) is not getattr(ms.ModelSamplingDiscrete, name)]
    if not overridden and kind.calculate_denoised is ms.EPS.calculate_denoised:
        return "eps"
    if not overridden and kind.calculate_denoised is ms.V_PREDICTION.calculate_denoised:
        return "v"
    # the prediction class the patch mixed in (ModelSamplingDiscrete's node: LCM, X0, IMG_TO_IMG, ...)
    mixed_in = next((c.__name__ for c in kind.__mro__ if issubclass(c, ms.EPS) and not issubclass(c, torch.nn.Module)),
                    kind.__name__)
    raise ValueError(f"the MODEL's model sampling is ModelSamplingDiscrete's {mixed_in.lower()!r} sampling, which "
                     f"the xDiT ranks do not reproduce; xDiT runs ModelSamplingDiscrete with sampling "
                     f"{' or '.join(DISCRETE_SAMPLINGS)}, zsnr on or off; for lcm, x0 or img_to_img use the stock "
                     f"KSampler")


def _discrete_shift(sampling: Any, model: Any) -> SigmaShift:
    """A discrete-schedule MODEL's sampling (PixArt: EPS, HunyuanDiT: v) as our SigmaShift: the model's own
    (``default``), or ModelSamplingDiscrete's patch (``discrete``: eps / v_prediction, zsnr on or off)."""
    import comfy.model_sampling as ms

    prediction = _discrete_prediction(sampling)
    own = OWN_PREDICTION.get(getattr(getattr(model.model, "model_type", None), "name", ""))
    if own is None:
        raise ValueError(f"the MODEL is a {type(model.model).__name__}, which samples on a flow schedule, but carries "
                         f"a ModelSamplingDiscrete patch (for discrete-schedule models: PixArt, HunyuanDiT); connect "
                         f"the MODEL from before that node")
    zsnr = bool(getattr(sampling, "zsnr", False))
    expected = ms.ModelSamplingDiscrete(model.model.model_config, zsnr=zsnr)  # the table that node builds
    if not torch.equal(sampling.sigmas.cpu(), expected.sigmas.cpu()):
        raise ValueError("the MODEL's discrete sigma table is not the model's own schedule (nor its zero-terminal-SNR "
                         "rescaling), which the xDiT ranks do not reproduce; connect the MODEL from before the node "
                         "that changed it, or use the stock KSampler")
    if prediction == own and not zsnr:
        return SigmaShift(mode="default")
    return SigmaShift(mode="discrete", prediction=prediction, zsnr=zsnr)


def sigma_shift(model: Any) -> SigmaShift:
    """The MODEL's model sampling (the loader's default, ModelSamplingFlux's, ModelSamplingSD3's or
    ModelSamplingDiscrete's patch) as our SigmaShift."""
    import comfy.model_sampling

    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.ModelSamplingFlux):
        return SigmaShift(mode="flux", shift=float(sampling.shift))
    if isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteFlow):
        return SigmaShift(mode="discrete_flow", shift=float(sampling.shift), multiplier=float(sampling.multiplier))
    if isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete):
        return _discrete_shift(sampling, model)
    raise ValueError(f"the MODEL's model sampling is {type(sampling).__name__}; xDiT runs flow sampling "
                     f"(ModelSamplingFlux / ModelSamplingDiscreteFlow: Flux, SD3, Qwen-Image) and the discrete "
                     f"schedule of PixArt and HunyuanDiT only")
