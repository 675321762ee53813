"""The stale K/V buffer and its attention backend, against plain SDPA."""

from __future__ import annotations

import pytest
import torch

from comfyui_xdit.attention import sdpa
from comfyui_xdit.parallel.patch_kv_buffer import PatchKVBuffer, StaleKVAttention

B, L, N, H, D = 2, 3, 8, 4, 16


def _qkv(seed: int, tokens: int = L + N) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, tokens, H, D, generator=g) for _ in range(3))  # type: ignore[return-value]


def test_whole_latent_equals_serial_attention() -> None:
    q, k, v = _qkv(0)
    backend = StaleKVAttention(N)
    torch.testing.assert_close(backend(q, k, v, text_len=L, layer=0), sdpa(q, k, v), rtol=0, atol=0)


def test_patch_refreshes_its_slice_and_sees_stale_rest() -> None:
    backend = StaleKVAttention(N)
    q0, k0, v0 = _qkv(0)
    backend(q0, k0, v0, text_len=L, layer=5)  # warm-up fills the buffer
    q1, k1, v1 = _qkv(1)
    start, stop = 2, 6
    # the patch's call carries text + its 4 image tokens
    pick = torch.cat([torch.arange(L), L + torch.arange(start, stop)])
    out = backend.at(start, stop)(q1[:, pick], k1[:, pick], v1[:, pick], text_len=L, layer=5)
    # expected: fresh text and fresh patch K/V, the other image tokens from the first call
    k_exp, v_exp = k0.clone(), v0.clone()
    k_exp[:, :L], v_exp[:, :L] = k1[:, :L], v1[:, :L]
    k_exp[:, L + start:L + stop], v_exp[:, L + start:L + stop] = k1[:, L + start:L + stop], v1[:, L + start:L + stop]
    torch.testing.assert_close(out, sdpa(q1[:, pick], k_exp, v_exp))
    buffer = backend.buffers[5]
    torch.testing.assert_close(buffer.key, k_exp[:, L:], rtol=0, atol=0)
    torch.testing.assert_close(buffer.value[:, :start], v0[:, L:L + start], rtol=0, atol=0)


def test_patches_in_turn_refresh_the_whole_buffer() -> None:
    backend = StaleKVAttention(N)
    q0, k0, v0 = _qkv(0)
    backend(q0, k0, v0, text_len=L, layer=0)
    _, k1, v1 = _qkv(1)
    for start, stop in ((0, 4), (4, 8)):
        pick = torch.cat([torch.arange(L), L + torch.arange(start, stop)])
        backend.at(start, stop)(k1[:, pick], k1[:, pick], v1[:, pick], text_len=L, layer=0)
    torch.testing.assert_close(backend.buffers[0].key, k1[:, L:], rtol=0, atol=0)
    torch.testing.assert_close(backend.buffers[0].value, v1[:, L:], rtol=0, atol=0)
    assert backend.nbytes() == 2 * B * N * H * D * 4


def test_layers_have_separate_buffers() -> None:
    backend = StaleKVAttention(N)
    for layer in range(3):
        q, k, v = _qkv(layer)
        backend(q, k, v, text_len=L, layer=layer)
    assert sorted(backend.buffers) == [0, 1, 2]
    assert not torch.equal(backend.buffers[0].key, backend.buffers[1].key)


def test_patch_before_fill_is_an_error() -> None:
    backend = StaleKVAttention(N).at(0, 4)
    q, k, v = _qkv(0, tokens=L + 4)
    with pytest.raises(RuntimeError, match="warmup_steps >= 1"):
        backend(q, k, v, text_len=L, layer=0)


def test_wrong_patch_length_is_an_error() -> None:
    backend = StaleKVAttention(N).at(0, 4)
    q, k, v = _qkv(0, tokens=L + 3)
    with pytest.raises(RuntimeError, match="3 image tokens"):
        backend(q, k, v, text_len=L, layer=0)


def test_buffer_rejects_out_of_range_patch() -> None:
    buffer = PatchKVBuffer(N, layer=0)
    k = torch.zeros(B, N, H, D)
    buffer.refresh(0, k, k)
    with pytest.raises(RuntimeError, match="outside"):
        buffer.refresh(6, k[:, :4], k[:, :4])
