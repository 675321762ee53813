"""Pools in real use on one embedded CPU runtime (2 CPUs), one pool per test so each test's devices come free.

Stalls: a rank that stops (SIGSTOP) mid-job is found within Timeouts.stall_s, named by rank, host and
pid, its processes killed, the job retried once or failed; the status never waits on it.
Sharing: two pools (clients) run at once on disjoint devices, and take turns when there is no room."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import torch

from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit_workers import JobState, PoolSettings, Timeouts, WorkerStalled, XDiTPool

TINY = ModelRef("tiny:flux")
STALL_S = 5.0
TIMEOUTS = Timeouts(step_s=120, start_s=120, stall_s=STALL_S, heartbeat_s=0.5)
SETTINGS = PoolSettings(embedded_num_cpus=2, timeouts=TIMEOUTS)


def request(steps: int, seed: int = 0, size: int = 8, parallel: ParallelConfig = ParallelConfig()) -> GenerationRequest:
    positive, _ = tiny_conditioning(TINY, seed)
    return GenerationRequest(model=TINY, latent=torch.zeros(1, 16, size, size), positive=positive, seed=seed,
                             steps=steps, parallel=parallel)


@pytest.fixture(scope="module")
def runtime():
    """Owns the embedded Ray runtime of the module and builds no world itself."""
    owner = XDiTPool(SETTINGS)
    try:
        yield owner.start()
    finally:
        owner.shutdown()


@pytest.fixture
def pool(runtime):
    """A pool of its own per test on the shared runtime: its world's CPUs are free again after the test."""
    pool = XDiTPool(SETTINGS)
    try:
        yield pool.start()
    finally:
        pool.shutdown()


def gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def kill_if_left(pid: int) -> None:
    """A failed test must not leave a stopped rank behind."""
    try:
        process = psutil.Process(pid)
        if "RankWorker" in " ".join(process.cmdline()):
            process.kill()
    except psutil.Error:
        pass


def serial(req: GenerationRequest) -> torch.Tensor:
    return Engine(load_model(TINY)).generate(req)


def quick_status(pool: XDiTPool):
    started = time.monotonic()
    status = pool.status()
    assert time.monotonic() - started < 1.0
    return status


def test_stopped_rank_fails_the_job_naming_rank_host_and_pid_and_status_never_waits(runtime: XDiTPool) -> None:
    no_retry = XDiTPool(PoolSettings(retry_once=False, timeouts=TIMEOUTS))  # shares the runtime
    pids: list[int] = []
    try:
        job = no_retry.submit(request(steps=400, seed=2, parallel=ParallelConfig(ulysses_degree=2)))
        next(iter(job.events(timeout=120)))
        time.sleep(2 * TIMEOUTS.heartbeat_s)  # a heartbeat or two came back
        status = quick_status(no_retry)  # while the job runs: from the heartbeats, not by asking busy ranks
        assert [r.state for r in status.ranks] == ["busy", "busy"] and status.running == job.id
        assert all(r.step is not None and r.heard_s is not None and r.heard_s < 3 for r in status.ranks)
        assert "step" in status.format()
        pids = [r.pid for r in status.ranks]
        os.kill(pids[1], signal.SIGSTOP)
        started = time.monotonic()
        time.sleep(2.0)
        stale = quick_status(no_retry).ranks[1]  # a stopped rank does not slow the status down either
        assert stale.heard_s is not None and stale.heard_s >= 1.5
        with pytest.raises(WorkerStalled, match=rf"rank 1 on host 127\.0\.0\.1 \(node \w+, pid {pids[1]}\) failed in "
                                                rf"generate: stalled: no heartbeat for \d+s \(limit 5s\)"):
            job.result(timeout=60)
        took = time.monotonic() - started
        assert took < STALL_S + 5, took  # the bound runs from its last heartbeat, which came before the stop
        assert all(gone(pid, within_s=10) for pid in pids)  # the stopped rank and its waiting peer
        assert no_retry.submit(request(steps=2)).result(timeout=120) is not None  # a fresh world serves the next
    finally:
        for pid in pids:
            kill_if_left(pid)
        no_retry.shutdown()


@pytest.mark.slow  # the retry path itself is the dead-worker one (test_pool.py); this adds the stopped rank
def test_stopped_rank_is_retried_once_on_a_rebuilt_world(pool: XDiTPool) -> None:
    pool.submit(request(steps=1)).result(timeout=120)  # a one-rank world
    pid = pool.status().ranks[0].pid
    req = request(steps=40, seed=3)
    try:
        job = pool.submit(req)
        next(iter(job.events(timeout=120)))
        os.kill(pid, signal.SIGSTOP)
        torch.testing.assert_close(job.result(timeout=120), serial(req))
        assert job.attempts == 2 and gone(pid, within_s=10) and pool.status().ranks[0].pid != pid
    finally:
        kill_if_left(pid)


@pytest.fixture
def two_pools(runtime):
    calm = PoolSettings(embedded_num_cpus=2, timeouts=Timeouts(step_s=120, start_s=120, stall_s=30))
    pools = [XDiTPool(calm).start(), XDiTPool(calm).start()]  # two jobs share 2 busy cores: a calmer stall bound
    try:
        yield pools
    finally:
        for pool in pools:
            pool.shutdown()


def test_two_pools_run_at_once_on_disjoint_devices(two_pools) -> None:
    a, b = two_pools
    jobs = [a.submit(request(steps=400, seed=1)), b.submit(request(steps=400, seed=2))]
    for job in jobs:
        next(iter(job.events(timeout=120)))
    assert all(job.state is JobState.RUNNING for job in jobs)  # both at the same time, one CPU each
    status = a.status()
    held = {lease.client: lease.devices for lease in status.leases if lease.state == "held"}
    assert held == {a.client: 1, b.client: 1}
    assert {r.pid for r in status.ranks}.isdisjoint({r.pid for r in b.status().ranks})
    assert f"{b.client}" in status.format() and "held" in status.format()
    for job in jobs:
        job.cancel()
    assert all(job.wait(timeout=60) for job in jobs)


def test_an_idle_pool_lets_its_devices_go_to_a_waiting_one(two_pools) -> None:
    a, b = two_pools
    wide = request(steps=2, seed=3, parallel=ParallelConfig(ulysses_degree=2))
    torch.testing.assert_close(a.submit(wide).result(timeout=120), serial(request(steps=2, seed=3)),
                               rtol=1e-4, atol=1e-4)
    assert [lease.devices for lease in a.status().leases] == [2]  # a's idle world holds both CPUs
    started = time.monotonic()
    narrow = request(steps=2, seed=4)
    torch.testing.assert_close(b.submit(narrow).result(timeout=120), serial(narrow))  # a gave its world back
    assert time.monotonic() - started < 60
    torch.testing.assert_close(a.submit(wide).result(timeout=120), serial(request(steps=2, seed=3)),
                               rtol=1e-4, atol=1e-4)  # and b's idle world goes back to a
    assert [lease.client for lease in a.status().leases if lease.state == "held"] == [a.client]

