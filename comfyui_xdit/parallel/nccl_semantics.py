"""NCCL's point-to-point and ordering rules, enforced on gloo so CPU tests fail where GPUs would hang.

gloo is forgiving where NCCL is not: gloo matches messages by tag, and its sends complete into the
peer's buffers whether or not the peer has posted the receive. NCCL ignores tags (messages between
two ranks of a communicator match in posting order), and its operations between two ranks run in
order on one stream: a receive cannot complete while an earlier send on that stream waits for the
peer to post the matching receive. Code that is deadlock-free only thanks to gloo's buffering hangs
on GPUs, and over Ethernet.

``install`` (in a rank process, after ``init_process_group``) replaces torch.distributed's
point-to-point entry points with checked ones:

- a tag other than 0 raises at once;
- every send gets an acknowledgement, sent by the receiver when it posts the matching receive, over
  a companion group made for each group (so data and acknowledgements never mix). Data still moves
  through gloo at once (as a GPU moves it without the host), but the operations of one group form one
  stream, as one NCCL communicator's do: a receive, a collective or a ``wait`` completes only after
  every earlier send on that group was acknowledged. A circular wait (each rank sends, then receives
  from the other, on one group) deadlocks here as it does on NCCL, and the watchdog turns it into an
  error;
- the host posts a receive only when everything earlier on its group is done. NCCL posts it from the
  GPU stream without blocking the host, so this is stricter: what passes here cannot wait in a circle
  there;
- ``batch_isend_irecv`` posts all its receives' acknowledgements before it waits for its sends', as
  NCCL's grouped calls do not wait on each other;
- every collective first completes its group's earlier point-to-point operations, then all ranks of
  the group compare what they are about to issue (kind, shapes, dtypes) over the companion group: a
  rank that issues a different collective, or one in a different order, fails at once with both
  sides named instead of hanging or mixing data;
- the watchdog: every wait is bounded by ``wait_bound_s``; past it, an ``NcclSemanticsError`` names
  the rank and the message it waited for.

The groups made under it get ``wait_bound_s`` as their timeout too. Not modelled: NCCL's eager completion of small sends (we never rely on it) and deadlocks between
communicators on the GPU.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

SEMANTICS_ENV = "COMFYUI_XDIT_NCCL_SEMANTICS"  # "1": gloo ranks obey NCCL's rules (the test suite sets it)
WAIT_ENV = "COMFYUI_XDIT_NCCL_WAIT_S"  # the watchdog's bound in seconds
# all_gather_single: FSDP2's all-gather of a block's weights (weight_sharding.py) on torch >= 2.14; the names this
# torch lacks are skipped
COLLECTIVES = tuple(name for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
                                      "all_to_all_single", "broadcast", "reduce_scatter_tensor", "barrier")
                    if hasattr(dist, name))


@dataclass(frozen=True)
class NcclSemantics:
    """Whether rank processes enforce NCCL's rules, and how long any wait may last before it is an error."""

    enabled: bool = True
    wait_bound_s: float = 60.0


def from_env(environ: Optional[dict] = None) -> NcclSemantics:
    """The mode as ``COMFYUI_XDIT_NCCL_SEMANTICS`` / ``COMFYUI_XDIT_NCCL_WAIT_S`` set it (off, 60 s by default)."""
    environ = os.environ if environ is None else environ
    return NcclSemantics(enabled=environ.get(SEMANTICS_ENV, "") == "1", wait_bound_s=float(environ.get(WAIT_ENV, "60")))


class NcclSemanticsError(RuntimeError):
    """Code that would hang or misbehave on NCCL: a tag, a circular wait, collectives out of order."""


@dataclass
class _Pending:
    """An operation a later one on the same stream must wait for: a send (until its acknowledgement, i.e.
    the peer posted the receive) or a non-blocking receive (until its data arrived)."""

    work: Any  # the acknowledgement's receive (sends) or the data receive (receives)
    what: str


