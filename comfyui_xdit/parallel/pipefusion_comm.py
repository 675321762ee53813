"""The messages PipeFusion exchanges: activations forward along the pipeline, updated patches and step
previews from the last stage back to the first, and a stop vote that never stalls the pipeline.

Sends are non-blocking (``isend``) and kept alive until done: the pipeline is a ring (the last stage
feeds the first), so blocking sends could wait on each other forever. Receives block, in the order
the schedule fixes on both sides; one tag per kind of message keeps the kinds apart.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..sampling import GenerationCancelled
from .comm import CommCounter, nbytes
from .mesh import Mesh

logger = logging.getLogger(__name__)

TAG_ACTIVATIONS = 101  # stage s -> s + 1: hidden + text hidden of one patch, per CFG branch
TAG_PATCH = 102  # last stage -> first: a patch after the sampler step
TAG_PREVIEW = 103  # last stage -> first: the step's downscaled x0 prediction


class PipeLinks:
    """This rank's neighbours along the pipefusion axis (global ranks) and its in-flight sends."""

    def __init__(self, mesh: Mesh, counter: Optional[CommCounter]) -> None:
        self.stage = mesh.coords.pipefusion
        self.stages = mesh.size(("pipefusion",))
        self.prev = mesh.peer("pipefusion", -1)
        self.next = mesh.peer("pipefusion", 1)
        self.first = mesh.rank_at(pipefusion=0)
        self.last = mesh.rank_at(pipefusion=self.stages - 1)
        self.group = mesh.group(("pipefusion",))
        self.counter = counter
        self._in_flight: list[tuple[dist.Work, torch.Tensor]] = []

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    def send(self, tensors: Sequence[torch.Tensor], dst: int, tag: int) -> None:
        for tensor in tensors:
            tensor = tensor.contiguous()
            self._in_flight.append((dist.isend(tensor, dst, tag=tag), tensor))
            if self.counter is not None:
                self.counter.add("pipefusion", nbytes(tensor))
        self._in_flight = [(work, t) for work, t in self._in_flight if not work.is_completed()]

    def recv(self, like: Sequence[torch.Tensor], src: int, tag: int) -> list[torch.Tensor]:
        """Receive one tensor shaped like each of ``like``, in order."""
        out = []
        for template in like:
            buffer = torch.empty_like(template, memory_format=torch.contiguous_format)
            dist.recv(buffer, src, tag=tag)
            out.append(buffer)
        return out

    def flush(self) -> None:
        """Wait until every send of this rank has been received."""
        for work, _ in self._in_flight:
            work.wait()
        self._in_flight = []

    def broadcast_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """The last stage's ``tensor`` on every stage of this pipeline."""
        tensor = tensor.contiguous()
        if self.is_last and self.counter is not None:
            self.counter.add("pipefusion", nbytes(tensor) * (self.stages - 1))
        dist.broadcast(tensor, self.last, group=self.group)
        return tensor


class LaggedStopVote:
    """All ranks agree whether to stop, one step late, so the vote never makes stage 0 wait.

    At the start of step ``i`` every rank starts a MAX all-reduce of its own ``should_stop(i)`` and
    acts on the vote started at step ``i - 1`` (step 0 waits on its own). Stage 0 starts step ``i``
    no earlier than the last stage started step ``i - 1`` when patches >= stages - 1, so that vote
    is already complete. A cancel therefore takes effect one step later than in the serial loop.
    """

    def __init__(self, should_stop: Optional[Callable[[int], bool]], device: torch.device,
                 counter: Optional[CommCounter]) -> None:
        self.should_stop = should_stop
        self.device = device
        self.counter = counter
        self._pending: Optional[tuple[dist.Work, torch.Tensor]] = None

    def before_step(self, step: int) -> None:
        """Raises ``GenerationCancelled`` on every rank alike."""
        flag = torch.tensor([1 if self.should_stop is not None and self.should_stop(step) else 0], dtype=torch.int32,
                            device=self.device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if self.counter is not None:
            self.counter.add("control", nbytes(flag))
        decided = self._pending if self._pending is not None else (work, flag)
        decided[0].wait()
        self._pending = (work, flag)
        if decided[1].item():
            self.close()
            raise GenerationCancelled(f"cancelled before step {step}")

    def close(self) -> None:
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
