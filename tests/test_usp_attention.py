"""USP attention (Ulysses x Ring via yunchang's pieces) equals full attention; LSE kernels are true."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
import torch.distributed as dist
from yunchang.kernels import AttnType, select_flash_attn_impl

from comfyui_xdit.attention import sdpa
from comfyui_xdit.parallel.attention_kernels import cpu_flash_kernel, kernel_for, math_kernel, verify_lse
from comfyui_xdit.parallel.launch import run_ranks, stop_helper_processes
from comfyui_xdit.parallel.mesh import SEQUENCE_AXES, Mesh
from comfyui_xdit.parallel.sequence_parallel import SequenceShard
from comfyui_xdit.parallel.usp_attention import USPAttention, ring_attention
from comfyui_xdit.parallel_config import ParallelConfig

B, TEXT, IMAGE, HEADS, DIM = 2, 8, 48, 8, 16


def yunchang_torch_math(query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """yunchang's only CPU kernel: right output, but a log-sum-exp of zeros."""
    fn = select_flash_attn_impl(AttnType.TORCH_MATH, stage="fwd-only")
    return fn(query, key, value, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
              alibi_slopes=None, return_softmax=False)


def qkv(seed: int, text: int = TEXT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, text + IMAGE, HEADS, DIM, generator=generator) for _ in range(3))  # type: ignore


@pytest.mark.parametrize("kernel", [cpu_flash_kernel, math_kernel])
def test_kernels_return_output_and_true_lse(kernel) -> None:
    q, k, v = qkv(0)
    out, lse = kernel(q, k[:, :30], v[:, :30])
    torch.testing.assert_close(out, sdpa(q, k[:, :30], v[:, :30]), rtol=1e-5, atol=1e-5)
    # (B, S, H, D) x (B, S, H, D) -> (B, H, Sq, Sk)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k[:, :30]) * DIM ** -0.5
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)
    verify_lse(kernel, torch.device("cpu"), torch.float32)


def test_zero_lse_kernel_is_refused() -> None:
    assert kernel_for(torch.device("cpu"), torch.float32) is cpu_flash_kernel
    with pytest.raises(RuntimeError, match="does not return the true log-sum-exp"):
        verify_lse(yunchang_torch_math, torch.device("cpu"), torch.float32)


def test_unknown_device_is_refused() -> None:
    with pytest.raises(ValueError, match="ring_degree 1"):
        kernel_for(torch.device("xpu"), torch.float32)


def test_meta_device_gets_the_plain_torch_kernel() -> None:
    assert kernel_for(torch.device("meta"), torch.float32) is math_kernel


def test_single_rank_joint_attention_is_sdpa() -> None:
    q, k, v = qkv(1)
    out = ring_attention(q, k[:, TEXT:], v[:, TEXT:], None, cpu_flash_kernel, local_key=k[:, :TEXT],
                         local_value=v[:, :TEXT])
    torch.testing.assert_close(out, sdpa(q, k, v), rtol=1e-5, atol=1e-5)


def usp_errors(rank: int, world_size: int, cases: list[tuple[ParallelConfig, int, str]]) -> list[float]:
    """Rank body: relative max error of USP against full SDPA for each (config, text_len, kernel) case."""
    kernels = {"cpu_flash": cpu_flash_kernel, "yunchang_torch_math": yunchang_torch_math}
    errors = []
    for index, (config, text, kernel) in enumerate(cases):
        mesh = Mesh.build(config, rank)
        attention = USPAttention(mesh.group(("ulysses",)), mesh.group(("ring",)), kernels[kernel])
        q, k, v = qkv(100 + index, text)  # the same on every rank
        shard = SequenceShard(mesh.index(SEQUENCE_AXES), mesh.size(SEQUENCE_AXES))

        def local(t: torch.Tensor) -> torch.Tensor:
            # (B, L + N, H, D) -> (B, L + N / P, H, D): all text, this rank's image shard
            return torch.cat([t[:, :text], shard.take(t[:, text:], 1)], dim=1)

        out = attention(local(q), local(k), local(v), text_len=text, layer=0)
        expected = local(sdpa(q, k, v))
        errors.append(float((out - expected).abs().max() / expected.abs().max()))
    gathered = torch.tensor(errors)
    dist.all_reduce(gathered, op=dist.ReduceOp.MAX)
    return gathered.tolist()


@pytest.fixture(scope="module", autouse=True)
def _stop_forkserver() -> Iterator[None]:
    yield
    stop_helper_processes()


def test_usp_equals_full_attention_on_four_ranks() -> None:
    cases = [(ParallelConfig(ulysses_degree=4), TEXT, "cpu_flash"),
             (ParallelConfig(ring_degree=4), TEXT, "cpu_flash"),
             (ParallelConfig(ring_degree=2, ulysses_degree=2), TEXT, "cpu_flash"),
             (ParallelConfig(ring_degree=2, ulysses_degree=2), 0, "cpu_flash"),
             (ParallelConfig(cfg_degree=2, ring_degree=2), TEXT, "cpu_flash"),
             (ParallelConfig(pipefusion_degree=2, ulysses_degree=2), TEXT, "cpu_flash"),
             (ParallelConfig(ring_degree=2, ulysses_degree=2), TEXT, "yunchang_torch_math")]
    errors = run_ranks(4, usp_errors, (cases,), timeout=240)
    for (config, text, kernel), error in zip(cases[:-1], errors[:-1]):
        assert error < 1e-5, f"{config.describe()} text {text}: relative error {error}"
    assert errors[-1] > 1e-2, "a zero-LSE kernel must visibly break the ring merge"
