"""Device-placement test mode: run an engine with the model on the ``meta`` device, on CPU.

On a GPU the model lives on ``cuda:N`` while a request (latent, conditioning, sigmas) arrives on the
CPU and the latent must come back on the CPU. Here the model is put on ``meta`` instead: torch raises
"Tensor on device meta is not on the expected device cpu!" for every operation that mixes a CPU
tensor with a model-device tensor (0-dim CPU scalars excepted, exactly as CUDA allows), so every
CPU/device mix-up a GPU would hit fails here too. Meta tensors carry no values, so:

- ``MetaValues`` answers what needs values: ``.item()`` of a meta tensor is 0, and copying a meta
  tensor to the CPU gives zeros of its shape (the result's values are meaningless; its shape and the
  absence of errors are what the mode checks);
- parallel layouts run one rank at a time in this process over torch's fake process group, whose
  collectives and point-to-point calls return at once without touching data, so each rank's own
  code path (its stage, its shard, its CFG branch) runs alone.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode


class MetaValues(TorchFunctionMode):
    """``.item()`` / ``.tolist()`` / copies to the CPU of meta tensors give zeros instead of raising."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        this = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if this is not None and this.is_meta:
            if func is torch.Tensor.item:
                return 0
            if func is torch.Tensor.tolist:
                return torch.zeros(this.shape, dtype=this.dtype).tolist()
            if func in (torch.Tensor.cpu, torch.Tensor.to):
                try:
                    return func(*args, **kwargs)
                except NotImplementedError:  # "Cannot copy out of meta tensor": stand in zeros on the CPU
                    dtype = kwargs.get("dtype") or next((a for a in args[1:] if isinstance(a, torch.dtype)),
                                                        this.dtype)
                    return torch.zeros(this.shape, dtype=dtype)
        return func(*args, **kwargs)


def _batch_one_by_one(ops: list) -> list:
    """The fake group has no meta backend for batched P2P; post the same ops one by one."""
    return [op.op(op.tensor, op.peer, op.group, op.tag) for op in ops]


@contextlib.contextmanager
def fake_world(rank: int, world_size: int) -> Iterator[None]:
    """This process as ``rank`` of a fake world: every collective returns at once, no peer needed."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    saved = dist.batch_isend_irecv
    dist.batch_isend_irecv = _batch_one_by_one
    try:
        yield
    finally:
        dist.batch_isend_irecv = saved
        dist.destroy_process_group()


def generate_on_meta(adapter: Any, request: Any, rank: int = 0, on_step: Optional[Any] = None) -> torch.Tensor:
    """``request`` through the engine its layout needs, as ``rank``, with ``adapter`` on meta."""
    from comfyui_xdit.engine import Engine
    from comfyui_xdit.parallel import create_engine
    from comfyui_xdit.parallel.mesh import Mesh

    assert adapter.device.type == "meta", "load the model with device='meta'"
    with MetaValues():
        if request.parallel.is_serial:
            return Engine(adapter).generate(request, on_step=on_step)
        with fake_world(rank, request.parallel.world_size):
            mesh = Mesh.build(request.parallel, rank)
            return create_engine(adapter, request.parallel, rank, mesh).generate(request, on_step=on_step)
