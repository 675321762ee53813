"""The embedded pool on CPU ranks: one local Ray runtime for the whole module (2 CPU ranks)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import signal
import time

import psutil
import pytest
import torch

from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.models.flux_checkpoint import NAMED_SPECS, write_random_flux
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sampling import GenerationCancelled
from comfyui_xdit_workers import JobState, ModelMissing, NotEnoughDevices, PoolSettings, Timeouts, WorkerLost, XDiTPool

TINY = ModelRef("tiny:flux")
SETTINGS = PoolSettings(embedded_num_cpus=2, timeouts=Timeouts(step_s=120, start_s=120))


def request(steps: int = 3, seed: int = 0, size: int = 16, parallel: ParallelConfig = ParallelConfig(),
            model: ModelRef = TINY) -> GenerationRequest:
    positive, _ = tiny_conditioning(TINY, seed)
    return GenerationRequest(model=model, latent=torch.zeros(1, 16, size, size), positive=positive, seed=seed,
                             steps=steps, parallel=parallel)


def serial(req: GenerationRequest) -> torch.Tensor:
    return Engine(load_model(TINY)).generate(req)


@pytest.fixture(scope="module")
def pool():
    pool = XDiTPool(SETTINGS)
    try:
        pool.start()
        yield pool
    finally:
        pool.shutdown()


def rank_pids(pool: XDiTPool) -> list[int]:
    return [r.pid for r in pool.status().ranks]


def test_events_stream_and_latent_equals_serial(pool: XDiTPool) -> None:
    req = request(steps=3, seed=5)
    job = pool.submit(req)
    events = list(job.events(timeout=120))
    latent = job.result(timeout=60)
    assert [(e.step, e.total) for e in events] == [(1, 3), (2, 3), (3, 3)]
    assert all(e.preview is not None and e.preview.shape == (1, 16, 16, 16) for e in events)
    torch.testing.assert_close(latent, serial(req))
    assert job.state is JobState.DONE
    status = pool.status()
    assert [(r.rank, r.state, r.model) for r in status.ranks] == [(0, "idle", "tiny:flux")]
    assert "rank 0" in status.format() and status.auth == "token"


def test_every_listening_socket_is_loopback_and_auth_is_on(pool: XDiTPool) -> None:
    # A 2-rank world, so torch.distributed's rendezvous and gloo's sockets are among those checked.
    pool.warm(ParallelConfig(ulysses_degree=2))
    me = psutil.Process()
    listening = []
    for process in [me, *me.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="inet")
        except psutil.Error:
            continue
        listening += [(process.name(), c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN]
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, f"Ray's processes not found among {names}"

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip.split("%")[0])
        mapped = getattr(address, "ipv4_mapped", None)
        return (mapped or address).is_loopback

    exposed = [entry for entry in listening if not loopback(entry[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert pool.status().auth == "token"


def test_two_jobs_queue_in_order(pool: XDiTPool) -> None:
    first, second = pool.submit(request(steps=3, seed=1)), pool.submit(request(steps=2, seed=2))
    a, b = first.result(timeout=120), second.result(timeout=120)
    torch.testing.assert_close(b, serial(request(steps=2, seed=2)))
    assert not torch.equal(a, b) and first.state is second.state is JobState.DONE


def test_not_enough_devices_names_the_numbers(pool: XDiTPool) -> None:
    job = pool.submit(request(parallel=ParallelConfig(ulysses_degree=2, pipefusion_degree=2)))
    with pytest.raises(NotEnoughDevices, match="needs 4 devices, the cluster has 2"):
        job.result(timeout=60)
    assert pool.submit(request(steps=1)).result(timeout=120) is not None


def test_model_file_and_missing_file(pool: XDiTPool, tmp_path) -> None:
    path = tmp_path / "tiny-flux.safetensors"
    write_random_flux(str(path), NAMED_SPECS["flux"], seed=0)
    req = request(steps=2, model=ModelRef(str(path)))
    torch.testing.assert_close(pool.submit(req).result(timeout=120), serial(request(steps=2)))
    assert pool.status().ranks[0].weights == f"local file {path}"
    missing = pool.submit(request(model=ModelRef(str(tmp_path / "nowhere.safetensors"))))
    with pytest.raises(ModelMissing, match=r"missing on host\(s\) 127.0.0.1 .*and on this machine"):
        missing.result(timeout=60)


def test_sequence_parallel_world_matches_serial_and_cancel_stops_all_ranks(pool: XDiTPool) -> None:
    parallel = ParallelConfig(ulysses_degree=2)
    req = request(steps=3, seed=3, parallel=parallel)
    torch.testing.assert_close(pool.submit(req).result(timeout=180), serial(request(steps=3, seed=3)),
                               rtol=1e-4, atol=1e-4)
    long = pool.submit(request(steps=500, seed=4, parallel=parallel))
    seen = []
    for event in long.events(timeout=120):
        seen.append(event.step)
        if event.step == 2:
            long.cancel()
    with pytest.raises(GenerationCancelled):
        long.result(timeout=60)
    assert long.state is JobState.CANCELLED and max(seen) < 10  # stopped within a step or two
    assert [r.state for r in pool.status().ranks] == ["idle", "idle"]  # both ranks left the job
    torch.testing.assert_close(pool.submit(req).result(timeout=120), serial(request(steps=3, seed=3)),
                               rtol=1e-4, atol=1e-4)
    pids = rank_pids(pool)  # same world size and host layout: the actors and the loaded model stay
    ring = request(steps=2, seed=3, parallel=ParallelConfig(ring_degree=2))
    torch.testing.assert_close(pool.submit(ring).result(timeout=120), serial(request(steps=2, seed=3)),
                               rtol=1e-4, atol=1e-4)
    assert rank_pids(pool) == pids


def test_pipefusion_ranks_hold_their_stage_and_obey_nccl_rules(pool: XDiTPool) -> None:
    import ray

    parallel = ParallelConfig(pipefusion_degree=2, num_patches=2, warmup_steps=2)  # warm-up = steps: exact
    torch.testing.assert_close(pool.submit(request(steps=2, seed=5, parallel=parallel)).result(timeout=180),
                               serial(request(steps=2, seed=5)), rtol=1e-4, atol=1e-4)
    assert [r.weights for r in pool.status().ranks] == ["built in (blocks 0-1)", "built in (blocks 2-3)"]
    # the suite's NCCL-semantics mode reached the pool's gloo world (conftest sets it before Ray starts)
    rules = [ray.get(a.__ray_call__.remote(lambda worker: worker.nccl_rules is not None)) for a in pool._world.actors]
    assert rules == [True, True]


def test_data_groups_split_the_batch_and_rank_0_returns_it_whole(pool: XDiTPool) -> None:
    batch = dataclasses.replace(request(steps=2, seed=6), latent=torch.zeros(2, 16, 16, 16))
    result = pool.submit(dataclasses.replace(batch, parallel=ParallelConfig(data_degree=2))).result(timeout=180)
    assert result.shape == (2, 16, 16, 16)
    torch.testing.assert_close(result, serial(batch), rtol=1e-4, atol=1e-4)


def test_killed_worker_is_retried_once_on_a_rebuilt_world_and_resumes(pool: XDiTPool) -> None:
    pool.submit(request(steps=1)).result(timeout=120)  # world of one rank
    pid = rank_pids(pool)[0]
    # long enough to still run when the kill lands; a multistep sampler: its history is in the checkpoint
    req = dataclasses.replace(request(steps=60, seed=6, size=8), sampler="dpmpp_2m")
    job = pool.submit(req)
    events = job.events(timeout=120)
    steps = [next(events).step for _ in range(3)]
    os.kill(pid, signal.SIGKILL)
    steps += [event.step for event in events]
    assert torch.equal(job.result(timeout=180), serial(req))  # resumed: the uninterrupted run's latent, bit for bit
    assert job.attempts == 2 and rank_pids(pool)[0] != pid
    # progress went on from the last checkpoint the driver had, not from step 1 again
    assert steps.count(1) == 1 and steps[-1] == 60 and set(steps) == set(range(1, 61)), steps
    assert job.checkpoint is not None and job.checkpoint.calls == 60


def test_killed_pipefusion_stage_resumes_from_every_ranks_parts(pool: XDiTPool) -> None:
    """A PipeFusion job whose last stage is SIGKILLed after warm-up resumes on the rebuilt world from the
    checkpoint put together from both ranks' parts (the stale K/V included) and gives the uninterrupted
    run's latent, bit for bit."""
    parallel = ParallelConfig(pipefusion_degree=2, num_patches=2, warmup_steps=1)
    # long enough to still run when the kill lands on a fast machine (the kill follows the second step's event)
    req = dataclasses.replace(request(steps=300, seed=9, size=8, parallel=parallel), sampler="dpmpp_2m")
    whole = pool.submit(req).result(timeout=300)
    pid = rank_pids(pool)[1]
    job = pool.submit(req)
    events = job.events(timeout=120)
    steps = [next(events).step for _ in range(2)]
    os.kill(pid, signal.SIGKILL)
    steps += [event.step for event in events]
    assert torch.equal(job.result(timeout=300), whole)
    assert job.attempts == 2 and rank_pids(pool)[1] != pid, "the job ended before the kill landed"
    assert steps.count(1) == 1 and steps[-1] == 300 and set(steps) == set(range(1, 301)), steps
    assert job.checkpoint is not None and sorted(job.checkpoint.kv) == [0, 1]


