"""The private torch and Ray interfaces we lean on: present in the tested versions, and when a release
changes them, a clear warning and a fallback that still gives the right result (or a refusal that names
the fix where no safe fallback exists)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from comfyui_xdit.parallel import attention_kernels
from comfyui_xdit.parallel.attention_kernels import checked_kernel, cpu_flash_kernel, math_kernel
from comfyui_xdit.parallel.usp_attention import ring_attention
from comfyui_xdit_workers.errors import InsecureCluster
from comfyui_xdit_workers.security import (AUTH_MODE_ENV, CLUSTER_MODE_ENV, CLUSTER_MODE_FLAG, auth_mode,
                                           check_loopback, loopback_runtime)

CPU = torch.device("cpu")


def renamed_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """What ``cpu_flash_kernel`` becomes when a torch release renames the private op."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_renamed_in_a_future_torch(query, key, value)


def zero_lse_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """A changed op that still runs but no longer returns the log-sum-exp."""
    out = torch.nn.functional.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2),
                                                           value.transpose(1, 2)).transpose(1, 2)
    return out, torch.zeros(query.shape[0], query.shape[2], query.shape[1])


def test_tested_torch_has_the_private_attention_op() -> None:
    assert hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    assert checked_kernel(CPU, torch.float32) is cpu_flash_kernel


@pytest.mark.parametrize("broken", [renamed_kernel, zero_lse_kernel])
def test_missing_or_changed_attention_op_falls_back_to_math(monkeypatch, caplog, broken) -> None:
    monkeypatch.setattr(attention_kernels, "kernel_for", lambda device, dtype: broken)
    with caplog.at_level(logging.WARNING, logger=attention_kernels.__name__):
        kernel = checked_kernel(CPU, torch.float32)
    assert kernel is math_kernel
    assert "missing or changed" in caplog.text and broken.__name__ in caplog.text and torch.__version__ in caplog.text
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 4, 32, generator=generator) for n in (12, 12, 12))
    text_k, text_v = torch.randn(1, 3, 4, 32, generator=generator), torch.randn(1, 3, 4, 32, generator=generator)
    got = ring_attention(q, k, v, None, kernel, local_key=text_k, local_value=text_v)
    expected = cpu_flash_kernel(q, torch.cat([text_k, k], 1), torch.cat([text_v, v], 1))[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tested_ray_has_the_private_names() -> None:
    from ray._private import ray_constants
    from ray._raylet import AuthenticationMode, get_authentication_mode  # noqa: F401

    assert hasattr(ray_constants, CLUSTER_MODE_FLAG)


def test_loopback_runtime_without_ray_cluster_flag_still_sets_the_env(monkeypatch, caplog) -> None:
    from ray._private import ray_constants

    monkeypatch.delattr(ray_constants, CLUSTER_MODE_FLAG)
    monkeypatch.delenv(CLUSTER_MODE_ENV, raising=False)
    with caplog.at_level(logging.WARNING), loopback_runtime():
        assert os.environ[CLUSTER_MODE_ENV] == "0"
    assert CLUSTER_MODE_ENV not in os.environ and f"no ray_constants.{CLUSTER_MODE_FLAG}" in caplog.text


def test_loopback_is_checked_after_start() -> None:
    check_loopback(["127.0.0.1", "127.0.0.1"])
    with pytest.raises(InsecureCluster, match="took the address\\(es\\) 10.0.0.5 instead of 127.0.0.1"):
        check_loopback(["127.0.0.1", "10.0.0.5"])


def test_auth_mode_without_the_private_query(monkeypatch, caplog) -> None:
    import ray._raylet

    monkeypatch.delattr(ray._raylet, "get_authentication_mode")
    monkeypatch.delenv(AUTH_MODE_ENV, raising=False)
    with caplog.at_level(logging.WARNING):
        assert auth_mode() == "token"
    assert "no longer has ray._raylet.get_authentication_mode" in caplog.text
    monkeypatch.setenv(AUTH_MODE_ENV, "disabled")
    assert auth_mode() == "disabled"
