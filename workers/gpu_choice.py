"""Which of this machine's GPUs the embedded pool takes.

ComfyUI keeps its text encoders and VAE on one GPU (``cuda:N`` of its process). An embedded pool that
took every GPU would load a transformer there too and run out of memory on 24 GB cards, so the default
(``auto``) leaves that GPU to ComfyUI whenever the machine has others. ``all`` takes every GPU; a list
such as ``1,2,3`` takes exactly those (torch's ``cuda:N`` numbering on this machine, the numbers
ComfyUI's own ``--cuda-device`` and ``nvidia-smi`` use when ``CUDA_VISIBLE_DEVICES`` is unset).

The embedded Ray runtime is started with ``CUDA_VISIBLE_DEVICES`` naming only the chosen GPUs, so its
ranks can never touch another one. A cluster joined by address uses what each host offered at
``ray start`` (set ``CUDA_VISIBLE_DEVICES`` or ``--num-gpus`` there).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

AUTO = "auto"
ALL = "all"
GpuRequest = Union[str, tuple[int, ...]]  # AUTO, ALL, or cuda ordinals
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


def parse_gpus(text: Optional[str]) -> GpuRequest:
    """'' / 'auto' -> AUTO, 'all' -> ALL, '1,2, 3' -> (1, 2, 3); ``ValueError`` naming what to type."""
    value = (text or "").strip().lower()
    if value in ("", AUTO):
        return AUTO
    if value == ALL:
        return ALL
    try:
        ordinals = tuple(int(part) for part in value.replace(" ", "").split(","))
    except ValueError:
        raise ValueError(f"gpus {text!r} must be 'auto', 'all' or GPU numbers such as 1,2,3") from None
    if any(o < 0 for o in ordinals) or len(set(ordinals)) != len(ordinals):
        raise ValueError(f"gpus {text!r} must list distinct GPU numbers >= 0, such as 1,2,3")
    return ordinals


def format_gpus(request: GpuRequest) -> str:
    return request if isinstance(request, str) else ",".join(str(o) for o in request)


def visible_devices(count: int, env: Optional[str]) -> tuple[str, ...]:
    """The physical ids behind ``cuda:0..count-1``: ``CUDA_VISIBLE_DEVICES``'s entries, or 0..count-1."""
    if env is None:
        return tuple(str(i) for i in range(count))
    entries = tuple(e.strip() for e in env.split(",") if e.strip())
    return entries[:count]


@dataclass(frozen=True)
class GpuPlan:
    """The GPUs the embedded pool takes (cuda ordinals and their physical ids) and the one it leaves."""

    ordinals: tuple[int, ...]
    physical: tuple[str, ...]
    left_for_host: Optional[int]  # the ComfyUI GPU left out by ``auto``

    def describe(self) -> str:
        if not self.ordinals:
            return "no GPU (CPU ranks)"
        text = "cuda " + ",".join(str(o) for o in self.ordinals)
        if self.left_for_host is not None:
            text += f" (cuda {self.left_for_host} left to ComfyUI)"
        return text


def choose_gpus(request: GpuRequest, visible: Sequence[str], host_gpu: Optional[int]) -> GpuPlan:
    """Resolve ``request`` against the ``visible`` GPUs (``cuda:i`` is ``visible[i]``)."""
    count = len(visible)
    if request == ALL or (request == AUTO and (host_gpu is None or count < 2 or not 0 <= host_gpu < count)):
        ordinals, left = tuple(range(count)), None
    elif request == AUTO:
        ordinals, left = tuple(i for i in range(count) if i != host_gpu), host_gpu
    else:
        assert isinstance(request, tuple)
        unknown = [o for o in request if o >= count]
        if unknown:
            have = f"cuda 0..{count - 1}" if count else "none"
            raise ValueError(f"gpus {format_gpus(request)} names GPU(s) {unknown} that this machine does not have "
                             f"(visible: {have}); use 'auto', 'all' or numbers from that range")
        ordinals, left = request, None
    return GpuPlan(ordinals=ordinals, physical=tuple(visible[o] for o in ordinals), left_for_host=left)


def local_gpu_plan(request: GpuRequest, host_gpu: Optional[int]) -> GpuPlan:
    """``choose_gpus`` for this machine (torch counts its GPUs without creating a CUDA context)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return choose_gpus(request, visible_devices(count, os.environ.get(VISIBLE_ENV)), host_gpu)


@contextlib.contextmanager
def only_these_gpus(plan: GpuPlan) -> Iterator[None]:
    """Within: ``CUDA_VISIBLE_DEVICES`` names the plan's GPUs (read by the Ray runtime started here and
    inherited by its workers); this process's own CUDA context, if any, is unaffected."""
    saved = os.environ.get(VISIBLE_ENV)
    os.environ[VISIBLE_ENV] = ",".join(plan.physical)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(VISIBLE_ENV, None)
        else:
            os.environ[VISIBLE_ENV] = saved
