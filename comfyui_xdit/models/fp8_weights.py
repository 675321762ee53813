"""fp8 weights: Linear weights kept in fp8 in memory and upcast to the compute dtype at each call.

What ComfyUI v0.3.64 does with UNETLoader's ``weight_dtype`` fp8_e4m3fn / fp8_e5m2 (``comfy/ops.py``
manual_cast): every tensor of the diffusion model is rounded to fp8 when it is loaded, and each layer casts
its weight and bias to the compute dtype when it runs. Here:

- ``stored_state`` rounds a file-layout state dict as ComfyUI's loading does: with an fp8 ``weight_dtype`` every
  floating tensor (weights, biases, norm scales, position tables) to that fp8 dtype, round to nearest;
  with ``default`` nothing changes (an fp8 file's tensors are already fp8).
- ``cast_state`` then gives each diffusers tensor its resident dtype: the weight of an ``nn.Linear`` that is
  fp8 stays fp8 (1 byte a parameter: nearly all of a DiT's bytes); everything else (biases, norms, convs,
  embeddings, tables; well under 1% of the bytes) is held in the compute dtype. fp8 values are exact in
  fp32 / bf16 / fp16, so holding a rounded bias in the compute dtype computes what ComfyUI computes.
- ``upcast_at_forward`` makes those Linears upcast their weight at each call (``UpcastLinear``). The module
  reads ``self.weight`` when it runs, so it keeps working when a block is later wrapped by FSDP2 (which puts
  the unsharded fp8 parameter back before the block runs) and next to PipeFusion's ``AbsentBlock``.

The same code path runs on CPU and GPU: there is no fp8 matmul here (ComfyUI's fp8_e4m3fn_fast asks for
one; we compute it as fp8_e4m3fn). ComfyUI's ``default`` keeps an fp8 file in fp8 only where fp8 compute or
a short memory asks for it (on a CPU it upcasts); ours always does, which computes the same numbers, since
the upcast is exact. Also here: ``stochastic_round``, how ComfyUI stores a LoRA merged into an fp8 weight
(``lora.merge_lora`` uses it), and ``picklable`` / ``unpickled``, how fp8 tensors cross Ray's object store.
Scaled fp8 files (a ``scaled_fp8`` marker and per-layer ``scale_weight``) are refused with the fix.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

logger = logging.getLogger(__name__)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# ModelRef.weight_dtype -> the dtype every tensor is rounded to (None: the file's own)
WEIGHT_STORAGE: Mapping[str, Optional[torch.dtype]] = {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn,
                                                       "fp8_e5m2": torch.float8_e5m2}
# UNETLoader's weight_dtype choices (the node widget and --weight-dtype); fp8_e4m3fn_fast asks ComfyUI for fp8
# matmuls, which we do not run: it stores and computes as fp8_e4m3fn
UNET_LOADER_CHOICES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
SCALED_FP8_MARKER = "scaled_fp8"
COMFY_KEY_PREFIX = "diffusion_model."  # ComfyUI's name of a diffusion-model weight: its LoRA rounding seed


def storage_dtype(weight_dtype: str) -> Optional[torch.dtype]:
    try:
        return WEIGHT_STORAGE[weight_dtype]
    except KeyError:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_STORAGE)}, got {weight_dtype!r}") from None


def weight_dtype_of_choice(choice: str) -> str:
    """UNETLoader's ``weight_dtype`` choice -> ``ModelRef.weight_dtype`` (``fp8_e4m3fn_fast`` = ``fp8_e4m3fn``)."""
    if choice not in UNET_LOADER_CHOICES:
        raise ValueError(f"weight_dtype must be one of {', '.join(UNET_LOADER_CHOICES)}, got {choice!r}")
    if choice == "fp8_e4m3fn_fast":
        logger.info("fp8_e4m3fn_fast: no fp8 matmul on the ranks; weights stored as fp8_e4m3fn, upcast per layer")
        return "fp8_e4m3fn"
    return choice