def test_killed_worker_without_retry_fails_naming_rank_and_host(pool: XDiTPool) -> None:
    no_retry = XDiTPool(PoolSettings(retry_once=False, timeouts=SETTINGS.timeouts))  # shares the runtime
    try:
        no_retry.submit(request(steps=1)).result(timeout=120)
        pid = rank_pids(no_retry)[0]
        job = no_retry.submit(request(steps=200, seed=7))
        next(iter(job.events(timeout=120)))
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerLost, match=r"rank 0 on host 127.0.0.1 .*pid \d+\) failed in generate"):
            job.result(timeout=60)
        assert time.monotonic() - started < 30
        torch.testing.assert_close(no_retry.submit(request(steps=2)).result(timeout=120), serial(request(steps=2)))
        running, queued = no_retry.submit(request(steps=500, seed=8)), no_retry.submit(request(steps=2))
        next(iter(running.events(timeout=120)))
        started = time.monotonic()
        no_retry.shutdown()  # explicit shutdown while a job runs: bounded, and nothing is left hanging
        assert time.monotonic() - started < 30
        assert running.wait(timeout=5) and running.state in (JobState.CANCELLED, JobState.FAILED)
        assert queued.wait(timeout=5) and queued.state is JobState.FAILED
    finally:
        no_retry.shutdown()