@dataclass
class _Stream:
    """The operations of one group: NCCL runs a communicator's operations in posting order."""

    pending: list[_Pending] = field(default_factory=list)


class _Work:
    """What a checked ``isend`` / ``irecv`` returns: done when the stream got past it (a send: its data went
    out and the receiver posted its receive; a receive: its data arrived)."""

    def __init__(self, shim: "_Shim", stream: _Stream, pending: _Pending, data: Any = None) -> None:
        self._shim, self._stream, self._pending, self._data = shim, stream, pending, data

    def wait(self, timeout: Optional[datetime.timedelta] = None) -> bool:
        self._shim.drain(self._stream, upto=self._pending)
        if self._data is not None:
            self._data.wait()
        return True

    def is_completed(self) -> bool:
        self._shim.advance(self._stream)
        return self._pending not in self._stream.pending and (self._data is None or self._data.is_completed())


class _P2P:
    """Stand-in for ``dist.P2POp`` that accepts the checked ``isend`` / ``irecv``."""

    def __init__(self, op: Callable, tensor: torch.Tensor, peer: Optional[int] = None,
                 group: Optional[dist.ProcessGroup] = None, tag: int = 0, group_peer: Optional[int] = None) -> None:
        self.op, self.tensor, self.group, self.tag = op, tensor, group, tag
        self.peer = peer if peer is not None else dist.get_global_rank(group, group_peer)


