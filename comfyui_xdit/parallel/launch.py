"""Run requests on N local CPU processes (one rank each, gloo) and hand back rank 0's latent.

This is the no-GPU, no-Ray path for the CLI and the tests: ranks forked from a fork server that has
imported torch and the engine once (not from this possibly threaded process), one torch thread per
rank, a rendezvous file (no listening socket), a deadline on everything, and every child killed when any rank
fails or the deadline passes. Results cross back as plain pickles (no shared-memory tensors, so a
child may exit as soon as it has reported).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import queue as queue_module
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from ..request import GenerationRequest
from .distributed import DEFAULT_TIMEOUT_S, init_distributed, shutdown_distributed
from .nccl_semantics import NcclSemantics, from_env, install

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
# Imported once by the fork server; every rank is then a cheap fork instead of a fresh interpreter.
PRELOAD = ["torch", "comfyui_xdit.model_loader", "comfyui_xdit.parallel"]
POLL_S = 0.2
RUN_TIMEOUT_S = 3600.0  # a whole run; each collective has its own, shorter, DEFAULT_TIMEOUT_S
KILL_GRACE_S = 5.0

RankFn = Callable[..., Any]  # fn(rank, world_size, *args) -> result (rank 0's is returned)


class RankFailed(RuntimeError):
    """A rank raised, died or timed out; the message names the rank and carries its traceback."""


def nccl_semantics_from_env() -> NcclSemantics:
    """``COMFYUI_XDIT_NCCL_SEMANTICS=1`` (the test suite sets it) runs local ranks under NCCL's rules;
    ``COMFYUI_XDIT_NCCL_WAIT_S`` bounds every wait (default 60 s)."""
    return from_env()


def _rank_main(rank: int, world_size: int, store_file: str, fn: RankFn, args: tuple, results: Any,
               collective_timeout: float, threads: int, nccl: NcclSemantics) -> None:
    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's pair sockets on loopback (this child only)
    try:
        init_distributed(rank, world_size, HOST, 0, "gloo", collective_timeout, store_file=store_file)
        shim = install(nccl, collective_timeout)
        result = fn(rank, world_size, *args)
        if shim is not None:
            shim.finish()
        results.put(("ok", rank, pickle.dumps(result) if rank == 0 else None))
    except ValueError as exc:  # bad user input: the caller re-raises it as a ValueError
        results.put(("value_error", rank, str(exc)))
        raise
    except BaseException:  # report everything (also KeyboardInterrupt) before dying: a silent rank hangs the rest
        results.put(("error", rank, traceback.format_exc()))
        raise
    finally:
        shutdown_distributed()


def _stop(processes: Sequence[mp.Process]) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + KILL_GRACE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(KILL_GRACE_S)


def run_ranks(world_size: int, fn: RankFn, args: tuple = (), timeout: float = RUN_TIMEOUT_S,
              collective_timeout: float = DEFAULT_TIMEOUT_S, threads_per_rank: int = 1,
              nccl: Optional[NcclSemantics] = None) -> Any:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local gloo ranks; return rank 0's result.

    ``nccl`` (default: from the environment, ``nccl_semantics_from_env``) enforces NCCL's point-to-point
    and ordering rules in the ranks (``nccl_semantics.py``), so code that only gloo's buffering lets
    finish fails here instead of hanging on GPUs.
    ``fn`` must be importable (a module-level function). A rank's ``ValueError`` is re-raised as a
    ``ValueError``; anything else as ``RankFailed`` naming the first rank that failed, or the ranks
    still running at the deadline. No child outlives this call.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    results = context.Queue()
    rendezvous_dir = tempfile.mkdtemp(prefix="xdit-ranks-")
    store_file = os.path.join(rendezvous_dir, "store")
    processes = [context.Process(target=_rank_main, name=f"xdit-rank-{rank}", daemon=True,
                                 args=(rank, world_size, store_file, fn, args, results, collective_timeout,
                                       threads_per_rank, nccl if nccl is not None else nccl_semantics_from_env()))
                 for rank in range(world_size)]
    deadline = time.monotonic() + timeout
    done: set[int] = set()
    answer: Optional[bytes] = None
    try:
        for process in processes:
            process.start()
        while len(done) < world_size:
            try:
                kind, rank, payload = results.get(timeout=POLL_S)
            except queue_module.Empty:
                dead = [p for r, p in enumerate(processes) if r not in done and p.exitcode not in (None, 0)]
                if dead:
                    raise RankFailed(f"{dead[0].name} died with exit code {dead[0].exitcode} before reporting")
                if time.monotonic() > deadline:
                    waiting = sorted(set(range(world_size)) - done)
                    raise RankFailed(f"ranks {waiting} did not finish within {timeout:.0f} s")
                continue
            if kind == "value_error":
                raise ValueError(payload)
            if kind == "error":
                raise RankFailed(f"rank {rank} of {world_size} failed:\n{payload}")
            done.add(rank)
            if rank == 0:
                answer = payload
        for process in processes:
            process.join(max(1.0, deadline - time.monotonic()))
    finally:
        _stop(processes)
        results.close()
        shutil.rmtree(rendezvous_dir, ignore_errors=True)
    assert answer is not None
    return pickle.loads(answer)


@dataclass(frozen=True)
class RankResult:
    """Rank 0's latent for one request and the bytes it sent, {step: {axis: bytes}}."""

    latent: torch.Tensor
    comm_bytes: dict[int, dict[str, int]]