def weight_dtype_of_state(state: Mapping[str, torch.Tensor]) -> str:
    """``fp8_e4m3fn`` / ``fp8_e5m2`` when most of ``state``'s values (by count, as ComfyUI's ``weight_dtype``
    reads a file) are that fp8 dtype, e.g. a ComfyUI MODEL that UNETLoader loaded with an fp8 weight_dtype;
    else ``default``."""
    counts: Counter = Counter()
    for tensor in state.values():
        counts[tensor.dtype] += tensor.numel()
    dominant = max(counts, key=counts.__getitem__) if counts else None
    return next((name for name, dtype in WEIGHT_STORAGE.items() if dtype is not None and dtype == dominant),
                "default")


def refuse_scaled_fp8(keys: Mapping[str, object] | set[str], source: str) -> None:
    """``ValueError`` for a scaled fp8 file: its weights mean ``weight * scale_weight``, which we do not apply."""
    if SCALED_FP8_MARKER in keys or any(k.endswith(".scale_weight") for k in keys):
        raise ValueError(f"{source} holds scaled fp8 weights (a '{SCALED_FP8_MARKER}' marker and per-layer "
                         f"scale_weight tensors), which the xDiT ranks do not load; use the plain fp8 or the bf16 "
                         f"release of the model (weight_storage fp8_e4m3fn keeps a bf16 file in fp8), or the stock "
                         f"KSampler")


def stored_state(state: Mapping[str, torch.Tensor], weight_dtype: str) -> dict[str, torch.Tensor]:
    """``state`` as ComfyUI holds it for ``weight_dtype``: every floating tensor rounded to that fp8 dtype
    (round to nearest, as ``param.copy_`` does), or unchanged for ``default``. Idempotent."""
    target = storage_dtype(weight_dtype)
    if target is None:
        return dict(state)
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


def linear_weight_names(module: torch.nn.Module) -> set[str]:
    """Names (as in ``module.state_dict()``) of every plain ``nn.Linear``'s weight (a subclass may have its own
    forward, so it computes in the compute dtype); works on a module built on meta."""
    return {f"{name}.weight" if name else "weight" for name, child in module.named_modules()
            if type(child) is torch.nn.Linear}


def cast_state(converted: Mapping[str, torch.Tensor], module: torch.nn.Module,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Each diffusers tensor in its resident dtype: a Linear weight that is fp8 stays fp8, everything else
    in the compute ``dtype`` (an fp8 bias or norm upcast exactly)."""
    keep = linear_weight_names(module)
    return {k: v if k in keep and v.dtype in FP8_DTYPES else v.to(dtype) for k, v in converted.items()}


class UpcastLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose weight stays in its stored fp8 dtype and is upcast to ``compute_dtype`` at each
    call (ComfyUI's manual cast); the bias is already in the compute dtype."""

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.to(self.compute_dtype), self.bias)

    @classmethod
    def wrapping(cls, linear: torch.nn.Linear, compute_dtype: torch.dtype) -> "UpcastLinear":
        """A new module over ``linear``'s own parameters (no copy)."""
        with torch.device("meta"):
            out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        out.weight, out.bias = linear.weight, linear.bias
        out.compute_dtype = compute_dtype
        return out


