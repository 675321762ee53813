"""Local attention kernels that return the output *and* a true log-sum-exp, chosen per device.

Ring attention merges partial attentions over key blocks by their log-sum-exp
(``lse_i = log sum_j exp(q_i . k_j * scale)``), so a kernel that returns anything else (yunchang's
``TORCH_MATH`` returns zeros on CPU) silently gives a wrong picture. ``kernel_for`` picks a kernel
for a device and dtype, and ``verify_lse`` probes a kernel against ``torch.logsumexp`` before use.

Layout (yunchang's): q (B, Sq, H, D), k and v (B, Sk, H, D) -> out (B, Sq, H, D), lse (B, H, Sq) float32.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger(__name__)

LseKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]

LSE_TOLERANCE = 1e-3  # relative; a zero or unnormalised LSE is off by O(1)


def cpu_flash_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ATen's CPU flash attention, which returns the true LSE (unlike the public SDPA entry point)."""
    # (B, S, H, D) -> (B, H, S, D)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))[:2]
    return out.transpose(1, 2), lse.float()  # out back to (B, S, H, D); lse (B, H, S)


def cuda_flash_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ATen's CUDA flash attention (fp16/bf16)."""
    # (B, S, H, D) -> (B, H, S, D)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))[:2]
    return out.transpose(1, 2), lse.float()


def cuda_efficient_kernel(query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ATen's CUDA memory-efficient attention (any float dtype, fp32 included)."""
    seq = query.shape[1]
    # (B, S, H, D) -> (B, H, S, D)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), None, True)[:2]
    return out.transpose(1, 2), lse[..., :seq].float()  # some versions pad the LSE's sequence dim


def math_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference kernel in plain torch (float32 scores); slow, for probes and tests."""
    scale = query.shape[-1] ** -0.5
    # (B, Sq, H, D) x (B, Sk, H, D) -> (B, H, Sq, Sk)
    scores = torch.einsum("bqhd,bkhd->bhqk", query.float(), key.float()) * scale
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Sq)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), value.float())
    return out.to(query.dtype), lse


def kernel_for(device: torch.device, dtype: torch.dtype) -> LseKernel:
    """The fastest kernel with a true LSE for ``device``/``dtype``; ``ValueError`` where we have none."""
    if device.type == "cpu":
        return cpu_flash_kernel
    if device.type == "cuda":
        return cuda_flash_kernel if dtype in (torch.float16, torch.bfloat16) else cuda_efficient_kernel
    if device.type == "meta":  # placement tests: shapes only, any kernel in plain torch will do
        return math_kernel
    raise ValueError(f"no ring-attention kernel with a log-sum-exp for device {device.type!r}; run on cpu or "
                     f"cuda, or set ring_degree 1 (Ulysses alone needs no log-sum-exp)")


def verify_lse(kernel: LseKernel, device: torch.device, dtype: torch.dtype) -> None:
    """Probe ``kernel`` on a small random problem; ``RuntimeError`` if its LSE is not the true one."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, 16, generator=generator).to(device=device, dtype=dtype) for n in (5, 7, 7))
    _, lse = kernel(q, k, v)
    # (B, Sq, H, D) x (B, Sk, H, D) -> (B, H, Sq, Sk)
    expected = torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * 16 ** -0.5, dim=-1)
    if lse.shape != expected.shape or not torch.allclose(lse.float(), expected, rtol=LSE_TOLERANCE,
                                                         atol=LSE_TOLERANCE * 10):
        raise RuntimeError(f"attention kernel {getattr(kernel, '__name__', kernel)!r} does not return the true "
                           f"log-sum-exp on {device} {dtype} (got shape {tuple(lse.shape)}, first values "
                           f"{lse.flatten()[:3].tolist()}, expected {expected.flatten()[:3].tolist()}); ring "
                           f"attention would merge blocks wrongly. Use kernel_for(device, dtype)")


def checked_kernel(device: torch.device, dtype: torch.dtype) -> LseKernel:
    """``kernel_for``'s private ATen kernel when it exists in this torch and returns a true LSE; otherwise
    ``math_kernel`` (plain torch: same numbers, slower), with a warning naming the op and the torch version.

    The ATen entry points with an LSE (``_scaled_dot_product_flash_attention_for_cpu``, ``..._flash_attention``,
    ``..._efficient_attention``) are private: a torch release may rename them or change what they return.
    """
    kernel = kernel_for(device, dtype)
    if device.type == "meta":  # no values to verify
        return kernel
    try:
        verify_lse(kernel, device, dtype)
    except (AttributeError, RuntimeError, TypeError, ValueError, IndexError) as exc:
        logger.warning("torch %s: attention kernel %s is missing or changed (%s); ring attention uses the plain-torch "
                       "math kernel instead (same result, slower). Tested with torch 2.14.", torch.__version__,
                       getattr(kernel, "__name__", kernel), " ".join(str(exc).split())[:300])
        verify_lse(math_kernel, device, dtype)
        return math_kernel
    return kernel
