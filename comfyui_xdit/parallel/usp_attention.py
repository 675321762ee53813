"""USP (Ulysses x Ring) attention for joint text + image sequences, built on yunchang's pieces.

Each rank of a sequence group holds all ``L`` text tokens and its own shard of the image tokens:
q, k, v are (B, L + N_local, H, D), text first. Per layer:

1. Ulysses: the image part goes through yunchang's all-to-all (scatter heads, gather sequence) to
   (B, N_local * U, H/U, D); the text part, whole everywhere, just keeps this rank's H/U heads.
2. Ring: queries [text; image] attend to every key block of the ring. The text keys join the local
   block only, so each key is seen once; blocks circulate with yunchang's ``RingComm`` and partial
   results merge by log-sum-exp with yunchang's ``update_out_and_lse``. The local kernel is ours,
   picked per device so that its log-sum-exp is true.
3. Back: the image output all-to-all (scatter sequence, gather heads) to (B, N_local, H, D); the text
   output is all-gathered over heads, so every rank again holds all text tokens.

yunchang's ``LongContextAttention`` reads its groups from a module-global singleton, has no joint
tokens in 0.6.4, and takes its ring kernel from a table whose CPU entry returns a zero LSE, so we
compose its communication primitives instead of calling it.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist
from yunchang.ring.utils import RingComm, update_out_and_lse

from .attention_kernels import LseKernel, checked_kernel, kernel_for
from .comm import CommCounter, group_size, nbytes
from .joint_ulysses import JointUlysses

logger = logging.getLogger(__name__)


def ring_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group: Optional[dist.ProcessGroup],
                   kernel: LseKernel, counter: Optional[CommCounter] = None,
                   local_key: Optional[torch.Tensor] = None,
                   local_value: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of ``query`` over the keys of every ring member, merged by log-sum-exp.

    query (B, Sq, H, D); key, value (B, Sk, H, D) circulate around the ring; ``local_key`` /
    ``local_value`` (B, Sx, H, D), if given, join this rank's own block only (joint text tokens).
    Returns (B, Sq, H, D) in ``query``'s dtype.
    """
    size = group_size(group)
    if size == 1:
        if local_key is not None:
            key, value = torch.cat([local_key, key], dim=1), torch.cat([local_value, value], dim=1)
        return kernel(query, key, value)[0].to(query.dtype)
    comm = RingComm(group)
    key, value = key.contiguous(), value.contiguous()
    out: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
    for step in range(size):
        if step + 1 < size:  # post the hand-off of this block before computing on it
            next_key, next_value = comm.send_recv(key), comm.send_recv(value)
            comm.commit()
            if counter is not None:
                counter.add("ring", nbytes(key) + nbytes(value))
        block_key, block_value = key, value
        if step == 0 and local_key is not None:
            block_key = torch.cat([local_key, key], dim=1)
            block_value = torch.cat([local_value, value], dim=1)
        block_out, block_lse = kernel(query, block_key, block_value)
        out, lse = update_out_and_lse(out, lse, block_out, block_lse)  # out float32 (B, Sq, H, D)
        if step + 1 < size:
            comm.wait()
            key, value = next_key, next_value
    assert out is not None
    return out.to(query.dtype)


class USPAttention:
    """Attention backend for the seam: Ulysses over ``ulysses_group``, ring over ``ring_group``."""

    def __init__(self, ulysses_group: Optional[dist.ProcessGroup], ring_group: Optional[dist.ProcessGroup],
                 kernel: LseKernel, counter: Optional[CommCounter] = None) -> None:
        self.ring_group = ring_group
        self.kernel = kernel
        self.counter = counter
        self.ulysses = JointUlysses(ulysses_group, counter)

    @classmethod
    def for_device(cls, ulysses_group: Optional[dist.ProcessGroup], ring_group: Optional[dist.ProcessGroup],
                   device: torch.device, dtype: torch.dtype,
                   counter: Optional[CommCounter] = None) -> "USPAttention":
        """Pick the device's LSE kernel and, when a ring merges blocks, check it once (a zero LSE would break the
        merge; a private kernel missing from this torch falls back to the math kernel)."""
        kernel = checked_kernel(device, dtype) if group_size(ring_group) > 1 else kernel_for(device, dtype)
        return cls(ulysses_group, ring_group, kernel, counter)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, text_len: int,
                 layer: int) -> torch.Tensor:
        split = self.ulysses.scatter_heads
        (text_q, image_q), (text_k, image_k), (text_v, image_v) = (split(t, text_len) for t in (query, key, value))
        out = ring_attention(torch.cat([text_q, image_q], dim=1), image_k, image_v, self.ring_group, self.kernel,
                             self.counter, local_key=text_k, local_value=text_v)  # (B, L + N_local * U, H/U, D)
        return self.ulysses.gather_heads(out, text_len)  # (B, L + N_local, H, D)
