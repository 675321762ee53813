"""Without Ray: which rank a set of heartbeats shows stuck (liveness.py), who holds which devices (leases.py)."""

from __future__ import annotations

import pytest

from comfyui_xdit_workers.leases import (Lease, client_of, describe_holders, group_name, leases_from_table,
                                         others_waiting)
from comfyui_xdit_workers.liveness import Beat, describe_beats, find_stall, first_beats
from comfyui_xdit_workers.settings import Timeouts


def test_fresh_beats_are_not_a_stall_until_the_bound() -> None:
    beats = first_beats(3, now=100.0)
    assert find_stall(beats, now=104.0, stall_s=5.0) is None
    stall = find_stall(beats, now=106.0, stall_s=5.0)  # nobody answered at all: the first rank is named
    assert stall is not None and stall.rank == 0 and "before its first step" in stall.reason


def test_a_silent_rank_is_named_with_its_last_step() -> None:
    beats = [b.heard(100.0, 3) for b in first_beats(2, now=90.0)]
    beats[0] = beats[0].heard(108.0, 4)  # rank 0 answers; rank 1 went quiet at t=100 (SIGSTOP)
    assert find_stall(beats, now=104.0, stall_s=5.0) is None
    stall = find_stall(beats, now=109.0, stall_s=5.0)
    assert stall is not None and stall.rank == 1
    assert stall.reason == "no heartbeat for 9s (limit 5s), last seen at step 3"


def test_the_most_silent_rank_is_named_first() -> None:
    beats = [Beat(0, seen_at=10.0, step=2), Beat(1, seen_at=5.0, step=2), Beat(2, seen_at=20.0, step=2)]
    assert find_stall(beats, now=30.0, stall_s=5.0).rank == 1


def test_a_rank_stuck_at_a_step_its_peers_passed_is_named() -> None:
    b0, b1 = first_beats(2, now=0.0)
    b0, b1 = b0.heard(1.0, 2), b1.heard(1.0, 2)
    for t in range(2, 12):  # both keep answering; rank 0 moves on, rank 1 never leaves step 2
        b0, b1 = b0.heard(float(t), 3), b1.heard(float(t), 2)
    assert b1.step_at == 1.0 and b0.step_at == 2.0
    assert find_stall([b0, b1], now=5.0, stall_s=5.0) is None
    stall = find_stall([b0, b1], now=11.0, stall_s=5.0)
    assert stall is not None and stall.rank == 1
    assert stall.reason == "stuck at step 2 for 10s (limit 5s) while rank 0 is at step 3"


def test_ranks_at_the_same_step_are_slow_not_stuck() -> None:
    beats = [b.heard(1.0, 7) for b in first_beats(4, now=0.0)]
    beats = [b.heard(500.0, 7) for b in beats]  # a long step: every rank answers, none advanced
    assert find_stall(beats, now=501.0, stall_s=5.0) is None
    assert describe_beats(beats[:2], now=503.0) == "rank 0: step 7, answered 3s ago; rank 1: step 7, answered 3s ago"


def test_heard_keeps_the_time_a_step_was_first_seen() -> None:
    beat = Beat(0, seen_at=0.0).heard(1.0, 1).heard(2.0, 1).heard(3.0, 2)
    assert (beat.seen_at, beat.step, beat.step_at) == (3.0, 2, 3.0)


def test_stall_timeouts_must_be_positive() -> None:
    assert Timeouts().stall_s <= 120 and Timeouts(stall_s=3).stall_s == 3
    with pytest.raises(ValueError, match="stall_s must be positive"):
        Timeouts(stall_s=0)


# two rows as ``ray.util.placement_group_table()`` gives them (trimmed)
TABLE = {
    "c84e": {"name": "xdit/hostA:11:aa/0", "state": "CREATED", "bundles": {0: {"CPU": 1.0}, 1: {"CPU": 1.0}},
             "bundles_to_node_id": {0: "node1", 1: "node1"}, "stats": {"scheduling_state": "FINISHED"}},
    "b39b": {"name": "xdit/hostB:22:bb/0", "state": "PENDING", "bundles": {0: {"GPU": 1.0}},
             "bundles_to_node_id": {0: ""}, "stats": {"scheduling_state": "NO_RESOURCES"}},
    "d00d": {"name": "xdit/hostC:33:cc/1", "state": "REMOVED", "bundles": {0: {"CPU": 1.0}},
             "bundles_to_node_id": {0: ""}, "stats": {}},
    "e11e": {"name": "someone-else", "state": "CREATED", "bundles": {0: {"CPU": 1.0}},
             "bundles_to_node_id": {0: "node1"}, "stats": {}},
    "f22f": {"name": "xdit/hostD:44:dd/0", "state": "PENDING", "bundles": {0: {"CPU": 1.0}},
             "bundles_to_node_id": {0: ""}, "stats": {"scheduling_state": "SCHEDULING"}},
}


def test_leases_from_the_placement_group_table() -> None:
    assert client_of(group_name("h:1:ab", 3)) == "h:1:ab" and client_of("someone-else") is None
    leases = leases_from_table(TABLE, {"node1": "10.0.0.1"})
    assert leases == (Lease("hostA:11:aa", "held", 2, "CPU", ("10.0.0.1", "10.0.0.1"), "c84e"),
                      Lease("hostB:22:bb", "waiting", 1, "GPU", (), "b39b"),
                      Lease("hostD:44:dd", "starting", 1, "CPU", (), "f22f"))
    assert others_waiting(leases, me="hostA:11:aa") and not others_waiting(leases, me="hostB:22:bb")
    assert not others_waiting(leases[::2], me="x")  # a group being placed right now waits for nobody
    assert describe_holders(leases) == ("hostA:11:aa holds 2 CPU on 10.0.0.1; hostB:22:bb waits for 1 GPU; "
                                        "hostD:44:dd is placing 1 CPU")
    assert describe_holders(()) == "no pool holds devices"
