"""The messages PipeFusion exchanges: activations forward along the pipeline, updated patches and step
previews from the last stage back to the first, and a stop vote that never stalls the pipeline.

Written for NCCL's rules (``nccl_semantics.py`` enforces them in the tests): no tags, since messages
between two ranks of a group match in posting order; one communicator runs its operations in order.
The two directions therefore travel on two groups over the same ranks: ``forward`` carries activations
from stage s to s + 1, ``back`` carries patches and previews from the last stage to the first. On each
group every rank's messages form a chain that only ever waits on a later stage (forward) or on the
last stage (back), so no schedule can wait in a circle: stage 0 posts forward sends and receives on
``back``; a middle stage receives from s - 1 and then sends to s + 1 on ``forward``; the last stage
receives on ``forward`` and sends on ``back``. Within one group both sides post in the order the
schedule fixes, which is what matches a message to its receive. Sends are non-blocking and kept alive
until done.
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


class PipeLinks:
    """This rank's neighbours along the pipefusion axis (global ranks), the two groups that carry the
    two directions, and its in-flight sends."""

    def __init__(self, mesh: Mesh, counter: Optional[CommCounter]) -> None:
        self.stage = mesh.coords.pipefusion
        self.stages = mesh.size(("pipefusion",))
        self.prev = mesh.peer("pipefusion", -1)
        self.next = mesh.peer("pipefusion", 1)
        self.first = mesh.rank_at(pipefusion=0)
        self.last = mesh.rank_at(pipefusion=self.stages - 1)
        self.forward = mesh.group(("pipefusion",))  # activations, stage s -> s + 1
        self.back = mesh.twin(("pipefusion",))  # patches and previews, last stage -> first
        self.counter = counter
        self._in_flight: list[tuple[dist.Work, torch.Tensor]] = []

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    def send_activations(self, tensors: Sequence[torch.Tensor]) -> None:
        self._send(tensors, self.next, self.forward)

    def recv_activations(self, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self._recv(like, self.prev, self.forward)

    def send_back(self, tensors: Sequence[torch.Tensor]) -> None:
        """Last stage: a patch or a preview to stage 0."""
        self._send(tensors, self.first, self.back)

    def recv_back(self, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Stage 0: what the last stage sent back, in the order it sent it."""
        return self._recv(like, self.last, self.back)

    def _send(self, tensors: Sequence[torch.Tensor], dst: int, group: Optional[dist.ProcessGroup]) -> None:
        for tensor in tensors:
            tensor = tensor.contiguous()
            self._in_flight.append((dist.isend(tensor, dst, group=group), tensor))
            if self.counter is not None:
                self.counter.add("pipefusion", nbytes(tensor))
        self._in_flight = [(work, t) for work, t in self._in_flight if not work.is_completed()]

    @staticmethod
    def _recv(like: Sequence[torch.Tensor], src: int, group: Optional[dist.ProcessGroup]) -> list[torch.Tensor]:
        """Receive one tensor shaped like each of ``like``, in order."""
        out = []
        for template in like:
            buffer = torch.empty_like(template, memory_format=torch.contiguous_format)
            dist.recv(buffer, src, group=group)
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
        dist.broadcast(tensor, self.last, group=self.forward)
        return tensor


class LaggedStopVote:
    """All ranks agree whether to stop, a few work items late, so the vote does not make stage 0 wait.

    At the start of every work item each rank starts a MAX all-reduce of its own ``should_stop(step)``
    and acts on the votes started ``lag`` items before: 0 right after a whole-latent (warm-up) item, when
    stage 0 has just received the whole latent from the last stage, so every rank is already at this
    item; ``stages - 1`` between patches, how far the last stage runs behind stage 0. Every rank walks
    the same items with the same lags, so all stop at the same item; with ``patches >= stages`` a cancel
    takes effect within one step.
    """

    def __init__(self, should_stop: Optional[Callable[[int], bool]], device: torch.device,
                 counter: Optional[CommCounter], stages: int) -> None:
        self.should_stop = should_stop
        self.device = device
        self.counter = counter
        self.stages = stages
        self._pending: list[tuple[int, dist.Work, torch.Tensor]] = []  # (item index, its all-reduce, flag)
        self._after_whole = True  # the previous item covered the whole latent (or there was none)

    def before_item(self, index: int, step: int, whole: bool) -> None:
        """Vote at item ``index`` (of step ``step``; ``whole``: a warm-up item); raises
        ``GenerationCancelled`` on every rank alike."""
        flag = torch.tensor([1 if self.should_stop is not None and self.should_stop(step) else 0], dtype=torch.int32,
                            device=self.device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if self.counter is not None:
            self.counter.add("control", nbytes(flag))
        self._pending.append((index, work, flag))
        lag = 0 if self._after_whole else self.stages - 1
        self._after_whole = whole
        while self._pending and self._pending[0][0] <= index - lag:
            _, decided, stop = self._pending.pop(0)
            decided.wait()
            if stop.item():
                self.close()
                raise GenerationCancelled(f"cancelled before step {step}")

    def close(self) -> None:
        for _, work, _ in self._pending:
            work.wait()
        self._pending = []
