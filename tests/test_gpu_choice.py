"""Which GPUs the embedded pool takes: auto leaves ComfyUI's own GPU when there are others."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from comfyui_xdit_workers.gpu_choice import ALL, AUTO, GpuPlan, choose_gpus, parse_gpus, visible_devices
from comfyui_xdit_workers.security import embedded_init_kwargs
from comfyui_xdit_workers.settings import PoolSettings
from comfyui_xdit_workers.status import PoolStatus

FOUR = ("0", "1", "2", "3")


def test_parse() -> None:
    assert parse_gpus("") == AUTO and parse_gpus(" Auto ") == AUTO and parse_gpus(None) == AUTO
    assert parse_gpus("all") == ALL and parse_gpus("1, 2,3") == (1, 2, 3)
    for bad in ("1,,2", "gpu1", "-1", "1,1"):
        with pytest.raises(ValueError, match="gpus"):
            parse_gpus(bad)


def test_auto_leaves_comfyuis_gpu_when_there_are_others() -> None:
    plan = choose_gpus(AUTO, FOUR, host_gpu=0)
    assert plan.ordinals == (1, 2, 3) and plan.left_for_host == 0
    assert plan.describe() == "cuda 1,2,3 (cuda 0 left to ComfyUI)"
    assert choose_gpus(AUTO, FOUR, host_gpu=2).ordinals == (0, 1, 3)
    assert choose_gpus(AUTO, ("0",), host_gpu=0).ordinals == (0,)  # the only GPU: share it
    assert choose_gpus(AUTO, FOUR, host_gpu=None).ordinals == (0, 1, 2, 3)  # CLI / ComfyUI on CPU
    assert choose_gpus(AUTO, (), host_gpu=None).describe() == "no GPU (CPU ranks)"


def test_all_and_lists() -> None:
    assert choose_gpus(ALL, FOUR, host_gpu=0).ordinals == (0, 1, 2, 3)
    plan = choose_gpus((3, 1), ("4", "5", "6", "7"), host_gpu=0)  # CUDA_VISIBLE_DEVICES=4,5,6,7
    assert plan.ordinals == (3, 1) and plan.physical == ("7", "5")
    with pytest.raises(ValueError, match=r"names GPU\(s\) \[4\] that this machine does not have \(visible: cuda 0..3\)"):
        choose_gpus((1, 4), FOUR, host_gpu=0)


def test_visible_devices_follow_cuda_visible_devices() -> None:
    assert visible_devices(2, None) == ("0", "1")
    assert visible_devices(2, "3,5") == ("3", "5")
    assert visible_devices(1, "GPU-aaaa,GPU-bbbb") == ("GPU-aaaa",)


def test_settings_and_ray_arguments() -> None:
    with pytest.raises(ValueError, match="embedded pool only"):
        PoolSettings(address="10.0.0.1:6379", gpus=(1, 2))
    assert embedded_init_kwargs(PoolSettings(), 3)["num_gpus"] == 3
    assert embedded_init_kwargs(PoolSettings(embedded_num_gpus=1), 3)["num_gpus"] == 1
    status = PoolStatus(address="a", embedded=True, auth="token", hosts=(), ranks=(), layout=None, queued=0,
                        running=None, gpus=GpuPlan((1, 2), ("1", "2"), 0).describe())
    assert "GPUs: cuda 1,2 (cuda 0 left to ComfyUI)" in status.format()


def test_embedded_ray_gives_ranks_only_the_chosen_gpus() -> None:
    """Ray takes the GPU ids from CUDA_VISIBLE_DEVICES at start: a rank asking for one GPU gets one of the
    chosen ones (Ray advertises the GPUs without touching them, so this runs on a machine without any)."""
    code = textwrap.dedent("""
        import os, ray
        from comfyui_xdit_workers.gpu_choice import GpuPlan, only_these_gpus
        from comfyui_xdit_workers.security import embedded_init_kwargs, loopback_runtime
        from comfyui_xdit_workers.settings import PoolSettings
        os.environ["CUDA_VISIBLE_DEVICES"] = "0,1,2"  # what ComfyUI's process sees
        plan = GpuPlan(ordinals=(1, 2), physical=("1", "2"), left_for_host=0)
        with loopback_runtime(), only_these_gpus(plan):
            ray.init(**embedded_init_kwargs(PoolSettings(embedded_num_cpus=1), len(plan.ordinals)))
        try:
            assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2", "restored for ComfyUI's own process"
            assert ray.cluster_resources().get("GPU") == 2.0, ray.cluster_resources()
            @ray.remote(num_gpus=1, num_cpus=0)
            def seen():
                return os.environ.get("CUDA_VISIBLE_DEVICES")
            got = set(ray.get([seen.remote(), seen.remote()], timeout=120))
            assert got <= {"1", "2"} and got, got
            print("OK", sorted(got))
        finally:
            ray.shutdown()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