def upcast_at_forward(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` of ``module`` whose weight is fp8 by an ``UpcastLinear`` computing in
    ``dtype``; returns how many. (The adapters freeze every parameter, so FSDP2 may gather a block's mixed
    fp8 / compute-dtype parameters: it does so as bytes.)"""
    found = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
             if type(child) is torch.nn.Linear and child.weight.dtype in FP8_DTYPES]
    for parent, name, child in found:
        setattr(parent, name, UpcastLinear.wrapping(child, dtype))
    return len(found)


def compute_dtype_of(module: torch.nn.Module, parameter: str) -> torch.dtype:
    """The dtype ``module``'s parameter ``parameter`` computes in: the parameter's own, or its UpcastLinear's."""
    owner = module.get_submodule(parameter.rpartition(".")[0])
    return owner.compute_dtype if isinstance(owner, UpcastLinear) else module.get_parameter(parameter).dtype


def resident_bytes(module: torch.nn.Module) -> dict[torch.dtype, int]:
    """Bytes of ``module``'s parameters and buffers by dtype (what the rank holds)."""
    out: Counter = Counter()
    for tensor in module.state_dict().values():
        out[tensor.dtype] += tensor.numel() * tensor.element_size()
    return dict(out)


def finish(module: torch.nn.Module, dtype: torch.dtype, source: str) -> torch.nn.Module:
    """After ``load_state_dict``: fp8 Linears upcast at each call, and the resident bytes logged."""
    count = upcast_at_forward(module, dtype)
    if count:
        by_dtype = resident_bytes(module)
        logger.info("%s: %d Linear weights kept in fp8, computed in %s; resident %s", source, count, dtype,
                    ", ".join(f"{str(k).replace('torch.', '')} {v / 2**20:.1f} MiB" for k, v in by_dtype.items()))
    return module


@dataclass(frozen=True)
class PickledFp8:
    """An fp8 tensor as its bytes (a uint8 view of the same shape), for pickling: torch 2.14 pickles fp8
    tensors but cannot unpickle them, and Ray's object store pickles. ``shape`` is the tensor's, so a
    family's spec inference reads a shipped state dict as it reads a file's header."""

    data: torch.Tensor  # uint8, the fp8 tensor's shape
    dtype: str  # "float8_e4m3fn" / "float8_e5m2"

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def tensor(self) -> torch.Tensor:
        return self.data.view(getattr(torch, self.dtype))


def picklable(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """``state`` with its fp8 tensors as ``PickledFp8`` (no copy), for ``ray.put``."""
    return {k: PickledFp8(v.view(torch.uint8), str(v.dtype).removeprefix("torch.")) if v.dtype in FP8_DTYPES else v
            for k, v in state.items()}


def unpickled(state: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The tensors ``picklable`` shipped."""
    return {k: v.tensor() if isinstance(v, PickledFp8) else v for k, v in state.items()}


def stochastic_round(value: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    """A merged float32 weight back into fp8 ``dtype`` as ComfyUI v0.3.64 stores a LoRA-patched fp8 weight
    (``comfy.float.stochastic_rounding``, seeded by the CRC-32 of ComfyUI's key of the weight): through fp16,
    then each magnitude's mantissa floored after adding a uniform draw, rows in slices of about 16M values."""
    mantissa_bits, exponent_bits, bias = {torch.float8_e4m3fn: (3, 4, 7), torch.float8_e5m2: (2, 5, 15)}[dtype]
    generator = torch.Generator(device=value.device).manual_seed(zlib.crc32((COMFY_KEY_PREFIX + key).encode()))
    out = torch.empty_like(value, dtype=dtype)
    slices = max(1, value.numel() / (4096 * 4096))
    step = max(1, round(value.shape[0] / slices))
    for start in range(0, value.shape[0], step):
        out[start:start + step].copy_(_round_slice(value[start:start + step], dtype, mantissa_bits, exponent_bits,
                                                   bias, generator))
    return out


def _round_slice(x: torch.Tensor, dtype: torch.dtype, mantissa_bits: int, exponent_bits: int, bias: int,
                 generator: torch.Generator) -> torch.Tensor:
    x = x.half()
    magnitude = x.abs()
    sign = torch.where(magnitude == 0, 0, torch.sign(x))
    exponent = torch.clamp(torch.floor(torch.log2(magnitude)) + bias, 0, 2 ** exponent_bits - 1)
    normal = exponent != 0
    scaled = torch.where(normal, (magnitude / (2.0 ** (exponent - bias)) - 1.0) * 2 ** mantissa_bits,
                         magnitude / (2.0 ** (1 - bias - mantissa_bits)))
    scaled += torch.rand(scaled.size(), dtype=scaled.dtype, layout=scaled.layout, device=scaled.device,
                         generator=generator)
    fraction = scaled.floor() / 2 ** mantissa_bits
    result = sign * torch.where(normal, 2.0 ** (exponent - bias) * (1.0 + fraction), 2.0 ** (1 - bias) * fraction)
    limits = torch.finfo(dtype)
    return result.clamp(min=limits.min, max=limits.max)