class _Shim:
    """The checked entry points of one rank; ``originals`` are torch's own."""

    def __init__(self, config: NcclSemantics, collective_timeout_s: float) -> None:
        self.config = config
        self.rank = dist.get_rank()
        self.originals = {name: getattr(dist, name) for name in
                          ("send", "recv", "isend", "irecv", "batch_isend_irecv", "P2POp", "new_group",
                           "destroy_process_group", *COLLECTIVES)}
        self.timeout = datetime.timedelta(seconds=min(config.wait_bound_s, collective_timeout_s))
        # The companions' own agreement checks wait twice the bound: a rank stuck behind a send must be
        # reported by the watchdog (naming the send), not by its peer's gloo timeout inside the check.
        self.companion_timeout = 2 * self.timeout
        self.companions: dict[Any, Any] = {}
        self.streams: dict[tuple[Any, int], _Stream] = {}
        self.acks_in_flight: list[Any] = []  # acknowledgement sends, kept alive until done
        self.companions[None] = self.originals["new_group"](timeout=self.companion_timeout)  # the world's

    # ---- groups ---------------------------------------------------------------------------------
    def new_group(self, ranks: Any = None, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self.timeout)
        group = self.originals["new_group"](ranks, *args, **kwargs)
        companion = self.originals["new_group"](ranks, timeout=self.companion_timeout)  # collective too, same order
        if group is not None and group != dist.GroupMember.NON_GROUP_MEMBER:
            self.companions[group] = companion
        return group

    def destroy_process_group(self, group: Any = None) -> None:
        """A group's end (all its ranks alike): it and its companion go."""
        if group is not None and group in self.companions:
            self.originals["destroy_process_group"](self.companions.pop(group))
        self.originals["destroy_process_group"](group)

    def _companion(self, group: Any) -> Any:
        key = None if group is None or group == dist.group.WORLD else group
        return self.companions[key]

    def _stream(self, group: Any) -> _Stream:
        key = None if group is None or group == dist.group.WORLD else group
        return self.streams.setdefault(key, _Stream())

    # ---- point to point -------------------------------------------------------------------------
    def _check_tag(self, tag: int, op: str, peer: int) -> None:
        if tag:
            raise NcclSemanticsError(f"rank {self.rank}: {op} with peer {peer} uses tag {tag}; NCCL ignores tags "
                                     "(messages between two ranks match in posting order): separate kinds of "
                                     "messages by order or by process group")

    def drain(self, stream: _Stream, upto: Optional[_Pending] = None) -> None:
        """Complete the stream's earlier operations in order (all, or up to ``upto``), each within the bound."""
        while stream.pending:
            pending = stream.pending[0]
            try:
                if not pending.work.is_completed():
                    pending.work.wait(self.timeout)
            except RuntimeError as exc:
                raise NcclSemanticsError(
                    f"rank {self.rank}: waited more than {self.config.wait_bound_s:.0f}s for {pending.what}; on "
                    f"NCCL it never completes and every later operation on the stream waits behind it (a "
                    f"circular wait?). Cause: {' '.join(str(exc).split())[:300]}") from exc
            stream.pending.pop(0)
            if pending is upto:
                return

    @staticmethod
    def advance(stream: _Stream) -> None:
        """Retire the stream's leading operations that are already done, without waiting."""
        while stream.pending and stream.pending[0].work.is_completed():
            stream.pending.pop(0)

    def _post_send(self, tensor: torch.Tensor, dst: int, group: Any, what: str) -> tuple[Any, _Stream, _Pending]:
        stream = self._stream(group)
        ack = self.originals["irecv"](torch.zeros(1, dtype=torch.int32), dst, group=self._companion(group))
        pending = _Pending(work=ack, what=f"rank {dst} to post the receive matching {what}")
        stream.pending.append(pending)
        data = self.originals["isend"](tensor, dst, group=group)
        return data, stream, pending

    def _post_data_recv(self, tensor: torch.Tensor, src: int, group: Any, what: str) -> _Work:
        stream = self._stream(group)
        work = self.originals["irecv"](tensor, src, group=group)
        pending = _Pending(work=work, what=what)
        stream.pending.append(pending)
        return _Work(self, stream, pending)

    def _post_recv_ack(self, src: int, group: Any) -> None:
        """When a receive is posted: tell ``src`` its matching send may complete."""
        ack = torch.ones(1, dtype=torch.int32)
        self.acks_in_flight = [w for w in self.acks_in_flight if not w[0].is_completed()]
        self.acks_in_flight.append((self.originals["isend"](ack, src, group=self._companion(group)), ack))

    def _post_recv(self, tensor: torch.Tensor, src: int, group: Any) -> _Work:
        """A non-blocking receive after the stream's earlier operations; later ones wait for its data."""
        self.drain(self._stream(group))
        self._post_recv_ack(src, group)
        return self._post_data_recv(tensor, src, group, f"the data of a receive of {tuple(tensor.shape)} "
                                                        f"{tensor.dtype} from rank {src}")

    def isend(self, tensor: torch.Tensor, dst: Optional[int] = None, group: Any = None, tag: int = 0,
              **kwargs: Any) -> _Work:
        dst = dst if dst is not None else dist.get_global_rank(group, kwargs["group_dst"])
        self._check_tag(tag, "isend", dst)
        what = f"a send of {tuple(tensor.shape)} {tensor.dtype} from rank {self.rank}"
        data, stream, pending = self._post_send(tensor, dst, group, what)
        return _Work(self, stream, pending, data)

    def send(self, tensor: torch.Tensor, dst: Optional[int] = None, group: Any = None, tag: int = 0,
             **kwargs: Any) -> None:
        self.isend(tensor, dst, group, tag, **kwargs).wait()

    def irecv(self, tensor: torch.Tensor, src: Optional[int] = None, group: Any = None, tag: int = 0,
              **kwargs: Any) -> Any:
        if src is None:
            if kwargs.get("group_src") is None:
                raise NcclSemanticsError(f"rank {self.rank}: a receive from any source; NCCL needs the peer")
            src = dist.get_global_rank(group, kwargs["group_src"])
        self._check_tag(tag, "irecv", src)
        return self._post_recv(tensor, src, group)

    def recv(self, tensor: torch.Tensor, src: Optional[int] = None, group: Any = None, tag: int = 0,
             **kwargs: Any) -> int:
        self.irecv(tensor, src, group, tag, **kwargs).wait()  # blocking: its data (bounded by the watchdog)
        return src if src is not None else dist.get_global_rank(group, kwargs["group_src"])

    def batch_isend_irecv(self, ops: list) -> list:
        """NCCL runs a batch as one grouped call: its receives never wait for its own sends."""
        for op in ops:
            self._check_tag(op.tag, "batch_isend_irecv", op.peer)
        receives = [op for op in ops if op.op in (self.irecv, self.originals["irecv"])]
        sends = [op for op in ops if op not in receives]
        for op in ops:  # the batch starts after everything earlier on its streams
            self.drain(self._stream(op.group))
        for op in receives:
            self._post_recv_ack(op.peer, op.group)
        works: list = []
        for op in sends:
            what = f"a batched send of {tuple(op.tensor.shape)} {op.tensor.dtype} from rank {self.rank}"
            data, stream, pending = self._post_send(op.tensor, op.peer, op.group, what)
            works.append(_Work(self, stream, pending, data))
        for op in receives:
            works.append(self._post_data_recv(op.tensor, op.peer, op.group,
                                              f"a batched receive of {tuple(op.tensor.shape)} from rank {op.peer}"))
        return works

    # ---- collectives ----------------------------------------------------------------------------
    def checked(self, name: str) -> Callable:
        original = self.originals[name]

        def collective(*args: Any, **kwargs: Any) -> Any:
            group = kwargs.get("group")
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            signature = f"{name}[" + ",".join(f"{tuple(t.shape)}{str(t.dtype)[6:]}" for t in tensors) + "]"
            self.drain(self._stream(group))  # behind the group's earlier sends and receives, as on NCCL
            self.check_same_collective(group, signature)
            return original(*args, **kwargs)

        return collective

    def check_same_collective(self, group: Any, signature: str) -> None:
        """Every rank of ``group`` is about to issue the same collective; NcclSemanticsError naming both
        sides otherwise (raised on every rank of the group alike)."""
        companion = self._companion(group)
        size = dist.get_world_size(companion)
        digest = int.from_bytes(hashlib.sha256(signature.encode()).digest()[:7], "little")
        mine = torch.tensor([digest], dtype=torch.int64)
        gathered = [torch.zeros_like(mine) for _ in range(size)]
        self.originals["all_gather"](gathered, mine, group=companion)
        if any(int(g) != digest for g in gathered):
            described: list = [None] * size
            dist.all_gather_object(described, signature, group=companion)
            raise NcclSemanticsError(
                f"rank {self.rank}: the ranks of a group issue different collectives at the same point: "
                f"{described} (one per rank of the group); NCCL needs the same collectives in the same order on "
                f"every rank of a group, or it hangs or mixes data")

    def finish(self) -> None:
        """Complete every outstanding operation of this rank, each within the bound."""
        for stream in self.streams.values():
            self.drain(stream)
        for work, _ in self.acks_in_flight:
            if not work.is_completed():
                work.wait(self.timeout)


def install(config: NcclSemantics, collective_timeout_s: float = float("inf")) -> Optional[_Shim]:
    """Replace torch.distributed's entry points in this process (after ``init_process_group``, before any
    group is created); returns the shim whose ``finish`` ends the run. Collective: call on every rank.
    Waits are bounded by the smaller of ``wait_bound_s`` and the world's ``collective_timeout_s``."""
    if not config.enabled:
        return None
    shim = _Shim(config, collective_timeout_s)
    for name in ("send", "recv", "isend", "irecv", "batch_isend_irecv", "new_group", "destroy_process_group"):
        setattr(dist, name, getattr(shim, name))
    dist.P2POp = _P2P
    for name in COLLECTIVES:
        setattr(dist, name, shim.checked(name))
    logger.debug("rank %d: NCCL semantics on (wait bound %.0fs)", shim.rank, config.wait_bound_s)
    return shim


def uninstall(shim: Optional[_Shim]) -> None:
    """Give torch.distributed its own entry points back (the companion groups go with the world)."""
    if shim is None:
        return
    for name, original in shim.originals.items():
        setattr(dist, name, original)
