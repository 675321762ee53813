"""Weight sharding: each rank keeps 1/N of every transformer block, FSDP2-style, for inference.

PyTorch's own FSDP2 (``fully_shard`` over a 1-D ``DeviceMesh``, parameters as ``DTensor`` shards on dim 0)
does the work: a block's forward pre-hook all-gathers its weights over the shard group, its forward hook
frees them again, and each block prefetches the next one's all-gather as it starts
(``set_modules_to_forward_prefetch``), so while block i computes block i+1's weights arrive. At most two
blocks are whole on a rank at a time, one running, one arriving.

The shard group is the ranks that run the same blocks: the whole world without PipeFusion; with it, the
ranks of one pipeline stage (same pipefusion coordinate: data x cfg x ring x ulysses). Blocks of other
stages are ``AbsentBlock`` without weights and are left alone. Every rank of a shard group calls the same
blocks in the same order in every loop (sequence, CFG, data parallel, PipeFusion), so the all-gathers stay
in step.

What is not sharded: the root module's own tensors outside the blocks (embedders, final norm and
projection, Wan's / PixArt's ``scale_shift_table``). The adapters use some of them outside any module
call (``patch_conv_as_linear`` reads ``pos_embed.proj.weight``, the heads read ``scale_shift_table``),
where no FSDP hook would gather them, so they stay whole on every rank, as FSDP2 keeps its root unsharded
between forwards; they are 0.2 to 1.6 % of a full-size model's parameters (``benchmarks/weight_memory.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from ..models.absent_block import AbsentBlock
from ..parallel_config import ParallelConfig
from .mesh import groups_along

logger = logging.getLogger(__name__)

# Ranks that differ only along these axes run the same blocks (everything but the pipeline stage).
SHARD_AXES: tuple[str, ...] = ("data", "cfg", "ring", "ulysses")
# FSDP2's private hook that names the root of a module tree (torch 2.4 to 2.14 at least; see ``_name_root``)
ROOT_INIT = "_lazy_init"


def shard_ranks(parallel: ParallelConfig, rank: int) -> tuple[int, ...]:
    """The global ranks ``rank`` shares its blocks' weights with (itself included), in increasing order."""
    for row in groups_along(parallel, SHARD_AXES):
        if rank in row:
            return tuple(row)
    raise ValueError(f"rank {rank} is outside a world of {parallel.world_size} ({parallel.describe()})")


def sharing(parallel: ParallelConfig, rank: int) -> Optional[tuple[int, ...]]:
    """What a rank's loaded model depends on beyond its blocks: the ranks it shares them with when
    ``parallel.shard_weights``, else None (part of a model cache's key)."""
    return shard_ranks(parallel, rank) if parallel.shard_weights else None


@dataclass(frozen=True)
class ShardedWeights:
    """A rank's handle on its adapter's sharded weights: the shard group's ranks, its DeviceMesh, and the
    FSDP units (one per present block, in forward order, then the root)."""

    ranks: tuple[int, ...]
    mesh: DeviceMesh
    blocks: tuple[FSDPModule, ...]
    root: FSDPModule
    owns_group: bool  # a stage group made here (PipeFusion), destroyed by ``release``; the world is not
    prefetch: bool  # each block prefetches the next one's all-gather (False: a torch without ``ROOT_INIT``)

    def release(self) -> None:
        """Free the stage's process group (every rank alike, when the model is dropped)."""
        if self.owns_group:
            dist.destroy_process_group(self.mesh.get_group())


def _shard_group(parallel: ParallelConfig, rank: int) -> tuple[Any, bool]:
    """This rank's shard group and whether it was made here. Without PipeFusion it is the world itself;
    with it, one group per stage (``new_group`` is collective: every rank makes every stage's group)."""
    rows = groups_along(parallel, SHARD_AXES)
    if len(rows) == 1:
        return dist.group.WORLD, False
    mine = None
    for row in rows:
        group = dist.new_group(row)
        if rank in row:
            mine = group
    return mine, True


def shard_weights(adapter: Any, parallel: ParallelConfig, rank: int,
                  device: Optional[torch.device] = None) -> ShardedWeights:
    """Shard ``adapter``'s present blocks over ``rank``'s shard group, in place (collective: call on every
    rank alike, right after building the adapter, before any forward).

    ``device`` (default: the adapter's) is where the shards and the shared tensors end up: an adapter built
    in host memory reaches a GPU block by block as shards only, so the card never holds the whole stage.

    Weights are gathered in the dtype they are stored in: fp8-stored Linears (``models/fp8_weights.py``)
    travel as fp8, one byte a parameter, and upcast at their call as without sharding.
    """
    parallel.check_shardable()
    if not dist.is_initialized() or dist.get_world_size() != parallel.world_size:
        raise RuntimeError(f"weight sharding for {parallel.describe()} needs a torch.distributed world of "
                           f"{parallel.world_size} ranks; call init_distributed first")
    group, owns = _shard_group(parallel, rank)
    device = torch.device(device) if device is not None else adapter.device
    mesh = DeviceMesh.from_group(group, device.type)  # FSDP2 moves each block there, then keeps its shard
    present = [b for b in adapter.blocks if not isinstance(b, AbsentBlock)]
    blocks = tuple(fully_shard(b, mesh=mesh, reshard_after_forward=True) for b in present)
    transformer = adapter.transformer
    shared = {p for p in transformer.parameters() if not isinstance(p, DTensor)}  # outside every block
    root = fully_shard(transformer, mesh=mesh, reshard_after_forward=True, ignored_params=shared)
    transformer.to(device)  # the shared tensors (FSDP2 leaves ignored ones where they are)
    prefetch = _name_root(root)
    if prefetch:
        for block, following in zip(blocks, blocks[1:]):
            block.set_modules_to_forward_prefetch([following])
    sharded = ShardedWeights(shard_ranks(parallel, rank), mesh, blocks, root, owns, prefetch)
    logger.info("rank %d: %d blocks sharded over ranks %s; %.1f MiB of weights resident (%.1f MiB unsharded)",
                rank, len(blocks), list(sharded.ranks), resident_bytes(transformer) / 2**20,
                full_bytes(transformer) / 2**20)
    return sharded


def _name_root(root: FSDPModule) -> bool:
    """Make ``root`` the root of its FSDP tree now; False (with a warning) where this torch lacks the hook.

    FSDP2 names its root at the first forward through it. The adapters never call the root's forward (embed /
    run_blocks / head call its children), so without this each block would become a root of its own, with its
    own communication state, and a block's prefetch of the next one would find that one uninitialised. There
    is no public call for it; without it the blocks are still sharded and gathered, one at a time, without
    prefetching: the same numbers, slower where communication could overlap compute.
    """
    init = getattr(root._get_fsdp_state(), ROOT_INIT, None)
    if init is None:
        logger.warning("torch %s: FSDP2's private FSDPState.%s is missing or changed; weights stay sharded but "
                       "each block is gathered only when it starts (no prefetch of the next one)", torch.__version__,
                       ROOT_INIT)
        return False
    init()
    return True


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters this rank holds now: a sharded one's local shard, an unsharded (or
    gathered, during its block's forward) one whole."""
    return sum(_local(p).numel() * p.element_size() for p in module.parameters())


def full_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters as a whole (every shard counted)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def is_gathered(block: torch.nn.Module) -> bool:
    """Whether ``block``'s weights are whole on this rank now (inside its forward when sharded)."""
    return any(not isinstance(p, DTensor) for p in block.parameters())
