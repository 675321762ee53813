"""The NCCL-semantics mode: gloo ranks that fail where NCCL would hang or mix messages.

Each rule is shown to bite on a small exchange that gloo alone lets finish (or hang), and the patterns
our engines use (batched ring exchange, one group per direction, chains) are shown to pass. Every
other gloo test of the suite runs under the mode too (``conftest.nccl_semantics_everywhere``).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from comfyui_xdit.parallel.launch import RankFailed, nccl_semantics_from_env, run_ranks, stop_helper_processes
from comfyui_xdit.parallel.nccl_semantics import NcclSemantics

SHORT = NcclSemantics(enabled=True, wait_bound_s=5.0)
GLOO_ONLY = NcclSemantics(enabled=False)
TIMEOUT_S = 90


@pytest.fixture(scope="module", autouse=True)
def _no_helpers_left():
    yield
    stop_helper_processes()


def send_then_receive_one_group(rank: int, world_size: int) -> list[float]:
    """Each rank sends to the other, then receives, on one group: PipeFusion's old exchange with 2 stages."""
    peer = 1 - rank
    work = dist.isend(torch.full((4,), float(rank)), peer)
    received = torch.empty(4)
    dist.recv(received, peer)
    work.wait()
    return received.tolist()


def send_then_receive_two_groups(rank: int, world_size: int) -> list[float]:
    """The same exchange, each direction on its own group (what PipeLinks does now)."""
    rank0_to_1, rank1_to_0 = dist.new_group([0, 1]), dist.new_group([0, 1])
    peer = 1 - rank
    work = dist.isend(torch.full((4,), float(rank)), peer, group=rank0_to_1 if rank == 0 else rank1_to_0)
    received = torch.empty(4)
    dist.recv(received, peer, group=rank1_to_0 if rank == 0 else rank0_to_1)
    work.wait()
    return received.tolist()


def batched_exchange(rank: int, world_size: int) -> list[float]:
    """yunchang's ring step: send to the next, receive from the previous, as one batch."""
    ring = dist.new_group(list(range(world_size)))
    sent, received = torch.full((3,), float(rank)), torch.empty(3)
    ops = [dist.P2POp(dist.isend, sent, (rank + 1) % world_size, group=ring),
           dist.P2POp(dist.irecv, received, (rank - 1) % world_size, group=ring)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return received.tolist()


def chain_in_posting_order(rank: int, world_size: int) -> list[float]:
    """Rank 0 sends two messages and then waits for an answer built from both: matched by order."""
    if rank == 0:
        works = [dist.isend(torch.full((2,), float(i + 1)), 1) for i in range(2)]
        answer = torch.empty(2)
        dist.recv(answer, 1)
        for work in works:
            work.wait()
        return answer.tolist()
    first, second = torch.empty(2), torch.empty(2)
    dist.recv(first, 0)
    dist.recv(second, 0)
    dist.send(first * 10 + second, 0)
    return []


def tagged_message(rank: int, world_size: int) -> None:
    if rank == 0:
        dist.send(torch.ones(2), 1, tag=7)
    else:
        dist.recv(torch.empty(2), 0, tag=7)


def collectives_out_of_order(rank: int, world_size: int) -> None:
    group = dist.new_group([0, 1])
    value = torch.ones(3)
    dist.all_reduce(value, group=group)
    if rank == 0:
        dist.broadcast(value, 0, group=group)
    else:
        dist.all_reduce(value, group=group)


def collective_behind_unreceived_send(rank: int, world_size: int) -> None:
    """Rank 0 sends, then joins an all-reduce before rank 1 posts the receive: on one communicator the
    all-reduce queues behind the send, which waits for a receive rank 1 posts only after the all-reduce."""
    value = torch.ones(1)
    if rank == 0:
        work = dist.isend(torch.ones(2), 1)
        dist.all_reduce(value)
        work.wait()
    else:
        dist.all_reduce(value)
        dist.recv(torch.empty(2), 0)


def mode_in_this_rank(rank: int, world_size: int) -> str:
    return dist.P2POp.__module__


def test_the_suite_runs_under_nccl_semantics() -> None:
    assert nccl_semantics_from_env().enabled
    assert run_ranks(2, mode_in_this_rank, timeout=TIMEOUT_S) == "comfyui_xdit.parallel.nccl_semantics"


def test_circular_wait_finishes_on_gloo_but_is_an_error_under_nccl_rules() -> None:
    assert run_ranks(2, send_then_receive_one_group, timeout=TIMEOUT_S, nccl=GLOO_ONLY) == [1.0] * 4
    started = time.monotonic()
    with pytest.raises(RankFailed, match="waited more than 5s for rank . to post the receive matching a send"):
        run_ranks(2, send_then_receive_one_group, timeout=TIMEOUT_S, nccl=SHORT)
    assert time.monotonic() - started < 60, "the watchdog, not the run's timeout, must end a circular wait"


def test_one_group_per_direction_passes() -> None:
    assert run_ranks(2, send_then_receive_two_groups, timeout=TIMEOUT_S, nccl=SHORT) == [1.0] * 4


@pytest.mark.parametrize("world", [2, 4])
def test_batched_ring_exchange_passes(world: int) -> None:
    assert run_ranks(world, batched_exchange, timeout=TIMEOUT_S, nccl=SHORT) == [float(world - 1)] * 3


def test_messages_match_in_posting_order() -> None:
    assert run_ranks(2, chain_in_posting_order, timeout=TIMEOUT_S, nccl=SHORT) == [12.0, 12.0]


def test_tags_are_refused() -> None:
    run_ranks(2, tagged_message, timeout=TIMEOUT_S, nccl=GLOO_ONLY)  # gloo takes them
    with pytest.raises(RankFailed, match="uses tag 7; NCCL ignores tags"):
        run_ranks(2, tagged_message, timeout=TIMEOUT_S, nccl=SHORT)


def test_collectives_out_of_order_are_named() -> None:
    with pytest.raises(RankFailed, match=r"different collectives at the same point: \['broadcast\[\(3,\)float32\]', "
                                         r"'all_reduce\[\(3,\)float32\]'\]"):
        run_ranks(2, collectives_out_of_order, timeout=TIMEOUT_S, nccl=SHORT)


def test_a_collective_waits_behind_its_groups_sends() -> None:
    run_ranks(2, collective_behind_unreceived_send, timeout=TIMEOUT_S, nccl=GLOO_ONLY)  # gloo buffers the send
    with pytest.raises(RankFailed, match="waited more than 5s"):
        run_ranks(2, collective_behind_unreceived_send, timeout=TIMEOUT_S, nccl=SHORT)


def test_wait_bound_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFYUI_XDIT_NCCL_WAIT_S", "7")
    assert nccl_semantics_from_env().wait_bound_s == 7.0
    monkeypatch.setenv("COMFYUI_XDIT_NCCL_SEMANTICS", "0")
    assert not nccl_semantics_from_env().enabled