def test_alternating_models_stay_loaded_on_the_ranks(pool: XDiTPool) -> None:
    """Wan 2.2's two experts in one prompt: each rank keeps two models (models_per_rank), so alternating
    ones are built once; a third evicts the least recently used one."""
    sd3_ref = ModelRef("tiny:sd3")
    positive, _ = tiny_conditioning(sd3_ref, 1)
    sd3 = GenerationRequest(model=sd3_ref, latent=torch.zeros(1, 16, 16, 16), positive=positive, seed=1, steps=2)
    flux = request(steps=2, seed=1)
    bf16 = dataclasses.replace(flux, model=ModelRef("tiny:flux", dtype="bf16"))
    pool.submit(flux).result(timeout=120)
    loads = lambda: sum(r.loads for r in pool.status().ranks)  # noqa: E731 - read twice below
    before = loads()
    for req in (sd3, flux, sd3, flux):
        assert torch.equal(pool.submit(req).result(timeout=180), Engine(load_model(req.model)).generate(req))
    assert loads() == before + 1  # sd3 built once, flux never again
    pool.submit(bf16).result(timeout=180)  # a third model: sd3 (least recently used) goes
    pool.submit(flux).result(timeout=180)
    assert loads() == before + 2
    pool.submit(sd3).result(timeout=180)
    assert loads() == before + 3