def generate_requests(rank: int, world_size: int, requests: Sequence[GenerationRequest]) -> list[RankResult]:
    """Rank body: load each model once (a PipeFusion stage only its blocks; with ``shard_weights`` sharded
    over the ranks that run the same blocks), then sample every request with its own mesh and engine."""
    from ..model_loader import load_model, model_spec
    from . import create_engine
    from .comm import CommCounter
    from .mesh import Mesh
    from .pipefusion_schedule import stage_blocks
    from .weight_sharding import shard_weights, sharing

    adapters = {}
    out = []
    for request in requests:
        spec = model_spec(request.model)
        blocks = stage_blocks(request.parallel, rank, spec)
        key = (request.model, blocks, sharing(request.parallel, rank))  # a sharded model serves its shard group
        if key not in adapters:
            adapters[key] = load_model(request.model, blocks=blocks)
            if request.parallel.shard_weights:
                shard_weights(adapters[key], request.parallel, rank)
        counter = CommCounter()
        mesh = Mesh.build(request.parallel, rank)
        engine = create_engine(adapters[key], request.parallel, rank, mesh, counter)
        latent = engine.generate(request)
        out.append(RankResult(latent, counter.per_step()))
        logger.info("rank %d: %s done", rank, request.parallel.describe())
    return out


def generate_local_many(requests: Sequence[GenerationRequest], timeout: float = RUN_TIMEOUT_S) -> list[RankResult]:
    """Sample several requests of one world size on one set of spawned ranks (spawning costs seconds)."""
    sizes = {request.parallel.world_size for request in requests}
    if len(sizes) != 1:
        raise ValueError(f"requests need world sizes {sorted(sizes)}; group them by world size")
    return run_ranks(sizes.pop(), generate_requests, (list(requests),), timeout)


def stop_helper_processes() -> None:
    """Stop multiprocessing's fork server and resource tracker, which otherwise live, idle, until this
    process exits (e.g. at the end of a test module). Both restart on the next ``run_ranks``."""
    from multiprocessing import forkserver, resource_tracker

    for helper in (getattr(forkserver, "_forkserver", None), getattr(resource_tracker, "_resource_tracker", None)):
        if helper is None or not hasattr(helper, "_stop"):
            logger.warning("cannot stop multiprocessing helper %r on this Python; it exits with this process", helper)
            continue
        helper._stop()


def generate_local(request: GenerationRequest, timeout: float = RUN_TIMEOUT_S) -> torch.Tensor:
    """Rank 0's LATENT for ``request`` sampled on ``request.parallel.world_size`` local CPU processes."""
    return generate_local_many([request], timeout)[0].latent
